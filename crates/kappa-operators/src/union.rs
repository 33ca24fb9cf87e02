//! UNION ALL: the multiset sum of its inputs. The planner has already cast every input to
//! the union's column types; this only relabels the columns.

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{ChangeBatch, Result};

use crate::Operator;

pub struct Union {
    schema: SchemaRef,
}

impl Union {
    pub fn new(schema: SchemaRef) -> Self {
        Self { schema }
    }
}

impl Operator for Union {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let data = crate::batch_with_rows(
            self.schema.clone(),
            batch.columns().to_vec(),
            batch.num_rows(),
        )?;
        out.push(batch.with_data(data)?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamUnion"
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_changes, changes, schema};

    #[test]
    fn sums_its_inputs_under_its_own_column_names() {
        let mut op = Union::new(schema("u:i64"));
        let mut out = vec![];
        op.process(0, changes("a:i64", "+ 1\n+ 2"), &mut out)
            .unwrap();
        op.process(1, changes("b:i64", "- 1\n+ 3"), &mut out)
            .unwrap();
        assert_changes(&out, "+ 2\n+ 3");
        assert!(out.iter().all(|b| b.schema().field(0).name() == "u"));
    }
}

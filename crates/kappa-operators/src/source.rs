//! The entry of a relation's changelog into a view's dataflow.

use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{ChangeBatch, Result};

use crate::Operator;

/// Passes a relation's changes on, keeping only the projected columns.
pub struct SourceScan {
    projection: Option<Vec<usize>>,
    schema: SchemaRef,
}

impl SourceScan {
    pub fn new(projection: Option<Vec<usize>>, schema: SchemaRef) -> Self {
        Self { projection, schema }
    }
}

impl Operator for SourceScan {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let columns = match &self.projection {
            Some(p) => p.iter().map(|&i| batch.columns()[i].clone()).collect(),
            None => batch.columns().to_vec(),
        };
        let data = crate::batch_with_rows(self.schema.clone(), columns, batch.num_rows())?;
        out.push(batch.with_data(data)?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamScan"
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_changes, changes, schema};

    #[test]
    fn keeps_projected_columns_and_weights() {
        let mut op = SourceScan::new(Some(vec![1]), schema("b:utf8"));
        let mut out = vec![];
        op.process(0, changes("a:i64, b:utf8", "+ 1 | x\n-2 2 | y"), &mut out)
            .unwrap();
        assert_changes(&out, "+ x\n-2 y");
    }

    #[test]
    fn a_projection_of_no_columns_keeps_the_row_count() {
        let mut op = SourceScan::new(
            Some(vec![]),
            std::sync::Arc::new(datafusion::arrow::datatypes::Schema::empty()),
        );
        let mut out = vec![];
        op.process(0, changes("a:i64", "+ 1\n+ 2\n- 3"), &mut out)
            .unwrap();
        assert_eq!(out[0].num_rows(), 3);
        assert_eq!(out[0].weights().values().iter().sum::<i64>(), 1);
    }
}

//! Projection: one output column per scalar expression; weights pass through unchanged.

use std::sync::Arc;

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Result};

use crate::Operator;

pub struct Project {
    exprs: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
}

impl Project {
    pub fn new(exprs: Vec<Arc<dyn PhysicalExpr>>, schema: SchemaRef) -> Self {
        Self { exprs, schema }
    }
}

impl Operator for Project {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let n = batch.num_rows();
        let columns = self
            .exprs
            .iter()
            .map(|e| e.evaluate(batch.data())?.into_array(n))
            .collect::<datafusion::error::Result<Vec<_>>>()?;
        let data = crate::batch_with_rows(self.schema.clone(), columns, n)?;
        out.push(batch.with_data(data)?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamProject"
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::testing::{assert_changes, changes, df_schema};

    #[test]
    fn projects_and_keeps_weights() -> Result<()> {
        let input = df_schema("a:i64, b:utf8");
        let ctx = SessionContext::new();
        let e = ctx.create_physical_expr(col("a") * lit(10i64), &input)?;
        let out_schema = df_schema("x:i64");
        let mut op = Project::new(vec![e], Arc::new(out_schema.as_arrow().clone()));
        let mut out = vec![];
        op.process(
            0,
            changes("a:i64, b:utf8", "+ 1 | x\n- 2 | y\n+ NULL | z"),
            &mut out,
        )?;
        assert_changes(&out, "+ 10\n- 20\n+ NULL");
        Ok(())
    }
}

//! Filter: keeps the rows whose predicate is true (NULL is not true); weights pass through.

use std::sync::Arc;

use datafusion::arrow::array::BooleanArray;
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, KappaError, Result};

use crate::Operator;

pub struct Filter {
    predicate: Arc<dyn PhysicalExpr>,
}

impl Filter {
    pub fn new(predicate: Arc<dyn PhysicalExpr>) -> Self {
        Self { predicate }
    }
}

impl Operator for Filter {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let mask = self
            .predicate
            .evaluate(batch.data())?
            .into_array(batch.num_rows())?;
        let mask = mask
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| KappaError::internal("filter predicate is not boolean"))?;
        let kept = batch.filter(mask)?;
        if !kept.is_empty() {
            out.push(kept);
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamFilter"
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;

    use super::*;
    use crate::testing::{assert_changes, changes, df_schema};

    #[test]
    fn keeps_true_rows_with_their_weights() -> Result<()> {
        let ctx = SessionContext::new();
        let p = ctx.create_physical_expr(col("a").gt(lit(1i64)), &df_schema("a:i64, b:utf8"))?;
        let mut op = Filter::new(p);
        let mut out = vec![];
        op.process(
            0,
            changes("a:i64, b:utf8", "+ 1 | x\n- 2 | y\n+ NULL | z\n+3 5 | w"),
            &mut out,
        )?;
        assert_changes(&out, "- 2 | y\n+3 5 | w");
        Ok(())
    }
}

//! The event clock of a table or source: its watermark and the late changes it holds back.
//!
//! The watermark is the largest value of the watermark expression over every row inserted
//! so far; it never goes back. Each write (a statement, a polled batch) is judged against
//! the watermark as it stood before the write: a change whose event time is below it is
//! late, dropped from what the views see, and counted. A NULL event time is never late.

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, Int64Array, RecordBatch};
use datafusion::arrow::compute::kernels::{boolean, cmp};
use datafusion::arrow::compute::{cast, is_null, max, min};
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::logical_expr::Operator;
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
use kappa_common::{ChangeBatch, Result};

pub(crate) struct EventClock {
    column: usize,
    expr: Arc<dyn PhysicalExpr>,
    /// Whether `expr` never decreases as its one column grows (`ts`, `ts - INTERVAL …`,
    /// `ts + …`): then the largest value of `expr` over a write is its value on the row with
    /// the largest `ts`, which is all [`EventClock::advance`] evaluates.
    monotone_in: Option<usize>,
    pub watermark: Option<i64>,
    /// Late changes since the last barrier took them.
    pub late: u64,
}

/// The column `e` grows with, if it is that column plus or minus constants.
fn monotone_column(e: &dyn PhysicalExpr) -> Option<usize> {
    let any: &dyn std::any::Any = e;
    if let Some(c) = any.downcast_ref::<Column>() {
        return Some(c.index());
    }
    let b = any.downcast_ref::<BinaryExpr>()?;
    let right: &dyn std::any::Any = b.right().as_ref();
    let constant = right.downcast_ref::<Literal>().is_some();
    match b.op() {
        Operator::Plus | Operator::Minus if constant => monotone_column(b.left().as_ref()),
        _ => None,
    }
}

impl EventClock {
    pub fn new(column: usize, expr: Arc<dyn PhysicalExpr>) -> Self {
        Self {
            column,
            monotone_in: monotone_column(expr.as_ref()),
            expr,
            watermark: None,
            late: 0,
        }
    }

    /// The columns the clock reads: its event-time column and the watermark expression's.
    pub fn columns(&self) -> impl Iterator<Item = usize> + use<> {
        let mut cols: Vec<usize> = datafusion::physical_expr::utils::collect_columns(&self.expr)
            .into_iter()
            .map(|c| c.index())
            .collect();
        cols.push(self.column);
        cols.into_iter()
    }

    /// The on-time part of `change` (all of it if nothing is late). Does not move the
    /// watermark: call [`EventClock::advance`] once the whole write is admitted.
    pub fn admit(&mut self, change: ChangeBatch) -> Result<ChangeBatch> {
        let Some(w) = self.watermark else {
            return Ok(change);
        };
        let ts = cast(&change.columns()[self.column], &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        // In order (the common case): nothing to filter.
        if min(ts).is_none_or(|m| m >= w) {
            return Ok(change);
        }
        // On time, or without an event time.
        let on_time = cmp::gt_eq(ts, &Int64Array::new_scalar(w))?;
        let keep: BooleanArray = boolean::or_kleene(&on_time, &is_null(ts)?)?;
        let dropped = change.num_rows() - keep.true_count();
        self.late += dropped as u64;
        change.filter(&keep)
    }

    /// Moves the watermark forward over inserted rows.
    pub fn advance(&mut self, inserted: &RecordBatch) -> Result<()> {
        if inserted.num_rows() == 0 {
            return Ok(());
        }
        let batch = match self.monotone_in {
            Some(col) => {
                let ts = cast(inserted.column(col), &DataType::Int64)?;
                let ts = ts.as_primitive::<Int64Type>();
                let Some(m) = max(ts) else {
                    return Ok(()); // all NULL: no event time
                };
                let at = (0..ts.len())
                    .find(|&i| ts.is_valid(i) && ts.value(i) == m)
                    .unwrap_or_default();
                inserted.slice(at, 1)
            }
            None => inserted.clone(),
        };
        let v = self.expr.evaluate(&batch)?.into_array(batch.num_rows())?;
        let v = cast(&v, &DataType::Int64)?;
        if let Some(m) = max(v.as_primitive::<Int64Type>()) {
            self.watermark = Some(self.watermark.map_or(m, |old| old.max(m)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::TimestampMicrosecondArray;
    use datafusion::arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::SessionContext;
    use datafusion::scalar::ScalarValue;

    use super::*;

    const SECOND: i64 = 1_000_000;

    fn batch(ts: &[Option<i64>]) -> RecordBatch {
        let schema = Schema::new(vec![
            Field::new("id", DataType::Int64, false),
            Field::new("ts", DataType::Timestamp(TimeUnit::Microsecond, None), true),
        ]);
        let ids = Int64Array::from_iter_values(0..ts.len() as i64);
        let ts = TimestampMicrosecondArray::from(ts.to_vec());
        RecordBatch::try_new(Arc::new(schema), vec![Arc::new(ids), Arc::new(ts)]).expect("batch")
    }

    /// A clock on `ts` with watermark expression `expr`.
    fn clock(expr: datafusion::logical_expr::Expr) -> EventClock {
        let schema = batch(&[]).schema();
        let df = DFSchema::try_from(schema.as_ref().clone()).expect("schema");
        let e = SessionContext::new()
            .create_physical_expr(expr, &df)
            .expect("expr");
        EventClock::new(1, e)
    }

    fn minus_seconds(s: i64) -> datafusion::logical_expr::Expr {
        col("ts") - lit(ScalarValue::new_interval_mdn(0, 0, s * 1_000_000_000))
    }

    #[test]
    fn the_watermark_is_the_largest_value_of_the_expression_whatever_its_form() {
        let rows = [Some(7 * SECOND), None, Some(9 * SECOND), Some(3 * SECOND)];
        // `ts - 5 s` is evaluated on the latest row only; `-ts` (not monotone) on all.
        let mut shifted = clock(minus_seconds(5));
        assert!(shifted.monotone_in.is_some());
        let as_int = datafusion::logical_expr::cast(col("ts"), DataType::Int64);
        let mut negated = clock(lit(0i64) - as_int);
        assert!(negated.monotone_in.is_none());
        shifted.advance(&batch(&rows)).expect("advance");
        negated.advance(&batch(&rows)).expect("advance");
        assert_eq!(shifted.watermark, Some(4 * SECOND));
        assert_eq!(
            negated.watermark,
            Some(-3 * SECOND),
            "0 - ts is largest at the smallest ts"
        );
        // It never goes back; all-NULL event times leave it alone.
        shifted.advance(&batch(&[Some(SECOND)])).expect("advance");
        shifted.advance(&batch(&[None, None])).expect("advance");
        assert_eq!(shifted.watermark, Some(4 * SECOND));
        shifted
            .advance(&batch(&[Some(20 * SECOND), Some(11 * SECOND)]))
            .expect("advance");
        assert_eq!(shifted.watermark, Some(15 * SECOND));
    }

    #[test]
    fn late_rows_are_dropped_and_counted_and_null_times_kept() {
        let mut c = clock(minus_seconds(0));
        c.watermark = Some(10 * SECOND);
        let data = batch(&[Some(12 * SECOND), Some(9 * SECOND), None, Some(10 * SECOND)]);
        let n = data.num_rows();
        let change = ChangeBatch::new(data, Int64Array::from(vec![1; n])).expect("change");
        let kept = c.admit(change).expect("admit");
        let ids: Vec<i64> = kept.columns()[0]
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(ids, vec![0, 2, 3]);
        assert_eq!(c.late, 1);
        // Nothing late: the same rows back.
        let data = batch(&[Some(11 * SECOND), None]);
        let change = ChangeBatch::new(data, Int64Array::from(vec![1, 1])).expect("change");
        assert_eq!(c.admit(change).expect("admit").num_rows(), 2);
        assert_eq!(c.late, 1);
    }
}

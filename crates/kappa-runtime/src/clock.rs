//! The event clock of a table or source: its watermark and the late changes it holds back.
//!
//! The watermark is the largest value of the watermark expression over every row inserted
//! so far; it never goes back. Each write (a statement, a polled batch) is judged against
//! the watermark as it stood before the write: a change whose event time is below it is
//! late, dropped from what the views see, and counted. A NULL event time is never late.

use std::sync::Arc;

use datafusion::arrow::array::{AsArray, BooleanArray};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Result};

pub(crate) struct EventClock {
    column: usize,
    expr: Arc<dyn PhysicalExpr>,
    pub watermark: Option<i64>,
    /// Late changes since the last barrier took them.
    pub late: u64,
}

impl EventClock {
    pub fn new(column: usize, expr: Arc<dyn PhysicalExpr>) -> Self {
        Self {
            column,
            expr,
            watermark: None,
            late: 0,
        }
    }

    /// The on-time part of `change` (all of it if nothing is late). Does not move the
    /// watermark: call [`EventClock::advance`] once the whole write is admitted.
    pub fn admit(&mut self, change: ChangeBatch) -> Result<ChangeBatch> {
        let Some(w) = self.watermark else {
            return Ok(change);
        };
        let ts = cast(&change.columns()[self.column], &DataType::Int64)?;
        let ts = ts.as_primitive::<Int64Type>();
        let keep: BooleanArray = ts.iter().map(|t| Some(t.is_none_or(|t| t >= w))).collect();
        let dropped = change.num_rows() - keep.true_count();
        if dropped == 0 {
            return Ok(change);
        }
        self.late += dropped as u64;
        change.filter(&keep)
    }

    /// Moves the watermark forward over inserted rows.
    pub fn advance(&mut self, inserted: &datafusion::arrow::array::RecordBatch) -> Result<()> {
        if inserted.num_rows() == 0 {
            return Ok(());
        }
        let v = self
            .expr
            .evaluate(inserted)?
            .into_array(inserted.num_rows())?;
        let v = cast(&v, &DataType::Int64)?;
        if let Some(m) = datafusion::arrow::compute::max(v.as_primitive::<Int64Type>()) {
            self.watermark = Some(self.watermark.map_or(m, |old| old.max(m)));
        }
        Ok(())
    }
}

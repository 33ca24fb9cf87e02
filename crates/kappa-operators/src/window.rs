//! Window table function: each row once per window its event time falls in, with
//! `window_start` and `window_end` appended. Stateless; weights follow their rows, so a
//! retraction retracts the row from every window it was in.

use datafusion::arrow::array::Int64Array;
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::{ChangeBatch, Result};
use kappa_plan::window::WindowSpec;

use crate::Operator;

pub struct WindowExpand {
    time_col: usize,
    spec: WindowSpec,
    schema: SchemaRef,
}

impl WindowExpand {
    pub fn new(time_col: usize, spec: WindowSpec, schema: SchemaRef) -> Self {
        Self {
            time_col,
            spec,
            schema,
        }
    }
}

impl Operator for WindowExpand {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let (data, indices) = self
            .spec
            .expand(batch.data(), self.time_col, self.schema.clone())?;
        if data.num_rows() == 0 {
            return Ok(());
        }
        let weights = match indices {
            None => batch.weights().clone(),
            Some(idx) => {
                let w = take(batch.weights(), &idx, None)?;
                w.as_any()
                    .downcast_ref::<Int64Array>()
                    .cloned()
                    .ok_or_else(|| kappa_common::KappaError::internal("weights not Int64"))?
            }
        };
        out.push(ChangeBatch::new(data, weights)?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamWindow"
    }
}

#[cfg(test)]
mod tests {
    use kappa_plan::window::WindowKind;

    use super::*;
    use crate::testing::{assert_changes, changes, schema};

    #[test]
    fn hop_repeats_rows_and_retractions() {
        let spec = WindowSpec::new(WindowKind::Hop, 10_000_000, 5_000_000, 0).unwrap();
        let mut op = WindowExpand::new(1, spec, schema("k:utf8, t:ts, ws:ts, we:ts"));
        let mut out = vec![];
        op.process(
            0,
            changes("k:utf8, t:ts", "+ a | 7\n- b | 12\n+ c | NULL"),
            &mut out,
        )
        .unwrap();
        assert_changes(
            &out,
            "+ a | 1970-01-01T00:00:07 | 1970-01-01T00:00:00 | 1970-01-01T00:00:10
             + a | 1970-01-01T00:00:07 | 1970-01-01T00:00:05 | 1970-01-01T00:00:15
             - b | 1970-01-01T00:00:12 | 1970-01-01T00:00:05 | 1970-01-01T00:00:15
             - b | 1970-01-01T00:00:12 | 1970-01-01T00:00:10 | 1970-01-01T00:00:20",
        );
    }

    #[test]
    fn tumble_keeps_batch_shape() {
        let spec = WindowSpec::new(WindowKind::Tumble, 10_000_000, 10_000_000, 0).unwrap();
        let mut op = WindowExpand::new(0, spec, schema("t:ts, ws:ts, we:ts"));
        let mut out = vec![];
        op.process(0, changes("t:ts", "+2 19\n- 20"), &mut out)
            .unwrap();
        assert_changes(
            &out,
            "+2 1970-01-01T00:00:19 | 1970-01-01T00:00:10 | 1970-01-01T00:00:20
             - 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30",
        );
    }
}

//! The probe rows of a temporal join whose probe input is append-only, kept as the Arrow
//! batches they came in (the batch form of `join_batches`) instead of one state-table
//! entry per row. See `temporal_join.rs` for what a stored probe row means: it is a row
//! whose match can still change, kept until the watermark closes its probe time
//! (`t + version offset <= W`, its expiry here).
//!
//! Each stored batch is the probe input's columns followed by the rows' probe times (so a
//! version change finds the rows of its key in `[v, next)` without evaluating anything).
//!
//! # Checkpoints
//! The rows are in memory; what rebuilds them is logged ([`ChangeLog`]): each stored batch
//! (the probe's columns and weights, without the times, which replay evaluates again) and
//! each watermark that expired rows. Once the log is mostly rows no longer stored it is
//! started over with the live rows. Replaying the log stores the same rows and expires
//! them at the same watermarks, so the restored state is the one checkpointed.

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimestampMicrosecondType};
use datafusion::arrow::row::Rows;
use kappa_common::{ChangeBatch, KappaError, Result};
use kappa_state::StateTable;

use crate::change_log::{ChangeLog, LogEntry};
use crate::join_batches::{BatchRows, RowRef};

/// What restoring reports as damaged.
const WHAT: &str = "a temporal join";
/// The log's one stream: stored probe rows.
const STORED: u8 = 0;

pub(crate) struct ProbeBatches {
    rows: BatchRows,
    /// The probe input's schema, and its column count (the stored times follow them).
    schema: SchemaRef,
    width: usize,
    /// The log of what built `rows` since the last checkpoint, and its table; `None`
    /// without checkpoints (and while the log is being replayed).
    log: Option<(ChangeLog, Box<dyn StateTable>)>,
}

/// A log entry as replay applies it.
pub(crate) enum Replayed {
    /// Rows to store again (all of them were stored: keys and times are valid).
    Stored(ChangeBatch),
    /// The watermark advanced to this.
    Watermark(i64),
}

impl ProbeBatches {
    /// `probe` is the probe input's schema; `log_table` holds the log (`None`: the state
    /// is not checkpointed).
    pub fn new(probe: &SchemaRef, log_table: Option<Box<dyn StateTable>>) -> Self {
        let mut fields: Vec<Field> = probe
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        fields.push(Field::new("weight", DataType::Int64, false));
        let stream: SchemaRef = Arc::new(Schema::new(fields));
        Self {
            rows: BatchRows::default(),
            schema: probe.clone(),
            width: probe.fields().len(),
            log: log_table.map(|t| (ChangeLog::new(vec![stream], WHAT), t)),
        }
    }

    /// Stores the rows of `batch` for which `keep` is true: `keys` are their join keys,
    /// `times` their probe times, `expiry` when each can no longer change its match.
    pub fn add(
        &mut self,
        batch: &ChangeBatch,
        keys: Rows,
        times: ArrayRef,
        keep: &[bool],
        expiry: &[Option<i64>],
    ) -> Result<()> {
        let mut columns = batch.columns().to_vec();
        columns.push(times);
        self.rows
            .add(&columns, batch.weights(), keys, |i| keep[i], expiry)?;
        if let Some((log, _)) = &mut self.log {
            let kept = if keep.iter().all(|&k| k) {
                batch.clone()
            } else {
                batch.filter(&BooleanArray::from(keep.to_vec()))?
            };
            let (data, weights) = kept.into_parts();
            let mut cols = data.columns().to_vec();
            cols.push(Arc::new(weights));
            log.push(STORED, cols, data.num_rows())?;
        }
        Ok(())
    }

    /// Calls `f` with each stored row of `key` that has not expired: the row, its probe
    /// time and its count.
    pub fn probe(&self, key: &[u8], mut f: impl FnMut(RowRef, i64, i64)) -> Result<()> {
        let mut missing = false;
        self.rows.probe(key, |r, count| {
            match self.rows.column_of(r, self.width).and_then(|(a, i)| {
                a.as_primitive_opt::<TimestampMicrosecondType>()
                    .map(|t| t.value(i))
            }) {
                Some(t) => f(r, t, count),
                None => missing = true,
            }
        });
        if missing {
            return Err(KappaError::internal(
                "a stored temporal join probe row without its time",
            ));
        }
        Ok(())
    }

    /// The probe input's columns of the given stored rows, in order.
    pub fn gather(&self, rows: &[RowRef]) -> Result<Vec<ArrayRef>> {
        let mut cols = self.rows.gather(rows)?;
        cols.truncate(self.width);
        Ok(cols)
    }

    /// Forgets the rows the watermark `w` has closed.
    pub fn expire(&mut self, w: i64) {
        self.rows.expire(w);
        if let Some((log, _)) = &mut self.log {
            log.mark(w.to_be_bytes().to_vec());
        }
    }

    /// Stored rows not expired.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn checkpointed(&self) -> bool {
        self.log.is_some()
    }

    pub fn table_mut(&mut self) -> Option<&mut dyn StateTable> {
        self.log
            .as_mut()
            .map(|(_, t)| t.as_mut() as &mut dyn StateTable)
    }

    /// Writes what changed since the last checkpoint: the log, or, when it holds mostly
    /// rows no longer stored, the live rows at watermark `w` instead.
    pub fn checkpoint(&mut self, w: Option<i64>) -> Result<()> {
        let Some((mut log, mut table)) = self.log.take() else {
            return Ok(());
        };
        let written = if log.due_for_compaction(self.rows.len()) {
            self.write_snapshot(&mut log, table.as_mut(), w)
        } else {
            log.flush(table.as_mut())
        };
        self.log = Some((log, table));
        written
    }

    fn write_snapshot(
        &self,
        log: &mut ChangeLog,
        table: &mut dyn StateTable,
        w: Option<i64>,
    ) -> Result<()> {
        log.clear(table);
        if let Some(w) = w {
            log.mark(w.to_be_bytes().to_vec());
        }
        for live in self.rows.live_rows(self.width) {
            let (mut cols, weights, n) = live?;
            cols.push(Arc::new(weights));
            log.push(STORED, cols, n)?;
            log.flush(table)?;
        }
        log.flush(table)
    }

    /// Hands `f` the live rows (the probe's columns and weights, batch by batch), then
    /// empties the store and its log (the log's entries are deleted at the next checkpoint).
    pub fn drain(&mut self, mut f: impl FnMut(ChangeBatch) -> Result<()>) -> Result<()> {
        for live in self.rows.live_rows(self.width) {
            let (cols, weights, n) = live?;
            let data = crate::batch_with_rows(self.schema.clone(), cols, n)?;
            f(ChangeBatch::new(data, weights)?)?;
        }
        self.rows = BatchRows::default();
        if let Some((log, table)) = &mut self.log {
            log.clear(table.as_mut());
        }
        Ok(())
    }

    /// Empties the store and hands `apply` the checkpointed log's entries in order, with
    /// the store not logging (they are in the log already); `probe` is the probe input's
    /// schema.
    pub fn restore(
        &mut self,
        probe: &SchemaRef,
        mut apply: impl FnMut(&mut Self, Replayed) -> Result<()>,
    ) -> Result<()> {
        self.rows = BatchRows::default();
        let Some((mut log, table)) = self.log.take() else {
            return Ok(());
        };
        let mut entries = Vec::new();
        let read = log.restore(table.as_ref(), |e| {
            entries.push(e);
            Ok(())
        });
        let applied = read.and_then(|()| {
            for entry in entries {
                let replayed = match entry {
                    LogEntry::Mark(m) => Replayed::Watermark(i64::from_be_bytes(
                        m.as_slice()
                            .try_into()
                            .map_err(|_| kappa_state::codec::damaged(WHAT))?,
                    )),
                    LogEntry::Batch(_, batch) => {
                        let mut cols = batch.columns().to_vec();
                        let weights = cols
                            .pop()
                            .and_then(|w| w.as_any().downcast_ref::<Int64Array>().cloned())
                            .ok_or_else(|| kappa_state::codec::damaged(WHAT))?;
                        let data = crate::batch_with_rows(probe.clone(), cols, batch.num_rows())?;
                        Replayed::Stored(ChangeBatch::new(data, weights)?)
                    }
                };
                apply(self, replayed)?;
            }
            Ok(())
        });
        self.log = Some((log, table));
        applied
    }
}

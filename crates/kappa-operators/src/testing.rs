//! Changelog literals for tests.
//!
//! ```text
//! + 1 | ann      insert (1, 'ann') once
//! -2 3 | bob     delete two copies of (3, 'bob')
//! ```
//! Column types are given as `name:type` with type one of `i64`, `f64`, `utf8`, `bool`, `ts`
//! (a timestamp in microseconds, written as whole seconds since the epoch); `NULL` is a null
//! cell.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::DFSchema;
use kappa_common::ChangeBatch;

/// A schema from `"a:i64, b:utf8"`. Panics on a malformed literal (tests only).
pub fn schema(spec: &str) -> SchemaRef {
    let fields: Vec<Field> = spec
        .split(',')
        .map(|f| {
            let (name, ty) = f.trim().split_once(':').expect("name:type");
            let ty = match ty.trim() {
                "i64" => DataType::Int64,
                "f64" => DataType::Float64,
                "utf8" => DataType::Utf8,
                "bool" => DataType::Boolean,
                "ts" => {
                    DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Microsecond, None)
                }
                other => panic!("unknown type {other}"),
            };
            Field::new(name.trim(), ty, true)
        })
        .collect();
    Arc::new(Schema::new(fields))
}

pub fn df_schema(spec: &str) -> DFSchema {
    DFSchema::try_from(schema(spec).as_ref().clone()).expect("valid schema")
}

/// A change batch from a schema literal and changelog lines.
pub fn changes(schema_spec: &str, lines: &str) -> ChangeBatch {
    let schema = schema(schema_spec);
    let mut weights = vec![];
    let mut cells: Vec<Vec<Option<String>>> = vec![vec![]; schema.fields().len()];
    for line in lines.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (w, rest) = parse_weight(line);
        weights.push(w);
        let vals: Vec<&str> = rest.split('|').map(str::trim).collect();
        assert_eq!(vals.len(), cells.len(), "wrong number of cells in {line:?}");
        for (c, v) in cells.iter_mut().zip(vals) {
            c.push((v != "NULL").then(|| v.to_string()));
        }
    }
    let columns: Vec<ArrayRef> = schema
        .fields()
        .iter()
        .zip(cells)
        .map(|(f, c)| -> ArrayRef {
            match f.data_type() {
                DataType::Int64 => Arc::new(
                    c.iter()
                        .map(|v| v.as_ref().map(|s| s.parse::<i64>().expect("i64")))
                        .collect::<Int64Array>(),
                ),
                DataType::Float64 => Arc::new(
                    c.iter()
                        .map(|v| v.as_ref().map(|s| s.parse::<f64>().expect("f64")))
                        .collect::<Float64Array>(),
                ),
                DataType::Timestamp(..) => Arc::new(
                    c.iter()
                        .map(|v| {
                            v.as_ref()
                                .map(|s| s.parse::<i64>().expect("ts seconds") * 1_000_000)
                        })
                        .collect::<datafusion::arrow::array::TimestampMicrosecondArray>(),
                ),
                DataType::Boolean => Arc::new(
                    c.iter()
                        .map(|v| v.as_ref().map(|s| s == "true"))
                        .collect::<BooleanArray>(),
                ),
                _ => Arc::new(c.iter().map(|v| v.as_deref()).collect::<StringArray>()),
            }
        })
        .collect();
    let data = RecordBatch::try_new(schema, columns).expect("valid batch");
    ChangeBatch::new(data, Int64Array::from(weights)).expect("valid change batch")
}

fn parse_weight(line: &str) -> (i64, &str) {
    let sign = match line.as_bytes()[0] {
        b'+' => 1,
        b'-' => -1,
        _ => panic!("changelog line must start with + or -: {line:?}"),
    };
    let rest = &line[1..];
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    let n = if digits.is_empty() {
        1
    } else {
        digits.parse().expect("weight")
    };
    (sign * n, rest[digits.len()..].trim())
}

/// The changes consolidated: row text → net weight, zero weights dropped.
pub fn consolidate(batches: &[ChangeBatch]) -> BTreeMap<String, i64> {
    let mut m = BTreeMap::new();
    for b in batches {
        for line in b.to_string().lines() {
            let (w, row) = parse_weight(line);
            *m.entry(row.to_string()).or_insert(0) += w;
        }
    }
    m.retain(|_, w| *w != 0);
    m
}

/// Asserts that `batches` consolidate to the same changes as the changelog `expected`.
pub fn assert_changes(batches: &[ChangeBatch], expected: &str) {
    let mut want = BTreeMap::new();
    for line in expected.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (w, row) = parse_weight(line);
        let row = row
            .split('|')
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" | ");
        *want.entry(row).or_insert(0) += w;
    }
    want.retain(|_, w| *w != 0);
    assert_eq!(consolidate(batches), want);
}

/// What checkpoints wrote, per state table (by its position in `state_tables`): a stand-in
/// for the disk in tests of an operator's checkpoint and restore.
#[derive(Default)]
pub struct CheckpointDisk {
    tables: Vec<BTreeMap<kappa_state::Bytes, kappa_state::Bytes>>,
    saved: Vec<u8>,
}

impl CheckpointDisk {
    /// Tables named by position, tracking their changes, as a checkpointed store hands
    /// them out (empty before the first checkpoint).
    pub fn tables(&self, n: usize) -> Vec<Box<dyn kappa_state::StateTable>> {
        (0..n)
            .map(|i| -> Box<dyn kappa_state::StateTable> {
                let entries = self.tables.get(i).cloned().unwrap_or_default();
                Box::new(kappa_state::MemStateTable::tracked(&i.to_string(), entries))
            })
            .collect()
    }

    /// Checkpoints `op`: applies its tables' changes to the disk and keeps its saved state.
    pub fn checkpoint(&mut self, op: &mut dyn crate::Operator) {
        assert!(op.checkpointable());
        self.saved = op.checkpoint().expect("checkpoint");
        for (i, t) in op.state_tables().into_iter().enumerate() {
            let mut taken = Vec::new();
            t.take_changes(&mut taken);
            t.checkpoint_done(true);
            let name = i.to_string();
            let (_, changes) = taken
                .into_iter()
                .find(|(n, _)| *n == name)
                .expect("a tracked table");
            if self.tables.len() <= i {
                self.tables.resize_with(i + 1, BTreeMap::new);
            }
            for (k, v) in changes {
                match v {
                    Some(v) => self.tables[i].insert(k, v),
                    None => self.tables[i].remove(&k),
                };
            }
        }
    }

    /// Restores an operator built over [`CheckpointDisk::tables`].
    pub fn restore(&self, op: &mut dyn crate::Operator) {
        op.restore(&self.saved).expect("restore");
    }
}

/// One epoch of a test: (input port, change batch) pairs and the barrier's watermark.
pub type TestEpoch = (Vec<(usize, ChangeBatch)>, Option<i64>);

/// Runs `epochs` (per epoch: input port and change batch, and the barrier's watermark,
/// which is also the epoch's processing time, or 0 without one) through
/// an operator built by `make`, checkpointing after each of the first `at` epochs; then
/// builds a second operator over the checkpointed tables, restores it, and checks that
/// both give the same changes and hold the same number of entries for every later epoch.
pub fn assert_restores_exactly(
    make: impl Fn(Vec<Box<dyn kappa_state::StateTable>>) -> Box<dyn crate::Operator>,
    tables: usize,
    epochs: &[TestEpoch],
    at: usize,
) {
    assert_restores_across(&make, &make, tables, epochs, at)
}

/// [`assert_restores_exactly`] with the second operator built by `remake` (the same
/// operator configured otherwise, e.g. keeping its state in another form).
pub fn assert_restores_across(
    make: impl Fn(Vec<Box<dyn kappa_state::StateTable>>) -> Box<dyn crate::Operator>,
    remake: impl Fn(Vec<Box<dyn kappa_state::StateTable>>) -> Box<dyn crate::Operator>,
    tables: usize,
    epochs: &[TestEpoch],
    at: usize,
) {
    let mut disk = CheckpointDisk::default();
    let mut live = make(disk.tables(tables));
    let run = |op: &mut dyn crate::Operator, e: usize| {
        let mut out = vec![];
        op.advance_time(epochs[e].1.unwrap_or(0));
        for (port, b) in &epochs[e].0 {
            op.process(*port, b.clone(), &mut out).expect("process");
        }
        op.on_barrier(e as u64 + 1, epochs[e].1, &mut out)
            .expect("barrier");
        consolidate(&out)
    };
    for e in 0..at {
        run(live.as_mut(), e);
        disk.checkpoint(live.as_mut());
    }
    let mut restored = remake(disk.tables(tables));
    disk.restore(restored.as_mut());
    assert_eq!(restored.state_entries(), live.state_entries());
    assert_eq!(restored.late_rows(), live.late_rows());
    for e in at..epochs.len() {
        assert_eq!(
            run(restored.as_mut(), e),
            run(live.as_mut(), e),
            "epoch {e} after restoring"
        );
        assert_eq!(restored.state_entries(), live.state_entries());
        assert_eq!(restored.late_rows(), live.late_rows());
    }
}

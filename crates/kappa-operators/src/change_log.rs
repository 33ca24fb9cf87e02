//! Operator state checkpointed as the log of what changed it.
//!
//! State built from the rows an operator received (a join's two sides) need not be written
//! entry by entry: the input since the last checkpoint *is* the delta. A [`ChangeLog`] keeps
//! it, in order — Arrow batches shared with the input (no copy, no per-row work) on numbered
//! streams, and small marks (a watermark that advanced) — and writes it at the checkpoint as
//! Arrow IPC batches of at most [`CHUNK_ROWS`] rows under increasing sequence numbers (8
//! bytes, big-endian, so key order is log order). Restoring hands the entries back in order;
//! the operator applies each as it did the first time, which rebuilds its state exactly
//! (operators are deterministic in what they store).
//!
//! The log grows with the input while the state may not (retractions, expired rows). So
//! once the log holds more than twice the rows the state does (and at least
//! [`MIN_COMPACT`]), the operator starts it over with a snapshot of its state
//! ([`ChangeLog::clear`], then entries that rebuild the state directly): writes stay linear
//! in the input, and a restore reads at most about three times the state.
//!
//! The table is written only at checkpoints and read only when restoring, so a store that
//! can keeps it on disk (`StateStore::create_cold_table`).

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use kappa_common::Result;
use kappa_state::StateTable;
use kappa_state::codec::{damaged, ipc_batch, ipc_bytes};

/// The most rows one stored batch holds (unless one pushed batch alone has more).
pub const CHUNK_ROWS: usize = 1 << 16;

/// Logs holding fewer rows than this are never compacted.
pub const MIN_COMPACT: usize = 1 << 16;

/// One entry of the log: rows on a stream, or a mark.
#[derive(Debug)]
pub enum LogEntry {
    Batch(u8, RecordBatch),
    Mark(Vec<u8>),
}

const BATCH: u8 = 0;
const MARK: u8 = 1;

pub struct ChangeLog {
    /// The schema of each stream's batches.
    streams: Vec<SchemaRef>,
    /// Entries not yet written.
    pending: Vec<LogEntry>,
    pending_rows: usize,
    /// The stored entries are numbered `first..next`.
    first: u64,
    next: u64,
    /// Rows in the stored entries.
    written_rows: usize,
    /// What restoring reports as damaged ("a join").
    what: &'static str,
}

impl ChangeLog {
    pub fn new(streams: Vec<SchemaRef>, what: &'static str) -> Self {
        Self {
            streams,
            pending: Vec::new(),
            pending_rows: 0,
            first: 0,
            next: 0,
            written_rows: 0,
            what,
        }
    }

    /// Appends `rows` rows to `stream`: `columns` in that stream's schema.
    pub fn push(&mut self, stream: u8, columns: Vec<ArrayRef>, rows: usize) -> Result<()> {
        if rows > 0 {
            let batch = crate::batch_with_rows(self.stream(stream)?.clone(), columns, rows)?;
            self.pending_rows += rows;
            self.pending.push(LogEntry::Batch(stream, batch));
        }
        Ok(())
    }

    fn stream(&self, stream: u8) -> Result<&SchemaRef> {
        self.streams
            .get(usize::from(stream))
            .ok_or_else(|| kappa_common::KappaError::internal("log stream out of range"))
    }

    /// Appends a mark.
    pub fn mark(&mut self, mark: Vec<u8>) {
        self.pending.push(LogEntry::Mark(mark));
    }

    /// Rows the log holds, written or not.
    pub fn rows(&self) -> usize {
        self.written_rows + self.pending_rows
    }

    /// Whether state of `live` rows should start the log over (see the module docs).
    pub fn due_for_compaction(&self, live: usize) -> bool {
        self.rows() >= MIN_COMPACT && self.rows() > 2 * live
    }

    /// Starts the log over, empty: deletes its stored entries (in the table's next
    /// checkpoint) and forgets the pending ones.
    pub fn clear(&mut self, table: &mut dyn StateTable) {
        for seq in self.first..self.next {
            table.delete(&seq.to_be_bytes());
        }
        self.first = self.next;
        self.written_rows = 0;
        self.pending.clear();
        self.pending_rows = 0;
    }

    /// Writes the pending entries to `table`; consecutive batches of one stream are written
    /// together, up to [`CHUNK_ROWS`] rows.
    pub fn flush(&mut self, table: &mut dyn StateTable) -> Result<()> {
        let mut group: Vec<RecordBatch> = Vec::new();
        let mut group_stream = 0;
        let mut rows = 0;
        for entry in std::mem::take(&mut self.pending) {
            let joins_group = matches!(&entry, LogEntry::Batch(s, b)
                if *s == group_stream && rows + b.num_rows() <= CHUNK_ROWS);
            if !joins_group && !group.is_empty() {
                self.write_batch(table, group_stream, &std::mem::take(&mut group))?;
                rows = 0;
            }
            match entry {
                LogEntry::Batch(s, b) => {
                    group_stream = s;
                    rows += b.num_rows();
                    group.push(b);
                }
                LogEntry::Mark(m) => {
                    let mut value = vec![MARK];
                    value.extend_from_slice(&m);
                    self.write(table, value);
                }
            }
        }
        if !group.is_empty() {
            self.write_batch(table, group_stream, &group)?;
        }
        self.pending_rows = 0;
        Ok(())
    }

    fn write_batch(
        &mut self,
        table: &mut dyn StateTable,
        stream: u8,
        group: &[RecordBatch],
    ) -> Result<()> {
        let batch = concat_batches(self.stream(stream)?, group)?;
        let mut value = vec![BATCH, stream];
        value.extend_from_slice(&ipc_bytes(&batch)?);
        self.written_rows += batch.num_rows();
        self.write(table, value);
        Ok(())
    }

    fn write(&mut self, table: &mut dyn StateTable, value: Vec<u8>) {
        table.put(
            Arc::from(self.next.to_be_bytes().as_slice()),
            Arc::from(value),
        );
        self.next += 1;
    }

    /// Reads the log back from `table` (as last checkpointed), handing `apply` each entry in
    /// the order it was pushed; the log then continues after it.
    pub fn restore(
        &mut self,
        table: &dyn StateTable,
        mut apply: impl FnMut(LogEntry) -> Result<()>,
    ) -> Result<()> {
        let damaged = || damaged(self.what);
        self.pending.clear();
        self.pending_rows = 0;
        self.written_rows = 0;
        let mut seqs = None;
        for (k, v) in table.snapshot().iter() {
            let seq = <[u8; 8]>::try_from(&k[..])
                .map(u64::from_be_bytes)
                .map_err(|_| damaged())?;
            let (first, _) = seqs.get_or_insert((seq, seq));
            seqs = Some((*first, seq));
            let entry = match v.first() {
                Some(&MARK) => LogEntry::Mark(v[1..].to_vec()),
                Some(&BATCH) => {
                    let stream = *v.get(1).ok_or_else(damaged)?;
                    let schema = self.streams.get(usize::from(stream)).ok_or_else(damaged)?;
                    let stored = ipc_batch(&v[2..])?;
                    let batch = crate::batch_with_rows(
                        schema.clone(),
                        stored.columns().to_vec(),
                        stored.num_rows(),
                    )
                    .map_err(|_| damaged())?;
                    self.written_rows += batch.num_rows();
                    LogEntry::Batch(stream, batch)
                }
                _ => return Err(damaged()),
            };
            apply(entry)?;
        }
        (self.first, self.next) = seqs.map_or((0, 0), |(first, last)| (first, last + 1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::schema;
    use datafusion::arrow::array::{Array, Int64Array};
    use kappa_state::MemStateTable;

    /// Appends the values to `stream` (schema `v:i64`).
    fn push(log: &mut ChangeLog, stream: u8, values: impl IntoIterator<Item = i64>) {
        let values: Int64Array = values.into_iter().collect();
        let n = values.len();
        log.push(stream, vec![Arc::new(values)], n).unwrap();
    }

    fn new_log() -> ChangeLog {
        ChangeLog::new(vec![schema("v:i64"), schema("v:i64")], "a test")
    }

    /// The log's entries as text: `s0:[1,2]` for rows on stream 0, `m:7` for a mark.
    fn read_back(table: &MemStateTable) -> (ChangeLog, Vec<String>) {
        let mut log = new_log();
        let mut got = vec![];
        log.restore(table, |e| {
            got.push(match e {
                LogEntry::Batch(s, b) => {
                    let v = b.column(0).as_any().downcast_ref::<Int64Array>().unwrap();
                    format!("s{s}:{:?}", v.values().to_vec())
                }
                LogEntry::Mark(m) => format!("m:{}", m[0]),
            });
            Ok(())
        })
        .unwrap();
        (log, got)
    }

    #[test]
    fn entries_come_back_in_order_across_checkpoints() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = new_log();
        push(&mut log, 0, [1, 2]);
        push(&mut log, 0, [3]);
        push(&mut log, 1, [4]);
        log.mark(vec![7]);
        push(&mut log, 0, [5]);
        log.flush(&mut table).unwrap();
        push(&mut log, 1, [6]);
        log.flush(&mut table).unwrap();
        assert_eq!(log.rows(), 6);

        let (mut restored, got) = read_back(&table);
        assert_eq!(
            got,
            ["s0:[1, 2, 3]", "s1:[4]", "m:7", "s0:[5]", "s1:[6]"],
            "consecutive batches of a stream are written together"
        );
        assert_eq!(restored.rows(), 6);

        // The restored log continues after the last stored entry.
        push(&mut restored, 0, [8]);
        restored.flush(&mut table).unwrap();
        assert_eq!(read_back(&table).1.last().unwrap(), "s0:[8]");
    }

    #[test]
    fn clearing_starts_the_log_over() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = new_log();
        push(&mut log, 0, [1, 2]);
        log.flush(&mut table).unwrap();
        push(&mut log, 0, [9]);
        assert!(!log.due_for_compaction(0), "too small to compact");
        log.clear(&mut table);
        assert_eq!(log.rows(), 0);
        push(&mut log, 1, [3]);
        log.flush(&mut table).unwrap();
        assert_eq!(table.len(), 1);
        let (restored, got) = read_back(&table);
        assert_eq!(got, ["s1:[3]"]);
        assert_eq!(restored.rows(), 1);
    }

    #[test]
    fn large_inputs_are_stored_in_chunks_and_compaction_waits_for_waste() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = new_log();
        push(&mut log, 0, 0..CHUNK_ROWS as i64 + 10);
        push(&mut log, 0, [1]);
        log.flush(&mut table).unwrap();
        // The oversized batch alone, then the rest.
        assert_eq!(table.len(), 2);
        assert!(!log.due_for_compaction(CHUNK_ROWS));
        assert!(log.due_for_compaction(CHUNK_ROWS / 2 - 1));
        let mut rows = 0;
        new_log()
            .restore(&table, |e| {
                if let LogEntry::Batch(_, b) = e {
                    rows += b.num_rows();
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(rows, CHUNK_ROWS + 11);
    }

    #[test]
    fn a_damaged_log_is_reported() {
        for (key, value) in [
            (&b"short"[..], &[MARK][..]),
            (&[0u8; 8][..], &[9u8][..]),
            (&[0u8; 8][..], &[BATCH, 5][..]),
            (&[0u8; 8][..], &[BATCH, 0, 1, 2][..]),
        ] {
            let mut table = MemStateTable::tracked("log", []);
            table.put(Arc::from(key), Arc::from(value));
            let err = new_log().restore(&table, |_| Ok(())).unwrap_err();
            assert!(err.to_string().contains("damaged"), "{err}");
        }
    }
}

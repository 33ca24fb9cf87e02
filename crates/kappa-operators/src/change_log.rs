//! Operator state checkpointed as the log of its changes.
//!
//! State that is a multiset of the rows an operator received (a join side's rows) need not
//! be written entry by entry: the changes since the last checkpoint *are* the delta. A
//! [`ChangeLog`] keeps those changes (Arrow batches shared with the input: no copy, no
//! per-row work) and writes them at the checkpoint as Arrow IPC batches of at most
//! [`CHUNK_ROWS`] rows under increasing sequence numbers (8 bytes, big-endian, so key order
//! is log order). Restoring replays the log in order; the operator applies each change as it
//! did the first time.
//!
//! Rows can also leave the state without a change (an expired join row): they stay in the
//! log. So once the log holds more than twice the live rows (and at least [`MIN_COMPACT`]
//! rows), the operator rewrites it as its live state ([`ChangeLog::clear`], then one
//! insertion per live row). Writes stay linear in the input, and a restore reads at most
//! about three times the live state.
//!
//! The table is written only at checkpoints and read only when restoring, so a store that
//! can keeps it on disk (`StateStore::create_cold_table`).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::compute::{concat, concat_batches};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use kappa_common::{ChangeBatch, Result};
use kappa_state::StateTable;
use kappa_state::codec::{damaged, ipc_batch, ipc_bytes};

/// The most rows one stored batch holds.
pub const CHUNK_ROWS: usize = 1 << 16;

/// Logs smaller than this are never compacted.
pub const MIN_COMPACT: usize = 1 << 16;

pub struct ChangeLog {
    /// The state's rows (every field nullable).
    data: SchemaRef,
    /// `data` followed by the weight.
    stored: SchemaRef,
    /// Changes not yet written.
    pending: Vec<ChangeBatch>,
    pending_rows: usize,
    /// The stored batches are numbered `first..next`.
    first: u64,
    next: u64,
    /// Rows in the stored batches.
    written_rows: usize,
    /// What restoring reports as damaged ("a join").
    what: &'static str,
}

impl ChangeLog {
    pub fn new(schema: &SchemaRef, what: &'static str) -> Self {
        let data: Vec<Field> = schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let mut stored = data.clone();
        stored.push(Field::new("weight", DataType::Int64, false));
        Self {
            data: Arc::new(Schema::new(data)),
            stored: Arc::new(Schema::new(stored)),
            pending: Vec::new(),
            pending_rows: 0,
            first: 0,
            next: 0,
            written_rows: 0,
            what,
        }
    }

    /// Records a change to the state.
    pub fn push(&mut self, batch: ChangeBatch) {
        if !batch.is_empty() {
            self.pending_rows += batch.num_rows();
            self.pending.push(batch);
        }
    }

    /// Rows the log holds, written or not.
    pub fn rows(&self) -> usize {
        self.written_rows + self.pending_rows
    }

    /// Whether a state of `live` rows should be rewritten as the log (see the module docs).
    pub fn due_for_compaction(&self, live: usize) -> bool {
        self.rows() >= MIN_COMPACT && self.rows() > 2 * live
    }

    /// Starts the log over, empty: deletes its stored batches (in the table's next
    /// checkpoint) and forgets the pending changes.
    pub fn clear(&mut self, table: &mut dyn StateTable) {
        for seq in self.first..self.next {
            table.delete(&seq.to_be_bytes());
        }
        self.first = self.next;
        self.written_rows = 0;
        self.pending.clear();
        self.pending_rows = 0;
    }

    /// Writes the pending changes to `table`.
    pub fn flush(&mut self, table: &mut dyn StateTable) -> Result<()> {
        let mut group: Vec<ChangeBatch> = Vec::new();
        let mut rows = 0;
        for batch in std::mem::take(&mut self.pending) {
            if rows + batch.num_rows() > CHUNK_ROWS && !group.is_empty() {
                self.write(table, &std::mem::take(&mut group))?;
                rows = 0;
            }
            rows += batch.num_rows();
            group.push(batch);
        }
        if !group.is_empty() {
            self.write(table, &group)?;
        }
        self.pending_rows = 0;
        Ok(())
    }

    /// Writes `group` as one stored batch.
    fn write(&mut self, table: &mut dyn StateTable, group: &[ChangeBatch]) -> Result<()> {
        let data: Vec<RecordBatch> = group
            .iter()
            .map(|b| RecordBatch::try_new(self.data.clone(), b.columns().to_vec()))
            .collect::<std::result::Result<_, _>>()?;
        let data = concat_batches(&self.data, &data)?;
        let weights: Vec<&dyn Array> = group.iter().map(|b| b.weights() as &dyn Array).collect();
        let mut columns = data.columns().to_vec();
        columns.push(concat(&weights)?);
        let batch = crate::batch_with_rows(self.stored.clone(), columns, data.num_rows())?;
        table.put(
            Arc::from(self.next.to_be_bytes().as_slice()),
            Arc::from(ipc_bytes(&batch)?),
        );
        self.next += 1;
        self.written_rows += batch.num_rows();
        Ok(())
    }

    /// Reads the log back from `table` (as last checkpointed), handing `apply` each change in
    /// the order it was made; the log then continues after it.
    pub fn restore(
        &mut self,
        table: &dyn StateTable,
        mut apply: impl FnMut(ChangeBatch) -> Result<()>,
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
            let batch = ipc_batch(&v)?;
            let n = batch.num_columns();
            if batch.schema().fields().len() != self.stored.fields().len() {
                return Err(damaged());
            }
            let weights = batch
                .column(n - 1)
                .as_any()
                .downcast_ref::<Int64Array>()
                .ok_or_else(damaged)?
                .clone();
            let columns: Vec<ArrayRef> = batch.columns()[..n - 1].to_vec();
            let data = crate::batch_with_rows(self.data.clone(), columns, batch.num_rows())
                .map_err(|_| damaged())?;
            self.written_rows += data.num_rows();
            apply(ChangeBatch::new(data, weights)?)?;
        }
        (self.first, self.next) = seqs.map_or((0, 0), |(first, last)| (first, last + 1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{changes, consolidate};
    use kappa_state::MemStateTable;

    const S: &str = "k:i64, v:utf8";

    fn read_back(table: &MemStateTable) -> (ChangeLog, Vec<ChangeBatch>) {
        let mut log = ChangeLog::new(&crate::testing::schema(S), "a test");
        let mut got = vec![];
        log.restore(table, |b| {
            got.push(b);
            Ok(())
        })
        .unwrap();
        (log, got)
    }

    #[test]
    fn changes_come_back_in_order_across_checkpoints() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = ChangeLog::new(&crate::testing::schema(S), "a test");
        log.push(changes(S, "+ 1 | a\n+ 2 | b"));
        log.push(changes(S, "- 1 | a"));
        log.flush(&mut table).unwrap();
        log.push(changes(S, "+2 3 | c"));
        log.flush(&mut table).unwrap();
        assert_eq!(log.rows(), 4);

        let (mut restored, got) = read_back(&table);
        assert_eq!(restored.rows(), 4);
        assert_eq!(got.len(), 2);
        let want = consolidate(&[changes(S, "+ 2 | b\n+2 3 | c")]);
        assert_eq!(consolidate(&got), want);
        // The first batch holds both writes of the first checkpoint, insert before delete.
        assert_eq!(got[0].weights().values(), &[1, 1, -1]);

        // The restored log continues after the last stored batch.
        restored.push(changes(S, "- 2 | b"));
        restored.flush(&mut table).unwrap();
        let (_, got) = read_back(&table);
        assert_eq!(got.len(), 3);
        assert_eq!(consolidate(&got), consolidate(&[changes(S, "+2 3 | c")]));
    }

    #[test]
    fn clearing_rewrites_the_log_as_the_live_state() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = ChangeLog::new(&crate::testing::schema(S), "a test");
        log.push(changes(S, "+ 1 | a\n+ 2 | b"));
        log.flush(&mut table).unwrap();
        log.push(changes(S, "+ 9 | pending"));
        assert!(!log.due_for_compaction(0), "too small to compact");
        log.clear(&mut table);
        assert_eq!(log.rows(), 0);
        log.push(changes(S, "+3 2 | b"));
        log.flush(&mut table).unwrap();
        assert_eq!(table.len(), 1);
        let (restored, got) = read_back(&table);
        assert_eq!(restored.rows(), 1);
        assert_eq!(consolidate(&got), consolidate(&[changes(S, "+3 2 | b")]));
    }

    #[test]
    fn large_changes_are_stored_in_chunks_and_compaction_waits_for_waste() {
        let mut table = MemStateTable::tracked("log", []);
        let mut log = ChangeLog::new(&crate::testing::schema(S), "a test");
        let rows: String = (0..CHUNK_ROWS + 10).map(|i| format!("+ {i} | x\n")).collect();
        log.push(changes(S, &rows));
        log.push(changes(S, "+ 1 | y"));
        log.flush(&mut table).unwrap();
        // One oversized batch alone, then the rest.
        assert_eq!(table.len(), 2);
        assert!(!log.due_for_compaction(CHUNK_ROWS));
        assert!(log.due_for_compaction(CHUNK_ROWS / 2 - 1));
        let (_, got) = read_back(&table);
        assert_eq!(got.iter().map(|b| b.num_rows()).sum::<usize>(), CHUNK_ROWS + 11);
    }

    #[test]
    fn a_damaged_log_is_reported() {
        let mut table = MemStateTable::tracked("log", []);
        table.put(Arc::from(&b"short"[..]), Arc::from(&b"x"[..]));
        let mut log = ChangeLog::new(&crate::testing::schema(S), "a test");
        let err = log.restore(&table, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("damaged"), "{err}");
    }
}

//! Engine tables: the changelog that INSERT, UPDATE, DELETE and COPY write.
//!
//! A table keeps two things: its latest contents (what the next statement reads and
//! constraint checks run against) and the changes not yet cut into an epoch. The barrier
//! drains the pending changes and takes a snapshot of the contents at the same instant, so
//! the snapshot readers see is exactly the sum of all drained changes.
//!
//! # Durability
//! With a history (`--data-dir`), a write is appended to it after every check has passed
//! and before it is applied, while the statement holds the DML gate: so the history's order
//! of writes and epoch boundaries is the order the views saw. [`Table::apply`] returns a
//! [`WriteAck`]; the statement is acknowledged only after [`WriteAck::durable`].
//!
//! # Back-pressure
//! The views take a table's changes at each barrier, and an epoch's work and memory grow
//! with what it takes. A writer that outpaces the views is held back: once more than
//! [`BACKLOG_ROWS`] rows wait for an epoch, a write's acknowledgment also waits until the
//! next barrier has taken them ([`Table::settled`]). So an epoch holds at most that many
//! rows plus one statement per writer, however fast the writers are.
//!
//! # Event time
//! A table with a `WATERMARK FOR col AS expr` keeps its watermark: the largest `expr` over
//! every row inserted so far (it never goes back). Each statement's changes are judged
//! against the watermark as it stood before the statement: a change whose `col` is below it
//! is late. Late changes still apply to the table (ad-hoc queries see them) but are not
//! passed to the views; they are counted instead. A table that has not been written for
//! longer than its idle timeout reports itself idle, so it does not hold back the watermark
//! of a view that also reads other inputs.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, KappaError, RelationId, Result, SqlState};
use kappa_state::{History, MultisetSnapshot, RowMultiset, StateStore, StateTable};

use crate::clock::EventClock;
use crate::dataflow::EventTime;

/// A table's declared event time, compiled.
pub struct TableEventTime {
    /// The event-time column (a timestamp).
    pub column: usize,
    /// The watermark expression, evaluated per inserted row.
    pub expr: Arc<dyn PhysicalExpr>,
    /// After this long without a write the table reports itself idle; `None`: never.
    pub idle_timeout: Option<Duration>,
}

/// What the barrier takes from a table: the changes for the views, the contents they lead
/// to, where the table stands in event time, and how many late changes were held back.
pub(crate) struct Drained {
    pub changes: Vec<ChangeBatch>,
    pub contents: MultisetSnapshot,
    pub time: EventTime,
    pub late: u64,
}

/// One statement's effect on a table: rows removed (each must be present) and rows added.
#[derive(Default)]
pub struct TableWrite {
    pub deletes: Option<RecordBatch>,
    pub inserts: Option<RecordBatch>,
}

/// Rows waiting for an epoch above which writers wait for the views.
pub const BACKLOG_ROWS: usize = 1 << 16;

struct Inner {
    contents: RowMultiset,
    /// Primary key (row format) → 1, for tables with a primary key.
    pk_index: Option<(RowConverter, Box<dyn StateTable>)>,
    pending: Vec<ChangeBatch>,
    /// Rows in `pending`.
    pending_rows: usize,
    /// How many times the pending changes were taken into an epoch.
    drains: u64,
    clock: Option<EventClock>,
    last_write: Instant,
}

pub struct Table {
    pub id: RelationId,
    pub name: String,
    pub schema: SchemaRef,
    pub primary_key: Option<Vec<usize>>,
    idle_timeout: Option<Duration>,
    /// Serializes statements on this table from their read to their write.
    dml: tokio::sync::Mutex<()>,
    inner: Mutex<Inner>,
    order: WriteOrder,
}

/// What orders a table's writes against everything else: the DML gate (held shared while a
/// write is recorded and applied, exclusively by the barrier's cut) and the history they
/// are recorded in.
#[derive(Clone)]
pub(crate) struct WriteOrder {
    pub gate: Arc<RwLock<()>>,
    pub history: Option<Arc<History>>,
}

/// An applied write, not yet known to be on disk.
#[must_use = "a write is acknowledged only once durable"]
pub struct WriteAck {
    history: Option<(Arc<History>, u64)>,
}

impl WriteAck {
    /// Whether [`WriteAck::durable`] has anything to wait for.
    pub fn waits(&self) -> bool {
        self.history.is_some()
    }

    /// Returns once the write survives a crash (blocking: it may wait for an `fsync`).
    pub fn durable(self) -> Result<()> {
        match self.history {
            Some((h, seq)) => h.sync(seq),
            None => Ok(()),
        }
    }
}

impl Table {
    pub(crate) fn new(
        id: RelationId,
        name: &str,
        schema: SchemaRef,
        primary_key: Option<Vec<usize>>,
        store: &dyn StateStore,
        event_time: Option<TableEventTime>,
        order: WriteOrder,
    ) -> Result<Self> {
        let prefix = crate::build::state_prefix(id, false);
        let contents = RowMultiset::new(
            schema.clone(),
            store.create_table(&format!("{prefix}rows"))?,
        )?;
        let pk_index = match &primary_key {
            Some(cols) => {
                let fields = cols
                    .iter()
                    .map(|&c| SortField::new(schema.field(c).data_type().clone()))
                    .collect();
                Some((
                    RowConverter::new(fields)?,
                    store.create_table(&format!("{prefix}pk"))?,
                ))
            }
            None => None,
        };
        Ok(Self {
            id,
            name: name.to_string(),
            schema,
            primary_key,
            idle_timeout: event_time.as_ref().and_then(|e| e.idle_timeout),
            dml: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                contents,
                pk_index,
                pending: Vec::new(),
                pending_rows: 0,
                drains: 0,
                clock: event_time.map(|e| EventClock::new(e.column, e.expr)),
                last_write: Instant::now(),
            }),
            order,
        })
    }

    /// Held by a statement from the moment it reads the table until its write is applied.
    pub async fn lock_dml(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dml.lock().await
    }

    fn inner(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| KappaError::internal("table lock poisoned"))
    }

    /// The latest contents, including writes not yet in any epoch.
    pub fn latest(&self) -> Result<MultisetSnapshot> {
        Ok(self.inner()?.contents.snapshot())
    }

    /// Applies one statement's write atomically: either every check passes and all of it is
    /// applied (and appended to the history), or nothing is.
    pub fn apply(&self, write: TableWrite) -> Result<WriteAck> {
        let seq = self.apply_write(write, true)?;
        Ok(WriteAck {
            history: self.order.history.clone().zip(seq),
        })
    }

    /// Returns once the views have taken the rows waiting for an epoch, if there are more
    /// than [`BACKLOG_ROWS`] (see the module docs). Gives up after a minute (a table
    /// dropped meanwhile is never drained again).
    pub async fn settled(&self) -> Result<()> {
        let start = {
            let inner = self.inner()?;
            if inner.pending_rows <= BACKLOG_ROWS {
                return Ok(());
            }
            inner.drains
        };
        crate::hold_while(|| Ok(self.inner()?.drains == start)).await
    }

    /// Applies a write read back from the history (recovery): not appended again.
    pub(crate) fn apply_replayed(&self, write: TableWrite) -> Result<()> {
        self.apply_write(write, false).map(|_| ())
    }

    /// Returns the write's sequence number in the history, if it was appended.
    fn apply_write(&self, write: TableWrite, log: bool) -> Result<Option<u64>> {
        let _gate = self
            .order
            .gate
            .read()
            .map_err(|_| KappaError::internal("DML gate poisoned"))?;
        let mut inner = self.inner()?;
        if let Some(ins) = &write.inserts {
            self.check_not_null(ins)?;
        }
        let del = write
            .deletes
            .filter(|b| b.num_rows() > 0)
            .map(ChangeBatch::deletes);
        let ins = write
            .inserts
            .filter(|b| b.num_rows() > 0)
            .map(ChangeBatch::inserts);
        // Every deleted row must be present (with multiplicity).
        if let Some(d) = &del {
            let rows = inner.contents.converter().convert_columns(d.columns())?;
            let mut need: std::collections::HashMap<&[u8], i64> = Default::default();
            for r in rows.iter() {
                *need.entry(r.data()).or_default() += 1;
            }
            for (k, n) in need {
                if inner.contents.count_encoded(k) < n {
                    return Err(KappaError::internal(format!(
                        "write to {} deletes a row that is not there",
                        self.name
                    )));
                }
            }
        }
        if let (Some(pk), Some((conv, index))) = (&self.primary_key, &inner.pk_index) {
            let key_rows = |b: &ChangeBatch| -> Result<datafusion::arrow::row::Rows> {
                let cols: Vec<_> = pk.iter().map(|&c| b.columns()[c].clone()).collect();
                Ok(conv.convert_columns(&cols)?)
            };
            let removed = match &del {
                Some(d) => key_rows(d)?.iter().map(|r| r.data().to_vec()).collect(),
                None => HashSet::new(),
            };
            if let Some(i) = &ins {
                let keys = key_rows(i)?;
                let mut seen = HashSet::with_capacity(i.num_rows());
                for (row, k) in keys.iter().enumerate() {
                    let k = k.data();
                    let exists = index.get(k).is_some() && !removed.contains(k);
                    if exists || !seen.insert(k) {
                        return Err(KappaError::user(
                            SqlState::UNIQUE_VIOLATION,
                            format!(
                                "duplicate key value violates primary key of \"{}\": ({}) already exists",
                                self.name,
                                self.describe_key(i.data(), row)
                            ),
                        ));
                    }
                }
            }
        }
        // All checks passed: record, then apply.
        let seq = match (&self.order.history, log) {
            (Some(h), true) if del.is_some() || ins.is_some() => Some(h.append_write(
                self.id,
                del.as_ref().map(|d| d.data()),
                ins.as_ref().map(|i| i.data()),
            )?),
            _ => None,
        };
        let Inner {
            contents,
            pk_index,
            pending,
            pending_rows,
            clock,
            last_write,
            ..
        } = &mut *inner;
        *last_write = Instant::now();
        let inserted = ins.as_ref().map(|i| i.data().clone());
        for change in [del, ins].into_iter().flatten() {
            contents.apply(&change)?;
            if let (Some(pk), Some((conv, index))) = (&self.primary_key, pk_index.as_mut()) {
                let cols: Vec<_> = pk.iter().map(|&c| change.columns()[c].clone()).collect();
                let insert = change.weights().value(0) > 0;
                for k in conv.convert_columns(&cols)?.iter() {
                    if insert {
                        index.put(Arc::from(k.data()), kappa_state::encode_count(1));
                    } else {
                        index.delete(k.data());
                    }
                }
            }
            let change = match clock.as_mut() {
                Some(c) => c.admit(change)?,
                None => change,
            };
            *pending_rows += change.num_rows();
            pending.push(change);
        }
        if let (Some(c), Some(i)) = (clock.as_mut(), &inserted) {
            c.advance(i)?;
        }
        Ok(seq)
    }

    fn check_not_null(&self, batch: &RecordBatch) -> Result<()> {
        for (i, f) in self.schema.fields().iter().enumerate() {
            if !f.is_nullable() && batch.column(i).null_count() > 0 {
                return Err(KappaError::user(
                    SqlState::NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                        f.name(),
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn describe_key(&self, batch: &RecordBatch, row: usize) -> String {
        use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
        let opts = FormatOptions::default().with_null("NULL");
        self.primary_key
            .iter()
            .flatten()
            .map(|&c| {
                ArrayFormatter::try_new(batch.column(c).as_ref(), &opts)
                    .map(|f| format!("{}={}", self.schema.field(c).name(), f.value(row)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// At a checkpoint, under the DML gate right after [`Table::drain`]: appends the changes
    /// of the table's state since the last checkpoint to `out` and returns its watermark.
    pub(crate) fn checkpoint(
        &self,
        out: &mut crate::dataflow::TableChanges,
    ) -> Result<Option<i64>> {
        self.for_each_table(&mut |t| t.take_changes(out))?;
        Ok(self.inner()?.clock.as_ref().and_then(|c| c.watermark))
    }

    /// Right before the checkpoint is written (see `StateTable::before_checkpoint_write`).
    pub(crate) fn before_checkpoint_write(&self) -> Result<()> {
        self.for_each_table(&mut |t| t.before_checkpoint_write())
    }

    /// The checkpoint holding the changes taken was written or abandoned.
    pub(crate) fn checkpoint_done(&self, written: bool) -> Result<()> {
        self.for_each_table(&mut |t| t.checkpoint_done(written))
    }

    fn for_each_table(&self, f: &mut dyn FnMut(&mut dyn StateTable)) -> Result<()> {
        let mut inner = self.inner()?;
        f(inner.contents.table_mut());
        if let Some((_, index)) = &mut inner.pk_index {
            f(index.as_mut());
        }
        Ok(())
    }

    /// After the table was created over restored state: its watermark at the checkpoint.
    pub(crate) fn restore(&self, watermark: Option<i64>) -> Result<()> {
        if let Some(c) = &mut self.inner()?.clock {
            c.watermark = watermark;
        }
        Ok(())
    }

    /// Takes the changes not yet in an epoch and the contents they lead to.
    pub(crate) fn drain(&self) -> Result<Drained> {
        let mut inner = self.inner()?;
        let changes = std::mem::take(&mut inner.pending);
        inner.pending_rows = 0;
        inner.drains += 1;
        let idle = self
            .idle_timeout
            .is_some_and(|t| inner.last_write.elapsed() > t);
        let watermark = inner.clock.as_ref().and_then(|c| c.watermark);
        let late = inner
            .clock
            .as_mut()
            .map_or(0, |c| std::mem::take(&mut c.late));
        Ok(Drained {
            changes,
            contents: inner.contents.snapshot(),
            time: EventTime { watermark, idle },
            late,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::Int64Array;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    fn rows(n: i64) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("v", DataType::Int64, true)]));
        RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from_iter_values(0..n))])
            .expect("batch")
    }

    fn write(t: &Table, n: i64) {
        let commit = t
            .apply(TableWrite {
                deletes: None,
                inserts: Some(rows(n)),
            })
            .expect("apply");
        commit.durable().expect("durable");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_writer_ahead_of_the_views_waits_for_the_next_epoch() {
        let t = Arc::new(
            Table::new(
                1,
                "t",
                rows(0).schema(),
                None,
                &kappa_state::MemStateStore,
                None,
                WriteOrder {
                    gate: Arc::default(),
                    history: None,
                },
            )
            .expect("table"),
        );
        // A small backlog: acknowledged at once.
        write(&t, 10);
        t.settled().await.expect("settled");

        // A large one: the acknowledgment waits until a barrier takes it.
        write(&t, BACKLOG_ROWS as i64);
        let waiting = tokio::spawn({
            let t = t.clone();
            async move { t.settled().await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "acknowledged before the views took the rows"
        );
        let drained = t.drain().expect("drain");
        assert_eq!(
            drained.changes.iter().map(|c| c.num_rows()).sum::<usize>(),
            BACKLOG_ROWS + 10
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(waiting.is_finished());
        waiting.await.expect("task").expect("settled");
    }
}

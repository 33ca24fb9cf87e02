//! The runtime: runs every materialized view's dataflow, epoch by epoch.
//!
//! # Epochs and the consistent cut
//! A barrier ([`Runtime::barrier`]) first takes a cut of every engine table's changelog
//! under the DML gate — so a statement's write is either wholly in the epoch or wholly in a
//! later one, and any write that finished before another one started is in the same or an
//! earlier epoch. It then drives each view's operators over the epoch's changes (views in
//! creation order, which is a topological order: a view can only read relations created
//! before it) and finally publishes one [`Snapshot`] holding every relation's contents at
//! that epoch. Readers only ever see published snapshots, so they see all views at the same
//! epoch, never a view half-way through one.
//!
//! Operators see each epoch as: every batch from every input, then `on_barrier` once. This
//! slice schedules that synchronously on the thread that runs the barrier; the operator
//! contract is the same one an asynchronous, channel-based scheduler will drive.
//!
//! # Durability and recovery
//! With a [`History`], the runtime records every input the dataflow depends on: each DDL
//! statement at the moment it changes the runtime (under the runtime lock), each table
//! write (under the DML gate, see `table.rs`), and each epoch boundary with its processing
//! time, source positions and idle inputs (under the gate, exclusively, after the cut). An
//! epoch in which nothing could have changed a view (no write, no source rows, no new or
//! dropped relation, the same idle inputs) is not recorded; it is merged into the next.
//! Recovery ([`Runtime::begin_recovery`]) feeds the history back: writes to their tables,
//! epoch records as barriers that take their time, source positions and idleness from the
//! record instead of the clock, and DDL statements to the engine, whose barriers consume the
//! next epoch record. The dataflow is deterministic, so every view comes back with the
//! contents it had.

// The runtime's sides: `inputs` (tables, sources, sinks), `views` (the view graph and its
// lifecycles), `commit` (what each epoch publishes, and its listeners), `recovery` (the
// history fed back), `checkpoint` (state written as of one epoch record). The epoch loop
// itself, which ties them together, is `run_barrier` below.
mod build;
mod checkpoint;
mod clock;
pub mod commit;
mod dataflow;
mod exchange;
mod inputs;
mod recovery;
mod table;
mod views;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_connectors::{ColumnSet, Position, Sink, Source};
use kappa_operators::ContentsSnapshot;
use kappa_plan::{NodeKind, StreamGraph};
use kappa_state::{EpochRecord, History, Record, SourcePosition, StateStore};

pub use checkpoint::{CheckpointStats, HistoryInfo};
pub use commit::{Commit, CommitDelta, ListenLimits, Listening};
pub use dataflow::{EventTime, cores};
pub use inputs::SourceStats;
pub use recovery::RecoveryStats;
pub use table::{Table, TableEventTime, TableWrite, WriteAck};

use checkpoint::{PendingCheckpoint, RuntimeCheckpoint, WritingCheckpoint};
use dataflow::Dataflow;
use inputs::{LiveSink, LiveSource, MAX_SOURCE_ROWS_PER_EPOCH, set_columns_read};
use recovery::Replay;

/// Rows per batch when a snapshot is decoded for readers and for backfill.
pub const READ_BATCH_SIZE: usize = 8192;

/// One relation's contents at a committed epoch.
pub struct RelationSnapshot {
    pub data: ContentsSnapshot,
    /// Set if the view stopped updating because its dataflow failed; readers get the error.
    pub failure: Option<String>,
    batches: OnceLock<Arc<Vec<RecordBatch>>>,
}

impl RelationSnapshot {
    fn new(data: ContentsSnapshot, failure: Option<String>) -> Arc<Self> {
        Arc::new(Self {
            data,
            failure,
            batches: OnceLock::new(),
        })
    }

    /// The contents as Arrow batches, decoded once per snapshot and shared by all readers.
    pub fn batches(&self) -> Result<Arc<Vec<RecordBatch>>> {
        if let Some(b) = self.batches.get() {
            return Ok(b.clone());
        }
        let b = Arc::new(self.data.to_batches(READ_BATCH_SIZE)?);
        Ok(self.batches.get_or_init(|| b).clone())
    }
}

/// Keeps a subscription's own dataflow running; dropped, the dataflow goes away at the
/// next barrier.
pub struct TransientView(Arc<std::sync::atomic::AtomicBool>);

impl Drop for TransientView {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A materialized view's progress, as `kappa_view_stats` shows it.
#[derive(Clone, Debug, Default)]
pub struct ViewStats {
    /// The watermark of the view's output (event-time microseconds).
    pub watermark: Option<i64>,
    /// Late changes dropped since the view was created.
    pub late_rows: u64,
    /// Entries in the view's operator state (its own contents excluded).
    pub state_entries: usize,
    /// Shards its keyed operators run in.
    pub parallelism: usize,
    /// Why the view stopped updating, if it did.
    pub failure: Option<String>,
}

struct Inner {
    epoch: Epoch,
    /// Processing time of the current epoch (wall-clock µs at its start, never decreasing):
    /// what `now()` is to a temporal filter.
    now: i64,
    /// In creation order (a topological order).
    views: Vec<Dataflow>,
    sources: BTreeMap<RelationId, LiveSource>,
    sinks: BTreeMap<RelationId, LiveSink>,
    /// A relation was created or dropped since the last barrier: its epoch is recorded.
    relations_changed: bool,
    /// The idle inputs of the last recorded epoch.
    recorded_idle: Vec<RelationId>,
    /// When the last checkpoint was taken (or the runtime started), and last attempted.
    last_checkpoint: std::time::Instant,
    last_attempt: std::time::Instant,
    /// Something was recorded since the last checkpoint.
    changed_since_checkpoint: bool,
    /// Name prefixes of the state of relations dropped since the last checkpoint.
    dropped_state: Vec<String>,
    checkpoints: CheckpointStats,
    /// The checkpoint being written, if any (one at a time).
    writing: Option<WritingCheckpoint>,
}

impl Inner {
    /// Advances the processing time to the wall clock (if it moved forward) and returns it.
    fn tick(&mut self) -> i64 {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        self.now = self.now.max(wall);
        self.now
    }
}

pub struct Runtime {
    inner: Mutex<Inner>,
    /// Kept apart from `inner` so that statements find their table without waiting for a
    /// barrier in progress.
    tables: RwLock<BTreeMap<RelationId, Arc<Table>>>,
    /// Held shared by every DML statement while it applies its write, exclusively by the
    /// barrier while it cuts the tables' changelogs.
    gate: Arc<RwLock<()>>,
    /// The last commit and its listeners.
    commits: commit::Listeners,
    store: Arc<dyn StateStore>,
    ctx: SessionContext,
    /// Where every input is recorded; `None`: nothing survives a restart.
    history: Option<Arc<History>>,
    replay: Mutex<Option<Replay>>,
    recovered: Mutex<RecoveryStats>,
    /// Take a checkpoint at the first recorded epoch this long after the last one; `None`:
    /// never (recovery replays the whole history).
    checkpoint_interval: Option<std::time::Duration>,
    /// Set by a barrier when the store holds more than twice its limit of unwritten
    /// changes while checkpoints are being taken: writes wait ([`Runtime::state_settled`]).
    state_backlog: std::sync::atomic::AtomicBool,
}

impl Runtime {
    pub fn new(store: Arc<dyn StateStore>, history: Option<Arc<History>>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                epoch: 0,
                now: i64::MIN,
                views: Vec::new(),
                sources: BTreeMap::new(),
                sinks: BTreeMap::new(),
                relations_changed: false,
                recorded_idle: Vec::new(),
                last_checkpoint: std::time::Instant::now(),
                last_attempt: std::time::Instant::now(),
                changed_since_checkpoint: false,
                dropped_state: Vec::new(),
                checkpoints: CheckpointStats::default(),
                writing: None,
            }),
            tables: RwLock::new(BTreeMap::new()),
            gate: Arc::new(RwLock::new(())),
            commits: commit::Listeners::default(),
            store,
            ctx: SessionContext::new(),
            history,
            replay: Mutex::new(None),
            recovered: Mutex::new(RecoveryStats::default()),
            state_backlog: std::sync::atomic::AtomicBool::new(false),
            checkpoint_interval: None,
        }
    }

    /// Checkpoints every `interval` (needs a history and a checkpointed store).
    pub fn with_checkpoints(mut self, interval: std::time::Duration) -> Self {
        self.checkpoint_interval = Some(interval);
        self
    }

    fn tables_now(&self) -> Result<BTreeMap<RelationId, Arc<Table>>> {
        Ok(self
            .tables
            .read()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .clone())
    }

    /// Records a DDL statement that changes only the catalog (a plain view).
    pub fn record_ddl(&self, sql: &str) -> Result<()> {
        let mut inner = self.lock()?;
        self.record_ddl_locked(&mut inner, sql)
    }

    /// Appends `sql` to the history, durably, unless recovering; the next epoch is recorded.
    fn record_ddl_locked(&self, inner: &mut Inner, sql: &str) -> Result<()> {
        inner.relations_changed = true;
        match &self.history {
            Some(h) if !self.recovering() => h.sync(h.append_ddl(sql)?),
            _ => Ok(()),
        }
    }

    /// The processing time for work outside a barrier: during recovery the last recorded
    /// one, else the clock.
    fn current_now(&self, inner: &mut Inner) -> i64 {
        if self.recovering() {
            inner.now
        } else {
            inner.tick()
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| KappaError::internal("runtime lock poisoned"))
    }

    /// The last commit: the consistent cut readers query.
    pub fn committed(&self) -> Arc<Commit> {
        self.commits.current()
    }

    /// Follows the commits from now on (see [`commit::Listeners::listen`]): returns the
    /// current commit, and the listener receives every later one's changes of `relations`
    /// (`None`: all).
    pub fn listen(
        &self,
        relations: Option<Vec<RelationId>>,
        limits: ListenLimits,
    ) -> (Arc<Commit>, Listening) {
        self.commits.listen(relations, limits)
    }

    /// Makes `catalog` the catalog of the current commit and of every later one: readers
    /// resolve names with it from now on.
    pub fn set_catalog(&self, catalog: kappa_sql::catalog::Catalog) {
        self.commits.set_catalog(catalog);
    }

    /// Listeners following the commits now.
    pub fn listeners(&self) -> usize {
        self.commits.count()
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Runs one epoch: cuts the tables' changelogs, drives every view, publishes the new
    /// snapshot. Returns when the epoch is visible to readers. During recovery epochs come
    /// from the history only, so this does nothing.
    pub fn barrier(&self) -> Result<Epoch> {
        let mut inner = self.lock()?;
        if !self.recovering() {
            self.run_barrier(&mut inner, None)?;
        }
        Ok(inner.epoch)
    }

    /// Runs one epoch. `recorded`: the epoch's record when recovery replays it; a barrier
    /// run by a DDL statement during recovery takes the next record from the history.
    fn run_barrier(&self, inner: &mut Inner, recorded: Option<EpochRecord>) -> Result<()> {
        let recorded = match recorded {
            Some(r) => Some(r),
            None if self.recovering() => self.next_recorded_epoch()?,
            None => None,
        };
        if inner.views.iter().any(Dataflow::abandoned) {
            inner.views.retain(|v| !v.abandoned());
            set_columns_read(inner, None);
        }
        let previous = self.committed();
        let mut deltas: HashMap<RelationId, Vec<ChangeBatch>> = HashMap::new();
        let mut times: HashMap<RelationId, EventTime> = HashMap::new();
        let mut late: HashMap<RelationId, u64> = HashMap::new();
        let mut relations = HashMap::new();
        let mut source_stats = HashMap::new();
        let idle_by_record = |id: &RelationId, live: bool| match &recorded {
            Some(r) => r.idle.contains(id),
            None => live,
        };
        // Sources first, outside the DML gate: their positions and the tables' cut are
        // independent, and the gate holds up writes only for the cut and the epoch record.
        let checkpoint_due = recorded.is_none() && self.checkpoint_due(inner);
        let mut changed = inner.relations_changed;
        let mut positions = Vec::with_capacity(inner.sources.len());
        for (id, s) in inner.sources.iter_mut() {
            let (read, finished) = match &recorded {
                Some(r) => match r.sources.iter().find(|p| p.source == *id) {
                    Some(p) => {
                        let to = Position::decode(&p.position)?;
                        let read = s.source.read_range(&s.position, &to)?;
                        s.position = to;
                        (read, p.finished)
                    }
                    None => (vec![], s.finished),
                },
                None if s.finished => (vec![], true),
                None => {
                    let poll = s.source.poll(MAX_SOURCE_ROWS_PER_EPOCH)?;
                    s.position = s.source.position();
                    (poll.changes, poll.finished)
                }
            };
            let mut changes = Vec::with_capacity(read.len());
            for change in read {
                s.rows += change.num_rows() as u64;
                let change = match s.clock.as_mut() {
                    Some(c) => {
                        let admitted = c.admit(change.clone())?;
                        c.advance(change.data())?;
                        admitted
                    }
                    None => change,
                };
                changes.push(change);
            }
            changed |= !changes.is_empty() || finished != s.finished;
            s.finished = finished;
            s.busy = recorded.is_none() && !changes.is_empty() && !s.finished;
            if !changes.is_empty() {
                s.last_rows = std::time::Instant::now();
            }
            deltas.insert(*id, changes);
            let t = s.event_time();
            times.insert(
                *id,
                EventTime {
                    idle: idle_by_record(id, t.idle),
                    ..t
                },
            );
            late.insert(
                *id,
                s.clock.as_mut().map_or(0, |c| std::mem::take(&mut c.late)),
            );
            source_stats.insert(
                *id,
                SourceStats {
                    rows: s.rows,
                    finished: s.finished,
                },
            );
            positions.push(SourcePosition {
                source: *id,
                position: s.position.encode(),
                finished: s.finished,
            });
        }
        let mut checkpoint: Option<PendingCheckpoint> = None;
        let now = {
            let _cut = self
                .gate
                .write()
                .map_err(|_| KappaError::internal("DML gate poisoned"))?;
            let tables = self
                .tables
                .read()
                .map_err(|_| KappaError::internal("table registry poisoned"))?
                .clone();
            for (id, table) in &tables {
                let d = table.drain()?;
                let unchanged = d.changes.is_empty() && d.late == 0;
                changed |= !unchanged;
                deltas.insert(*id, d.changes);
                times.insert(
                    *id,
                    EventTime {
                        idle: idle_by_record(id, d.time.idle),
                        ..d.time
                    },
                );
                late.insert(*id, d.late);
                let rel = match previous.relations.get(id) {
                    Some(p) if unchanged => p.clone(),
                    _ => RelationSnapshot::new(ContentsSnapshot::Multiset(d.contents), None),
                };
                relations.insert(*id, rel);
            }
            let now = match &recorded {
                Some(r) => {
                    inner.now = inner.now.max(r.now);
                    inner.now
                }
                None => inner.tick(),
            };
            let mut idle: Vec<RelationId> = times
                .iter()
                .filter(|(_, t)| t.idle)
                .map(|(id, _)| *id)
                .collect();
            idle.sort_unstable();
            changed |= idle != inner.recorded_idle;
            // A checkpoint is taken at an epoch record: this epoch is recorded if anything
            // was since the last checkpoint.
            let record = changed || (checkpoint_due && inner.changed_since_checkpoint);
            if let (Some(h), None, true) = (&self.history, &recorded, record) {
                let record = EpochRecord {
                    now,
                    sources: positions,
                    idle: idle.clone(),
                };
                // Views stay correct without the record (recovery then merges this epoch
                // into the next); a failing disk fails the next write instead.
                match h.append_epoch(&record) {
                    Ok(seq) => {
                        inner.changed_since_checkpoint = true;
                        if checkpoint_due {
                            checkpoint = self.checkpoint_tables(inner, seq, &tables);
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "cannot record an epoch in the history"),
                }
            }
            inner.recorded_idle = idle;
            inner.relations_changed = false;
            now
        };
        inner.epoch += 1;
        let epoch = inner.epoch;
        let mut view_stats = HashMap::new();
        for view in &mut inner.views {
            let was_failed = view.failure.is_some();
            if view.failure.is_none() {
                // A view over a failed view cannot stay correct either.
                let failed_input = view.graph.sources().into_iter().find_map(|s| {
                    relations
                        .get(&s)
                        .and_then(|r: &Arc<RelationSnapshot>| r.failure.clone())
                });
                // A subscription's dataflow over a relation dropped since it started.
                let dropped_input = view.transient.is_some()
                    && view
                        .graph
                        .sources()
                        .iter()
                        .any(|s| !relations.contains_key(s) && !deltas.contains_key(s));
                if let Some(f) = failed_input {
                    view.failure = Some(f);
                } else if dropped_input {
                    view.failure = Some(format!(
                        "the subscription ended at epoch {epoch}: a relation its query reads was dropped"
                    ));
                } else if let Err(e) = view
                    .run_epoch(epoch, now, &deltas, &times)
                    // A read of stored state that failed while the view ran.
                    .and_then(|()| self.store.take_error().map_or(Ok(()), Err))
                {
                    tracing::error!(view = view.name(), error = %e, "materialized view failed");
                    view.failure = Some(format!(
                        "materialized view \"{}\" stopped updating at epoch {epoch}: {e}",
                        view.name()
                    ));
                }
            }
            view.late_rows += view
                .graph
                .sources()
                .iter()
                .filter_map(|s| late.get(s))
                .sum::<u64>();
            times.insert(view.relation, view.watermark);
            view_stats.insert(view.relation, view.stats());
            let mut out = view.take_output();
            if view.failure.is_some() {
                // Whatever a failing epoch emitted is not a change of the view.
                out.clear();
            }
            let unchanged = out.is_empty() && was_failed == view.failure.is_some();
            deltas.insert(view.relation, out);
            let rel = match previous.relations.get(&view.relation) {
                Some(p) if unchanged => p.clone(),
                _ => RelationSnapshot::new(view.snapshot()?, view.failure.clone()),
            };
            relations.insert(view.relation, rel);
        }
        for (id, s) in inner.sinks.iter_mut() {
            if s.dormant || s.failure.is_some() {
                continue;
            }
            let failed = relations.get(&s.from).and_then(|r| r.failure.clone());
            let written = match failed {
                Some(f) => Err(KappaError::user(
                    kappa_common::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    f,
                )),
                None => s.sink.write(
                    epoch,
                    deltas.get(&s.from).map(Vec::as_slice).unwrap_or_default(),
                ),
            };
            if let Err(e) = written {
                tracing::error!(sink = id, error = %e, "a sink stopped writing");
                s.failure = Some(format!("stopped at epoch {epoch}: {e}"));
            }
        }
        self.commits.publish(Commit {
            epoch,
            now,
            catalog: Arc::default(),
            relations,
            delta: Arc::new(CommitDelta {
                epoch,
                now,
                changes: deltas
                    .into_iter()
                    .map(|(id, c)| (id, Arc::new(c)))
                    .collect(),
                view_stats,
                source_stats,
            }),
        });
        // The snapshot just replaced pins older state; dropped first, it does not hold the
        // checkpoint back (a query's own reference still does).
        drop(previous);
        if let Some(cp) = checkpoint {
            self.finish_checkpoint(inner, cp);
        }
        let over = self
            .store
            .pending_limit()
            .is_some_and(|limit| self.store.pending_bytes() > 2 * limit);
        let draining = self.checkpoint_interval.is_some()
            && self.history.is_some()
            && inner.checkpoints.paused.is_none();
        self.state_backlog
            .store(over && draining, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Returns once the store's unwritten changes are back under twice its limit, if a
    /// barrier found them over it (memory back-pressure: a write is acknowledged only
    /// then, so writers cannot outrun the checkpoints that move state to disk). Gives up
    /// after a minute.
    pub async fn state_settled(&self) -> Result<()> {
        hold_while(|| {
            Ok(self
                .state_backlog
                .load(std::sync::atomic::Ordering::Relaxed))
        })
        .await
    }
}

/// Back-pressure: holds a writer while `waiting` says so, for at most a minute. What it
/// waits for happens at a barrier, which wakes no one, so it polls every 2 ms; the minute
/// bounds the wait if that never comes (a table dropped meanwhile, failing checkpoints).
pub(crate) async fn hold_while(mut waiting: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while waiting()? && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    struct Silent;

    impl Source for Silent {
        fn position(&self) -> Position {
            Position::rows(0)
        }
        fn earliest(&self) -> Position {
            Position::rows(0)
        }
        fn poll(&mut self, _max_rows: usize) -> Result<kappa_connectors::Poll> {
            Ok(kappa_connectors::Poll::inserts(vec![], false))
        }
        fn read_range(&self, _from: &Position, _to: &Position) -> Result<Vec<ChangeBatch>> {
            Ok(vec![])
        }
        fn seek(&mut self, _to: &Position) -> Result<()> {
            Ok(())
        }
    }

    fn source(idle_timeout: Option<Duration>, quiet_for: Duration, finished: bool) -> LiveSource {
        LiveSource {
            source: Box::new(Silent),
            position: Position::rows(0),
            rows: 0,
            finished,
            busy: false,
            clock: None,
            idle_timeout,
            last_rows: Instant::now() - quiet_for,
        }
    }

    #[test]
    fn a_quiet_source_becomes_idle_after_its_timeout() {
        let t = Some(Duration::from_millis(100));
        assert!(!source(t, Duration::ZERO, false).event_time().idle);
        assert!(source(t, Duration::from_secs(1), false).event_time().idle);
        assert!(
            !source(None, Duration::from_secs(1), false)
                .event_time()
                .idle
        );
        // A finished stream is not idle: its watermark is the end of time instead.
        assert!(!source(t, Duration::from_secs(1), true).event_time().idle);
    }
}

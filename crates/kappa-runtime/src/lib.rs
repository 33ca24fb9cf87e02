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

mod build;
mod clock;
pub mod commit;
mod dataflow;
mod exchange;
mod table;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_connectors::{ColumnSet, Position, Sink, Source};
use kappa_operators::ContentsSnapshot;
use kappa_plan::{NodeKind, StreamGraph};
use kappa_state::{EpochRecord, History, Record, SourcePosition, StateStore};

pub use commit::{Commit, CommitDelta, ListenLimits, Listening};
pub use dataflow::{EventTime, cores};
pub use table::{Table, TableEventTime, TableWrite, WriteAck};

use dataflow::Dataflow;

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

/// A checkpoint whose batch a background thread is writing, while epochs go on: the
/// changes it holds stay in flight in their tables (reads see them in memory) until it ends.
struct WritingCheckpoint {
    cp: PendingCheckpoint,
    /// The views whose changes it holds.
    views: Vec<RelationId>,
    /// The dropped relations whose state it deletes.
    dropped: Vec<String>,
    started: std::time::Instant,
    thread: Option<std::thread::JoinHandle<Result<u64>>>,
}

impl Drop for WritingCheckpoint {
    /// The runtime goes away only after its last write (the database stays open until then).
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

/// A connector-fed source: the source, how far the views have read it, its event clock.
struct LiveSource {
    source: Box<dyn Source>,
    /// Where the views have read up to: what a later view replays to, and where the next
    /// poll starts.
    position: Position,
    /// Rows handed to the views so far (`kappa_sources`).
    rows: u64,
    finished: bool,
    /// The last poll returned rows: there may be more ready.
    busy: bool,
    clock: Option<clock::EventClock>,
    /// After this long without rows the source reports itself idle; `None`: never.
    idle_timeout: Option<std::time::Duration>,
    last_rows: std::time::Instant,
}

/// Tells each source which of its columns are read: by its event clock, and by the scans
/// of the views (and of `new`, a view about to be added) over it.
fn set_columns_read(inner: &mut Inner, new: Option<&StreamGraph>) {
    let graphs: Vec<&StreamGraph> = inner.views.iter().map(|v| &v.graph).chain(new).collect();
    for (id, s) in inner.sources.iter_mut() {
        let mut read = ColumnSet::of(s.clock.iter().flat_map(|c| c.columns()));
        for node in graphs.iter().flat_map(|g| &g.nodes) {
            if let NodeKind::Source {
                relation,
                projection,
                ..
            } = &node.kind
                && relation == id
            {
                read = read.union(match projection {
                    Some(cols) => ColumnSet::of(cols.iter().copied()),
                    None => ColumnSet::ALL,
                });
            }
        }
        s.source.set_columns_read(read);
    }
}

impl LiveSource {
    /// Where the source stands in event time. A finished stream's watermark is the end of
    /// time (every window closes); a live one without rows for longer than its idle timeout
    /// is idle.
    fn event_time(&self) -> EventTime {
        let watermark = match (&self.clock, self.finished) {
            (Some(_), true) => Some(i64::MAX),
            (Some(c), false) => c.watermark,
            (None, _) => None,
        };
        let idle = !self.finished
            && self
                .idle_timeout
                .is_some_and(|t| self.last_rows.elapsed() > t);
        EventTime { watermark, idle }
    }
}

/// A sink: the relation whose changes it writes, and how far it got.
struct LiveSink {
    sink: Box<dyn Sink>,
    from: RelationId,
    /// What the last successful `pre_commit` returned (what a restart resumes from, if its
    /// checkpoint was written).
    token: Option<Vec<u8>>,
    /// Why it stopped writing, if it did (it resumes from its last checkpoint at the next
    /// start).
    failure: Option<String>,
    /// Restored from a checkpoint that did not hold it (it was dropped before, its DROP
    /// follows): it must not touch its output.
    dormant: bool,
}

/// Rows a barrier takes from one source at most, so an epoch stays short.
const MAX_SOURCE_ROWS_PER_EPOCH: usize = 1 << 20;

/// A source's progress, as `kappa_sources` shows it.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    pub rows: u64,
    pub finished: bool,
}

/// Recovery in progress: the history being fed back, read ahead in chunks.
struct Replay {
    history: Arc<History>,
    buffer: VecDeque<(u64, Record)>,
    next_seq: u64,
    stats: RecoveryStats,
    started: std::time::Instant,
    restore: Option<Restore>,
    /// The DDL statement being run comes before the checkpoint: it rebuilds its relation
    /// over the checkpointed state (no backfill, no barrier).
    restoring: bool,
}

/// What recovery replayed.
#[derive(Clone, Debug, Default)]
pub struct RecoveryStats {
    /// The sequence number of the checkpoint recovery started from (0: none).
    pub checkpoint: u64,
    pub ddl: u64,
    pub writes: u64,
    pub epochs: u64,
    pub seconds: f64,
}

/// Checkpoints taken since the server started, as `kappa_history` shows them.
#[derive(Clone, Debug, Default)]
pub struct CheckpointStats {
    pub count: u64,
    /// The sequence number of the epoch record the last checkpoint reflects.
    pub last_seq: u64,
    /// How long the last checkpoint took (collecting its changes and writing them) and its
    /// write batch's size.
    pub last_ms: f64,
    pub last_bytes: u64,
    pub max_ms: f64,
    /// Why the last checkpoint attempt failed (cleared by the next one written). Nothing is
    /// lost: the history keeps everything since the last good one, and the next checkpoint
    /// writes everything the failed one would have.
    pub failed: Option<String>,
    /// Why the last checkpoint due was not taken, if it was not.
    pub paused: Option<String>,
}

/// A source at a checkpoint.
#[derive(Clone, Debug, Default)]
struct SourceCheckpoint {
    /// Its position, as the source encodes it.
    position: Vec<u8>,
    rows: u64,
    finished: bool,
    watermark: Option<i64>,
}

/// The runtime's own state at a checkpoint (the state tables hold the rest).
#[derive(Default)]
struct RuntimeCheckpoint {
    epoch: Epoch,
    now: i64,
    recorded_idle: Vec<RelationId>,
    /// Per source, where it stood.
    sources: HashMap<RelationId, SourceCheckpoint>,
    /// Table → watermark.
    tables: HashMap<RelationId, Option<i64>>,
    /// The views that existed.
    views: Vec<RelationId>,
    /// Per sink, what its `pre_commit` returned for this checkpoint.
    sinks: HashMap<RelationId, Vec<u8>>,
}

impl RuntimeCheckpoint {
    fn encode(&self) -> Vec<u8> {
        use kappa_state::codec::Encoder;
        let mut e = Encoder::new();
        e.u64(self.epoch).i64(self.now);
        e.u64(self.recorded_idle.len() as u64);
        for id in &self.recorded_idle {
            e.u64(*id);
        }
        e.u64(self.sources.len() as u64);
        for (id, s) in &self.sources {
            e.u64(*id)
                .bytes(&s.position)
                .u64(s.rows)
                .bool(s.finished)
                .opt_i64(s.watermark);
        }
        e.u64(self.tables.len() as u64);
        for (id, wm) in &self.tables {
            e.u64(*id).opt_i64(*wm);
        }
        e.u64(self.views.len() as u64);
        for id in &self.views {
            e.u64(*id);
        }
        e.u64(self.sinks.len() as u64);
        for (id, token) in &self.sinks {
            e.u64(*id).bytes(token);
        }
        e.finish()
    }

    fn decode(bytes: &[u8]) -> Result<Self> {
        let mut d = kappa_state::codec::Decoder::new(bytes, "the runtime");
        let mut c = RuntimeCheckpoint {
            epoch: d.u64()?,
            now: d.i64()?,
            ..Default::default()
        };
        for _ in 0..d.u64()? {
            c.recorded_idle.push(d.u64()?);
        }
        for _ in 0..d.u64()? {
            let id = d.u64()?;
            let source = SourceCheckpoint {
                position: d.bytes()?.to_vec(),
                rows: d.u64()?,
                finished: d.bool()?,
                watermark: d.opt_i64()?,
            };
            c.sources.insert(id, source);
        }
        for _ in 0..d.u64()? {
            let id = d.u64()?;
            c.tables.insert(id, d.opt_i64()?);
        }
        for _ in 0..d.u64()? {
            c.views.push(d.u64()?);
        }
        for _ in 0..d.u64()? {
            let id = d.u64()?;
            c.sinks.insert(id, d.bytes()?.to_vec());
        }
        d.end()?;
        Ok(c)
    }
}

/// The checkpoint recovery starts from.
struct Restore {
    /// The epoch record the checkpoint reflects: every DDL record before it rebuilds a
    /// relation over its checkpointed state instead of running.
    seq: u64,
    state: RuntimeCheckpoint,
    /// The restored relations are published (the first record after the checkpoint came).
    published: bool,
}

/// The history's state, as `kappa_history` shows it.
#[derive(Clone, Debug)]
pub struct HistoryInfo {
    pub data_dir: String,
    pub fsync: bool,
    /// The last record's sequence number (records up to the last checkpoint are deleted,
    /// except DDL statements).
    pub records: u64,
    pub disk_bytes: u64,
    /// What the last start recovered.
    pub recovered: RecoveryStats,
    pub checkpoints: CheckpointStats,
    /// 0: checkpoints are off.
    pub checkpoint_interval_ms: u64,
}

impl Replay {
    fn fill(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            for r in self.history.read_from(self.next_seq).take(1024) {
                let (seq, rec) = r?;
                self.next_seq = seq + 1;
                self.buffer.push_back((seq, rec));
            }
        }
        Ok(())
    }

    /// Whether the next record is a DDL statement (it is left in place).
    fn next_is_ddl(&mut self) -> Result<bool> {
        self.fill()?;
        Ok(matches!(self.buffer.front(), Some((_, Record::Ddl(_)))))
    }

    /// Takes the next record, counting it.
    fn next(&mut self) -> Result<Option<(u64, Record)>> {
        self.fill()?;
        let next = self.buffer.pop_front();
        match &next {
            Some((_, Record::Ddl(_))) => self.stats.ddl += 1,
            Some((_, Record::Write { .. })) => self.stats.writes += 1,
            Some((_, Record::Epoch(_))) => self.stats.epochs += 1,
            None => {}
        }
        Ok(next)
    }
}

/// Names the history record an error of recovery arose at.
fn at_record(seq: u64, e: KappaError) -> KappaError {
    match e {
        KappaError::User { state, message } => KappaError::user(
            state,
            format!("recovery failed at history record {seq}: {message}"),
        ),
        other => KappaError::internal(format!("recovery failed at history record {seq}: {other}")),
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

    /// The history's state; `None` when state is kept in memory only.
    pub fn history_info(&self) -> Option<HistoryInfo> {
        let h = self.history.as_ref()?;
        Some(HistoryInfo {
            data_dir: h.path().display().to_string(),
            fsync: h.fsync(),
            records: h.last_seq(),
            disk_bytes: h.disk_bytes(),
            recovered: self.recovered.lock().map(|r| r.clone()).unwrap_or_default(),
            checkpoints: self
                .inner
                .lock()
                .map(|i| i.checkpoints.clone())
                .unwrap_or_default(),
            checkpoint_interval_ms: self
                .checkpoint_interval
                .map_or(0, |d| d.as_millis().max(1) as u64),
        })
    }

    fn replay_lock(&self) -> Result<MutexGuard<'_, Option<Replay>>> {
        self.replay
            .lock()
            .map_err(|_| KappaError::internal("recovery lock poisoned"))
    }

    /// Whether the runtime is replaying its history (recovery).
    pub fn recovering(&self) -> bool {
        self.replay_lock().map(|r| r.is_some()).unwrap_or(false)
    }

    /// Starts recovery: the history is fed back by [`Runtime::recover_step`].
    pub fn begin_recovery(&self) -> Result<()> {
        let Some(history) = self.history.clone() else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let restore = match history.last_checkpoint()? {
            Some((seq, bytes)) => {
                let state = RuntimeCheckpoint::decode(&bytes)?;
                let mut inner = self.lock()?;
                inner.epoch = state.epoch;
                inner.now = state.now;
                inner.recorded_idle = state.recorded_idle.clone();
                Some(Restore {
                    seq,
                    state,
                    published: false,
                })
            }
            None => None,
        };
        *self.replay_lock()? = Some(Replay {
            history,
            buffer: VecDeque::new(),
            next_seq: 1,
            stats: RecoveryStats {
                checkpoint: restore.as_ref().map_or(0, |r| r.seq),
                ..RecoveryStats::default()
            },
            started,
            restore,
            restoring: false,
        });
        Ok(())
    }

    /// Whether the DDL statement being replayed comes before the checkpoint (its relation
    /// is rebuilt over checkpointed state).
    fn restoring(&self) -> Result<bool> {
        Ok(self.replay_lock()?.as_ref().is_some_and(|r| r.restoring))
    }

    /// What the checkpoint recovery started from says about relation `id`.
    fn restored<T>(&self, f: impl FnOnce(&RuntimeCheckpoint) -> Option<T>) -> Result<Option<T>> {
        Ok(self
            .replay_lock()?
            .as_ref()
            .and_then(|r| r.restore.as_ref())
            .and_then(|r| f(&r.state)))
    }

    /// Once every relation of the checkpoint is rebuilt (the first record after it, or the
    /// end of the history): publishes their restored contents, which the replay continues
    /// from.
    fn publish_restored(&self) -> Result<()> {
        {
            let mut replay = self.replay_lock()?;
            let Some(r) = replay.as_mut() else {
                return Ok(());
            };
            r.restoring = false;
            match &mut r.restore {
                Some(restore) if !restore.published => restore.published = true,
                _ => return Ok(()),
            }
        }
        let inner = self.lock()?;
        let mut relations = HashMap::new();
        for (id, table) in self.tables_now()? {
            relations.insert(
                id,
                RelationSnapshot::new(ContentsSnapshot::Multiset(table.latest()?), None),
            );
        }
        let mut view_stats = HashMap::new();
        for view in &inner.views {
            relations.insert(
                view.relation,
                RelationSnapshot::new(view.snapshot()?, view.failure.clone()),
            );
            view_stats.insert(view.relation, view.stats());
        }
        let source_stats = inner
            .sources
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    SourceStats {
                        rows: s.rows,
                        finished: s.finished,
                    },
                )
            })
            .collect();
        // The restored contents are the base the replay continues from: no changes.
        self.commits.publish(Commit {
            epoch: inner.epoch,
            now: inner.now,
            relations,
            delta: Arc::new(CommitDelta {
                epoch: inner.epoch,
                now: inner.now,
                changes: HashMap::new(),
                view_stats,
                source_stats,
            }),
        });
        Ok(())
    }

    fn tables_now(&self) -> Result<BTreeMap<RelationId, Arc<Table>>> {
        Ok(self
            .tables
            .read()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .clone())
    }

    /// Replays writes and epochs up to the next DDL statement, which it returns for the
    /// engine to execute (its barriers take their epochs from the history); `None` at the
    /// end of the history.
    pub fn recover_step(&self) -> Result<Option<String>> {
        loop {
            let next = match self.replay_lock()?.as_mut() {
                Some(r) => {
                    let next = r.next()?;
                    let before_checkpoint =
                        |seq: u64| r.restore.as_ref().is_some_and(|c| seq < c.seq);
                    r.restoring =
                        matches!(&next, Some((seq, Record::Ddl(_))) if before_checkpoint(*seq));
                    next
                }
                None => None,
            };
            if !self.restoring()? {
                self.publish_restored()?;
            }
            let Some((seq, record)) = next else {
                return Ok(None);
            };
            match record {
                Record::Ddl(sql) => return Ok(Some(sql)),
                Record::Write { .. } => self.replay_write(seq, record)?,
                Record::Epoch(e) => {
                    let mut inner = self.lock()?;
                    self.run_barrier(&mut inner, Some(e))
                        .map_err(|e| at_record(seq, e))?;
                }
            }
        }
    }

    /// Applies write record number `seq` to its table.
    fn replay_write(&self, seq: u64, record: Record) -> Result<()> {
        let Record::Write {
            table,
            deletes,
            inserts,
        } = record
        else {
            return Err(KappaError::internal("not a write record"));
        };
        let t = self.table(table).ok_or_else(|| {
            KappaError::user(
                kappa_common::SqlState::DATA_CORRUPTED,
                format!("a write to table {table}, which does not exist"),
            )
        });
        t.and_then(|t| t.apply_replayed(TableWrite { deletes, inserts }))
            .map_err(|e| at_record(seq, e))
    }

    /// Inside recovery, the epoch record that ends the current epoch, after applying the
    /// writes before it. `None` if the history ends first (or a DDL statement comes first,
    /// which stays next): the epoch then runs on the live clock.
    fn next_recorded_epoch(&self) -> Result<Option<EpochRecord>> {
        loop {
            let mut guard = self.replay_lock()?;
            let Some(replay) = guard.as_mut() else {
                return Ok(None);
            };
            if replay.next_is_ddl()? {
                return Ok(None);
            }
            match replay.next()? {
                None => return Ok(None),
                Some((_, Record::Epoch(e))) => return Ok(Some(e)),
                Some((seq, w)) => {
                    drop(guard);
                    self.replay_write(seq, w)?;
                }
            }
        }
    }

    /// Ends recovery: sources continue where the history left them.
    pub fn finish_recovery(&self) -> Result<RecoveryStats> {
        self.publish_restored()?;
        let stats = self
            .replay_lock()?
            .take()
            .map(|r| RecoveryStats {
                seconds: r.started.elapsed().as_secs_f64(),
                ..r.stats
            })
            .unwrap_or_default();
        if let Ok(mut r) = self.recovered.lock() {
            *r = stats.clone();
        }
        let mut inner = self.lock()?;
        for s in inner.sources.values_mut() {
            s.source.seek(&s.position)?;
            s.busy = !s.finished;
        }
        // What was replayed after the checkpoint is in the next one.
        inner.changed_since_checkpoint = true;
        Ok(stats)
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

    /// Listeners following the commits now.
    pub fn listeners(&self) -> usize {
        self.commits.count()
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Registers a new, empty engine table. It is visible (empty) after the next barrier.
    /// `ddl` is the statement, for the history.
    pub fn create_table(
        &self,
        ddl: &str,
        id: RelationId,
        name: &str,
        schema: datafusion::arrow::datatypes::SchemaRef,
        primary_key: Option<Vec<usize>>,
        watermark: Option<(
            usize,
            datafusion::logical_expr::Expr,
            Option<std::time::Duration>,
        )>,
    ) -> Result<Arc<Table>> {
        let event_time = match watermark {
            Some((column, expr, idle_timeout)) => {
                let df = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
                Some(TableEventTime {
                    column,
                    expr: self.ctx.create_physical_expr(expr, &df)?,
                    idle_timeout,
                })
            }
            None => None,
        };
        let table = Arc::new(Table::new(
            id,
            name,
            schema,
            primary_key,
            self.store.as_ref(),
            event_time,
            table::WriteOrder {
                gate: self.gate.clone(),
                history: self.history.clone(),
            },
        )?);
        if self.restoring()? {
            table.restore(self.restored(|c| c.tables.get(&id).copied())?.flatten())?;
        }
        let mut inner = self.lock()?;
        self.record_ddl_locked(&mut inner, ddl)?;
        self.tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .insert(id, table.clone());
        Ok(table)
    }

    /// Registers a connector-fed source. Its rows flow to views from the next barrier on.
    pub fn create_source(
        &self,
        ddl: &str,
        id: RelationId,
        schema: datafusion::arrow::datatypes::SchemaRef,
        source: Box<dyn Source>,
        watermark: Option<(usize, datafusion::logical_expr::Expr)>,
        idle_timeout: Option<std::time::Duration>,
    ) -> Result<()> {
        let clock = match watermark {
            Some((column, expr)) => {
                let df = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
                Some(clock::EventClock::new(
                    column,
                    self.ctx.create_physical_expr(expr, &df)?,
                ))
            }
            None => None,
        };
        let mut clock = clock;
        let (position, rows, finished) = match self.restored(|c| c.sources.get(&id).cloned())? {
            Some(saved) if self.restoring()? => {
                if let Some(c) = &mut clock {
                    c.watermark = saved.watermark;
                }
                (
                    Position::decode(&saved.position)?,
                    saved.rows,
                    saved.finished,
                )
            }
            _ => (source.earliest(), 0, false),
        };
        let mut inner = self.lock()?;
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.sources.insert(
            id,
            LiveSource {
                source,
                position,
                rows,
                finished,
                busy: true,
                clock,
                idle_timeout,
                last_rows: std::time::Instant::now(),
            },
        );
        set_columns_read(&mut inner, None);
        Ok(())
    }

    /// Whether a source delivered rows at the last barrier and is not finished: another
    /// barrier right away will likely find more.
    pub fn sources_have_more(&self) -> bool {
        self.inner
            .lock()
            .map(|i| i.sources.values().any(|s| s.busy))
            .unwrap_or(false)
    }

    pub fn table(&self, id: RelationId) -> Option<Arc<Table>> {
        self.tables.read().ok()?.get(&id).cloned()
    }

    /// Builds a view's dataflow, fills it from the current contents of its inputs (the
    /// relations' contents at the last committed epoch are exactly what their future
    /// changes will apply to), and commits an epoch so the view is visible on return.
    /// `parallelism`: how many shards its keyed operators run in (a view restored from a
    /// checkpoint keeps the number it was checkpointed with, which its state is split by).
    pub fn create_view(
        &self,
        ddl: &str,
        relation: RelationId,
        graph: StreamGraph,
        parallelism: usize,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let current = self.committed();
        if self.restoring()? {
            // Its state is the checkpoint's (a view dropped before the checkpoint has none;
            // its DROP follows).
            let checkpointed = self
                .restored(|c| c.views.contains(&relation).then_some(()))?
                .is_some();
            let parallelism = if checkpointed {
                dataflow::checkpointed_parallelism(self.store.as_ref(), relation)?
            } else {
                parallelism
            };
            let mut view = build::build_dataflow(
                &self.ctx,
                relation,
                graph,
                self.store.as_ref(),
                parallelism,
            )?;
            if checkpointed {
                view.restore()?;
            }
            inner.views.push(view);
            set_columns_read(&mut inner, None);
            return Ok(());
        }
        let mut view =
            build::build_dataflow(&self.ctx, relation, graph, self.store.as_ref(), parallelism)?;
        // Before the replay, which must fill the columns the new view reads.
        set_columns_read(&mut inner, Some(&view.graph));
        let backfill = Self::backfill_inputs(&inner, &view, &current)?;
        let epoch = inner.epoch;
        let now = self.current_now(&mut inner);
        view.run_epoch(epoch, now, &backfill, &HashMap::new())?;
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.views.push(view);
        self.run_barrier(&mut inner, None)
    }

    /// Every input relation's contents as of `current` (a source's rows up to its
    /// position), as inserts: what a new dataflow is filled from.
    fn backfill_inputs(
        inner: &Inner,
        view: &Dataflow,
        current: &Commit,
    ) -> Result<HashMap<RelationId, Vec<ChangeBatch>>> {
        let mut backfill: HashMap<RelationId, Vec<ChangeBatch>> = HashMap::new();
        for src in view.graph.sources() {
            if let Some(s) = inner.sources.get(&src) {
                let changes = s.source.read_range(&s.source.earliest(), &s.position)?;
                backfill.insert(src, changes);
                continue;
            }
            let snap = current.relations.get(&src).ok_or_else(|| {
                KappaError::internal(format!("relation {src} has no committed snapshot"))
            })?;
            if let Some(f) = &snap.failure {
                return Err(KappaError::user(
                    kappa_common::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("cannot read a failed view: {f}"),
                ));
            }
            let batches = snap.batches()?;
            backfill.insert(
                src,
                batches.iter().cloned().map(ChangeBatch::inserts).collect(),
            );
        }
        Ok(backfill)
    }

    /// Builds a subscription's own dataflow over `graph` (`SUBSCRIBE (query)`), fills it
    /// from the last commit's contents, and follows it from the next commit on. Returns
    /// the epoch it was filled at, its contents then, and the listener of its changes.
    /// It is not recorded, not checkpointed and keeps its state in memory; it goes away at
    /// the first barrier after the returned handle is dropped.
    pub fn create_transient_view(
        &self,
        relation: RelationId,
        graph: StreamGraph,
        parallelism: usize,
        limits: ListenLimits,
    ) -> Result<(Epoch, ContentsSnapshot, Listening, TransientView)> {
        let mut inner = self.lock()?;
        let current = self.committed();
        let mut view = build::build_dataflow(
            &self.ctx,
            relation,
            graph,
            &kappa_state::MemStateStore,
            parallelism,
        )?;
        set_columns_read(&mut inner, Some(&view.graph));
        let backfill = Self::backfill_inputs(&inner, &view, &current)?;
        let now = self.current_now(&mut inner);
        view.run_epoch(current.epoch, now, &backfill, &HashMap::new())?;
        // Its backfill is its contents, not a change.
        view.take_output();
        let ended = Arc::new(std::sync::atomic::AtomicBool::new(false));
        view.transient = Some(ended.clone());
        let contents = view.snapshot()?;
        inner.views.push(view);
        // Under the runtime lock: the next commit is the first with the view in it.
        let (commit, listening) = self.commits.listen(Some(vec![relation]), limits);
        Ok((commit.epoch, contents, listening, TransientView(ended)))
    }

    /// Registers a sink of relation `from`'s changes. Unless restored from a checkpoint
    /// (then it resumes from the checkpoint's token), it starts empty, is given the
    /// relation's contents at the last commit when `snapshot` (as inserts of that epoch),
    /// and then every later epoch's changes.
    pub fn create_sink(
        &self,
        ddl: &str,
        id: RelationId,
        from: RelationId,
        sink: Box<dyn Sink>,
        snapshot: bool,
    ) -> Result<()> {
        let mut inner = self.lock()?;
        let mut live = LiveSink {
            sink,
            from,
            token: None,
            failure: None,
            dormant: false,
        };
        if self.restoring()? {
            match self.restored(|c| c.sinks.get(&id).cloned())? {
                Some(token) => {
                    live.sink.start(Some(&token))?;
                    live.token = Some(token);
                }
                None => live.dormant = true,
            }
        } else {
            live.sink.start(None)?;
            if snapshot {
                let current = self.committed();
                let snap = current.relations.get(&from).ok_or_else(|| {
                    KappaError::internal(format!("relation {from} has no committed snapshot"))
                })?;
                if let Some(f) = &snap.failure {
                    return Err(KappaError::user(
                        kappa_common::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!("cannot write a failed view: {f}"),
                    ));
                }
                let rows: Vec<ChangeBatch> = snap
                    .batches()?
                    .iter()
                    .cloned()
                    .map(ChangeBatch::inserts)
                    .collect();
                live.sink.write(current.epoch, &rows)?;
            }
        }
        self.record_ddl_locked(&mut inner, ddl)?;
        inner.sinks.insert(id, live);
        Ok(())
    }

    /// Removes a relation's dataflow or table. Readers stop seeing it at the next commit.
    /// `ddl` is the statement, for the history, on the first of its drops.
    pub fn drop_relation(&self, ddl: Option<&str>, relation: RelationId) -> Result<()> {
        let mut inner = self.lock()?;
        match ddl {
            Some(sql) => self.record_ddl_locked(&mut inner, sql)?,
            None => inner.relations_changed = true,
        }
        let table = self
            .tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .remove(&relation);
        let views = inner.views.len();
        inner.views.retain(|v| v.relation != relation);
        let view = inner.views.len() < views;
        inner.sources.remove(&relation);
        inner.sinks.remove(&relation);
        set_columns_read(&mut inner, None);
        if self.restoring()? {
            // The checkpoint holds no state of it any more.
            return Ok(());
        }
        if table.is_some() || view {
            inner
                .dropped_state
                .push(build::state_prefix(relation, view));
        }
        self.run_barrier(&mut inner, None)
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

    /// Whether this barrier should take a checkpoint: live, and its interval has passed or
    /// the store holds more unwritten changes than it should.
    fn checkpoint_due(&self, inner: &mut Inner) -> bool {
        let (Some(interval), Some(_)) = (self.checkpoint_interval, &self.history) else {
            return false;
        };
        if !self.checkpoint_written(inner) {
            return false;
        }
        // Early when the store holds too many unwritten changes, but never more often than
        // every tenth of the interval.
        let full = self
            .store
            .pending_limit()
            .is_some_and(|limit| self.store.pending_bytes() >= limit);
        if self.recovering()
            || (inner.last_checkpoint.elapsed() < interval && !full)
            || inner.last_attempt.elapsed() < interval / 10
        {
            return false;
        }
        inner.checkpoints.paused = inner
            .views
            .iter()
            .find(|v| v.transient.is_none() && !v.checkpointable())
            .map(|v| {
                format!(
                    "materialized view \"{}\" uses an operator whose state cannot be checkpointed",
                    v.name()
                )
            });
        inner.checkpoints.paused.is_none()
    }

    /// Under the DML gate, at epoch record `seq`: takes the tables' changes since the last
    /// checkpoint (their contents as of the cut).
    fn checkpoint_tables(
        &self,
        inner: &mut Inner,
        seq: u64,
        tables: &BTreeMap<RelationId, Arc<Table>>,
    ) -> Option<PendingCheckpoint> {
        let started = std::time::Instant::now();
        inner.last_attempt = started;
        let mut cp = PendingCheckpoint {
            seq,
            elapsed: std::time::Duration::ZERO,
            changes: Vec::new(),
            watermarks: HashMap::new(),
            tables: Vec::new(),
            positions: Vec::new(),
            sinks: HashMap::new(),
        };
        for (id, table) in tables {
            cp.tables.push(table.clone());
            match table.checkpoint(&mut cp.changes) {
                Ok(wm) => {
                    cp.watermarks.insert(*id, wm);
                }
                Err(e) => {
                    self.checkpoint_ended(inner, &cp, &[], Err(e));
                    return None;
                }
            }
        }
        cp.elapsed = started.elapsed();
        Some(cp)
    }

    /// After the epoch's views ran: adds their changes and the runtime's state, and starts
    /// writing the checkpoint.
    fn finish_checkpoint(&self, inner: &mut Inner, mut cp: PendingCheckpoint) {
        let started = std::time::Instant::now();
        let mut taken = Vec::new();
        for view in inner.views.iter_mut().filter(|v| v.transient.is_none()) {
            taken.push(view.relation);
            if let Err(e) = view.checkpoint(&mut cp.changes) {
                self.checkpoint_ended(inner, &cp, &taken, Err(e));
                return;
            }
        }
        let mut prepared: Result<()> = Ok(());
        for t in &cp.tables {
            prepared = prepared.and(t.before_checkpoint_write());
        }
        for v in inner.views.iter_mut().filter(|v| v.transient.is_none()) {
            prepared = prepared.and(v.before_checkpoint_write());
        }
        if let Err(e) = prepared {
            self.checkpoint_ended(inner, &cp, &taken, Err(e));
            return;
        }
        cp.positions = inner
            .sources
            .iter()
            .map(|(id, s)| (*id, s.position.clone()))
            .collect();
        // Sinks make what they wrote durable before the checkpoint that records how far
        // they got; a failed sink keeps its last good token.
        let mut sink_tokens = HashMap::new();
        let epoch = inner.epoch;
        for (id, s) in inner.sinks.iter_mut() {
            if s.dormant {
                continue;
            }
            if s.failure.is_none() {
                match s.sink.pre_commit(epoch) {
                    Ok(token) => s.token = Some(token),
                    Err(e) => {
                        tracing::error!(sink = id, error = %e, "a sink cannot make its output durable");
                        s.failure = Some(format!("stopped at epoch {epoch}: {e}"));
                    }
                }
            }
            if let Some(t) = &s.token {
                sink_tokens.insert(*id, t.clone());
            }
        }
        cp.sinks = sink_tokens.clone();
        let state = RuntimeCheckpoint {
            epoch: inner.epoch,
            now: inner.now,
            recorded_idle: inner.recorded_idle.clone(),
            sources: inner
                .sources
                .iter()
                .map(|(id, s)| {
                    let saved = SourceCheckpoint {
                        position: s.position.encode(),
                        rows: s.rows,
                        finished: s.finished,
                        watermark: s.clock.as_ref().and_then(|c| c.watermark),
                    };
                    (*id, saved)
                })
                .collect(),
            tables: std::mem::take(&mut cp.watermarks),
            views: taken.clone(),
            sinks: sink_tokens,
        };
        let Some(history) = self.history.clone() else {
            return;
        };
        // The batch is written on its own thread: the next epochs run meanwhile, and wait
        // only if RocksDB makes their own records wait.
        let (seq, meta) = (cp.seq, state.encode());
        let dropped = inner.dropped_state.clone();
        let batch = kappa_state::CheckpointState {
            tables: std::mem::take(&mut cp.changes),
            dropped: dropped.clone(),
        };
        cp.elapsed += started.elapsed();
        let thread = std::thread::Builder::new()
            .name("kappa-checkpoint".into())
            .spawn(move || history.checkpoint(seq, &meta, batch));
        match thread {
            Ok(thread) => {
                inner.writing = Some(WritingCheckpoint {
                    cp,
                    views: taken,
                    dropped,
                    started: std::time::Instant::now(),
                    thread: Some(thread),
                });
            }
            Err(e) => {
                let e = KappaError::internal(format!("cannot start the checkpoint writer: {e}"));
                self.checkpoint_ended(inner, &cp, &taken, Err(e));
            }
        }
    }

    /// Whether no checkpoint is being written: ends the one being written if its thread is
    /// done. (A runtime that goes away waits for it: `WritingCheckpoint`'s drop.)
    fn checkpoint_written(&self, inner: &mut Inner) -> bool {
        let Some(w) = &mut inner.writing else {
            return true;
        };
        if w.thread.as_ref().is_some_and(|t| !t.is_finished()) {
            return false;
        }
        let Some(mut w) = inner.writing.take() else {
            return true;
        };
        let written = match w.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) | None => Err(KappaError::internal("the checkpoint writer panicked")),
        };
        w.cp.elapsed += w.started.elapsed();
        if written.is_ok() {
            inner.dropped_state.retain(|d| !w.dropped.contains(d));
        }
        self.checkpoint_ended(inner, &w.cp, &w.views, written);
        true
    }

    /// Tells every table whose changes were taken (the tables, and those of `views`)
    /// whether the checkpoint was written, and keeps the statistics. A checkpoint that was
    /// not written costs nothing: its changes are taken again by the next.
    fn checkpoint_ended(
        &self,
        inner: &mut Inner,
        cp: &PendingCheckpoint,
        views: &[RelationId],
        outcome: Result<u64>,
    ) {
        let written = outcome.is_ok();
        let mut done: Result<()> = Ok(());
        for t in &cp.tables {
            done = done.and(t.checkpoint_done(written));
        }
        for v in inner
            .views
            .iter_mut()
            .filter(|v| views.contains(&v.relation))
        {
            done = done.and(v.checkpoint_done(written));
        }
        let c = &mut inner.checkpoints;
        match (outcome, done) {
            (Ok(bytes), Ok(())) => {
                // The checkpoint's own work: collecting the changes and writing them (not
                // the epoch's processing in between).
                let ms = cp.elapsed.as_secs_f64() * 1e3;
                c.count += 1;
                c.last_seq = cp.seq;
                c.last_ms = ms;
                c.last_bytes = bytes;
                c.max_ms = c.max_ms.max(ms);
                c.failed = None;
                c.paused = None;
                inner.last_checkpoint = std::time::Instant::now();
                // Records appended while it was written are after it.
                inner.changed_since_checkpoint =
                    self.history.as_ref().is_some_and(|h| h.last_seq() > cp.seq);
                for (id, token) in &cp.sinks {
                    if let Some(s) = inner.sinks.get_mut(id)
                        && s.failure.is_none()
                        && let Err(e) = s.sink.commit(token)
                    {
                        tracing::error!(sink = id, error = %e, "a sink cannot commit");
                        s.failure = Some(e.to_string());
                    }
                }
                // Recovery never reads a source before these positions again.
                for (id, at) in &cp.positions {
                    if let Some(s) = inner.sources.get_mut(id)
                        && let Err(e) = s.source.checkpoint_durable(at)
                    {
                        tracing::warn!(source = id, error = %e, "a source could not take note of a durable checkpoint");
                    }
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "checkpoint failed; the next one will retry");
                c.failed = Some(e.to_string());
            }
        }
    }
}

/// A checkpoint between the tables' cut and the end of its epoch.
struct PendingCheckpoint {
    seq: u64,
    /// Time spent on the checkpoint so far.
    elapsed: std::time::Duration,
    changes: dataflow::TableChanges,
    watermarks: HashMap<RelationId, Option<i64>>,
    /// The tables whose changes were taken.
    tables: Vec<Arc<Table>>,
    /// Each source's position at the checkpoint: once it is written, told to the source
    /// ([`Source::checkpoint_durable`]).
    positions: Vec<(RelationId, Position)>,
    /// Each sink's token in the checkpoint: once it is written, the sink commits.
    sinks: HashMap<RelationId, Vec<u8>>,
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

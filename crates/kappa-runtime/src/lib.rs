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

mod build;
mod clock;
mod dataflow;
mod table;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};

use datafusion::arrow::array::RecordBatch;
use datafusion::prelude::SessionContext;
use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_operators::ContentsSnapshot;
use kappa_plan::StreamGraph;
use kappa_state::StateStore;

pub use dataflow::EventTime;
pub use table::{Table, TableEventTime, TableWrite};

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

/// Every relation's contents at one committed epoch: the consistent cut readers query.
#[derive(Default)]
pub struct Snapshot {
    pub epoch: Epoch,
    pub relations: HashMap<RelationId, Arc<RelationSnapshot>>,
    /// Per materialized view, at this epoch.
    pub view_stats: HashMap<RelationId, ViewStats>,
    /// Per source, at this epoch.
    pub source_stats: HashMap<RelationId, SourceStats>,
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
}

struct Inner {
    epoch: Epoch,
    /// Processing time of the current epoch (wall-clock µs at its start, never decreasing):
    /// what `now()` is to a temporal filter.
    now: i64,
    /// In creation order (a topological order).
    views: Vec<Dataflow>,
    sources: BTreeMap<RelationId, LiveSource>,
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

/// A connector-fed source: its reader, how far the views have read it, its event clock.
struct LiveSource {
    reader: Box<dyn kappa_connectors::SourceReader>,
    /// Rows handed to the views so far (the offset a later view replays up to).
    rows: u64,
    finished: bool,
    /// The last poll returned rows: there may be more ready.
    busy: bool,
    clock: Option<clock::EventClock>,
    /// After this long without rows the source reports itself idle; `None`: never.
    idle_timeout: Option<std::time::Duration>,
    last_rows: std::time::Instant,
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

/// Rows a barrier takes from one source at most, so an epoch stays short.
const MAX_SOURCE_ROWS_PER_EPOCH: usize = 1 << 20;

/// A source's progress, as `kappa_sources` shows it.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    pub rows: u64,
    pub finished: bool,
}

pub struct Runtime {
    inner: Mutex<Inner>,
    /// Kept apart from `inner` so that statements find their table without waiting for a
    /// barrier in progress.
    tables: RwLock<BTreeMap<RelationId, Arc<Table>>>,
    /// Held shared by every DML statement while it applies its write, exclusively by the
    /// barrier while it cuts the tables' changelogs.
    gate: Arc<RwLock<()>>,
    published: RwLock<Arc<Snapshot>>,
    store: Arc<dyn StateStore>,
    ctx: SessionContext,
}

impl Runtime {
    pub fn new(store: Arc<dyn StateStore>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                epoch: 0,
                now: i64::MIN,
                views: Vec::new(),
                sources: BTreeMap::new(),
            }),
            tables: RwLock::new(BTreeMap::new()),
            gate: Arc::new(RwLock::new(())),
            published: RwLock::new(Arc::new(Snapshot::default())),
            store,
            ctx: SessionContext::new(),
        }
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| KappaError::internal("runtime lock poisoned"))
    }

    /// The last committed cut.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        match self.published.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.store
    }

    /// Registers a new, empty engine table. It is visible (empty) after the next barrier.
    pub fn create_table(
        &self,
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
            self.gate.clone(),
            event_time,
        )?);
        self.tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .insert(id, table.clone());
        Ok(table)
    }

    /// Registers a connector-fed source. Its rows flow to views from the next barrier on.
    pub fn create_source(
        &self,
        id: RelationId,
        schema: datafusion::arrow::datatypes::SchemaRef,
        reader: Box<dyn kappa_connectors::SourceReader>,
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
        let mut inner = self.lock()?;
        inner.sources.insert(
            id,
            LiveSource {
                reader,
                rows: 0,
                finished: false,
                busy: true,
                clock,
                idle_timeout,
                last_rows: std::time::Instant::now(),
            },
        );
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
    pub fn create_view(&self, relation: RelationId, graph: StreamGraph) -> Result<()> {
        let mut inner = self.lock()?;
        let current = self.snapshot();
        let mut view = build::build_dataflow(&self.ctx, relation, graph, self.store.as_ref())?;
        let mut backfill: HashMap<RelationId, Vec<ChangeBatch>> = HashMap::new();
        for src in view.graph.sources() {
            if let Some(s) = inner.sources.get(&src) {
                let batches = s.reader.replay(s.rows)?;
                backfill.insert(src, batches.into_iter().map(ChangeBatch::inserts).collect());
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
        let epoch = inner.epoch;
        view.run_epoch(epoch, inner.tick(), &backfill, &HashMap::new())?;
        inner.views.push(view);
        self.barrier_locked(&mut inner)
    }

    /// Removes a relation's dataflow or table. Readers stop seeing it at the next commit.
    pub fn drop_relation(&self, relation: RelationId) -> Result<()> {
        let mut inner = self.lock()?;
        self.tables
            .write()
            .map_err(|_| KappaError::internal("table registry poisoned"))?
            .remove(&relation);
        inner.views.retain(|v| v.relation != relation);
        inner.sources.remove(&relation);
        self.barrier_locked(&mut inner)
    }

    /// Runs one epoch: cuts the tables' changelogs, drives every view, publishes the new
    /// snapshot. Returns when the epoch is visible to readers.
    pub fn barrier(&self) -> Result<Epoch> {
        let mut inner = self.lock()?;
        self.barrier_locked(&mut inner)?;
        Ok(inner.epoch)
    }

    fn barrier_locked(&self, inner: &mut Inner) -> Result<()> {
        let previous = self.snapshot();
        let mut deltas: HashMap<RelationId, Vec<ChangeBatch>> = HashMap::new();
        let mut times: HashMap<RelationId, EventTime> = HashMap::new();
        let mut late: HashMap<RelationId, u64> = HashMap::new();
        let mut relations = HashMap::new();
        {
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
                deltas.insert(*id, d.changes);
                times.insert(*id, d.time);
                late.insert(*id, d.late);
                let rel = match previous.relations.get(id) {
                    Some(p) if unchanged => p.clone(),
                    _ => RelationSnapshot::new(ContentsSnapshot::Multiset(d.contents), None),
                };
                relations.insert(*id, rel);
            }
        }
        let mut source_stats = HashMap::new();
        for (id, s) in inner.sources.iter_mut() {
            let mut changes = Vec::new();
            if !s.finished {
                let poll = s.reader.poll(MAX_SOURCE_ROWS_PER_EPOCH)?;
                for b in poll.batches {
                    s.rows += b.num_rows() as u64;
                    let change = ChangeBatch::inserts(b);
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
                s.finished = poll.finished;
                s.busy = !changes.is_empty() && !s.finished;
                if !changes.is_empty() {
                    s.last_rows = std::time::Instant::now();
                }
            }
            deltas.insert(*id, changes);
            times.insert(*id, s.event_time());
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
        }
        inner.epoch += 1;
        let epoch = inner.epoch;
        let now = inner.tick();
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
                if let Some(f) = failed_input {
                    view.failure = Some(f);
                } else if let Err(e) = view.run_epoch(epoch, now, &deltas, &times) {
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
            view_stats.insert(
                view.relation,
                ViewStats {
                    watermark: view.watermark.watermark,
                    late_rows: view.total_late_rows(),
                    state_entries: view.state_entries(),
                },
            );
            let out = view.take_output();
            let unchanged = out.is_empty() && was_failed == view.failure.is_some();
            deltas.insert(view.relation, out);
            let rel = match previous.relations.get(&view.relation) {
                Some(p) if unchanged => p.clone(),
                _ => RelationSnapshot::new(view.snapshot()?, view.failure.clone()),
            };
            relations.insert(view.relation, rel);
        }
        let snapshot = Arc::new(Snapshot {
            epoch,
            relations,
            view_stats,
            source_stats,
        });
        match self.published.write() {
            Ok(mut p) => *p = snapshot,
            Err(p) => *p.into_inner() = snapshot,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    struct Silent;

    impl kappa_connectors::SourceReader for Silent {
        fn poll(&mut self, _max_rows: usize) -> Result<kappa_connectors::Poll> {
            Ok(kappa_connectors::Poll {
                batches: vec![],
                finished: false,
            })
        }
        fn replay(&self, _rows: u64) -> Result<Vec<RecordBatch>> {
            Ok(vec![])
        }
    }

    fn source(idle_timeout: Option<Duration>, quiet_for: Duration, finished: bool) -> LiveSource {
        LiveSource {
            reader: Box::new(Silent),
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

//! One materialized view's running dataflow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_operators::{ContentsSnapshot, Materialize, Operator, ViewContents};
use kappa_plan::{NodeKind, StreamGraph};
use kappa_state::codec::{Decoder, Encoder};
use kappa_state::{Bytes, StateTable};

use crate::exchange::{self, Route};

pub(crate) use kappa_state::TableChanges;

/// The tables a view keeps beside its operators' when its state is checkpointed.
pub(crate) struct ViewTables {
    /// Per node (key: node index, 4 bytes big-endian) what its operator's `checkpoint`
    /// returned, and under [`VIEW_KEY`] the view's own progress.
    pub meta: Box<dyn StateTable>,
    /// An append-only view's batches, as Arrow IPC, keyed by position (8 bytes big-endian).
    pub appended: Box<dyn StateTable>,
    /// How many of the append-only batches are in `appended`.
    pub appended_len: usize,
}

const VIEW_KEY: &[u8] = b"view";

/// Under this key, the view's parallelism (4 bytes big-endian; absent: 1).
const PARALLELISM_KEY: &[u8] = b"parallelism";

/// Under this key, per node, its operator's name and state version
/// ([`Operator::state_version`]); absent (a checkpoint from before versions were recorded):
/// every operator's state is version 1.
pub const STATE_VERSIONS_KEY: &[u8] = b"state_versions";

/// Encodes each node's operator name and state version, in node order.
fn encode_state_versions(ops: &[Vec<Box<dyn Operator>>]) -> Vec<u8> {
    let mut e = Encoder::new();
    e.u64(ops.len() as u64);
    for shards in ops {
        let (name, version) = shards
            .first()
            .map_or(("", 1), |o| (o.name(), o.state_version()));
        e.str(name).u64(u64::from(version));
    }
    e.finish()
}

/// Refuses a checkpoint whose operators' state versions differ from this build's.
fn check_state_versions(
    saved: Option<&[u8]>,
    ops: &[Vec<Box<dyn Operator>>],
    what: &str,
) -> Result<()> {
    let recorded: Vec<(String, u32)> = match saved {
        Some(bytes) => {
            let mut d = Decoder::new(bytes, what);
            let mut v = Vec::new();
            for _ in 0..d.u64()? {
                let name = d.str()?;
                let version = u32::try_from(d.u64()?).unwrap_or(u32::MAX);
                v.push((name, version));
            }
            d.end()?;
            v
        }
        None => Vec::new(),
    };
    for (i, shards) in ops.iter().enumerate() {
        let Some(op) = shards.first() else { continue };
        let found = recorded.get(i).map_or(1, |(_, v)| *v);
        if found != op.state_version() {
            return Err(KappaError::user(
                kappa_common::SqlState::DATA_CORRUPTED,
                format!(
                    "the checkpoint of {what} holds state format {found} for its operator {} (node {i}), but this build of Kappa reads format {}; start the server on a new data directory (or with the build that wrote it)",
                    op.name(),
                    op.state_version()
                ),
            ));
        }
    }
    Ok(())
}

/// Shard 0 of node `i`: its index, 4 bytes big-endian; shard `s > 0`: then `s`, 4 more.
fn node_key(i: usize, shard: usize) -> Bytes {
    let mut k = (i as u32).to_be_bytes().to_vec();
    if shard > 0 {
        k.extend_from_slice(&(shard as u32).to_be_bytes());
    }
    std::sync::Arc::from(k)
}

/// The name of view `relation`'s `meta` table (see [`ViewTables`]).
pub(crate) fn meta_table_name(relation: RelationId) -> String {
    format!("mv{relation}.meta")
}

/// The parallelism view `relation` was running with at the checkpoint `store` was restored
/// from (1 when the checkpoint predates keyed parallelism).
pub(crate) fn checkpointed_parallelism(
    store: &dyn kappa_state::StateStore,
    relation: RelationId,
) -> Result<usize> {
    let meta = store.create_table(&meta_table_name(relation))?;
    Ok(meta
        .get(PARALLELISM_KEY)
        .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
        .map_or(1, |b| u32::from_be_bytes(b) as usize))
}

pub(crate) struct Dataflow {
    pub relation: RelationId,
    pub graph: StreamGraph,
    /// Per graph node (same index), its operator's shards: one, or the view's parallelism
    /// (see `exchange`).
    pub ops: Vec<Vec<Box<dyn Operator>>>,
    /// Per graph node, how each of its inputs reaches its shards.
    routes: Vec<Vec<Route>>,
    pub contents: Arc<Mutex<ViewContents>>,
    pub failure: Option<String>,
    /// The view's changes in the epoch just run, for the views that read it.
    output: Vec<ChangeBatch>,
    /// The watermark of the view's output after the epoch just run.
    pub watermark: EventTime,
    /// Late changes dropped from this view's inputs since it was created.
    pub late_rows: u64,
    /// With checkpoints: where the view's own state goes.
    pub checkpointed: Option<ViewTables>,
    /// Set for a subscription's own dataflow (`SUBSCRIBE (query)`): not in the catalog, not
    /// recorded, not checkpointed, its state in memory; removed at the first barrier after
    /// the flag is raised (the subscription ended).
    pub transient: Option<Arc<std::sync::atomic::AtomicBool>>,
}

/// Where a stream stands in event time at a barrier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventTime {
    /// The watermark, in microseconds; `None` until the stream has one.
    pub watermark: Option<i64>,
    /// The stream has been idle longer than its idle timeout: it does not hold back the
    /// watermark of an operator that also reads other streams.
    pub idle: bool,
}

impl EventTime {
    /// The watermark of an operator reading `inputs`: the minimum over the inputs that are
    /// not idle (over all of them if all are idle). An input without a watermark has none.
    pub fn combine(inputs: impl IntoIterator<Item = EventTime>) -> EventTime {
        let all: Vec<EventTime> = inputs.into_iter().collect();
        let idle = !all.is_empty() && all.iter().all(|t| t.idle);
        let mut wm: Option<i64> = None;
        for t in all.iter().filter(|t| idle || !t.idle) {
            let Some(w) = t.watermark else {
                return EventTime {
                    watermark: None,
                    idle,
                };
            };
            wm = Some(wm.map_or(w, |m| m.min(w)));
        }
        EventTime {
            watermark: wm,
            idle,
        }
    }
}

impl Dataflow {
    pub fn new(
        relation: RelationId,
        graph: StreamGraph,
        ops: Vec<Vec<Box<dyn Operator>>>,
        routes: Vec<Vec<Route>>,
        contents: Arc<Mutex<ViewContents>>,
    ) -> Self {
        Self {
            relation,
            graph,
            ops,
            routes,
            contents,
            failure: None,
            output: Vec::new(),
            watermark: EventTime::default(),
            late_rows: 0,
            checkpointed: None,
            transient: None,
        }
    }

    pub fn name(&self) -> &str {
        match self.graph.sink().map(|n| &n.kind) {
            Some(NodeKind::Materialize { name, .. }) => name,
            _ => "?",
        }
    }

    /// How many shards the view's keyed operators run in.
    pub fn parallelism(&self) -> usize {
        self.ops.iter().map(Vec::len).max().unwrap_or(1)
    }

    fn all_ops(&self) -> impl Iterator<Item = &Box<dyn Operator>> {
        self.ops.iter().flatten()
    }

    /// Drives one epoch: each node receives all of its inputs' batches, then the barrier
    /// with its inputs' watermark. Nodes are in topological order, so a node's inputs are
    /// complete when it runs; a node's shards run in parallel, each over the part of the
    /// inputs its routes give it. `times` holds each source relation's event time at the
    /// cut; `now` is the epoch's processing time.
    pub fn run_epoch(
        &mut self,
        epoch: Epoch,
        now: i64,
        deltas: &HashMap<RelationId, Vec<ChangeBatch>>,
        times: &HashMap<RelationId, EventTime>,
    ) -> Result<()> {
        let n = self.graph.nodes.len();
        // Per node, per shard, the batches it emitted this epoch.
        let mut outputs: Vec<Vec<Vec<ChangeBatch>>> = Vec::with_capacity(n);
        let mut node_times: Vec<EventTime> = Vec::with_capacity(n);
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let width = self.ops[i].len();
            let time = match &node.kind {
                NodeKind::Source { relation, .. } => {
                    times.get(relation).copied().unwrap_or_default()
                }
                _ => EventTime::combine(node.inputs.iter().map(|&j| node_times[j])),
            };
            // Per shard, its input batches with their port, in arrival order.
            let mut inputs: Vec<Vec<(usize, ChangeBatch)>> =
                (0..width).map(|_| Vec::new()).collect();
            match &node.kind {
                NodeKind::Source { relation, .. } => {
                    let batches = deltas.get(relation).map(Vec::as_slice).unwrap_or_default();
                    for (shard, run) in exchange::split_contiguous(batches, width)
                        .into_iter()
                        .enumerate()
                    {
                        inputs[shard].extend(run.into_iter().map(|b| (0, b)));
                    }
                }
                _ => {
                    for (port, &input) in node.inputs.iter().enumerate() {
                        let produced = outputs.get(input).ok_or_else(|| {
                            KappaError::internal("stream graph is not in topological order")
                        })?;
                        route(&self.routes[i][port], port, produced, &mut inputs)?;
                    }
                }
            }
            let watermark = time.watermark;
            let run = |op: &mut Box<dyn Operator>, input: Vec<(usize, ChangeBatch)>| {
                op.advance_time(now);
                let mut out = Vec::new();
                for (port, b) in input {
                    op.process(port, b, &mut out)?;
                }
                op.on_barrier(epoch, watermark, &mut out)?;
                Ok(out)
            };
            outputs.push(in_parallel(&mut self.ops[i], inputs, run)?);
            node_times.push(time);
        }
        self.output = outputs.pop().map(|o| o.concat()).unwrap_or_default();
        self.watermark = node_times.pop().unwrap_or_default();
        Ok(())
    }

    /// Entries in the operators' state tables (the view's own contents excluded).
    pub fn state_entries(&self) -> usize {
        self.all_ops().map(|o| o.state_entries()).sum()
    }

    /// The view's progress, as `kappa_view_stats` shows it.
    pub fn stats(&self) -> crate::ViewStats {
        crate::ViewStats {
            watermark: self.watermark.watermark,
            late_rows: self.total_late_rows(),
            state_entries: self.state_entries(),
            parallelism: self.parallelism(),
            failure: self.failure.clone(),
        }
    }

    /// Late changes dropped for this view: at its sources and inside its operators.
    pub fn total_late_rows(&self) -> u64 {
        self.late_rows + self.all_ops().map(|o| o.late_rows()).sum::<u64>()
    }

    /// Whether a checkpoint can capture the view's whole state.
    pub fn checkpointable(&self) -> bool {
        self.checkpointed.is_some() && self.all_ops().all(|o| o.checkpointable())
    }

    /// Brings the view's state tables up to date and appends their changes since the last
    /// checkpoint to `out`.
    pub fn checkpoint(&mut self, out: &mut TableChanges) -> Result<()> {
        let parallelism = self.parallelism();
        let Some(tables) = &mut self.checkpointed else {
            return Err(KappaError::internal("a view without checkpoint tables"));
        };
        for (i, shards) in self.ops.iter_mut().enumerate() {
            for (shard, op) in shards.iter_mut().enumerate() {
                let saved = op.checkpoint()?;
                tables
                    .meta
                    .put(node_key(i, shard), std::sync::Arc::from(saved));
            }
        }
        tables.meta.put(
            std::sync::Arc::from(PARALLELISM_KEY),
            std::sync::Arc::from((parallelism as u32).to_be_bytes().as_slice()),
        );
        tables.meta.put(
            std::sync::Arc::from(STATE_VERSIONS_KEY),
            std::sync::Arc::from(encode_state_versions(&self.ops)),
        );
        let view = Encoder::new()
            .opt_i64(self.watermark.watermark)
            .bool(self.watermark.idle)
            .u64(self.late_rows)
            .opt_str(self.failure.as_deref())
            .finish();
        tables
            .meta
            .put(std::sync::Arc::from(VIEW_KEY), std::sync::Arc::from(view));
        if let ViewContents::AppendOnly(batches) = &*self
            .contents
            .lock()
            .map_err(|_| KappaError::internal("view contents lock poisoned"))?
        {
            for (i, b) in batches.iter().enumerate().skip(tables.appended_len) {
                tables.appended.put(
                    std::sync::Arc::from((i as u64).to_be_bytes().as_slice()),
                    std::sync::Arc::from(kappa_state::codec::ipc_bytes(b)?),
                );
            }
            tables.appended_len = batches.len();
        }
        self.for_each_table(&mut |t| t.take_changes(out))
    }

    /// Right before the checkpoint is written (see `StateTable::before_checkpoint_write`).
    pub fn before_checkpoint_write(&mut self) -> Result<()> {
        self.for_each_table(&mut |t| t.before_checkpoint_write())
    }

    /// The checkpoint holding the changes taken was written or abandoned.
    pub fn checkpoint_done(&mut self, written: bool) -> Result<()> {
        self.for_each_table(&mut |t| t.checkpoint_done(written))
    }

    /// Every state table of the view: its operators', its contents', its own.
    fn for_each_table(&mut self, f: &mut dyn FnMut(&mut dyn StateTable)) -> Result<()> {
        for op in self.ops.iter_mut().flatten() {
            for t in op.state_tables() {
                f(t);
            }
        }
        if let ViewContents::Multiset(m) = &mut *self
            .contents
            .lock()
            .map_err(|_| KappaError::internal("view contents lock poisoned"))?
        {
            f(m.table_mut());
        }
        if let Some(tables) = &mut self.checkpointed {
            f(tables.meta.as_mut());
            f(tables.appended.as_mut());
        }
        Ok(())
    }

    /// After the view was built over restored state tables: restores each operator and the
    /// view's own progress and contents.
    pub fn restore(&mut self) -> Result<()> {
        let what = format!("view \"{}\"", self.name());
        let Some(tables) = &mut self.checkpointed else {
            return Err(KappaError::internal("a view without checkpoint tables"));
        };
        let Some(view) = tables.meta.get(VIEW_KEY) else {
            return Err(KappaError::user(
                kappa_common::SqlState::DATA_CORRUPTED,
                format!("the checkpoint holds no state for {what}"),
            ));
        };
        check_state_versions(
            tables.meta.get(STATE_VERSIONS_KEY).as_deref(),
            &self.ops,
            &what,
        )?;
        for (i, shards) in self.ops.iter_mut().enumerate() {
            for (shard, op) in shards.iter_mut().enumerate() {
                let saved = tables
                    .meta
                    .get(&node_key(i, shard))
                    .unwrap_or_else(|| std::sync::Arc::from(&[][..]));
                op.restore(&saved)?;
            }
        }
        let mut d = Decoder::new(&view, &what);
        self.watermark = EventTime {
            watermark: d.opt_i64()?,
            idle: d.bool()?,
        };
        self.late_rows = d.u64()?;
        self.failure = d.opt_str()?;
        d.end()?;
        let mut contents = self
            .contents
            .lock()
            .map_err(|_| KappaError::internal("view contents lock poisoned"))?;
        if let ViewContents::AppendOnly(batches) = &mut *contents {
            let restored = tables
                .appended
                .snapshot()
                .iter()
                .map(|(_, v)| kappa_state::codec::ipc_batch(&v))
                .collect::<Result<Vec<_>>>()?;
            tables.appended_len = restored.len();
            *batches = std::sync::Arc::new(restored);
        }
        Ok(())
    }

    /// A subscription's dataflow whose subscription has ended.
    pub fn abandoned(&self) -> bool {
        self.transient
            .as_ref()
            .is_some_and(|t| t.load(std::sync::atomic::Ordering::Relaxed))
    }

    pub fn take_output(&mut self) -> Vec<ChangeBatch> {
        std::mem::take(&mut self.output)
    }

    pub fn snapshot(&self) -> Result<ContentsSnapshot> {
        Materialize::snapshot(&self.contents)
    }
}

/// Rows below which a node's shards run one after another on the calling thread: handing
/// them to the pool would cost more than the work.
const PARALLEL_ROWS: usize = 4096;

/// The machine's cores: the threads of the shard pool, and views' default parallelism.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The threads every view's shards run on: one per core, started once for the life of the
/// process. Shards are tasks, not threads: a view may have more shards than there are cores,
/// and views share the cores. Keeping the threads (rather than starting some per node per
/// epoch) keeps the allocator's per-thread caches few and warm. `None` when the threads
/// could not be started: shards then run one after another.
fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(cores())
            .thread_name(|i| format!("kappa-shard-{i}"))
            .build()
            .map_err(|e| tracing::warn!("shards run on one thread: {e}"))
            .ok()
    })
    .as_ref()
}

/// `f` over each of `items`, on the pool when `parallel`; the results in `items`' order. A
/// panic in `f` becomes an internal error rather than taking the caller down with it.
fn for_each_shard<T, R, F>(items: Vec<T>, parallel: bool, f: F) -> Result<Vec<R>>
where
    T: Send,
    R: Send,
    F: Fn(T) -> Result<R> + Sync,
{
    let guarded = |item: T| {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(item)))
            .map_err(|_| KappaError::internal("a shard panicked"))?
    };
    match pool() {
        Some(pool) if parallel && items.len() > 1 => {
            use rayon::prelude::*;
            pool.install(|| items.into_par_iter().map(guarded).collect())
        }
        _ => items.into_iter().map(guarded).collect(),
    }
}

/// Delivers one input's batches, as its producer's shards emitted them, to the consumer's
/// shards (`inputs`), as input number `port`. Producer shards are taken in order, so each
/// row's changes keep their order (see `exchange`).
fn route(
    route: &Route,
    port: usize,
    produced: &[Vec<ChangeBatch>],
    inputs: &mut [Vec<(usize, ChangeBatch)>],
) -> Result<()> {
    match route {
        Route::Single => {
            for b in produced.iter().flatten() {
                inputs[0].push((port, b.clone()));
            }
        }
        Route::Forward => {
            for (shard, batches) in produced.iter().enumerate() {
                let target = shard.min(inputs.len() - 1);
                inputs[target].extend(batches.iter().map(|b| (port, b.clone())));
            }
        }
        Route::Hash { keys, types } => {
            let n = inputs.len();
            let rows: usize = produced.iter().flatten().map(ChangeBatch::num_rows).sum();
            let split = |batches: &Vec<ChangeBatch>| -> Result<Vec<Vec<Option<ChangeBatch>>>> {
                batches
                    .iter()
                    .map(|b| exchange::partition(b, keys, types, n))
                    .collect()
            };
            let parts: Vec<Vec<Vec<Option<ChangeBatch>>>> =
                for_each_shard(produced.iter().collect(), rows >= PARALLEL_ROWS, split)?;
            for batch_parts in parts.into_iter().flatten() {
                for (shard, part) in batch_parts.into_iter().enumerate() {
                    if let Some(p) = part {
                        inputs[shard].push((port, p));
                    }
                }
            }
        }
    }
    Ok(())
}

/// Runs `f` for each shard over its input, the shards in parallel when there is enough
/// input to be worth it; the shards' outputs, in shard order.
fn in_parallel<F>(
    shards: &mut [Box<dyn Operator>],
    inputs: Vec<Vec<(usize, ChangeBatch)>>,
    f: F,
) -> Result<Vec<Vec<ChangeBatch>>>
where
    F: Fn(&mut Box<dyn Operator>, Vec<(usize, ChangeBatch)>) -> Result<Vec<ChangeBatch>> + Sync,
{
    let rows: usize = inputs.iter().flatten().map(|(_, b)| b.num_rows()).sum();
    let work: Vec<_> = shards.iter_mut().zip(inputs).collect();
    for_each_shard(work, rows >= PARALLEL_ROWS, |(op, input)| f(op, input))
}

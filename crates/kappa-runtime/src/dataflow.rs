//! One materialized view's running dataflow.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result};
use kappa_operators::{ContentsSnapshot, Materialize, Operator, ViewContents};
use kappa_plan::{NodeKind, StreamGraph};
use kappa_state::codec::{Decoder, Encoder};
use kappa_state::{Bytes, StateTable};

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

fn node_key(i: usize) -> Bytes {
    std::sync::Arc::from((i as u32).to_be_bytes().as_slice())
}

pub(crate) struct Dataflow {
    pub relation: RelationId,
    pub graph: StreamGraph,
    /// One operator per graph node, same index.
    pub ops: Vec<Box<dyn Operator>>,
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
        ops: Vec<Box<dyn Operator>>,
        contents: Arc<Mutex<ViewContents>>,
    ) -> Self {
        Self {
            relation,
            graph,
            ops,
            contents,
            failure: None,
            output: Vec::new(),
            watermark: EventTime::default(),
            late_rows: 0,
            checkpointed: None,
        }
    }

    pub fn name(&self) -> &str {
        match self.graph.sink().map(|n| &n.kind) {
            Some(NodeKind::Materialize { name, .. }) => name,
            _ => "?",
        }
    }

    /// Drives one epoch: each node receives all of its inputs' batches, then the barrier
    /// with its inputs' watermark. Nodes are in topological order, so a node's inputs are
    /// complete when it runs. `times` holds each source relation's event time at the cut;
    /// `now` is the epoch's processing time.
    pub fn run_epoch(
        &mut self,
        epoch: Epoch,
        now: i64,
        deltas: &HashMap<RelationId, Vec<ChangeBatch>>,
        times: &HashMap<RelationId, EventTime>,
    ) -> Result<()> {
        let n = self.graph.nodes.len();
        let mut outputs: Vec<Vec<ChangeBatch>> = Vec::with_capacity(n);
        let mut node_times: Vec<EventTime> = Vec::with_capacity(n);
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let op = &mut self.ops[i];
            op.advance_time(now);
            let mut out = Vec::new();
            let time = match &node.kind {
                NodeKind::Source { relation, .. } => {
                    times.get(relation).copied().unwrap_or_default()
                }
                _ => EventTime::combine(node.inputs.iter().map(|&j| node_times[j])),
            };
            match &node.kind {
                NodeKind::Source { relation, .. } => {
                    for b in deltas.get(relation).into_iter().flatten() {
                        op.process(0, b.clone(), &mut out)?;
                    }
                }
                _ => {
                    for (port, &input) in node.inputs.iter().enumerate() {
                        let batches = outputs.get(input).ok_or_else(|| {
                            KappaError::internal("stream graph is not in topological order")
                        })?;
                        for b in batches {
                            op.process(port, b.clone(), &mut out)?;
                        }
                    }
                }
            }
            op.on_barrier(epoch, time.watermark, &mut out)?;
            outputs.push(out);
            node_times.push(time);
        }
        self.output = outputs.pop().unwrap_or_default();
        self.watermark = node_times.pop().unwrap_or_default();
        Ok(())
    }

    /// Entries in the operators' state tables (the view's own contents excluded).
    pub fn state_entries(&self) -> usize {
        self.ops.iter().map(|o| o.state_entries()).sum()
    }

    /// The view's progress, as `kappa_view_stats` shows it.
    pub fn stats(&self) -> crate::ViewStats {
        crate::ViewStats {
            watermark: self.watermark.watermark,
            late_rows: self.total_late_rows(),
            state_entries: self.state_entries(),
        }
    }

    /// Late changes dropped for this view: at its sources and inside its operators.
    pub fn total_late_rows(&self) -> u64 {
        self.late_rows + self.ops.iter().map(|o| o.late_rows()).sum::<u64>()
    }

    /// Whether a checkpoint can capture the view's whole state.
    pub fn checkpointable(&self) -> bool {
        self.checkpointed.is_some() && self.ops.iter().all(|o| o.checkpointable())
    }

    /// Brings the view's state tables up to date and appends their changes since the last
    /// checkpoint to `out`.
    pub fn checkpoint(&mut self, out: &mut TableChanges) -> Result<()> {
        let Some(tables) = &mut self.checkpointed else {
            return Err(KappaError::internal("a view without checkpoint tables"));
        };
        for (i, op) in self.ops.iter_mut().enumerate() {
            let saved = op.checkpoint()?;
            tables.meta.put(node_key(i), std::sync::Arc::from(saved));
        }
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
        for op in &mut self.ops {
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
        for (i, op) in self.ops.iter_mut().enumerate() {
            let saved = tables
                .meta
                .get(&node_key(i))
                .unwrap_or_else(|| std::sync::Arc::from(&[][..]));
            op.restore(&saved)?;
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

    pub fn take_output(&mut self) -> Vec<ChangeBatch> {
        std::mem::take(&mut self.output)
    }

    pub fn snapshot(&self) -> Result<ContentsSnapshot> {
        Materialize::snapshot(&self.contents)
    }
}

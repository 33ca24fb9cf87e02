//! Checkpoints: the state of every relation as of one epoch record, in one RocksDB write
//! batch, written on a thread of its own while the next epochs run (see
//! `docs/architecture.md`, "Checkpoints"). Also where sinks pre-commit into the checkpoint
//! and commit after it, and where sources learn that a position is durable.

use super::*;

/// A checkpoint whose batch a background thread is writing, while epochs go on: the
/// changes it holds stay in flight in their tables (reads see them in memory) until it ends.
pub(crate) struct WritingCheckpoint {
    pub(crate) cp: PendingCheckpoint,
    /// The views whose changes it holds.
    pub(crate) views: Vec<RelationId>,
    /// The dropped relations whose state it deletes.
    pub(crate) dropped: Vec<String>,
    pub(crate) started: std::time::Instant,
    pub(crate) thread: Option<std::thread::JoinHandle<Result<u64>>>,
}

impl Drop for WritingCheckpoint {
    /// The runtime goes away only after its last write (the database stays open until then).
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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
pub(crate) struct SourceCheckpoint {
    /// Its position, as the source encodes it.
    pub(crate) position: Vec<u8>,
    pub(crate) rows: u64,
    pub(crate) finished: bool,
    pub(crate) watermark: Option<i64>,
}

/// The runtime's own state at a checkpoint (the state tables hold the rest).
#[derive(Default)]
pub(crate) struct RuntimeCheckpoint {
    pub(crate) epoch: Epoch,
    pub(crate) now: i64,
    pub(crate) recorded_idle: Vec<RelationId>,
    /// Per source, where it stood.
    pub(crate) sources: HashMap<RelationId, SourceCheckpoint>,
    /// Table → watermark.
    pub(crate) tables: HashMap<RelationId, Option<i64>>,
    /// The views that existed.
    pub(crate) views: Vec<RelationId>,
    /// Per sink, what its `pre_commit` returned for this checkpoint.
    pub(crate) sinks: HashMap<RelationId, Vec<u8>>,
}

impl RuntimeCheckpoint {
    pub(crate) fn encode(&self) -> Vec<u8> {
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

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self> {
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

/// A checkpoint between the tables' cut and the end of its epoch.
pub(crate) struct PendingCheckpoint {
    pub(crate) seq: u64,
    /// Time spent on the checkpoint so far.
    pub(crate) elapsed: std::time::Duration,
    pub(crate) changes: dataflow::TableChanges,
    pub(crate) watermarks: HashMap<RelationId, Option<i64>>,
    /// The tables whose changes were taken.
    pub(crate) tables: Vec<Arc<Table>>,
    /// Each source's position at the checkpoint: once it is written, told to the source
    /// ([`Source::checkpoint_durable`]).
    pub(crate) positions: Vec<(RelationId, Position)>,
    /// Each sink's token in the checkpoint: once it is written, the sink commits.
    pub(crate) sinks: HashMap<RelationId, Vec<u8>>,
}

impl Runtime {
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

    /// Whether this barrier should take a checkpoint: live, and its interval has passed or
    /// the store holds more unwritten changes than it should.
    pub(crate) fn checkpoint_due(&self, inner: &mut Inner) -> bool {
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
    pub(crate) fn checkpoint_tables(
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
    pub(crate) fn finish_checkpoint(&self, inner: &mut Inner, mut cp: PendingCheckpoint) {
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
    pub(crate) fn checkpoint_written(&self, inner: &mut Inner) -> bool {
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
    pub(crate) fn checkpoint_ended(
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

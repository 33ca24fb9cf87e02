//! Recovery: feeding the history back through the runtime after a restart.
//!
//! Recovery ([`Runtime::begin_recovery`]) reads the history from the start (or from the
//! last checkpoint: the DDL statements before it rebuild their relations over the
//! checkpointed state in *restore* mode). Writes go to their tables; epoch records become
//! barriers that take their time, source positions and idleness from the record instead
//! of the clock; DDL statements go back to the engine, whose barriers consume the next
//! epoch record. The dataflow is deterministic, so every view comes back with the contents
//! it had.

use super::*;

/// Recovery in progress: the history being fed back, read ahead in chunks.
pub(crate) struct Replay {
    pub(crate) history: Arc<History>,
    pub(crate) buffer: VecDeque<(u64, Record)>,
    pub(crate) next_seq: u64,
    pub(crate) stats: RecoveryStats,
    pub(crate) started: std::time::Instant,
    pub(crate) restore: Option<Restore>,
    /// The DDL statement being run comes before the checkpoint: it rebuilds its relation
    /// over the checkpointed state (no backfill, no barrier).
    pub(crate) restoring: bool,
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

/// The checkpoint recovery starts from.
pub(crate) struct Restore {
    /// The epoch record the checkpoint reflects: every DDL record before it rebuilds a
    /// relation over its checkpointed state instead of running.
    pub(crate) seq: u64,
    pub(crate) state: RuntimeCheckpoint,
    /// The restored relations are published (the first record after the checkpoint came).
    pub(crate) published: bool,
}

impl Replay {
    pub(crate) fn fill(&mut self) -> Result<()> {
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
    pub(crate) fn next_is_ddl(&mut self) -> Result<bool> {
        self.fill()?;
        Ok(matches!(self.buffer.front(), Some((_, Record::Ddl(_)))))
    }

    /// Takes the next record, counting it.
    pub(crate) fn next(&mut self) -> Result<Option<(u64, Record)>> {
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
pub(crate) fn at_record(seq: u64, e: KappaError) -> KappaError {
    match e {
        KappaError::User { state, message } => KappaError::user(
            state,
            format!("recovery failed at history record {seq}: {message}"),
        ),
        other => KappaError::internal(format!("recovery failed at history record {seq}: {other}")),
    }
}

impl Runtime {
    pub(crate) fn replay_lock(&self) -> Result<MutexGuard<'_, Option<Replay>>> {
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
    pub(crate) fn restoring(&self) -> Result<bool> {
        Ok(self.replay_lock()?.as_ref().is_some_and(|r| r.restoring))
    }

    /// What the checkpoint recovery started from says about relation `id`.
    pub(crate) fn restored<T>(
        &self,
        f: impl FnOnce(&RuntimeCheckpoint) -> Option<T>,
    ) -> Result<Option<T>> {
        Ok(self
            .replay_lock()?
            .as_ref()
            .and_then(|r| r.restore.as_ref())
            .and_then(|r| f(&r.state)))
    }

    /// Once every relation of the checkpoint is rebuilt (the first record after it, or the
    /// end of the history): publishes their restored contents, which the replay continues
    /// from.
    pub(crate) fn publish_restored(&self) -> Result<()> {
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
            catalog: Arc::default(),
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
    pub(crate) fn replay_write(&self, seq: u64, record: Record) -> Result<()> {
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
    pub(crate) fn next_recorded_epoch(&self) -> Result<Option<EpochRecord>> {
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
}

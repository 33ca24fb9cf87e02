//! The epoch commit: the one value each epoch ends in, and the listeners that follow it.
//!
//! # What a commit is
//! A [`Commit`] is everything an epoch produced, published at once: the epoch number, its
//! processing time, the catalog, every relation's contents at the end of the epoch, every
//! relation's changes *in* the epoch, and every source's position. Readers take the whole
//! value ([`crate::Runtime::committed`]), so a query sees all relations at one epoch, and
//! names them through the catalog of that same value.
//!
//! The catalog is the engine's: a DDL statement replaces it in the current commit
//! ([`Listeners::set_catalog`]) once the runtime holds what it names, and every later
//! commit carries it on. Both happen under the listeners' lock, so an epoch published
//! concurrently never brings back an older catalog.
//!
//! # Invariants
//! - Epochs of successive commits increase by exactly one, and every epoch is published
//!   (an epoch with no changes is a commit with empty changes).
//! - For every relation `r` present in both commits `c(e-1)` and `c(e)`:
//!   `contents(c(e)) = contents(c(e-1)) + changes(c(e))[r]`, as multisets. A relation
//!   created in epoch `e` has no earlier commit; its first contents are its backfill.
//! - A relation's changes are in the order its operators emitted them: a retraction never
//!   comes before the insertion it retracts. They are not consolidated (a row may appear
//!   with +1 and −1 in one epoch).
//!
//! # Listeners
//! SUBSCRIBE sessions, sinks and metrics do not poll: they *listen*. [`Listeners::listen`]
//! registers a listener and returns the commit current at that instant; the listener then
//! receives the [`CommitDelta`] of every later commit, in epoch order, without gaps.
//! A delta holds the changes and statistics, never the snapshots, so a listener that lags
//! pins no state. A listener's buffer is bounded (epochs and rows); the epoch loop never
//! waits for one: a listener over its bound is dropped and told why
//! ([`Listening::recv`] then fails). A listener whose receiver is gone (a client that
//! disconnected) is removed at the next commit.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result, SqlState};

use kappa_sql::catalog::Catalog;

use crate::{RelationSnapshot, SourceStats, ViewStats};

/// One epoch's published result (see the module's documentation for its invariants).
#[derive(Default)]
pub struct Commit {
    pub epoch: Epoch,
    /// The epoch's processing time (µs since the Unix epoch): what `now()` was in it.
    pub now: i64,
    /// The catalog readers resolve names with (set by the engine, carried over by epochs).
    pub catalog: Arc<Catalog>,
    /// Every relation's contents at the end of the epoch.
    pub relations: HashMap<RelationId, Arc<RelationSnapshot>>,
    /// What changed in the epoch, and the statistics at its end.
    pub delta: Arc<CommitDelta>,
}

impl Commit {
    /// Relation `id`'s contents at this commit, as inserts: what a new dataflow or sink
    /// starts from. A failed view cannot be read (55000).
    pub fn contents_as_inserts(&self, id: RelationId) -> Result<Vec<ChangeBatch>> {
        let snap = self.relations.get(&id).ok_or_else(|| {
            KappaError::internal(format!("relation {id} has no committed snapshot"))
        })?;
        if let Some(f) = &snap.failure {
            return Err(KappaError::user(
                SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("cannot read a failed view: {f}"),
            ));
        }
        Ok(snap
            .batches()?
            .iter()
            .cloned()
            .map(ChangeBatch::inserts)
            .collect())
    }
}

/// The part of a commit listeners receive: changes and statistics, no snapshots.
#[derive(Debug, Default)]
pub struct CommitDelta {
    pub epoch: Epoch,
    pub now: i64,
    /// Each relation's changes in this epoch (absent or empty: unchanged).
    pub changes: HashMap<RelationId, Arc<Vec<ChangeBatch>>>,
    /// Per materialized view, at this epoch.
    pub view_stats: HashMap<RelationId, ViewStats>,
    /// Per source (its position: rows read, finished), at this epoch.
    pub source_stats: HashMap<RelationId, SourceStats>,
}

impl CommitDelta {
    /// The changes of `relation` in this epoch.
    pub fn changes_of(&self, relation: RelationId) -> &[ChangeBatch] {
        self.changes
            .get(&relation)
            .map(|c| c.as_slice())
            .unwrap_or_default()
    }

    /// This delta restricted to `relations`' changes (statistics are kept whole: they are
    /// small).
    fn only(&self, relations: &[RelationId]) -> CommitDelta {
        CommitDelta {
            epoch: self.epoch,
            now: self.now,
            changes: relations
                .iter()
                .filter_map(|r| self.changes.get(r).map(|c| (*r, c.clone())))
                .collect(),
            view_stats: self.view_stats.clone(),
            source_stats: self.source_stats.clone(),
        }
    }

    fn rows(&self) -> u64 {
        self.changes
            .values()
            .flat_map(|c| c.iter())
            .map(|b| b.num_rows() as u64)
            .sum()
    }
}

/// How much a listener may hold unread before it is dropped.
#[derive(Clone, Copy, Debug)]
pub struct ListenLimits {
    /// Commits received and not yet taken.
    pub epochs: usize,
    /// Change rows in those commits.
    pub rows: u64,
}

impl Default for ListenLimits {
    fn default() -> Self {
        Self {
            epochs: 4096,
            rows: 1 << 20,
        }
    }
}

struct Listener {
    /// The relations whose changes it receives; `None`: all.
    relations: Option<Vec<RelationId>>,
    tx: tokio::sync::mpsc::UnboundedSender<Arc<CommitDelta>>,
    shared: Arc<ListenerShared>,
    limits: ListenLimits,
}

#[derive(Default)]
struct ListenerShared {
    /// Commits and change rows sent and not yet taken.
    queued_epochs: AtomicU64,
    queued_rows: AtomicU64,
    /// Why the runtime stopped sending (set once, before the sender is dropped).
    ended: OnceLock<String>,
}

/// The receiving end of a listener: every commit after the one [`Listeners::listen`]
/// returned, in order.
pub struct Listening {
    rx: tokio::sync::mpsc::UnboundedReceiver<Arc<CommitDelta>>,
    shared: Arc<ListenerShared>,
}

impl Listening {
    /// The next commit's delta; waits for it. Fails if the listener was dropped for
    /// falling behind or the runtime went away.
    pub async fn recv(&mut self) -> Result<Arc<CommitDelta>> {
        match self.rx.recv().await {
            Some(d) => {
                self.taken(&d);
                Ok(d)
            }
            None => Err(self.end_error()),
        }
    }

    /// The next commit's delta if one is waiting.
    pub fn try_recv(&mut self) -> Result<Option<Arc<CommitDelta>>> {
        match self.rx.try_recv() {
            Ok(d) => {
                self.taken(&d);
                Ok(Some(d))
            }
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => Err(self.end_error()),
        }
    }

    fn taken(&self, d: &CommitDelta) {
        self.shared.queued_epochs.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .queued_rows
            .fetch_sub(d.rows(), Ordering::Relaxed);
    }

    fn end_error(&self) -> KappaError {
        match self.shared.ended.get() {
            Some(why) => KappaError::user(SqlState::PROGRAM_LIMIT_EXCEEDED, why.clone()),
            None => KappaError::user(
                SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                "the server is shutting down",
            ),
        }
    }
}

/// The published commit and everyone following it.
pub struct Listeners {
    current: RwLock<Arc<Commit>>,
    listeners: Mutex<Vec<Listener>>,
}

impl Default for Listeners {
    fn default() -> Self {
        Self {
            current: RwLock::new(Arc::new(Commit::default())),
            listeners: Mutex::new(Vec::new()),
        }
    }
}

impl Listeners {
    /// The last published commit.
    pub fn current(&self) -> Arc<Commit> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Publishes `commit` and hands its delta to every listener. Never waits for a
    /// listener: one over its limits is dropped with the reason.
    pub fn publish(&self, mut commit: Commit) {
        let mut listeners = match self.listeners.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        // The catalog is carried over from the commit it replaces (under the lock: a
        // concurrent `set_catalog` is never lost).
        commit.catalog = self.current().catalog.clone();
        let commit = Arc::new(commit);
        // Under the listeners' lock, so that `listen` sees either this commit as current
        // or receives its delta, never neither or both.
        match self.current.write() {
            Ok(mut c) => *c = commit.clone(),
            Err(p) => *p.into_inner() = commit.clone(),
        }
        listeners.retain(|l| {
            let delta = match &l.relations {
                None => commit.delta.clone(),
                Some(r) => Arc::new(commit.delta.only(r)),
            };
            let rows = delta.rows();
            let epochs = l.shared.queued_epochs.load(Ordering::Relaxed);
            let queued = l.shared.queued_rows.load(Ordering::Relaxed);
            if epochs >= l.limits.epochs as u64 || (queued > 0 && queued + rows > l.limits.rows) {
                let _ = l.shared.ended.set(format!(
                    "the subscriber fell behind: {epochs} epochs ({queued} changed rows) were \
                     waiting to be read at epoch {}, more than the {} epochs / {} rows a \
                     subscription may buffer",
                    commit.epoch, l.limits.epochs, l.limits.rows
                ));
                return false;
            }
            l.shared.queued_epochs.fetch_add(1, Ordering::Relaxed);
            l.shared.queued_rows.fetch_add(rows, Ordering::Relaxed);
            // A receiver that is gone (its client disconnected) removes the listener.
            l.tx.send(delta).is_ok()
        });
    }

    /// Replaces the catalog of the current commit (and so of every later one). Listeners
    /// are not told: no epoch passed.
    pub fn set_catalog(&self, catalog: Catalog) {
        let _listeners = match self.listeners.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let cur = self.current();
        let next = Arc::new(Commit {
            epoch: cur.epoch,
            now: cur.now,
            catalog: Arc::new(catalog),
            relations: cur.relations.clone(),
            delta: cur.delta.clone(),
        });
        match self.current.write() {
            Ok(mut c) => *c = next,
            Err(p) => *p.into_inner() = next,
        }
    }

    /// Registers a listener of `relations`' changes (`None`: every relation's) and returns
    /// the current commit: the listener receives every later one.
    pub fn listen(
        &self,
        relations: Option<Vec<RelationId>>,
        limits: ListenLimits,
    ) -> (Arc<Commit>, Listening) {
        let mut listeners = match self.listeners.lock() {
            Ok(l) => l,
            Err(p) => p.into_inner(),
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shared = Arc::new(ListenerShared::default());
        listeners.push(Listener {
            relations,
            tx,
            shared: shared.clone(),
            limits,
        });
        (self.current(), Listening { rx, shared })
    }

    /// Listeners registered now.
    pub fn count(&self) -> usize {
        self.listeners.lock().map(|l| l.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, RecordBatch};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn commit(epoch: Epoch, rows: &[(RelationId, usize)]) -> Commit {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let changes = rows
            .iter()
            .map(|&(r, n)| {
                let b = RecordBatch::try_new(
                    schema.clone(),
                    vec![Arc::new(Int64Array::from_iter_values(0..n as i64))],
                )
                .expect("batch");
                (r, Arc::new(vec![ChangeBatch::inserts(b)]))
            })
            .collect();
        Commit {
            epoch,
            delta: Arc::new(CommitDelta {
                epoch,
                changes,
                ..CommitDelta::default()
            }),
            ..Commit::default()
        }
    }

    #[test]
    fn a_listener_gets_every_later_commit_and_only_its_relations() -> Result<()> {
        let l = Listeners::default();
        l.publish(commit(1, &[(7, 1)]));
        let (current, mut rx) = l.listen(Some(vec![7]), ListenLimits::default());
        assert_eq!(current.epoch, 1);
        l.publish(commit(2, &[(7, 2), (8, 5)]));
        l.publish(commit(3, &[]));
        let d = rx.try_recv()?.expect("epoch 2");
        assert_eq!(d.epoch, 2);
        assert_eq!(d.changes_of(7)[0].num_rows(), 2);
        assert!(d.changes_of(8).is_empty(), "not listened to");
        assert_eq!(rx.try_recv()?.expect("epoch 3").epoch, 3);
        assert!(rx.try_recv()?.is_none());
        Ok(())
    }

    #[test]
    fn a_slow_listener_is_dropped_with_the_reason_and_never_blocks_publishing() {
        let l = Listeners::default();
        let limits = ListenLimits {
            epochs: 3,
            rows: 1000,
        };
        let (_, mut slow) = l.listen(None, limits);
        let (_, mut fast) = l.listen(None, limits);
        for e in 1..=10 {
            l.publish(commit(e, &[(1, 1)]));
            assert!(matches!(fast.try_recv(), Ok(Some(d)) if d.epoch == e));
        }
        assert_eq!(l.count(), 1, "the slow one is gone, the fast one stays");
        // What was buffered is still delivered, then the reason.
        for e in 1..=3 {
            assert!(matches!(slow.try_recv(), Ok(Some(d)) if d.epoch == e));
        }
        let err = slow.try_recv().expect_err("dropped");
        assert!(err.to_string().contains("fell behind"), "{err}");
        assert_eq!(err.sqlstate(), SqlState::PROGRAM_LIMIT_EXCEEDED);
    }

    #[test]
    fn rows_bound_a_listener_too_but_one_large_epoch_always_passes() {
        let l = Listeners::default();
        let (_, mut rx) = l.listen(
            None,
            ListenLimits {
                epochs: 100,
                rows: 10,
            },
        );
        l.publish(commit(1, &[(1, 50)]));
        l.publish(commit(2, &[(1, 1)]));
        assert!(matches!(rx.try_recv(), Ok(Some(d)) if d.epoch == 1));
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn a_gone_receiver_removes_its_listener() {
        let l = Listeners::default();
        let (_, rx) = l.listen(None, ListenLimits::default());
        drop(rx);
        assert_eq!(l.count(), 1);
        l.publish(commit(1, &[]));
        assert_eq!(l.count(), 0);
    }
}

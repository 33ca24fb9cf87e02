//! SUBSCRIBE: a relation's changes as rows, epoch by epoch.
//!
//! A subscription is a listener of the runtime's commits ([`kappa_runtime::Listening`]).
//! Its rows are `kappa_epoch, [kappa_progressed,] kappa_diff, <the relation's columns>`:
//! - first, unless `SNAPSHOT = false`, the relation's contents at the commit current when it
//!   started (epoch `S`), each row with `kappa_diff = 1` (a row held twice comes twice);
//! - then, for every later epoch `e > S` in order, the relation's changes in `e`, each row
//!   with its weight as `kappa_diff` (+n inserted n times, −n deleted n times; an update is a
//!   −1 and a +1 row), in the order the view emitted them (not consolidated);
//! - with `PROGRESS`, after each epoch's rows (and after the snapshot), one row with
//!   `kappa_progressed = true`, `kappa_epoch = e`, `kappa_diff` and the columns NULL: every
//!   change up to and including epoch `e` has been sent.
//!
//! So summing `kappa_diff` per row over all rows with `kappa_epoch <= e` gives the
//! relation's contents at epoch `e`, for every `e >= S`.
//!
//! A subscription never slows the epoch loop: a subscriber that leaves more than
//! [`kappa_runtime::ListenLimits`] unread is dropped, and its next read fails with 54000.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, new_null_array};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use kappa_common::{ChangeBatch, Epoch, KappaError, RelationId, Result, SqlState};
use kappa_runtime::{CommitDelta, ListenLimits, Listening};
use kappa_sql::catalog::RelationKind;
use kappa_sql::subscribe::{Subscribe, SubscribeTarget};

use crate::{Engine, Session};

/// A live subscription: rows ready to be read, and the listener that brings more.
pub struct Subscription {
    relation: RelationId,
    /// The subscribed relation is a materialized view (its stats say whether it failed or
    /// was dropped).
    view: bool,
    name: String,
    schema: SchemaRef,
    progress: bool,
    listening: Listening,
    /// Rows ready, in order.
    ready: VecDeque<RecordBatch>,
    /// Set when the stream ended (the view failed or was dropped, the subscriber fell
    /// behind); returned once the rows before it are read.
    ended: Option<KappaError>,
    /// `SUBSCRIBE (query)`: keeps the query's own dataflow running while the subscription
    /// lives.
    _transient: Option<kappa_runtime::TransientView>,
}

impl Subscription {
    /// The rows' schema: `kappa_epoch`, `kappa_progressed` (with PROGRESS), `kappa_diff`,
    /// then the relation's columns.
    pub fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    /// The subscribed relation's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Up to `max_rows` rows (`None`: all that are ready). Waits until at least one row is
    /// ready, for at most `timeout` (`None`: as long as it takes); returns no rows if none
    /// came. Fails once the stream has ended and every row before the end was read.
    pub async fn fetch(
        &mut self,
        max_rows: Option<u64>,
        timeout: Option<Duration>,
    ) -> Result<Vec<RecordBatch>> {
        self.drain_waiting()?;
        if self.ready.is_empty() && self.ended.is_none() {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            while self.ready.is_empty() && self.ended.is_none() {
                let next = match deadline {
                    Some(d) => match tokio::time::timeout_at(d, self.listening.recv()).await {
                        Ok(r) => r,
                        Err(_) => return Ok(vec![]),
                    },
                    None => self.listening.recv().await,
                };
                match next {
                    Ok(delta) => self.add(&delta)?,
                    Err(e) => self.ended = Some(e),
                }
            }
            self.drain_waiting()?;
        }
        if self.ready.is_empty() {
            return Err(self
                .ended
                .clone()
                .unwrap_or_else(|| KappaError::internal("subscription ended without a reason")));
        }
        Ok(self.take(max_rows.unwrap_or(u64::MAX)))
    }

    /// Adds the deltas already received, without waiting.
    fn drain_waiting(&mut self) -> Result<()> {
        while self.ended.is_none() {
            match self.listening.try_recv() {
                Ok(Some(delta)) => self.add(&delta)?,
                Ok(None) => break,
                Err(e) => self.ended = Some(e),
            }
        }
        Ok(())
    }

    fn take(&mut self, max_rows: u64) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        let mut left = max_rows;
        while left > 0 {
            let Some(b) = self.ready.pop_front() else {
                break;
            };
            let n = b.num_rows() as u64;
            if n <= left {
                left -= n;
                out.push(b);
            } else {
                let k = left as usize;
                out.push(b.slice(0, k));
                self.ready.push_front(b.slice(k, b.num_rows() - k));
                left = 0;
            }
        }
        out
    }

    /// One epoch's delta: its changes of the relation, then its progress row.
    fn add(&mut self, delta: &CommitDelta) -> Result<()> {
        if self.view {
            match delta.view_stats.get(&self.relation) {
                None => {
                    self.ended = Some(KappaError::user(
                        SqlState::UNDEFINED_TABLE,
                        format!(
                            "the subscription ended: materialized view \"{}\" was dropped at epoch {}",
                            self.name, delta.epoch
                        ),
                    ));
                    return Ok(());
                }
                Some(s) if s.failure.is_some() => {
                    self.ended = Some(KappaError::user(
                        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        s.failure.clone().unwrap_or_default(),
                    ));
                    return Ok(());
                }
                Some(_) => {}
            }
        }
        for c in delta.changes_of(self.relation) {
            if c.num_rows() > 0 {
                let b = self.rows(delta.epoch, c)?;
                self.ready.push_back(b);
            }
        }
        if self.progress {
            let b = self.progress_row(delta.epoch)?;
            self.ready.push_back(b);
        }
        Ok(())
    }

    /// `change`'s rows at `epoch`, with their weights as `kappa_diff`.
    fn rows(&self, epoch: Epoch, change: &ChangeBatch) -> Result<RecordBatch> {
        let n = change.num_rows();
        let mut cols: Vec<ArrayRef> = vec![Arc::new(Int64Array::from_value(epoch as i64, n))];
        if self.progress {
            cols.push(Arc::new(BooleanArray::from(vec![false; n])));
        }
        cols.push(Arc::new(change.weights().clone()));
        cols.extend(change.data().columns().iter().cloned());
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }

    fn progress_row(&self, epoch: Epoch) -> Result<RecordBatch> {
        let mut cols: Vec<ArrayRef> = vec![
            Arc::new(Int64Array::from(vec![epoch as i64])),
            Arc::new(BooleanArray::from(vec![true])),
        ];
        for f in self.schema.fields().iter().skip(2) {
            cols.push(new_null_array(f.data_type(), 1));
        }
        Ok(RecordBatch::try_new(self.schema.clone(), cols)?)
    }
}

/// The schema of a subscription's rows over a relation with `columns`.
fn output_schema(columns: &Schema, progress: bool) -> SchemaRef {
    let mut fields = vec![Field::new("kappa_epoch", DataType::Int64, false)];
    if progress {
        fields.push(Field::new("kappa_progressed", DataType::Boolean, false));
    }
    // A progress row has no diff and no columns.
    fields.push(Field::new("kappa_diff", DataType::Int64, progress));
    for f in columns.fields() {
        fields.push(
            f.as_ref()
                .clone()
                .with_nullable(f.is_nullable() || progress),
        );
    }
    Arc::new(Schema::new(fields))
}

/// How much a subscriber may leave unread before it is dropped.
pub const SUBSCRIBE_LIMITS: ListenLimits = ListenLimits {
    epochs: 4096,
    rows: 1 << 20,
};

/// Relation ids of subscriptions' own dataflows: far above the catalog's, never recorded.
static NEXT_TRANSIENT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1 << 62);

/// What a subscription follows: a relation in the catalog, or its own dataflow.
struct Target {
    relation: RelationId,
    /// A materialized view (its stats say whether it failed or was dropped).
    view: bool,
    columns: SchemaRef,
}

impl Engine {
    /// The schema a SUBSCRIBE would stream, without starting it.
    pub async fn subscribe_schema(&self, s: &Subscribe) -> Result<SchemaRef> {
        let columns = match &s.target {
            SubscribeTarget::Relation(name) => self.relation_target(name)?.columns,
            SubscribeTarget::Query(q) => {
                crate::ddl::plan_query_graph(
                    self,
                    q,
                    NEXT_TRANSIENT_ID.load(Ordering::Relaxed),
                    "subscribe",
                )
                .await?
                .0
            }
        };
        Ok(output_schema(&columns, s.progress))
    }

    fn relation_target(&self, name: &str) -> Result<Target> {
        let catalog = self.catalog();
        let rel = catalog.require(name)?;
        let view = match &rel.kind {
            RelationKind::MaterializedView => true,
            RelationKind::Table { .. } if rel.watermark.is_none() => false,
            RelationKind::Table { .. } => {
                return Err(KappaError::not_supported(
                    "SUBSCRIBE to a table with a WATERMARK (its late rows are in its contents but not in its changes); subscribe to a materialized view over it",
                ));
            }
            other => {
                return Err(KappaError::user(
                    SqlState::WRONG_OBJECT_TYPE,
                    format!(
                        "cannot SUBSCRIBE to {} \"{name}\": only tables and materialized views keep contents to follow",
                        other.describe()
                    ),
                ));
            }
        };
        Ok(Target {
            relation: rel.id,
            view,
            columns: rel.schema.clone(),
        })
    }

    /// Starts a subscription. A session that wrote first commits an epoch, so the snapshot
    /// holds its writes.
    pub async fn subscribe(&self, session: &Session, s: &Subscribe) -> Result<Subscription> {
        if let SubscribeTarget::Relation(name) = &s.target {
            // Checked before the barrier: a wrong name fails at once.
            self.relation_target(name)?;
        }
        if session.take_unflushed_writes() {
            self.barrier().await?;
        }
        let (target, epoch, snapshot, listening, transient) = match &s.target {
            SubscribeTarget::Relation(name) => {
                let target = self.relation_target(name)?;
                let (commit, listening) = self
                    .runtime()
                    .listen(Some(vec![target.relation]), SUBSCRIBE_LIMITS);
                let snap = commit.relations.get(&target.relation).ok_or_else(|| {
                    KappaError::user(
                        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!(
                            "\"{name}\" has no committed contents yet; try again after the next epoch"
                        ),
                    )
                })?;
                if let Some(f) = &snap.failure {
                    return Err(KappaError::user(
                        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        f.clone(),
                    ));
                }
                let batches = if s.snapshot {
                    snap.batches()?.as_ref().clone()
                } else {
                    vec![]
                };
                (target, commit.epoch, batches, listening, None)
            }
            SubscribeTarget::Query(q) => {
                let id = NEXT_TRANSIENT_ID.fetch_add(1, Ordering::Relaxed);
                let (columns, graph) =
                    crate::ddl::plan_query_graph(self, q, id, "subscribe").await?;
                let parallelism = self.parallelism();
                let (epoch, contents, listening, handle) = self
                    .blocking(move |rt| {
                        rt.create_transient_view(id, graph, parallelism, SUBSCRIBE_LIMITS)
                    })
                    .await?;
                let batches = if s.snapshot {
                    contents.to_batches(kappa_runtime::READ_BATCH_SIZE)?
                } else {
                    vec![]
                };
                let target = Target {
                    relation: id,
                    view: true,
                    columns,
                };
                (target, epoch, batches, listening, Some(handle))
            }
        };
        let name = match &s.target {
            SubscribeTarget::Relation(n) => n.clone(),
            SubscribeTarget::Query(_) => "(query)".into(),
        };
        let mut sub = Subscription {
            relation: target.relation,
            view: target.view,
            name,
            schema: output_schema(&target.columns, s.progress),
            progress: s.progress,
            listening,
            ready: VecDeque::new(),
            ended: None,
            _transient: transient,
        };
        for b in snapshot {
            if b.num_rows() > 0 {
                let rows = sub.rows(epoch, &ChangeBatch::inserts(b))?;
                sub.ready.push_back(rows);
            }
        }
        if s.progress {
            let p = sub.progress_row(epoch)?;
            sub.ready.push_back(p);
        }
        Ok(sub)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_names_epoch_diff_and_progress_first() {
        let cols = Schema::new(vec![Field::new("a", DataType::Utf8, false)]);
        let s = output_schema(&cols, false);
        let names: Vec<_> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(names, ["kappa_epoch", "kappa_diff", "a"]);
        assert!(!s.field(2).is_nullable());
        let s = output_schema(&cols, true);
        let names: Vec<_> = s.fields().iter().map(|f| f.name().as_str()).collect();
        assert_eq!(
            names,
            ["kappa_epoch", "kappa_progressed", "kappa_diff", "a"]
        );
        assert!(s.field(3).is_nullable(), "a progress row has no columns");
    }
}

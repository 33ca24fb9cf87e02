//! Streaming operators. Each consumes and produces changelogs ([`ChangeBatch`]: rows with
//! signed weights) and keeps whatever state it needs in [`kappa_state::StateTable`]s.
//!
//! The runtime, not the operator, aligns barriers: it hands an operator every batch of an
//! epoch through [`Operator::process`], from whichever input, and then calls
//! [`Operator::on_barrier`] once. An operator that needs a whole epoch's input before it can
//! answer (an aggregate emits one consolidated change per group per epoch) does its work there.

mod aggregate;
mod change_log;
mod dirty;
mod filter;
mod join;
mod join_batches;
mod join_state;
mod materialize;
mod over;
mod partition_rows;
mod project;
mod session;
mod source;
mod temporal_filter;
mod temporal_join;
mod temporal_probes;
pub mod testing;
mod top_n;
mod union;
mod window;

use kappa_common::{ChangeBatch, Epoch, Result};

pub use aggregate::{AggSpec, HashAggregate, Recompute};
pub use filter::Filter;
pub use join::{HashJoin, JoinSide};
pub use join_state::SideTables;
pub use materialize::{ContentsSnapshot, Materialize, ViewContents};
pub use over::{Over, OverSpec};
pub use project::Project;
pub use session::SessionWindow;
pub use source::SourceScan;
pub use temporal_filter::TemporalFilter;
pub use temporal_join::{TemporalJoin, TemporalJoinSpec};
pub use top_n::{TopN, TopNSpec};
pub use union::Union;
pub use window::WindowExpand;

/// An ORDER BY key compiled: expression, type, direction and null placement.
pub type SortKey = (
    std::sync::Arc<dyn datafusion::physical_expr::PhysicalExpr>,
    datafusion::arrow::datatypes::DataType,
    datafusion::arrow::compute::SortOptions,
);

/// A batch of `rows` rows over `columns`; also valid with no columns at all (e.g. the input
/// of `count(*)`, where the planner prunes every column).
pub(crate) fn batch_with_rows(
    schema: datafusion::arrow::datatypes::SchemaRef,
    columns: Vec<datafusion::arrow::array::ArrayRef>,
    rows: usize,
) -> Result<datafusion::arrow::array::RecordBatch> {
    let opts = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
    Ok(datafusion::arrow::array::RecordBatch::try_new_with_options(
        schema, columns, &opts,
    )?)
}

/// Removes and returns the entries of an event-time index whose key is `<= upto`: the part a
/// watermark at `upto` has closed (windows, expired join rows).
pub(crate) fn take_closed<V>(
    index: &mut std::collections::BTreeMap<i64, V>,
    upto: i64,
) -> std::collections::BTreeMap<i64, V> {
    let open = match upto.checked_add(1) {
        Some(b) => index.split_off(&b),
        None => std::collections::BTreeMap::new(),
    };
    std::mem::replace(index, open)
}

/// The small state most stateful operators checkpoint: the watermark they closed state at
/// and the late changes they dropped.
pub(crate) fn save_progress(watermark: Option<i64>, late_rows: u64) -> Vec<u8> {
    kappa_state::codec::Encoder::new()
        .opt_i64(watermark)
        .u64(late_rows)
        .finish()
}

/// What [`save_progress`] wrote; `what` names the operator in errors.
pub(crate) fn restore_progress(saved: &[u8], what: &str) -> Result<(Option<i64>, u64)> {
    let mut d = kappa_state::codec::Decoder::new(saved, what);
    let progress = (d.opt_i64()?, d.u64()?);
    d.end()?;
    Ok(progress)
}

/// A streaming operator.
pub trait Operator: Send {
    /// Consumes one batch that arrived on input number `input` (0-based, in the order of the
    /// plan node's inputs) and appends any changes it causes to `out`.
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()>;

    /// The epoch's processing time (wall-clock microseconds when the epoch began; the same
    /// for every view of the epoch, never decreasing), before any of its batches. Only
    /// operators that the query ties to `now()` use it. Default: ignored.
    fn advance_time(&mut self, _now: i64) {}

    /// Every input has delivered all of the epoch's batches, and the watermark of the
    /// node's input stands at `watermark` (event-time microseconds; `None` while there is
    /// none). Operators that buffer or consolidate emit here. Default: nothing to do.
    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        _watermark: Option<i64>,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        Ok(())
    }

    /// Short name for diagnostics.
    fn name(&self) -> &'static str;

    /// Entries the operator holds in its state tables (for `kappa_view_stats`).
    fn state_entries(&self) -> usize {
        0
    }

    /// Changes the operator dropped because they arrived for an already closed window.
    fn late_rows(&self) -> u64 {
        0
    }

    // Checkpoints. At a checkpoint (between epochs, after `on_barrier`) the runtime calls
    // `checkpoint` and then writes the changes of every table `state_tables` returns; after a
    // restart it builds the operator again over the restored tables and calls `restore` with
    // what `checkpoint` returned. Between the two the operator's state must be exactly what
    // it was. Stateless operators keep the defaults.

    /// The format of what this operator checkpoints (its state tables' keys and values and
    /// its small state). Bump it whenever a change makes a checkpoint written by an earlier
    /// build mean something else (a new key layout, a new encoding, a value that now counts
    /// differently): a checkpoint recorded with another version is refused at restore, with
    /// both versions named, instead of being misread. A checkpoint from before versions were
    /// recorded counts as version 1.
    fn state_version(&self) -> u32 {
        1
    }

    /// Whether the operator's whole state can be checkpointed. While any view has an
    /// operator that cannot, no checkpoint is taken (recovery replays the whole history).
    fn checkpointable(&self) -> bool {
        true
    }

    /// Brings the state tables up to date with whatever the operator keeps elsewhere, and
    /// returns its small state (watermark, counters), encoded.
    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }

    /// The tables that hold the operator's state (after `checkpoint`).
    fn state_tables(&mut self) -> Vec<&mut dyn kappa_state::StateTable> {
        Vec::new()
    }

    /// Takes back the small state `checkpoint` returned and rebuilds whatever the operator
    /// derives from its (restored) state tables.
    fn restore(&mut self, _saved: &[u8]) -> Result<()> {
        Ok(())
    }
}

//! Group-by aggregation with retraction.
//!
//! # State
//! - `groups`: group key (Arrow row format of the group columns; empty for a scalar
//!   aggregate) → [`GroupState`]: the group's row count (sum of weights) and one accumulator
//!   per aggregate. A group with row count 0 is deleted.
//! - `extremes`: for every `min`/`max`, the multiset of the non-null argument values per
//!   group, as `agg index (u16 BE) ‖ key length (u32 BE) ‖ group key ‖ value (row format)` →
//!   count. The row format sorts like the values, so the current minimum is the first entry
//!   under the `(agg, group)` prefix and the maximum the last: deleting the current extreme
//!   just exposes the next one. A `DISTINCT` aggregate (`count`, `sum`, `avg`) keeps the
//!   same multiset of its argument values; its accumulator in `groups` is over the values
//!   whose count is positive, so a value counts when its count leaves 0 and stops counting
//!   when it returns to 0 (both applied at the barrier, with the epoch's net changes).
//!   When nothing reads the table in key order (only DISTINCT aggregates, no window to
//!   close; see [`HashAggregate::multisets_read_in_order`]) the store may keep it hashed.
//!
//! # Output
//! Changes are consolidated per epoch: at the barrier every group touched during the epoch
//! emits `-old` (if it had a row) and `+new` (if it has one now), and nothing if the row did
//! not change. A grouped aggregate has a row for exactly the groups with row count > 0; a
//! scalar aggregate (no GROUP BY) always has exactly one row, emitted at the first barrier
//! even over an empty input, as SQL requires (`count` 0, other aggregates NULL).
//!
//! # Windows and the watermark
//! With a `window_close` column (a group column bounded by the watermark, e.g. `window_end`),
//! a group is closed once `value + offset <= watermark`: no future change can reach it. At
//! each barrier the closed groups are taken from `open` (group keys by window value, kept in
//! memory and rebuildable from `groups`) and their state is freed. In the default mode their
//! rows were already emitted as they changed; with `emit_on_window_close` nothing is emitted
//! until then, and each closed group emits its final row once (append-only output). A change
//! that arrives for an already closed group is late: it is dropped and counted.
//!
//! # Correctness
//! `count` and integer/decimal `sum` are exact (i128 accumulators). Float `sum`/`avg` use
//! compensated (Neumaier) summation, and reset to exactly zero when a group's non-null count
//! returns to zero, so retracting every value leaves no residue; they can still differ from
//! a batch engine in the last bits, as any two float summation orders can.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Decimal128Array, Float64Array, Int64Array, RecordBatch,
    UInt32Array, new_null_array,
};
use datafusion::arrow::compute::{CastOptions, cast, cast_with_options, take};
use datafusion::arrow::datatypes::{DataType, Decimal128Type, Float64Type, Int64Type, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::aggregate::AggregateFunctionExpr;
use datafusion::scalar::ScalarValue;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_plan::{AggFunc, WatermarkCol};
use kappa_state::{StateTable, add_to_count};

use crate::Operator;
use crate::dirty::{BatchGroups, DirtySet};

/// Per-epoch maps, hashed with foldhash rather than SipHash.
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// A compiled aggregate call.
pub struct AggSpec {
    pub func: AggFunc,
    /// Over the distinct non-null argument values.
    pub distinct: bool,
    /// The argument; `None` for `count(*)`.
    pub arg: Option<Arc<dyn PhysicalExpr>>,
    pub filter: Option<Arc<dyn PhysicalExpr>>,
    pub input_type: DataType,
    pub output_type: DataType,
    /// For `AggFunc::Other`: how to compute it.
    pub recompute: Option<Recompute>,
}

/// An aggregate computed by DataFusion's own accumulator over the group's multiset of input
/// rows (`AggFunc::Other`).
pub struct Recompute {
    pub aggregate: Arc<AggregateFunctionExpr>,
    /// What an input row contributes, in the order the accumulator takes it: the
    /// arguments, then the aggregate's ORDER BY keys.
    pub inputs: Vec<Arc<dyn PhysicalExpr>>,
    pub input_types: Vec<DataType>,
}

/// How an aggregate accumulates, chosen from its function and argument type.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Count,
    /// Exact sum of integers or decimals as unscaled i128; `scale` is the input's.
    SumInt {
        scale: i8,
    },
    SumFloat,
    AvgInt,
    AvgFloat,
    Extreme {
        max: bool,
    },
    /// min/max over an input that never retracts: the running extreme alone.
    Best {
        max: bool,
    },
    /// Any other function: recomputed from the multiset of the group's input rows.
    Recompute,
    /// A mergeable approximate function (HyperLogLog, t-digest) over an input that never
    /// retracts: the group keeps the function's own state, of bounded size.
    Sketch,
}

/// The approximate aggregate functions whose state DataFusion can serialize and merge,
/// kept as that state per group over append-only inputs.
const SKETCHES: &[&str] = &[
    "approx_distinct",
    "approx_percentile_cont",
    "approx_percentile_cont_with_weight",
    "approx_median",
];

/// Whether `spec` is a sketch over an append-only input (see [`Kind::Sketch`]).
fn sketchable(spec: &AggSpec) -> bool {
    !spec.distinct
        && spec
            .recompute
            .as_ref()
            .is_some_and(|r| SKETCHES.contains(&r.aggregate.fun().name()))
}

#[derive(Clone, Debug, PartialEq)]
enum Acc {
    Count(i64),
    Int {
        sum: i128,
        n: i64,
    },
    Float {
        sum: f64,
        comp: f64,
        n: i64,
    },
    /// The running min/max (row format), `None` before the first non-null value.
    Best(Option<Box<[u8]>>),
    /// A sketch's serialized state (row format of its state fields), empty before the
    /// first row.
    Sketch(Box<[u8]>),
    None,
}

#[derive(Clone, Debug, PartialEq)]
struct GroupState {
    rows: i64,
    accs: Vec<Acc>,
}

/// A group's aggregate values: computed one by one, or, when every aggregate's value
/// follows from its accumulator alone (count, sum, avg, min/max over an append-only input),
/// the accumulators, turned into output columns for all of an epoch's output rows at once.
#[derive(Clone, Debug)]
enum Output {
    Values(Vec<ScalarValue>),
    Accs(Vec<Acc>),
}

struct Dirty {
    /// The aggregate values the group's output row had before this epoch; `None` if the
    /// group had no row.
    before: Option<Output>,
    state: GroupState,
}

pub struct HashAggregate {
    group_exprs: Vec<Arc<dyn PhysicalExpr>>,
    group_converter: Option<RowConverter>,
    aggs: Vec<AggSpec>,
    kinds: Vec<Kind>,
    /// Per aggregate, whether it is over distinct values (its values go to `extremes`).
    /// Over an append-only input a DISTINCT multiset needs only each value's presence: a
    /// value is written when first seen (at once, not at the barrier: no group's earlier
    /// output reads it), into its presence set's entry (see `presence`), and a value seen
    /// before changes nothing.
    distinct: Vec<bool>,
    /// The input never retracts (see [`HashAggregate::with_append_only_input`]).
    append_only: bool,
    /// Over an append-only input, the DISTINCT aggregates of one argument (count, sum and
    /// avg, each with its own FILTER) share one presence set: per aggregate, the set's
    /// first aggregate (whose multiset prefix it uses) and its bit. A value's entry holds
    /// the bits of the aggregates that have seen it (a u64), so a row costs one lookup per
    /// argument, not per aggregate. `presence_members[first]` lists the set's aggregates
    /// in bit order.
    presence: Vec<Option<(usize, u32)>>,
    presence_members: Vec<Vec<usize>>,
    /// Per aggregate, for min/max and DISTINCT: encodes the argument values.
    value_converters: Vec<Option<RowConverter>>,
    schema: SchemaRef,
    groups: Box<dyn StateTable>,
    extremes: Box<dyn StateTable>,
    /// The groups touched this epoch.
    dirty: DirtySet<Dirty>,
    /// The current input batch's groups (reused across batches).
    batch_groups: BatchGroups,
    /// Per aggregate, for sketches: encodes the function's state, and the state's types.
    state_converters: Vec<Option<(RowConverter, Vec<DataType>)>>,
    /// Sketches updated this epoch, by (aggregate, dirty-set position); written back into
    /// the groups' states at the barrier.
    live_sketches: HashMap<(usize, usize), Box<dyn datafusion::logical_expr::Accumulator>>,
    /// This epoch's net changes to `extremes`, applied at the barrier. Until then `extremes`
    /// holds the state as of the epoch's start, which is what a group's old output needs.
    extreme_deltas: HashMap<Box<[u8]>, i64>,
    key_buf: Vec<u8>,
    window_close: Option<WatermarkCol>,
    emit_on_window_close: bool,
    /// Window value → keys of the groups created with it, while not closed.
    open: BTreeMap<i64, Vec<Box<[u8]>>>,
    /// A group whose window value is NULL (which never closes, and is not in `open`) may
    /// exist. Until one does, a barrier that leaves no window open has closed every group.
    unclosable: bool,
    /// The watermark the last barrier closed windows at.
    watermark: Option<i64>,
    late_rows: u64,
}

/// Whether accumulators `a` and `b` of an aggregate of kind `k` give the same value.
fn same_value(k: Kind, a: &Acc, b: &Acc) -> bool {
    match (a, b) {
        (Acc::Int { sum: s, n }, Acc::Int { sum: t, n: m }) => match (*n, *m) {
            (0, 0) => true,
            (0, _) | (_, 0) => false,
            _ if matches!(k, Kind::AvgInt) => {
                (*s as f64 / *n as f64).to_bits() == (*t as f64 / *m as f64).to_bits()
            }
            _ => s == t,
        },
        (
            Acc::Float { sum: s, comp: c, n },
            Acc::Float {
                sum: t,
                comp: d,
                n: m,
            },
        ) => match (*n, *m) {
            (0, 0) => true,
            (0, _) | (_, 0) => false,
            _ if matches!(k, Kind::AvgFloat) => {
                ((s + c) / *n as f64).to_bits() == ((t + d) / *m as f64).to_bits()
            }
            _ => (s + c).to_bits() == (t + d).to_bits(),
        },
        _ => a == b,
    }
}

fn kind_of(spec: &AggSpec) -> Result<Kind> {
    let t = &spec.input_type;
    let int_like = t.is_integer() || matches!(t, DataType::Decimal128(..));
    let float_like = t.is_floating();
    Ok(match spec.func {
        AggFunc::Count => Kind::Count,
        AggFunc::Min => Kind::Extreme { max: false },
        AggFunc::Max => Kind::Extreme { max: true },
        AggFunc::Other => Kind::Recompute,
        AggFunc::Sum if int_like => Kind::SumInt {
            scale: match t {
                DataType::Decimal128(_, s) => *s,
                _ => 0,
            },
        },
        AggFunc::Sum if float_like => Kind::SumFloat,
        AggFunc::Avg if t.is_integer() && spec.output_type == DataType::Float64 => Kind::AvgInt,
        AggFunc::Avg if float_like && spec.output_type == DataType::Float64 => Kind::AvgFloat,
        f => {
            return Err(KappaError::not_supported(format!(
                "{}({t}) in a materialized view",
                f.name()
            )));
        }
    })
}

impl HashAggregate {
    pub fn new(
        group_exprs: Vec<Arc<dyn PhysicalExpr>>,
        group_types: Vec<DataType>,
        aggs: Vec<AggSpec>,
        schema: SchemaRef,
        groups: Box<dyn StateTable>,
        extremes: Box<dyn StateTable>,
    ) -> Result<Self> {
        let group_converter = if group_exprs.is_empty() {
            None
        } else {
            Some(RowConverter::new(
                group_types.into_iter().map(SortField::new).collect(),
            )?)
        };
        let kinds = aggs.iter().map(kind_of).collect::<Result<Vec<_>>>()?;
        let n_aggs = aggs.len();
        let value_converters = aggs
            .iter()
            .zip(&kinds)
            .map(|(a, k)| match (k, &a.recompute) {
                (Kind::Recompute, Some(r)) => {
                    RowConverter::new(r.input_types.iter().cloned().map(SortField::new).collect())
                        .map(Some)
                }
                (Kind::Recompute, None) => Ok(None),
                _ if a.distinct || matches!(k, Kind::Extreme { .. } | Kind::Best { .. }) => {
                    RowConverter::new(vec![SortField::new(a.input_type.clone())]).map(Some)
                }
                _ => Ok(None),
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if aggs
            .iter()
            .zip(&kinds)
            .any(|(a, k)| (*k == Kind::Recompute) != a.recompute.is_some())
        {
            return Err(KappaError::internal(
                "an aggregate to recompute without its accumulator, or the reverse",
            ));
        }
        // A recomputed DISTINCT aggregate's accumulator removes duplicates itself.
        let distinct = aggs
            .iter()
            .zip(&kinds)
            .map(|(a, k)| a.distinct && *k != Kind::Recompute)
            .collect();
        Ok(Self {
            group_exprs,
            group_converter,
            aggs,
            kinds,
            distinct,
            value_converters,
            schema,
            groups,
            extremes,
            dirty: DirtySet::default(),
            batch_groups: BatchGroups::default(),
            state_converters: (0..n_aggs).map(|_| None).collect(),
            live_sketches: HashMap::default(),
            extreme_deltas: HashMap::default(),
            append_only: false,
            presence: Vec::new(),
            presence_members: Vec::new(),
            key_buf: Vec::new(),
            window_close: None,
            emit_on_window_close: false,
            open: BTreeMap::new(),
            unclosable: false,
            watermark: None,
            late_rows: 0,
        })
    }

    /// Whether the `extremes` table of an aggregate computing `aggs` is ever read in key
    /// order: for the multisets of `min`/`max` (current extreme = first or last entry) and
    /// of recomputed aggregates (scanned), and to free a closed window's multisets. When it
    /// is not (only DISTINCT `count`/`sum`/`avg`, which look a value up by key, and no
    /// window), the store may keep it hashed (`StateStore::create_keyed_table`).
    pub fn multisets_read_in_order(
        aggs: &[AggSpec],
        append_only_input: bool,
        windowed: bool,
    ) -> Result<bool> {
        let kinds = aggs
            .iter()
            .map(|a| {
                Ok(match kind_of(a)? {
                    Kind::Extreme { max } if append_only_input => Kind::Best { max },
                    Kind::Recompute if append_only_input && sketchable(a) => Kind::Sketch,
                    k => k,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(reads_in_order(&kinds, windowed))
    }

    /// The input never retracts (an append-only stream): `min` and `max` keep only the
    /// running extreme instead of the multiset of values, and the approximate functions
    /// their sketch instead of the group's rows. A retraction that still arrives is an
    /// internal error.
    pub fn with_append_only_input(mut self) -> Result<Self> {
        self.append_only = true;
        self.presence = vec![None; self.aggs.len()];
        self.presence_members = vec![Vec::new(); self.aggs.len()];
        for i in 0..self.aggs.len() {
            let counted = matches!(
                self.kinds[i],
                Kind::Count | Kind::SumInt { .. } | Kind::AvgInt | Kind::SumFloat | Kind::AvgFloat
            );
            let Some(arg) = self.aggs[i]
                .arg
                .as_ref()
                .filter(|_| self.distinct[i] && counted)
            else {
                continue;
            };
            let same = |j: usize| {
                let a = &self.aggs[j];
                a.input_type == self.aggs[i].input_type
                    && a.arg
                        .as_ref()
                        .is_some_and(|b| b.to_string() == arg.to_string())
            };
            let first = (0..i)
                .find(|&j| self.presence_members[j].len() < 64 && same(j))
                .filter(|&j| self.presence[j].is_some_and(|(f, _)| f == j));
            let first = first.unwrap_or(i);
            self.presence[i] = Some((first, self.presence_members[first].len() as u32));
            self.presence_members[first].push(i);
        }
        for (i, k) in self.kinds.iter_mut().enumerate() {
            match *k {
                Kind::Extreme { max } => *k = Kind::Best { max },
                Kind::Recompute if sketchable(&self.aggs[i]) => {
                    let Some(r) = &self.aggs[i].recompute else {
                        continue;
                    };
                    let types: Vec<DataType> = r
                        .aggregate
                        .state_fields()?
                        .iter()
                        .map(|f| f.data_type().clone())
                        .collect();
                    let conv =
                        RowConverter::new(types.iter().cloned().map(SortField::new).collect())?;
                    self.state_converters[i] = Some((conv, types));
                    *k = Kind::Sketch;
                }
                _ => {}
            }
        }
        Ok(self)
    }

    /// A sketch's accumulator holding the state `bytes` (none: empty).
    fn sketch(
        &self,
        agg: usize,
        bytes: &[u8],
    ) -> Result<Box<dyn datafusion::logical_expr::Accumulator>> {
        let (Some(r), Some((conv, _))) = (&self.aggs[agg].recompute, &self.state_converters[agg])
        else {
            return Err(KappaError::internal("a sketch without its accumulator"));
        };
        let mut acc = r.aggregate.create_accumulator()?;
        if !bytes.is_empty() {
            acc.merge_batch(&kappa_state::decode_rows(conv, [bytes])?)?;
        }
        Ok(acc)
    }

    /// A sketch's state, serialized.
    fn sketch_state(
        &self,
        agg: usize,
        acc: &mut dyn datafusion::logical_expr::Accumulator,
    ) -> Result<Box<[u8]>> {
        let (conv, types) = self.state_converters[agg]
            .as_ref()
            .ok_or_else(|| KappaError::internal("a sketch without its state encoding"))?;
        let cols = acc
            .state()?
            .into_iter()
            .map(|v| Ok(v.to_array()?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let cols = cols
            .iter()
            .zip(types)
            .map(|(c, t)| {
                Ok(if c.data_type() == t {
                    c.clone()
                } else {
                    cast(c, t)?
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(conv.convert_columns(&cols)?.row(0).data().into())
    }

    /// Makes this a windowed aggregate: group column `close.col` (a timestamp) closes with
    /// the watermark; with `emit_on_window_close`, rows are emitted only when they close.
    pub fn with_window_close(mut self, close: WatermarkCol, emit_on_window_close: bool) -> Self {
        self.window_close = Some(close);
        self.emit_on_window_close = emit_on_window_close;
        self
    }

    /// Deletes a group's state (its accumulators and min/max multisets).
    fn free_group(&mut self, group: &[u8]) {
        self.groups.delete(group);
        let mut prefix = Vec::new();
        for (i, k) in self.kinds.iter().enumerate() {
            if Self::keeps_multiset(*k) || self.distinct[i] {
                Self::extreme_prefix(&mut prefix, i, group);
                while let Some((key, _)) = self.extremes.first_with_prefix(&prefix) {
                    self.extremes.delete(&key);
                }
            }
        }
    }

    /// Frees (and with emit-on-close, emits) every group closed at watermark `w`.
    fn close_windows(
        &mut self,
        close: WatermarkCol,
        w: i64,
        keys: &mut Vec<Box<[u8]>>,
        vals: &mut Vec<Output>,
        weights: &mut Vec<i64>,
    ) -> Result<()> {
        // Values v with v + offset <= w, i.e. v <= w - offset.
        let closed = crate::take_closed(&mut self.open, w.saturating_sub(close.offset));
        // Every group closes (a bounded stream's end): the tables are emptied at once
        // instead of a delete per group and multiset entry.
        let all = self.open.is_empty() && !self.unclosable && !closed.is_empty();
        for group in closed.into_values().flatten() {
            if self.emit_on_window_close {
                let Some(bytes) = self.groups.get(&group) else {
                    continue;
                };
                let state = self.decode_state(&bytes)?;
                if state.rows > 0 {
                    vals.push(self.output(state, &group)?);
                    keys.push(group.clone());
                    weights.push(1);
                }
            }
            if !all {
                self.free_group(&group);
            } else if self.emit_on_window_close {
                // A group deleted and created again while open is listed twice: it is
                // emitted once.
                self.groups.delete(&group);
            }
        }
        if all {
            self.groups.clear();
            self.extremes.clear();
        }
        Ok(())
    }

    /// Whether the aggregate keeps its values in `extremes` (besides DISTINCT ones).
    fn keeps_multiset(k: Kind) -> bool {
        matches!(k, Kind::Extreme { .. } | Kind::Recompute)
    }

    /// A recomputed aggregate's value over the group's input rows in `extremes` (as of the
    /// epoch's start until the barrier applies the epoch's changes).
    fn recompute(&self, agg: usize, group: &[u8]) -> Result<ScalarValue> {
        let (Some(r), Some(conv)) = (&self.aggs[agg].recompute, &self.value_converters[agg]) else {
            return Err(KappaError::internal(
                "an aggregate to recompute without its accumulator",
            ));
        };
        let mut prefix = Vec::new();
        Self::extreme_prefix(&mut prefix, agg, group);
        let (mut rows, mut copies) = (Vec::new(), Vec::new());
        for (i, (k, c)) in self.extremes.scan_prefix(&prefix).enumerate() {
            copies.extend(std::iter::repeat_n(
                i as u32,
                kappa_state::decode_count(&c) as usize,
            ));
            rows.push(k);
        }
        let mut acc = r.aggregate.create_accumulator()?;
        if !rows.is_empty() {
            let columns = kappa_state::decode_rows(conv, rows.iter().map(|k| &k[prefix.len()..]))?;
            let idx = datafusion::arrow::array::UInt32Array::from(copies);
            let columns = columns
                .iter()
                .map(|c| datafusion::arrow::compute::take(c.as_ref(), &idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            acc.update_batch(&columns)?;
        }
        let v = acc.evaluate()?;
        let t = &self.aggs[agg].output_type;
        Ok(if v.data_type() == *t {
            v
        } else {
            v.cast_to(t)?
        })
    }

    fn is_scalar(&self) -> bool {
        self.group_converter.is_none()
    }

    fn empty_state(&self) -> GroupState {
        GroupState {
            rows: 0,
            accs: self
                .kinds
                .iter()
                .map(|k| match k {
                    Kind::Count => Acc::Count(0),
                    Kind::SumInt { .. } | Kind::AvgInt => Acc::Int { sum: 0, n: 0 },
                    Kind::SumFloat | Kind::AvgFloat => Acc::Float {
                        sum: 0.0,
                        comp: 0.0,
                        n: 0,
                    },
                    Kind::Extreme { .. } | Kind::Recompute => Acc::None,
                    Kind::Best { .. } => Acc::Best(None),
                    Kind::Sketch => Acc::Sketch(Box::default()),
                })
                .collect(),
        }
    }

    fn extreme_prefix(buf: &mut Vec<u8>, agg: usize, group: &[u8]) {
        buf.clear();
        buf.extend_from_slice(&(agg as u16).to_be_bytes());
        buf.extend_from_slice(&(group.len() as u32).to_be_bytes());
        buf.extend_from_slice(group);
    }

    /// Whether every aggregate's value follows from its accumulator alone.
    fn columnar(&self) -> bool {
        self.kinds.iter().all(|k| {
            matches!(
                k,
                Kind::Count
                    | Kind::SumInt { .. }
                    | Kind::SumFloat
                    | Kind::AvgInt
                    | Kind::AvgFloat
                    | Kind::Best { .. }
            )
        })
    }

    /// A group's aggregate values (see [`Output`]), as of now.
    fn output(&self, state: GroupState, group: &[u8]) -> Result<Output> {
        Ok(if self.columnar() {
            Output::Accs(state.accs)
        } else {
            Output::Values(self.outputs(&state, group)?)
        })
    }

    /// Whether two outputs of a group hold the same values.
    fn same_output(&self, a: &Option<Output>, b: &Option<Output>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(Output::Values(x)), Some(Output::Values(y))) => x == y,
            (Some(Output::Accs(x)), Some(Output::Accs(y))) => x
                .iter()
                .zip(y)
                .zip(&self.kinds)
                .all(|((a, b), k)| same_value(*k, a, b)),
            _ => false,
        }
    }

    /// Aggregate `agg`'s column over output rows `vals`.
    fn output_column(&self, agg: usize, vals: &[Output]) -> Result<ArrayRef> {
        let spec = &self.aggs[agg];
        let mismatch = || KappaError::internal("aggregate state does not match its kind");
        if !vals.iter().all(|v| matches!(v, Output::Accs(_))) {
            let vals = vals.iter().map(|v| match v {
                Output::Values(v) => Ok(v[agg].clone()),
                Output::Accs(_) => Err(mismatch()),
            });
            let arr = ScalarValue::iter_to_array(vals.collect::<Result<Vec<_>>>()?)?;
            return Ok(if arr.data_type() != &spec.output_type {
                cast(&arr, &spec.output_type)?
            } else {
                arr
            });
        }
        let accs = vals.iter().map(|v| match v {
            Output::Accs(a) => &a[agg],
            Output::Values(_) => &Acc::None,
        });
        let arr: ArrayRef = match self.kinds[agg] {
            Kind::Count => Arc::new(
                accs.map(|a| match a {
                    Acc::Count(c) => Ok(*c),
                    _ => Err(mismatch()),
                })
                .collect::<Result<Int64Array>>()?,
            ),
            Kind::SumInt { scale } => Arc::new(
                accs.map(|a| match a {
                    Acc::Int { sum, n } => Ok((*n != 0).then_some(*sum)),
                    _ => Err(mismatch()),
                })
                .collect::<Result<Decimal128Array>>()?
                .with_precision_and_scale(38, scale)?,
            ),
            Kind::AvgInt => Arc::new(
                accs.map(|a| match a {
                    Acc::Int { sum, n } => Ok((*n != 0).then(|| *sum as f64 / *n as f64)),
                    _ => Err(mismatch()),
                })
                .collect::<Result<Float64Array>>()?,
            ),
            Kind::SumFloat | Kind::AvgFloat => {
                let avg = matches!(self.kinds[agg], Kind::AvgFloat);
                Arc::new(
                    accs.map(|a| match a {
                        Acc::Float { sum, comp, n } => Ok((*n != 0).then(|| {
                            if avg {
                                (sum + comp) / *n as f64
                            } else {
                                sum + comp
                            }
                        })),
                        _ => Err(mismatch()),
                    })
                    .collect::<Result<Float64Array>>()?,
                )
            }
            Kind::Best { .. } => {
                let conv = self.value_converters[agg]
                    .as_ref()
                    .ok_or_else(|| KappaError::internal("min/max without converter"))?;
                let mut found: Vec<&[u8]> = Vec::new();
                let mut at: Vec<Option<u32>> = Vec::with_capacity(vals.len());
                for a in accs {
                    match a {
                        Acc::Best(Some(v)) => {
                            at.push(Some(found.len() as u32));
                            found.push(v);
                        }
                        Acc::Best(None) => at.push(None),
                        _ => return Err(mismatch()),
                    }
                }
                if found.is_empty() {
                    new_null_array(&spec.output_type, vals.len())
                } else {
                    let decoded = kappa_state::decode_rows(conv, found)?;
                    let col = decoded.into_iter().next().ok_or_else(mismatch)?;
                    if at.iter().all(Option::is_some) && at.len() == col.len() {
                        col
                    } else {
                        take(&col, &UInt32Array::from(at), None)?
                    }
                }
            }
            _ => return Err(mismatch()),
        };
        // Not the safe cast: a value that does not fit the output type is an error, as
        // it is for a single value.
        Ok(if arr.data_type() != &spec.output_type {
            cast_with_options(
                &arr,
                &spec.output_type,
                &CastOptions {
                    safe: false,
                    ..Default::default()
                },
            )?
        } else {
            arr
        })
    }

    /// The aggregate values of a group, reading extremes from the state table.
    fn outputs(&self, state: &GroupState, group: &[u8]) -> Result<Vec<ScalarValue>> {
        let mut prefix = Vec::new();
        let mut out = Vec::with_capacity(self.aggs.len());
        for (i, (spec, kind)) in self.aggs.iter().zip(&self.kinds).enumerate() {
            let null = ScalarValue::try_from(&spec.output_type)?;
            let v = match (kind, state.accs[i].clone()) {
                (Kind::Count, Acc::Count(c)) => ScalarValue::Int64(Some(c)),
                (Kind::Best { .. }, Acc::Best(best)) => match best {
                    Some(v) => self.decode_value(i, &v)?,
                    None => null,
                },
                (Kind::SumInt { scale }, Acc::Int { sum, n }) => {
                    if n == 0 {
                        null
                    } else {
                        ScalarValue::Decimal128(Some(sum), 38, *scale).cast_to(&spec.output_type)?
                    }
                }
                (Kind::SumFloat, Acc::Float { sum, comp, n }) => {
                    if n == 0 {
                        null
                    } else {
                        ScalarValue::Float64(Some(sum + comp)).cast_to(&spec.output_type)?
                    }
                }
                (Kind::AvgInt, Acc::Int { sum, n }) => {
                    if n == 0 {
                        null
                    } else {
                        ScalarValue::Float64(Some(sum as f64 / n as f64))
                    }
                }
                (Kind::AvgFloat, Acc::Float { sum, comp, n }) => {
                    if n == 0 {
                        null
                    } else {
                        ScalarValue::Float64(Some((sum + comp) / n as f64))
                    }
                }
                (Kind::Recompute, _) => self.recompute(i, group)?,
                (Kind::Sketch, Acc::Sketch(bytes)) => {
                    let v = self.sketch(i, &bytes)?.evaluate()?;
                    if v.data_type() == spec.output_type {
                        v
                    } else {
                        v.cast_to(&spec.output_type)?
                    }
                }
                (Kind::Extreme { max }, _) => {
                    Self::extreme_prefix(&mut prefix, i, group);
                    let entry = if *max {
                        self.extremes.last_with_prefix(&prefix)
                    } else {
                        self.extremes.first_with_prefix(&prefix)
                    };
                    match entry {
                        Some((k, _)) => self.decode_value(i, &k[prefix.len()..])?,
                        None => null,
                    }
                }
                _ => {
                    return Err(KappaError::internal(
                        "aggregate state does not match its kind",
                    ));
                }
            };
            out.push(v);
        }
        Ok(out)
    }

    /// A min/max argument value of aggregate `agg`, from its row format.
    fn decode_value(&self, agg: usize, value: &[u8]) -> Result<ScalarValue> {
        let conv = self.value_converters[agg]
            .as_ref()
            .ok_or_else(|| KappaError::internal("min/max without converter"))?;
        let arr = kappa_state::decode_rows(conv, [value])?;
        Ok(ScalarValue::try_from_array(&arr[0], 0)?)
    }

    fn encode_state(state: &GroupState) -> Vec<u8> {
        let mut b = Vec::with_capacity(8 + state.accs.len() * 24);
        b.extend_from_slice(&state.rows.to_le_bytes());
        for a in &state.accs {
            match a {
                Acc::Count(c) => b.extend_from_slice(&c.to_le_bytes()),
                Acc::Int { sum, n } => {
                    b.extend_from_slice(&sum.to_le_bytes());
                    b.extend_from_slice(&n.to_le_bytes());
                }
                Acc::Float { sum, comp, n } => {
                    b.extend_from_slice(&sum.to_le_bytes());
                    b.extend_from_slice(&comp.to_le_bytes());
                    b.extend_from_slice(&n.to_le_bytes());
                }
                Acc::Best(best) => {
                    // Length + 1, 0 for none.
                    let len = best.as_ref().map_or(0, |v| v.len() + 1) as u32;
                    b.extend_from_slice(&len.to_le_bytes());
                    b.extend_from_slice(best.as_deref().unwrap_or_default());
                }
                Acc::Sketch(state) => {
                    b.extend_from_slice(&(state.len() as u32).to_le_bytes());
                    b.extend_from_slice(state);
                }
                Acc::None => {}
            }
        }
        b
    }

    fn decode_state(&self, bytes: &[u8]) -> Result<GroupState> {
        let corrupt = || KappaError::internal("corrupt aggregate state");
        let mut pos = 0usize;
        let mut take = |n: usize| -> Result<&[u8]> {
            let s = bytes.get(pos..pos + n).ok_or_else(corrupt)?;
            pos += n;
            Ok(s)
        };
        let arr8 = |s: &[u8]| -> [u8; 8] { s.try_into().unwrap_or([0; 8]) };
        let rows = i64::from_le_bytes(arr8(take(8)?));
        let mut accs = Vec::with_capacity(self.kinds.len());
        for k in &self.kinds {
            accs.push(match k {
                Kind::Count => Acc::Count(i64::from_le_bytes(arr8(take(8)?))),
                Kind::SumInt { .. } | Kind::AvgInt => {
                    let sum = i128::from_le_bytes(take(16)?.try_into().unwrap_or([0; 16]));
                    Acc::Int {
                        sum,
                        n: i64::from_le_bytes(arr8(take(8)?)),
                    }
                }
                Kind::SumFloat | Kind::AvgFloat => Acc::Float {
                    sum: f64::from_le_bytes(arr8(take(8)?)),
                    comp: f64::from_le_bytes(arr8(take(8)?)),
                    n: i64::from_le_bytes(arr8(take(8)?)),
                },
                Kind::Extreme { .. } | Kind::Recompute => Acc::None,
                Kind::Sketch => {
                    let len = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4]));
                    Acc::Sketch(take(len as usize)?.into())
                }
                Kind::Best { .. } => {
                    let len = u32::from_le_bytes(take(4)?.try_into().unwrap_or([0; 4]));
                    Acc::Best(match len {
                        0 => None,
                        n => Some(take(n as usize - 1)?.into()),
                    })
                }
            });
        }
        Ok(GroupState { rows, accs })
    }

    /// A group not in the dirty set, as it stands in state: its accumulators and its current
    /// output (none, and empty accumulators, if it is not stored).
    fn load(&self, group: &[u8]) -> Result<Dirty> {
        Ok(match self.groups.get(group) {
            Some(bytes) => {
                let state = self.decode_state(&bytes)?;
                let before = Some(if self.columnar() {
                    Output::Accs(state.accs.clone())
                } else {
                    Output::Values(self.outputs(&state, group)?)
                });
                Dirty { before, state }
            }
            None => Dirty {
                before: None,
                state: self.empty_state(),
            },
        })
    }

    /// A value of a DISTINCT aggregate started (`sign` 1) or stopped (-1) being present in
    /// its group: adds it to or takes it from the group's accumulator. `key` is its
    /// multiset key, `agg ‖ group length ‖ group ‖ value`.
    fn count_distinct(&mut self, key: &[u8], sign: i64) -> Result<()> {
        let (agg, group, value) = split_multiset_key(key)
            .ok_or_else(|| KappaError::internal("corrupt DISTINCT multiset key"))?;
        self.count_distinct_value(agg, group, value, sign)
    }

    /// [`Self::count_distinct`] for aggregate `agg`'s `value` (row format) in `group`.
    fn count_distinct_value(
        &mut self,
        agg: usize,
        group: &[u8],
        value: &[u8],
        sign: i64,
    ) -> Result<()> {
        let kind = self
            .kinds
            .get(agg)
            .copied()
            .ok_or_else(|| KappaError::internal("a DISTINCT multiset of no aggregate"))?;
        let v = match kind {
            Kind::Count => ScalarValue::Null,
            _ => self.decode_value(agg, value)?,
        };
        let d = self
            .dirty
            .get_mut(group)
            .ok_or_else(|| KappaError::internal("a DISTINCT value of a group not touched"))?;
        match (kind, d.state.accs.get_mut(agg)) {
            (Kind::Count, Some(Acc::Count(c))) => *c += sign,
            (Kind::SumInt { .. } | Kind::AvgInt, Some(Acc::Int { sum, n })) => {
                let x = match v {
                    ScalarValue::Decimal128(Some(x), ..) => x,
                    other => match other.cast_to(&DataType::Int64)? {
                        ScalarValue::Int64(Some(x)) => x as i128,
                        _ => return Err(KappaError::internal("DISTINCT sum of a non-integer")),
                    },
                };
                *sum += x * sign as i128;
                *n += sign;
                if *n == 0 {
                    *sum = 0;
                }
            }
            (Kind::SumFloat | Kind::AvgFloat, Some(Acc::Float { sum, comp, n })) => {
                let ScalarValue::Float64(Some(x)) = v.cast_to(&DataType::Float64)? else {
                    return Err(KappaError::internal("DISTINCT sum of a non-number"));
                };
                add_float(sum, comp, x * sign as f64);
                *n += sign;
                if *n == 0 {
                    *sum = 0.0;
                    *comp = 0.0;
                }
            }
            _ => return Err(KappaError::internal("DISTINCT over min/max")),
        }
        Ok(())
    }
}

/// Argument columns of one batch, prepared once per batch for the per-row loop.
enum ArgValues {
    None,
    Nulls(ArrayRef),
    Int(ArrayRef),
    Float(ArrayRef),
    Rows(ArrayRef, Rows),
    /// Whole input rows of a recomputed aggregate (NULLs included: the function decides).
    Inputs(Rows),
    /// A sketch's input columns.
    Columns(Vec<ArrayRef>),
}

/// Adds row `row` of weight `w` to group state `d`: its count and the accumulators, and
/// (into `updates`) the (aggregate, row) pairs whose value multiset changes.
#[allow(clippy::too_many_arguments)]
fn accumulate(
    d: &mut GroupState,
    row: usize,
    w: i64,
    args: &[ArgValues],
    filters: &[Option<BooleanArray>],
    distinct: &[bool],
    kinds: &[Kind],
    extreme_updates: &mut Vec<(usize, usize)>,
) -> Result<()> {
    d.rows += w;
    for (i, arg) in args.iter().enumerate() {
        if let Some(f) = &filters[i]
            && !(f.is_valid(row) && f.value(row))
        {
            continue;
        }
        match (arg, &mut d.accs[i]) {
            (ArgValues::Rows(a, _), _) if distinct[i] => {
                if a.is_valid(row) {
                    extreme_updates.push((i, row));
                }
            }
            (ArgValues::None, Acc::Count(c)) => *c += w,
            (ArgValues::Nulls(a), Acc::Count(c)) => {
                if a.is_valid(row) {
                    *c += w
                }
            }
            (ArgValues::Int(a), Acc::Int { sum, n }) => {
                if a.is_valid(row) {
                    let v: i128 = match a.data_type() {
                        DataType::Decimal128(..) => a.as_primitive::<Decimal128Type>().value(row),
                        _ => a.as_primitive::<Int64Type>().value(row) as i128,
                    };
                    *sum += v * w as i128;
                    *n += w;
                    if *n == 0 {
                        *sum = 0;
                    }
                }
            }
            (ArgValues::Float(a), Acc::Float { sum, comp, n }) => {
                if a.is_valid(row) {
                    let v = a.as_primitive::<Float64Type>().value(row);
                    add_float(sum, comp, v * w as f64);
                    *n += w;
                    if *n == 0 {
                        *sum = 0.0;
                        *comp = 0.0;
                    }
                }
            }
            (ArgValues::Rows(a, rows), Acc::Best(best)) => {
                if a.is_valid(row) {
                    if w < 0 {
                        return Err(KappaError::internal(
                            "a retraction reached min/max over an append-only input",
                        ));
                    }
                    let v = rows.row(row).data();
                    let better = match best.as_deref() {
                        None => true,
                        Some(b) if matches!(kinds[i], Kind::Best { max: true }) => v > b,
                        Some(b) => v < b,
                    };
                    if better {
                        *best = Some(v.into());
                    }
                }
            }
            (ArgValues::Rows(a, _), Acc::None) => {
                if a.is_valid(row) {
                    extreme_updates.push((i, row));
                }
            }
            (ArgValues::Inputs(_), Acc::None) => extreme_updates.push((i, row)),
            (ArgValues::Columns(_), Acc::Sketch(_)) => {
                if w < 0 {
                    return Err(KappaError::internal(
                        "a retraction reached a sketch over an append-only input",
                    ));
                }
                // Once per copy.
                for _ in 0..w {
                    extreme_updates.push((i, row));
                }
            }
            _ => return Err(KappaError::internal("aggregate argument mismatch")),
        }
    }
    Ok(())
}

/// Whether an aggregate of these kinds reads its value multisets in key order (see
/// [`HashAggregate::multisets_read_in_order`]).
fn reads_in_order(kinds: &[Kind], windowed: bool) -> bool {
    windowed
        || kinds
            .iter()
            .any(|k| matches!(k, Kind::Extreme { .. } | Kind::Recompute))
}

/// A value multiset key, `agg ‖ group length ‖ group ‖ value` (see
/// `HashAggregate::extreme_prefix`), split into its parts.
fn split_multiset_key(key: &[u8]) -> Option<(usize, &[u8], &[u8])> {
    let agg = u16::from_be_bytes(key.get(..2)?.try_into().ok()?) as usize;
    let len = u32::from_be_bytes(key.get(2..6)?.try_into().ok()?) as usize;
    Some((agg, key.get(6..6 + len)?, key.get(6 + len..)?))
}

fn add_float(sum: &mut f64, comp: &mut f64, x: f64) {
    // Neumaier's compensated summation.
    let t = *sum + x;
    if sum.abs() >= x.abs() {
        *comp += (*sum - t) + x;
    } else {
        *comp += (x - t) + *sum;
    }
    *sum = t;
}

impl Operator for HashAggregate {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let data = batch.data();
        let mut window_values: Option<Int64Array> = None;
        let keys = match &self.group_converter {
            Some(conv) => {
                let cols = self
                    .group_exprs
                    .iter()
                    .map(|e| e.evaluate(data)?.into_array(n))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                if let Some(c) = self.window_close {
                    let v = cast(&cols[c.col], &DataType::Int64)?;
                    window_values = Some(v.as_primitive::<Int64Type>().clone());
                }
                kappa_state::KeyRows::new(conv, &cols)?
            }
            None => kappa_state::KeyRows::default(),
        };
        let mut args = Vec::with_capacity(self.aggs.len());
        let mut filters: Vec<Option<BooleanArray>> = Vec::with_capacity(self.aggs.len());
        for (i, spec) in self.aggs.iter().enumerate() {
            if let (Some(r), Some(conv)) = (&spec.recompute, &self.value_converters[i]) {
                let cols = r
                    .inputs
                    .iter()
                    .map(|e| e.evaluate(data)?.into_array(n))
                    .collect::<datafusion::error::Result<Vec<_>>>()?;
                args.push(if self.kinds[i] == Kind::Sketch {
                    ArgValues::Columns(cols)
                } else {
                    ArgValues::Inputs(conv.convert_columns(&cols)?)
                });
                filters.push(match &spec.filter {
                    Some(f) => Some(f.evaluate(data)?.into_array(n)?.as_boolean().clone()),
                    None => None,
                });
                continue;
            }
            let arr = match &spec.arg {
                Some(e) => Some(e.evaluate(data)?.into_array(n)?),
                None => None,
            };
            args.push(match (arr, self.kinds[i]) {
                (None, _) => ArgValues::None,
                (Some(a), _) if spec.distinct => {
                    let conv = self.value_converters[i]
                        .as_ref()
                        .ok_or_else(|| KappaError::internal("DISTINCT without converter"))?;
                    let rows = conv.convert_columns(std::slice::from_ref(&a))?;
                    ArgValues::Rows(a, rows)
                }
                (Some(a), Kind::Count) => ArgValues::Nulls(a),
                (Some(a), Kind::SumInt { .. } | Kind::AvgInt) => match a.data_type() {
                    DataType::Decimal128(..) => ArgValues::Int(a),
                    _ => ArgValues::Int(cast(&a, &DataType::Int64)?),
                },
                (Some(a), Kind::SumFloat | Kind::AvgFloat) => {
                    ArgValues::Float(cast(&a, &DataType::Float64)?)
                }
                (Some(_), Kind::Recompute | Kind::Sketch) => {
                    return Err(KappaError::internal(
                        "an aggregate to recompute without its accumulator",
                    ));
                }
                (Some(a), Kind::Extreme { .. } | Kind::Best { .. }) => {
                    let conv = self.value_converters[i]
                        .as_ref()
                        .ok_or_else(|| KappaError::internal("min/max without converter"))?;
                    let rows = conv.convert_columns(std::slice::from_ref(&a))?;
                    ArgValues::Rows(a, rows)
                }
            });
            filters.push(match &spec.filter {
                Some(f) => Some(f.evaluate(data)?.into_array(n)?.as_boolean().clone()),
                None => None,
            });
        }
        let weights = batch.weights();
        let mut key_buf = std::mem::take(&mut self.key_buf);
        let mut batch_groups = std::mem::take(&mut self.batch_groups);
        batch_groups.clear();
        // (sketch aggregate, dirty-set position) → the batch's rows it takes.
        let mut sketch_rows: HashMap<(usize, usize), Vec<u32>> = HashMap::default();
        // (aggregate, row) pairs whose min/max multiset changes; reused across rows.
        let mut extreme_updates: Vec<(usize, usize)> = Vec::new();
        // The row's presence sets: (first aggregate, bits of the aggregates it reaches).
        let mut present: Vec<(usize, u64)> = Vec::new();
        for row in 0..n {
            let w = weights.value(row);
            let group = keys.get(row);
            // The window value of the row's group; a NULL window never closes.
            let window = match (&window_values, self.window_close) {
                (Some(v), Some(c)) if v.is_valid(row) => {
                    let v = v.value(row);
                    if let Some(wm) = self.watermark
                        && c.is_closed(v, wm)
                    {
                        self.late_rows += w.unsigned_abs();
                        continue;
                    }
                    Some(v)
                }
                _ => None,
            };
            extreme_updates.clear();
            let add_row = |d: &mut GroupState, updates: &mut Vec<(usize, usize)>| {
                accumulate(
                    d,
                    row,
                    w,
                    &args,
                    &filters,
                    &self.distinct,
                    &self.kinds,
                    updates,
                )
            };
            // The epoch's (large) dirty set is probed once per group per batch.
            let hash = self.dirty.hash(group);
            let at = match batch_groups.find(hash, row, |r| keys.get(r)) {
                Some(at) => at,
                None => {
                    let at = match self.dirty.find(hash, group) {
                        Some(at) => at,
                        None => {
                            let d = self.load(group)?;
                            // Not stored: the group is created now, in window `v`.
                            if d.before.is_none() {
                                match window {
                                    Some(v) => self.open.entry(v).or_default().push(group.into()),
                                    None => self.unclosable = true,
                                }
                            }
                            self.dirty.insert(hash, group, d)
                        }
                    };
                    let dirty = &self.dirty;
                    batch_groups.insert(hash, row, at, |r| dirty.hash(keys.get(r)));
                    at
                }
            };
            add_row(&mut self.dirty.at(at).state, &mut extreme_updates)?;
            present.clear();
            for &(i, r) in &extreme_updates {
                if let ArgValues::Columns(_) = &args[i] {
                    sketch_rows.entry((i, at)).or_default().push(r as u32);
                    continue;
                }
                let (ArgValues::Rows(_, rows) | ArgValues::Inputs(rows)) = &args[i] else {
                    continue;
                };
                if let Some((first, bit)) = self.presence.get(i).copied().flatten() {
                    if w <= 0 {
                        return Err(KappaError::internal(
                            "a retraction reached a DISTINCT aggregate over an append-only input",
                        ));
                    }
                    match present.iter_mut().find(|p| p.0 == first) {
                        Some(p) => p.1 |= 1 << bit,
                        None => present.push((first, 1 << bit)),
                    }
                    continue;
                }
                Self::extreme_prefix(&mut key_buf, i, group);
                key_buf.extend_from_slice(rows.row(r).data());
                match self.extreme_deltas.get_mut(key_buf.as_slice()) {
                    Some(d) => *d += w,
                    None => {
                        self.extreme_deltas.insert(key_buf.as_slice().into(), w);
                    }
                }
            }
            // Each presence set: one lookup; the aggregates that see the value for the
            // first time count it.
            for &(first, bits) in &present {
                let (ArgValues::Rows(_, rows), Some(members)) =
                    (&args[first], self.presence_members.get(first))
                else {
                    return Err(KappaError::internal(
                        "a DISTINCT presence set without values",
                    ));
                };
                let value = rows.row(row);
                Self::extreme_prefix(&mut key_buf, first, group);
                let prefix = key_buf.len();
                key_buf.extend_from_slice(value.data());
                let seen = self
                    .extremes
                    .get(&key_buf)
                    .map_or(0, |v| kappa_state::decode_count(&v) as u64);
                let new = bits & !seen;
                if new == 0 {
                    continue;
                }
                self.extremes.put(
                    Arc::from(key_buf.as_slice()),
                    kappa_state::encode_count((seen | new) as i64),
                );
                let members: Vec<usize> = (0..members.len())
                    .filter(|b| new & (1 << b) != 0)
                    .map(|b| members[b])
                    .collect();
                for agg in members {
                    self.count_distinct_value(agg, group, &key_buf[prefix..], 1)?;
                }
            }
        }
        self.key_buf = key_buf;
        self.batch_groups = batch_groups;
        // Each touched sketch takes its rows of the batch at once.
        for ((agg, at), rows) in sketch_rows {
            let ArgValues::Columns(cols) = &args[agg] else {
                continue;
            };
            let idx = datafusion::arrow::array::UInt32Array::from(rows);
            let cols = datafusion::arrow::compute::take_arrays(cols, &idx, None)?;
            if !self.live_sketches.contains_key(&(agg, at)) {
                let acc = match &self.dirty.get(at).state.accs[agg] {
                    Acc::Sketch(bytes) => self.sketch(agg, bytes)?,
                    _ => return Err(KappaError::internal("a sketch without its state")),
                };
                self.live_sketches.insert((agg, at), acc);
            }
            if let Some(acc) = self.live_sketches.get_mut(&(agg, at)) {
                acc.update_batch(&cols)?;
            }
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        watermark: Option<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if self.is_scalar() && self.groups.get(&[]).is_none() {
            // The scalar aggregate's single row exists from the start.
            if !self.dirty.contains(&[]) {
                let d = self.load(&[])?;
                self.dirty.insert(self.dirty.hash(&[]), &[], d);
            }
        }
        let mut deltas: Vec<(Box<[u8]>, i64)> = std::mem::take(&mut self.extreme_deltas)
            .into_iter()
            .filter(|(_, d)| *d != 0)
            .collect();
        // In key order, into an ordered table: neighbouring updates touch the same pages.
        if reads_in_order(&self.kinds, self.window_close.is_some()) {
            deltas.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        }
        for (key, delta) in deltas {
            let new = add_to_count(
                self.extremes.as_mut(),
                &key,
                delta,
                &"a min/max or DISTINCT value multiset",
            )?;
            let old = new - delta;
            let distinct = split_multiset_key(&key)
                .is_some_and(|(agg, ..)| self.distinct.get(agg).copied().unwrap_or(false));
            if distinct && (old > 0) != (new > 0) {
                self.count_distinct(&key, if new > 0 { 1 } else { -1 })?;
            }
        }
        // The sketches updated this epoch, back into their groups' states.
        for ((agg, at), mut acc) in std::mem::take(&mut self.live_sketches) {
            let state = self.sketch_state(agg, acc.as_mut())?;
            self.dirty.at(at).state.accs[agg] = Acc::Sketch(state);
        }
        let scalar = self.is_scalar();
        let mut out_keys: Vec<Box<[u8]>> = Vec::new();
        let mut out_vals: Vec<Output> = Vec::new();
        let mut out_weights: Vec<i64> = Vec::new();
        for (group, d) in self.dirty.take() {
            if d.state.rows < 0 {
                return Err(KappaError::internal("group row count became negative"));
            }
            let exists = d.state.rows > 0 || scalar;
            if exists {
                self.groups
                    .put(Arc::from(&*group), Arc::from(Self::encode_state(&d.state)));
            } else {
                self.groups.delete(&group);
            }
            if self.emit_on_window_close {
                continue;
            }
            let after = if exists {
                Some(self.output(d.state, &group)?)
            } else {
                None
            };
            if self.same_output(&d.before, &after) {
                continue;
            }
            if let Some(b) = d.before {
                out_keys.push(group.clone());
                out_vals.push(b);
                out_weights.push(-1);
            }
            if let Some(a) = after {
                out_keys.push(group);
                out_vals.push(a);
                out_weights.push(1);
            }
        }
        if let (Some(close), Some(w)) = (self.window_close, watermark) {
            if self.watermark.is_none_or(|old| w > old) {
                self.watermark = Some(w);
            }
            self.close_windows(close, w, &mut out_keys, &mut out_vals, &mut out_weights)?;
        }
        if out_keys.is_empty() {
            return Ok(());
        }
        let mut columns: Vec<ArrayRef> = match &self.group_converter {
            Some(conv) => kappa_state::decode_rows(conv, out_keys.iter().map(|k| &k[..]))?,
            None => vec![],
        };
        for i in 0..self.aggs.len() {
            columns.push(self.output_column(i, &out_vals)?);
        }
        let data = RecordBatch::try_new(self.schema.clone(), columns)?;
        out.push(ChangeBatch::new(data, Int64Array::from(out_weights))?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamHashAgg"
    }

    fn state_entries(&self) -> usize {
        self.groups.len() + self.extremes.len()
    }

    fn late_rows(&self) -> u64 {
        self.late_rows
    }

    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        Ok(crate::save_progress(self.watermark, self.late_rows))
    }

    fn state_tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![&mut *self.groups, &mut *self.extremes]
    }

    /// The index of open windows is rebuilt from the groups' keys.
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        (self.watermark, self.late_rows) = crate::restore_progress(saved, "an aggregate")?;
        self.open.clear();
        self.unclosable = false;
        let (Some(close), Some(conv)) = (self.window_close, &self.group_converter) else {
            return Ok(());
        };
        let snapshot = self.groups.snapshot();
        let keys: Vec<_> = snapshot.iter().map(|(k, _)| k).collect();
        for chunk in keys.chunks(8192) {
            let cols = kappa_state::decode_rows(conv, chunk.iter().map(|k| &k[..]))?;
            let v = cast(&cols[close.col], &DataType::Int64)?;
            let v = v.as_primitive::<Int64Type>();
            for (i, key) in chunk.iter().enumerate() {
                if v.is_valid(i) {
                    self.open
                        .entry(v.value(i))
                        .or_default()
                        .push(key[..].into());
                } else {
                    self.unclosable = true;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use datafusion::logical_expr::col;
    use datafusion::prelude::SessionContext;
    use kappa_state::MemStateTable;

    use super::*;
    use crate::testing::{assert_changes, changes, df_schema, schema};

    const IN: &str = "k:utf8, v:i64";

    fn agg(funcs: &[AggFunc], out: &str, grouped: bool) -> HashAggregate {
        let calls: Vec<_> = funcs.iter().map(|&f| (f, false)).collect();
        distinct_agg(&calls, out, grouped)
    }

    /// Aggregates of `v`, each with whether it is DISTINCT.
    fn distinct_agg(funcs: &[(AggFunc, bool)], out: &str, grouped: bool) -> HashAggregate {
        let ctx = SessionContext::new();
        let input = df_schema(IN);
        let v = ctx.create_physical_expr(col("v"), &input).unwrap();
        let k = ctx.create_physical_expr(col("k"), &input).unwrap();
        let specs = funcs
            .iter()
            .map(|&(func, distinct)| AggSpec {
                distinct,
                func,
                arg: Some(v.clone()),
                filter: None,
                input_type: DataType::Int64,
                output_type: if func == AggFunc::Avg {
                    DataType::Float64
                } else {
                    DataType::Int64
                },
                recompute: None,
            })
            .collect();
        let (g, t) = if grouped {
            (vec![k], vec![DataType::Utf8])
        } else {
            (vec![], vec![])
        };
        HashAggregate::new(
            g,
            t,
            specs,
            schema(out),
            Box::new(MemStateTable::default()),
            Box::new(MemStateTable::default()),
        )
        .unwrap()
    }

    fn epoch(op: &mut HashAggregate, lines: &str) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(0, changes(IN, lines), &mut out).unwrap();
        op.on_barrier(1, None, &mut out).unwrap();
        out
    }

    #[test]
    fn max_survives_deleting_the_current_extreme() {
        use AggFunc::*;
        let mut op = agg(
            &[Count, Sum, Max, Min],
            "k:utf8, c:i64, s:i64, mx:i64, mn:i64",
            true,
        );
        let out = epoch(&mut op, "+ a | 10\n+ a | 7\n+ b | 5");
        assert_changes(&out, "+ a | 2 | 17 | 10 | 7\n+ b | 1 | 5 | 5 | 5");
        let out = epoch(&mut op, "- a | 10");
        assert_changes(&out, "- a | 2 | 17 | 10 | 7\n+ a | 1 | 7 | 7 | 7");
        // Duplicate values: deleting one copy of the max keeps the other.
        let out = epoch(&mut op, "+2 a | 9\n- a | 9");
        assert_changes(&out, "- a | 1 | 7 | 7 | 7\n+ a | 2 | 16 | 9 | 7");
    }

    #[test]
    fn distinct_aggregates_count_a_value_while_any_copy_is_left() {
        use AggFunc::*;
        let mut op = distinct_agg(
            &[(Count, true), (Sum, true), (Avg, true), (Count, false)],
            "k:utf8, cd:i64, sd:i64, ad:f64, c:i64",
            true,
        );
        let out = epoch(&mut op, "+ a | 10\n+ a | 10\n+ a | 4\n+ a | NULL\n+ b | 5");
        assert_changes(&out, "+ a | 2 | 14 | 7.0 | 3\n+ b | 1 | 5 | 5.0 | 1");
        // One of two copies goes: the value still counts.
        let out = epoch(&mut op, "- a | 10");
        assert_changes(&out, "- a | 2 | 14 | 7.0 | 3\n+ a | 2 | 14 | 7.0 | 2");
        // The last copy goes and a new value comes in the same epoch.
        let out = epoch(&mut op, "- a | 10\n+ a | 6\n+ a | 4");
        assert_changes(&out, "- a | 2 | 14 | 7.0 | 2\n+ a | 2 | 10 | 5.0 | 3");
        // A value that comes and goes within an epoch changes nothing.
        let out = epoch(&mut op, "+ b | 8\n- b | 8");
        assert_changes(&out, "");
        // Only the NULL row is left: no distinct values, the group stays.
        let out = epoch(&mut op, "- a | 6\n-2 a | 4");
        assert_changes(&out, "- a | 2 | 10 | 5.0 | 3\n+ a | 0 | NULL | NULL | 0");
        let out = epoch(&mut op, "- a | NULL\n- b | 5");
        assert_changes(&out, "- a | 0 | NULL | NULL | 0\n- b | 1 | 5 | 5.0 | 1");
        assert!(op.extremes.is_empty());
        assert!(op.groups.is_empty());
    }

    #[test]
    fn append_only_distinct_aggregates_keep_each_value_once() {
        use AggFunc::*;
        let mut op = distinct_agg(
            &[(Count, true), (Sum, true), (Avg, true), (Count, false)],
            "k:utf8, cd:i64, sd:i64, ad:f64, c:i64",
            true,
        )
        .with_append_only_input()
        .unwrap();
        let out = epoch(&mut op, "+ a | 10\n+2 a | 10\n+ a | 4\n+ a | NULL\n+ b | 5");
        assert_changes(&out, "+ a | 2 | 14 | 7.0 | 4\n+ b | 1 | 5 | 5.0 | 1");
        // Values seen before (in an earlier epoch or this one) change only count(v).
        let out = epoch(&mut op, "+ a | 4\n+ a | 6\n+ a | 6");
        assert_changes(
            &out,
            "- a | 2 | 14 | 7.0 | 4\n+ a | 3 | 20 | 6.666666666666667 | 7",
        );
        let out = epoch(&mut op, "+3 b | 5");
        assert_changes(&out, "- b | 1 | 5 | 5.0 | 1\n+ b | 1 | 5 | 5.0 | 4");
        // The three aggregates of `v` share one presence set: one entry per (group, value),
        // a: {4, 6, 10}, b: {5}.
        assert_eq!(op.extremes.len(), 4);
        let mut out = vec![];
        assert!(op.process(0, changes(IN, "- a | 4"), &mut out).is_err());
    }

    /// DISTINCT aggregates of one argument with different FILTERs share a presence set,
    /// yet each counts exactly the values its own filter let through.
    #[test]
    fn append_only_distinct_aggregates_with_filters_share_one_lookup() {
        use datafusion::logical_expr::lit;
        let ctx = SessionContext::new();
        let input = df_schema(IN);
        let v = ctx.create_physical_expr(col("v"), &input).unwrap();
        let k = ctx.create_physical_expr(col("k"), &input).unwrap();
        let filter = |e| Some(ctx.create_physical_expr(e, &input).unwrap());
        let spec = |func, filter| AggSpec {
            distinct: true,
            func,
            arg: Some(v.clone()),
            filter,
            input_type: DataType::Int64,
            output_type: DataType::Int64,
            recompute: None,
        };
        let specs = vec![
            spec(AggFunc::Count, None),
            spec(AggFunc::Count, filter(col("v").gt(lit(5i64)))),
            spec(AggFunc::Sum, filter(col("v").lt(lit(8i64)))),
        ];
        let mut op = HashAggregate::new(
            vec![k],
            vec![DataType::Utf8],
            specs,
            schema("k:utf8, c:i64, big:i64, small:i64"),
            Box::new(MemStateTable::default()),
            Box::new(MemStateTable::default()),
        )
        .unwrap()
        .with_append_only_input()
        .unwrap();
        assert_eq!(op.presence, vec![Some((0, 0)), Some((0, 1)), Some((0, 2))]);
        let out = epoch(&mut op, "+ a | 3\n+ a | 7\n+ a | 9\n+ a | 3");
        // all {3, 7, 9}; > 5: {7, 9}; < 8: 3 + 7.
        assert_changes(&out, "+ a | 3 | 2 | 10");
        // 7 again changes nothing; 6 reaches all three; 20 only the first two.
        let out = epoch(&mut op, "+ a | 7\n+ a | 6\n+ a | 20");
        assert_changes(&out, "- a | 3 | 2 | 10\n+ a | 5 | 4 | 16");
        assert_eq!(op.extremes.len(), 5, "one entry per value");
    }

    #[test]
    fn append_only_min_max_keep_only_the_running_extreme() {
        use AggFunc::*;
        let mut op = agg(&[Max, Min, Count], "k:utf8, mx:i64, mn:i64, c:i64", true)
            .with_append_only_input()
            .unwrap();
        let out = epoch(&mut op, "+ a | 10\n+ a | NULL\n+ a | -7\n+ b | 5");
        // count(v) skips the NULL.
        assert_changes(&out, "+ a | 10 | -7 | 2\n+ b | 5 | 5 | 1");
        let out = epoch(&mut op, "+ a | 3\n+ a | 12");
        assert_changes(&out, "- a | 10 | -7 | 2\n+ a | 12 | -7 | 4");
        // No value multiset is kept.
        assert!(op.extremes.is_empty());
        // A NULL-only group has a NULL extreme.
        let out = epoch(&mut op, "+ c | NULL");
        assert_changes(&out, "+ c | NULL | NULL | 0");
        let mut out = vec![];
        assert!(op.process(0, changes(IN, "- a | 12"), &mut out).is_err());
    }

    #[test]
    fn group_disappears_when_its_last_row_is_deleted() {
        let mut op = agg(&[AggFunc::Count], "k:utf8, c:i64", true);
        epoch(&mut op, "+ b | 5");
        let out = epoch(&mut op, "- b | 5");
        assert_changes(&out, "- b | 1");
        assert!(op.groups.is_empty());
        assert!(op.extremes.is_empty());
    }

    #[test]
    fn changes_within_an_epoch_consolidate() {
        let mut op = agg(&[AggFunc::Sum], "k:utf8, s:i64", true);
        epoch(&mut op, "+ a | 1");
        // Insert and delete in the same epoch: the output row does not change, nothing emitted.
        let out = epoch(&mut op, "+ a | 4\n- a | 4");
        assert!(out.is_empty());
    }

    #[test]
    fn scalar_aggregate_always_has_one_row() {
        let mut op = agg(
            &[AggFunc::Count, AggFunc::Sum, AggFunc::Avg],
            "c:i64, s:i64, a:f64",
            false,
        );
        let mut out = vec![];
        op.on_barrier(1, None, &mut out).unwrap();
        assert_changes(&out, "+ 0 | NULL | NULL");
        let out = epoch(&mut op, "+ x | 3\n+ y | 4\n+ z | NULL");
        assert_changes(&out, "- 0 | NULL | NULL\n+ 2 | 7 | 3.5");
        let out = epoch(&mut op, "- x | 3\n- y | 4\n- z | NULL");
        assert_changes(&out, "- 2 | 7 | 3.5\n+ 0 | NULL | NULL");
    }

    #[test]
    fn a_restored_aggregate_continues_exactly() {
        use AggFunc::*;
        let c = |l: &str| (0, changes(IN, l));
        let epochs = vec![
            (vec![c("+ a | 10\n+ a | 7\n+ b | 5")], None),
            (vec![c("+ a | 12\n- b | 5\n+ c | 1")], None),
            // After the restore: the min/max multisets and counts are the checkpoint's.
            (vec![c("- a | 12\n+ b | 3")], None),
            (vec![c("- a | 10\n- a | 7\n+ c | 9")], None),
        ];
        let make = |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
            let mut tables = tables.into_iter();
            let ctx = SessionContext::new();
            let input = df_schema(IN);
            let v = ctx.create_physical_expr(col("v"), &input).unwrap();
            let k = ctx.create_physical_expr(col("k"), &input).unwrap();
            let specs = [Count, Sum, Max, Min]
                .iter()
                .map(|&func| AggSpec {
                    distinct: false,
                    func,
                    arg: Some(v.clone()),
                    filter: None,
                    input_type: DataType::Int64,
                    output_type: DataType::Int64,
                    recompute: None,
                })
                .collect();
            Box::new(
                HashAggregate::new(
                    vec![k],
                    vec![DataType::Utf8],
                    specs,
                    schema("k:utf8, c:i64, s:i64, mx:i64, mn:i64"),
                    tables.next().unwrap(),
                    tables.next().unwrap(),
                )
                .unwrap(),
            )
        };
        crate::testing::assert_restores_exactly(make, 2, &epochs, 2);
    }

    /// A window aggregate over `w:i64, v:i64`: sum and max of `v` per window `w` (the max
    /// keeps its multiset), windows closing at the watermark.
    fn window_sum_max(emit_on_window_close: bool) -> HashAggregate {
        use AggFunc::*;
        const W: &str = "w:i64, v:i64";
        let ctx = SessionContext::new();
        let input = df_schema(W);
        let v = ctx.create_physical_expr(col("v"), &input).unwrap();
        let w = ctx.create_physical_expr(col("w"), &input).unwrap();
        let spec = |func| AggSpec {
            distinct: false,
            func,
            arg: Some(v.clone()),
            filter: None,
            input_type: DataType::Int64,
            output_type: DataType::Int64,
            recompute: None,
        };
        HashAggregate::new(
            vec![w],
            vec![DataType::Int64],
            vec![spec(Sum), spec(Max)],
            schema("w:i64, s:i64, m:i64"),
            Box::new(MemStateTable::keyed()),
            Box::new(MemStateTable::default()),
        )
        .unwrap()
        .with_window_close(WatermarkCol { col: 0, offset: 0 }, emit_on_window_close)
    }

    /// When a barrier closes every window the tables are emptied at once; a group whose
    /// window is NULL never closes, so then each closed group is freed alone.
    #[test]
    fn closing_every_window_frees_all_state_but_never_a_null_window() {
        const W: &str = "w:i64, v:i64";
        let run = |op: &mut HashAggregate, lines: &str, wm: i64| {
            let mut out = vec![];
            op.process(0, changes(W, lines), &mut out).unwrap();
            op.on_barrier(1, Some(wm), &mut out).unwrap();
            out
        };
        let mut op = window_sum_max(false);
        run(&mut op, "+ 10 | 1\n+ 10 | 3\n+ 20 | 2", 5);
        assert!(op.state_entries() > 2);
        run(&mut op, "", 20);
        assert_eq!(op.state_entries(), 0);
        // Late for a closed window; a new window opens as usual.
        let out = run(&mut op, "+ 10 | 7\n+ 30 | 4", 20);
        assert_eq!(op.late_rows(), 1);
        crate::testing::assert_changes(&out, "+ 30 | 4 | 4");

        let mut op = window_sum_max(false);
        run(&mut op, "+ 10 | 1\n+ NULL | 5\n+ NULL | 6", 5);
        run(&mut op, "", 20);
        // The NULL window's group and its max's two values remain.
        assert_eq!(op.state_entries(), 3);
        let out = run(&mut op, "- NULL | 6", 30);
        crate::testing::assert_changes(&out, "- NULL | 11 | 6\n+ NULL | 5 | 5");

        // Emitting on close: a group deleted and created again is emitted once.
        let mut op = window_sum_max(true);
        run(&mut op, "+ 10 | 1\n+ 20 | 2", 5);
        run(&mut op, "- 10 | 1", 5);
        run(&mut op, "+ 10 | 3", 5);
        let out = run(&mut op, "", 20);
        crate::testing::assert_changes(&out, "+ 10 | 3 | 3\n+ 20 | 2 | 2");
        assert_eq!(op.state_entries(), 0);
    }

    #[test]
    fn a_restored_window_aggregate_closes_the_windows_it_had_open() {
        use AggFunc::*;
        const W: &str = "w:i64, v:i64";
        let c = |l: &str| (0, changes(W, l));
        let epochs = vec![
            (vec![c("+ 10 | 1\n+ 20 | 2\n+ 30 | 3")], Some(5)),
            (vec![c("+ 10 | 4\n+ 40 | 5")], Some(10)),
            // Restored: window 10 is closed (late), 20 and 30 close at 30.
            (vec![c("+ 10 | 6\n+ 20 | 7")], Some(15)),
            (vec![c("+ 30 | 8")], Some(30)),
            (vec![c("+ 40 | 9")], Some(100)),
        ];
        let make = |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
            let mut tables = tables.into_iter();
            let ctx = SessionContext::new();
            let input = df_schema(W);
            let v = ctx.create_physical_expr(col("v"), &input).unwrap();
            let w = ctx.create_physical_expr(col("w"), &input).unwrap();
            let spec = AggSpec {
                distinct: false,
                func: Sum,
                arg: Some(v),
                filter: None,
                input_type: DataType::Int64,
                output_type: DataType::Int64,
                recompute: None,
            };
            Box::new(
                HashAggregate::new(
                    vec![w],
                    vec![DataType::Int64],
                    vec![spec],
                    schema("w:i64, s:i64"),
                    tables.next().unwrap(),
                    tables.next().unwrap(),
                )
                .unwrap()
                .with_window_close(WatermarkCol { col: 0, offset: 0 }, true),
            )
        };
        crate::testing::assert_restores_exactly(make, 2, &epochs, 2);
    }
}

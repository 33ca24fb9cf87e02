//! The `StreamGraph`: the plan of one materialized view as the planner hands it to the runtime.
//!
//! A graph is a list of nodes in topological order (every node's inputs come before it) whose
//! last node is the sink. Expressions are DataFusion logical `Expr`s, each resolved against the
//! schema of the node's first input, so the runtime compiles them with DataFusion's physical
//! expression planner and the planner never needs to know the runtime.
//!
//! Every node consumes and produces changelogs (`ChangeBatch`: rows with signed weights), and
//! every node's output is exactly its `schema`, column for column.
//!
//! # Event time
//! A relation may carry a watermark `W` (microseconds of event time): a promise that no
//! change whose event time is below `W` will reach the views any more (such changes are late:
//! dropped at the source and counted). The planner tracks, per node, which output columns the
//! watermark bounds ([`WatermarkCol`]); the runtime tracks the value, the minimum over a
//! node's (non-idle) inputs. An aggregate grouped by such a column knows when a group is
//! closed — no future change can touch it — so it can emit it once, final, and free its state.

pub mod window;

use std::fmt;

use datafusion::arrow::datatypes::DataType;
use datafusion::common::DFSchemaRef;
use datafusion::logical_expr::{Expr, SortExpr};
use kappa_common::RelationId;

pub type NodeId = usize;

#[derive(Clone, Debug)]
pub struct StreamGraph {
    pub nodes: Vec<StreamNode>,
}

#[derive(Clone, Debug)]
pub struct StreamNode {
    pub kind: NodeKind,
    pub inputs: Vec<NodeId>,
    /// The node's output schema (DataFusion's, with qualifiers, so expressions of the
    /// consuming node resolve against it).
    pub schema: DFSchemaRef,
    /// No row this node emits can ever be retracted (e.g. a scan of an insert-only log).
    /// Operators downstream may use it to skip retraction bookkeeping.
    pub append_only: bool,
    /// Output columns bounded by the watermark.
    pub watermark_cols: Vec<WatermarkCol>,
}

impl StreamNode {
    /// How the watermark bounds output column `col`, if it does.
    pub fn watermark_col(&self, col: usize) -> Option<WatermarkCol> {
        self.watermark_cols.iter().find(|w| w.col == col).copied()
    }
}

/// Column `col` is bounded by the watermark `W`: every future row has `col + offset > W`
/// (values in microseconds). The event-time column itself has offset 1 µs (future rows have
/// `ts >= W`); a window's `window_end` has offset 0 and its `window_start` the window size.
/// So a row whose value `v` has `v + offset <= W` can never be joined by another one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatermarkCol {
    pub col: usize,
    pub offset: i64,
}

impl WatermarkCol {
    /// Whether the value `v` is closed at watermark `w`.
    pub fn is_closed(&self, v: i64, w: i64) -> bool {
        v.saturating_add(self.offset) <= w
    }
}

/// Which side of a row's visibility a temporal bound gives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemporalEdge {
    /// Visible once `now >= expr + offset`.
    From,
    /// Visible while `now < expr + offset`.
    Until,
}

/// One conjunct of a temporal filter over the processing time `now` (microseconds):
/// `expr` is a timestamp expression over the input row.
#[derive(Clone, Debug, PartialEq)]
pub struct TemporalBound {
    pub expr: Expr,
    pub edge: TemporalEdge,
    pub offset: i64,
}

impl fmt::Display for TemporalBound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (e, o) = (&self.expr, self.offset);
        match self.edge {
            TemporalEdge::From => write!(f, "now() >= {e} + {o}us"),
            TemporalEdge::Until => write!(f, "now() < {e} + {o}us"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum NodeKind {
    /// The changelog of a relation (engine table or materialized view), restricted to the
    /// columns in `projection` (all when `None`), in that order.
    Source {
        relation: RelationId,
        name: String,
        projection: Option<Vec<usize>>,
    },
    /// One output column per expression, evaluated row by row; weights pass through.
    Project { exprs: Vec<Expr> },
    /// A window table function: every input row once per window its time column
    /// (`time_col`, a timestamp) falls in, with `window_start` and `window_end` appended.
    WindowExpand {
        time_col: usize,
        spec: window::WindowSpec,
    },
    /// Session windows: every input row with `window_start` and `window_end` of its
    /// session appended. A change can move other rows to a new session (merge, split): they
    /// are retracted with their old bounds and re-emitted with the new ones. Sessions whose
    /// end the watermark has passed are final and freed.
    SessionWindow {
        time_col: usize,
        spec: window::SessionSpec,
    },
    /// Keeps the rows whose predicate is true; weights pass through.
    Filter { predicate: Expr },
    /// Keeps the rows visible at the epoch's processing time `now` under every bound: a row
    /// appears when `now` reaches its `From` bounds and is retracted when `now` reaches its
    /// `Until` bounds, as time passes and without new input.
    TemporalFilter { bounds: Vec<TemporalBound> },
    /// Group-by aggregation with retraction. Output columns: the group expressions, then one
    /// column per aggregate. With no group expressions the output is always exactly one row
    /// (SQL's scalar aggregate), even over an empty input.
    ///
    /// With `window_close` (a group column bounded by the watermark), a group closes when
    /// the watermark passes it: its state is freed, and with `emit_on_window_close` its row
    /// is emitted only then, once, final (the output is append-only).
    Aggregate {
        group_exprs: Vec<Expr>,
        aggregates: Vec<AggCall>,
        window_close: Option<WatermarkCol>,
        emit_on_window_close: bool,
    },
    /// Top-N per partition: the input rows whose rank within their partition (the values of
    /// `partition_by`), ordered by `order_by` and then by the whole row, lies in
    /// `[lo, hi]`. With `emit_rank` the rank is appended as a `UInt64` column. A deletion
    /// promotes the next row; shifted ranks are retracted and re-emitted.
    ///
    /// With `window_close` (a partition expression bounded by the watermark), a partition
    /// closes when the watermark passes it: its state is freed, and with
    /// `emit_on_window_close` its rows are emitted only then, once, final.
    TopN {
        partition_by: Vec<Expr>,
        order_by: Vec<SortExpr>,
        func: RankFunc,
        lo: u64,
        hi: u64,
        emit_rank: bool,
        window_close: Option<WatermarkCol>,
        emit_on_window_close: bool,
    },
    /// Window functions (`OVER`) on a changelog: every input row, with one column appended
    /// per function in `funcs` (DataFusion window expressions over the input, all with
    /// these `partition_by` and `order_by`). Within a partition, rows are ordered by
    /// `order_by` and then by the whole row, so ties are broken the same way every time
    /// (one of the orders a batch engine may pick). A change anywhere in a partition
    /// retracts and re-emits the rows whose function values it changes.
    Over {
        partition_by: Vec<Expr>,
        order_by: Vec<SortExpr>,
        funcs: Vec<Expr>,
    },
    /// The multiset sum of all inputs (UNION ALL).
    Union,
    /// Join of its two inputs. `on` pairs a key expression over the left input with one
    /// over the right (equality; NULL keys match nothing unless `null_equals_null`);
    /// `filter` is the rest of the join condition, over the left's columns followed by the
    /// right's. A stored row of input `s` that has a column of `expiry[s]` closed at the
    /// watermark can never match a future row of the other input, and is freed.
    Join {
        kind: JoinKind,
        on: Vec<(Expr, Expr)>,
        filter: Option<Expr>,
        null_equals_null: bool,
        expiry: [Vec<WatermarkCol>; 2],
    },
    /// Temporal join (`FOR SYSTEM_TIME AS OF`): each row of the left (probe) input matches
    /// the rows of the right (versioned) input with equal `on` keys whose `version_time`
    /// column (a timestamp) is the greatest one `<= probe_time` (an expression over the
    /// left); `left` NULL-extends probe rows without such a version. The result equals a
    /// batch ASOF join over both inputs' current contents. With `version_bound` (every
    /// future right row has `version_time + offset > W`) probe rows whose time is closed are
    /// final and freed; with `probe_bound` too (every future left row has
    /// `probe_time + offset > W`) superseded versions are freed.
    TemporalJoin {
        left: bool,
        on: Vec<(Expr, Expr)>,
        probe_time: Expr,
        version_time: usize,
        probe_bound: Option<i64>,
        version_bound: Option<i64>,
    },
    /// Keeps the relation `relation` equal to the sum of all changes it receives, and
    /// publishes it at each epoch commit.
    Materialize { relation: RelationId, name: String },
}

/// What a join emits. Output columns: the left's then the right's, except for semi and
/// anti joins, which emit only the rows (columns) of one side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JoinKind {
    /// Every matching pair.
    Inner,
    /// Matching pairs, plus every left row without a match, NULL-extended.
    Left,
    Right,
    Full,
    /// Every left row that has at least one match, once.
    LeftSemi,
    RightSemi,
    /// Every left row that has no match.
    LeftAnti,
    RightAnti,
}

impl JoinKind {
    /// Whether the output has the matching pairs (left columns, then right columns).
    pub fn emits_pairs(self) -> bool {
        matches!(self, Self::Inner | Self::Left | Self::Right | Self::Full)
    }

    /// Whether the rows of input `side` (0 left, 1 right) without a match appear,
    /// NULL-extended.
    pub fn preserves(self, side: usize) -> bool {
        match self {
            Self::Left => side == 0,
            Self::Right => side == 1,
            Self::Full => true,
            _ => false,
        }
    }

    /// The input whose rows alone form a semi join's output.
    pub fn semi_side(self) -> Option<usize> {
        match self {
            Self::LeftSemi => Some(0),
            Self::RightSemi => Some(1),
            _ => None,
        }
    }

    /// The input whose unmatched rows alone form an anti join's output.
    pub fn anti_side(self) -> Option<usize> {
        match self {
            Self::LeftAnti => Some(0),
            Self::RightAnti => Some(1),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Inner => "Inner",
            Self::Left => "Left",
            Self::Right => "Right",
            Self::Full => "Full",
            Self::LeftSemi => "LeftSemi",
            Self::RightSemi => "RightSemi",
            Self::LeftAnti => "LeftAnti",
            Self::RightAnti => "RightAnti",
        }
    }
}

/// How a top-N ranks the rows of a partition (sorted by the order keys).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RankFunc {
    /// Position 1, 2, 3, …; ties are broken by the row itself.
    RowNumber,
    /// 1 + the number of rows with a smaller order key (ties share a rank, gaps follow).
    Rank,
    /// 1 + the number of distinct smaller order keys (no gaps).
    DenseRank,
}

impl RankFunc {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "row_number" => Self::RowNumber,
            "rank" => Self::Rank,
            "dense_rank" => Self::DenseRank,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::RowNumber => "row_number",
            Self::Rank => "rank",
            Self::DenseRank => "dense_rank",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AggFunc {
    Count,
    Sum,
    Avg,
    Min,
    Max,
    /// Any other aggregate function DataFusion knows (`string_agg`, `array_agg`, `median`,
    /// `percentile_cont`, `approx_distinct`, `stddev`, `bool_and`, …): computed by
    /// DataFusion's own accumulator over the group's multiset of input rows whenever the
    /// group changes, so it is exact (as DataFusion computes it in batch) and retractions
    /// are safe, at a cost per change of the group's size (see [`AggCall::call`]).
    Other,
}

impl AggFunc {
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "count" => Self::Count,
            "sum" => Self::Sum,
            "avg" | "mean" => Self::Avg,
            "min" => Self::Min,
            "max" => Self::Max,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Sum => "sum",
            Self::Avg => "avg",
            Self::Min => "min",
            Self::Max => "max",
            Self::Other => "other",
        }
    }
}

/// One aggregate call: `func([DISTINCT] args…) FILTER (WHERE filter)`.
#[derive(Clone, Debug, PartialEq)]
pub struct AggCall {
    pub func: AggFunc,
    /// Over the distinct non-null argument values (never for `min`/`max`, where it
    /// changes nothing).
    pub distinct: bool,
    /// Argument expressions over the aggregate's input. `count(*)` has a non-null literal.
    pub args: Vec<Expr>,
    pub filter: Option<Expr>,
    /// Type of the argument (after DataFusion's coercion); `Null` for none.
    pub input_type: DataType,
    /// Type of the aggregate's output column, as DataFusion's batch plan types it.
    pub output_type: DataType,
    /// The whole call as DataFusion planned it (with its DISTINCT, FILTER and ORDER BY),
    /// from which the runtime builds the accumulator of an `Other` function.
    pub call: Expr,
}

/// Which input rows must meet in one shard of a node, when a view runs in several shards
/// (keyed parallelism): every shard runs its own copy of the node's operator over its own
/// part of the input, and the union of the shards' outputs must be the node's output.
#[derive(Clone, Debug, PartialEq)]
pub enum Distribution {
    /// Any split will do: the operator relates no row to another (its state, if any, is
    /// per row), so it runs where its input already is.
    Any,
    /// Rows with equal values of these expressions (over the input) must meet in one shard:
    /// the operator's state is per value of them (a group, a join key, a partition). Rows
    /// are routed by a hash of the values.
    Hash(Vec<Expr>),
    /// Every row must meet every other one in a single shard (a scalar aggregate, a top-N
    /// or window without PARTITION BY, a join without equi keys, the view's contents).
    Single,
}

impl StreamGraph {
    pub fn sink(&self) -> Option<&StreamNode> {
        self.nodes.last()
    }

    /// How node `id` needs the rows of its input number `port` distributed over shards.
    pub fn input_distribution(&self, id: NodeId, port: usize) -> Distribution {
        let node = &self.nodes[id];
        let hash = |keys: Vec<Expr>| {
            if keys.is_empty() {
                Distribution::Single
            } else {
                Distribution::Hash(keys)
            }
        };
        match &node.kind {
            NodeKind::Source { .. }
            | NodeKind::Project { .. }
            | NodeKind::Filter { .. }
            | NodeKind::WindowExpand { .. }
            | NodeKind::TemporalFilter { .. }
            | NodeKind::Union => Distribution::Any,
            NodeKind::SessionWindow { spec, .. } => {
                let input = &self.nodes[node.inputs[0]].schema;
                let columns = input.columns();
                hash(
                    spec.partition
                        .iter()
                        .map(|&c| Expr::Column(columns[c].clone()))
                        .collect(),
                )
            }
            NodeKind::Aggregate { group_exprs, .. } => hash(group_exprs.clone()),
            NodeKind::TopN { partition_by, .. } | NodeKind::Over { partition_by, .. } => {
                hash(partition_by.clone())
            }
            NodeKind::Join { on, .. } | NodeKind::TemporalJoin { on, .. } => hash(
                on.iter()
                    .map(|(l, r)| if port == 0 { l.clone() } else { r.clone() })
                    .collect(),
            ),
            NodeKind::Materialize { .. } => Distribution::Single,
        }
    }

    /// The relations this graph reads, each once, in first-use order.
    pub fn sources(&self) -> Vec<RelationId> {
        let mut out = Vec::new();
        for n in &self.nodes {
            if let NodeKind::Source { relation, .. } = n.kind
                && !out.contains(&relation)
            {
                out.push(relation);
            }
        }
        out
    }

    /// Prints node `id` and, the first time only, its inputs; a node read by several
    /// consumers (a shared subplan) is marked as such.
    fn fmt_node(
        &self,
        f: &mut fmt::Formatter<'_>,
        id: NodeId,
        depth: usize,
        consumers: &[usize],
        seen: &mut [bool],
    ) -> fmt::Result {
        let node = &self.nodes[id];
        let pad = "  ".repeat(depth);
        let list = |es: &[Expr]| {
            es.iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let line = match &node.kind {
            NodeKind::Source {
                name, projection, ..
            } => {
                let cols: Vec<&str> = node
                    .schema
                    .fields()
                    .iter()
                    .map(|f| f.name().as_str())
                    .collect();
                match projection {
                    None => format!("StreamScan: {name} [{}]", cols.join(", ")),
                    Some(_) => format!("StreamScan: {name} projection=[{}]", cols.join(", ")),
                }
            }
            NodeKind::Project { exprs } => format!("StreamProject: {}", list(exprs)),
            NodeKind::WindowExpand { time_col, spec } => format!(
                "StreamWindow: {spec} on {}",
                self.nodes[node.inputs[0]].schema.field(*time_col).name()
            ),
            NodeKind::SessionWindow { time_col, spec } => {
                let input = &self.nodes[node.inputs[0]].schema;
                let parts: Vec<&str> = spec
                    .partition
                    .iter()
                    .map(|&c| input.field(c).name().as_str())
                    .collect();
                format!(
                    "StreamSessionWindow: {spec} on {}, partition by [{}]",
                    input.field(*time_col).name(),
                    parts.join(", ")
                )
            }
            NodeKind::Filter { predicate } => format!("StreamFilter: {predicate}"),
            NodeKind::TemporalFilter { bounds } => {
                let b: Vec<String> = bounds.iter().map(|b| b.to_string()).collect();
                format!("StreamTemporalFilter: {}", b.join(" AND "))
            }
            NodeKind::Aggregate {
                group_exprs,
                aggregates,
                window_close,
                emit_on_window_close,
            } => {
                let aggs: Vec<String> = aggregates
                    .iter()
                    .map(|a| {
                        if a.func == AggFunc::Other {
                            return a.call.to_string();
                        }
                        let distinct = if a.distinct { "DISTINCT " } else { "" };
                        let mut s = format!("{}({distinct}{})", a.func.name(), list(&a.args));
                        if let Some(fl) = &a.filter {
                            s.push_str(&format!(" FILTER ({fl})"));
                        }
                        s
                    })
                    .collect();
                let kind = if group_exprs.is_empty() {
                    "StreamSimpleAgg"
                } else {
                    "StreamHashAgg"
                };
                let close = match window_close {
                    Some(c) if *emit_on_window_close => {
                        format!(" emit on close of {}", group_exprs[c.col])
                    }
                    Some(c) => format!(" state cleaned by watermark on {}", group_exprs[c.col]),
                    None => String::new(),
                };
                format!(
                    "{kind}: group_by=[{}], aggs=[{}]{close}{}",
                    list(group_exprs),
                    aggs.join(", "),
                    if self.nodes[node.inputs[0]].append_only {
                        " (append-only input)"
                    } else {
                        ""
                    }
                )
            }
            NodeKind::TopN {
                partition_by,
                order_by,
                func,
                lo,
                hi,
                emit_rank,
                window_close,
                emit_on_window_close,
            } => {
                let order: Vec<String> = order_by.iter().map(|s| s.to_string()).collect();
                let mut s = format!(
                    "StreamTopN: {}() partition_by=[{}], order_by=[{}], rank in [{lo}, {hi}]",
                    func.name(),
                    list(partition_by),
                    order.join(", ")
                );
                if *emit_rank {
                    s.push_str(", emits rank");
                }
                match window_close {
                    Some(c) if *emit_on_window_close => {
                        s.push_str(&format!(" emit on close of {}", partition_by[c.col]))
                    }
                    Some(c) => s.push_str(&format!(
                        " state cleaned by watermark on {}",
                        partition_by[c.col]
                    )),
                    None => {}
                }
                s
            }
            NodeKind::Over {
                partition_by,
                order_by,
                funcs,
            } => {
                let order: Vec<String> = order_by.iter().map(|s| s.to_string()).collect();
                // Each function with its arguments, and an aggregate's frame.
                let funcs: Vec<String> = funcs
                    .iter()
                    .map(|e| match e.clone().unalias() {
                        Expr::WindowFunction(f) => {
                            let p = &f.params;
                            let mut s = format!("{}({})", f.fun.name(), list(&p.args));
                            if let datafusion::logical_expr::expr::WindowFunctionDefinition::AggregateUDF(_) = &f.fun {
                                s.push_str(&format!(" {}", p.window_frame));
                            }
                            s
                        }
                        e => e.to_string(),
                    })
                    .collect();
                format!(
                    "StreamOver: partition_by=[{}], order_by=[{}], funcs=[{}]",
                    list(partition_by),
                    order.join(", "),
                    funcs.join(", ")
                )
            }
            NodeKind::Union => "StreamUnion".to_string(),
            NodeKind::Join {
                kind,
                on,
                filter,
                expiry,
                ..
            } => {
                let on: Vec<String> = on.iter().map(|(l, r)| format!("{l} = {r}")).collect();
                let mut s = format!(
                    "StreamHashJoin: type={}, on=[{}]",
                    kind.name(),
                    on.join(", ")
                );
                if let Some(f) = filter {
                    s.push_str(&format!(", filter={f}"));
                }
                for (i, (side, cols)) in ["left", "right"].iter().zip(expiry).enumerate() {
                    let input = &self.nodes[node.inputs[i]];
                    let names: Vec<String> = cols
                        .iter()
                        .map(|c| {
                            format!(
                                "{} + {}",
                                input.schema.field(c.col).name(),
                                format_micros(c.offset)
                            )
                        })
                        .collect();
                    if !names.is_empty() {
                        s.push_str(&format!(
                            ", {side} rows freed when {} <= watermark",
                            names.join(" or ")
                        ));
                    }
                }
                s
            }
            NodeKind::TemporalJoin {
                left,
                on,
                probe_time,
                version_time,
                probe_bound,
                version_bound,
            } => {
                let on: Vec<String> = on.iter().map(|(l, r)| format!("{l} = {r}")).collect();
                let versioned = &self.nodes[node.inputs[1]];
                let vt = versioned.schema.field(*version_time).name();
                let mut s = format!(
                    "StreamTemporalJoin: type={}, on=[{}], as_of={probe_time}, version={vt}",
                    if *left { "Left" } else { "Inner" },
                    on.join(", ")
                );
                if let Some(v) = version_bound {
                    s.push_str(&format!(
                        ", probe rows freed when {probe_time} + {} <= watermark",
                        format_micros(*v)
                    ));
                    if let Some(p) = probe_bound {
                        s.push_str(&format!(
                            ", superseded versions freed when the next {vt} + {} <= watermark",
                            format_micros((*p).max(*v))
                        ));
                    }
                }
                s
            }
            NodeKind::Materialize { name, .. } => format!("StreamMaterialize: {name}"),
        };
        if consumers[id] < 2 {
            writeln!(f, "{pad}{line}")?;
        } else if seen[id] {
            return writeln!(f, "{pad}{line} (shared, as above)");
        } else {
            writeln!(f, "{pad}{line} (shared)")?;
        }
        seen[id] = true;
        for &i in &node.inputs {
            self.fmt_node(f, i, depth + 1, consumers, seen)?;
        }
        Ok(())
    }
}

/// A duration in microseconds as EXPLAIN shows it: `10s`, `1.000001s`, `0s`.
fn format_micros(us: i64) -> String {
    if us % 1_000_000 == 0 {
        format!("{}s", us / 1_000_000)
    } else {
        format!("{}s", us as f64 / 1e6)
    }
}

impl fmt::Display for StreamGraph {
    /// The plan as an indented tree, sink first, as `EXPLAIN` shows it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.nodes.is_empty() {
            return writeln!(f, "(empty plan)");
        }
        let mut consumers = vec![0; self.nodes.len()];
        for n in &self.nodes {
            for &i in &n.inputs {
                consumers[i] += 1;
            }
        }
        let mut seen = vec![false; self.nodes.len()];
        self.fmt_node(f, self.nodes.len() - 1, 0, &consumers, &mut seen)
    }
}

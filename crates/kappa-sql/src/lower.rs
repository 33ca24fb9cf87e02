//! Lowering an optimized DataFusion `LogicalPlan` into a `StreamGraph`.
//!
//! Every supported logical node maps to streaming nodes that compute the same relation
//! incrementally; anything else is refused with 0A000 naming the construct, never run
//! approximately.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::{DFSchema, TableReference};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Sort, SortExpr};
use kappa_common::{KappaError, RelationId, Result};
use kappa_plan::{
    AggCall, AggFunc, JoinKind, NodeId, NodeKind, RankFunc, StreamGraph, StreamNode, WatermarkCol,
};

use crate::tvf::WindowTable;
use kappa_plan::window::{SessionSpec, TableWindow};

/// What a scanned table name stands for.
pub struct ScanSource {
    pub relation: RelationId,
    pub name: String,
    /// The relation's event-time column, if it declares a watermark.
    pub watermark_col: Option<usize>,
    /// Set when the name is a window table function over `relation`.
    pub window: Option<WindowTable>,
    /// The relation never retracts a row (a source).
    pub append_only: bool,
}

/// Resolves a scanned table to the relation that feeds it.
pub type Resolver<'a> = dyn Fn(&TableReference) -> Result<ScanSource> + 'a;

/// Lowers `plan` (the optimized plan of a materialized view's query) into a graph whose sink
/// materializes into `sink`. With `emit_on_window_close`, every aggregate must be grouped by
/// a watermark-bounded column (a window bound) and emits each group once, when it closes.
pub fn lower_to_stream_graph(
    plan: &LogicalPlan,
    resolve: &Resolver<'_>,
    sink: (RelationId, &str),
    emit_on_window_close: bool,
) -> Result<StreamGraph> {
    let mut l = Lowering {
        nodes: vec![],
        resolve,
        emit_on_window_close,
        aggregates: 0,
    };
    let top = l.lower(plan)?;
    if emit_on_window_close && l.aggregates == 0 {
        return Err(KappaError::not_supported(
            "EMIT ON WINDOW CLOSE on a view without GROUP BY window_start or window_end",
        ));
    }
    let watermark_cols = l.nodes[top].watermark_cols.clone();
    let append_only = l.nodes[top].append_only;
    l.nodes.push(StreamNode {
        kind: NodeKind::Materialize {
            relation: sink.0,
            name: sink.1.to_string(),
        },
        inputs: vec![top],
        schema: plan.schema().clone(),
        append_only,
        watermark_cols,
    });
    Ok(StreamGraph { nodes: l.nodes })
}

struct Lowering<'a> {
    nodes: Vec<StreamNode>,
    resolve: &'a Resolver<'a>,
    emit_on_window_close: bool,
    aggregates: usize,
}

fn check_exprs<'e>(exprs: impl IntoIterator<Item = &'e Expr>) -> Result<()> {
    for e in exprs {
        if crate::temporal::calls_now(e) {
            return Err(crate::temporal::now_outside_filter(e));
        }
        if e.is_volatile() {
            return Err(KappaError::not_supported(format!(
                "the volatile expression {e} in a materialized view (its value would differ between insert and delete)"
            )));
        }
        let mut sub = false;
        e.apply(|x| {
            if matches!(
                x,
                Expr::ScalarSubquery(_)
                    | Expr::Exists(_)
                    | Expr::InSubquery(_)
                    | Expr::SetComparison(_)
            ) {
                sub = true;
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        })?;
        if sub {
            return Err(KappaError::not_supported(format!(
                "the subquery {e} in a materialized view"
            )));
        }
        if crate::as_of::mentions_marker(e) {
            return Err(KappaError::not_supported(
                "FOR SYSTEM_TIME AS OF where it is not a join's own condition",
            ));
        }
    }
    Ok(())
}

use datafusion::common::tree_node::TreeNode;

impl Lowering<'_> {
    /// The watermark-bounded column of `input` that `e` is, if it is one.
    fn bounded_col(&self, input: NodeId, e: &Expr) -> Option<WatermarkCol> {
        let Expr::Column(c) = e.clone().unalias() else {
            return None;
        };
        let node = &self.nodes[input];
        let idx = node.schema.index_of_column(&c).ok()?;
        node.watermark_col(idx)
    }

    /// The output columns among `exprs` (evaluated over `input`) that the watermark bounds.
    fn bounded_cols(&self, input: NodeId, exprs: &[Expr]) -> Vec<WatermarkCol> {
        exprs
            .iter()
            .enumerate()
            .filter_map(|(col, e)| {
                let w = self.bounded_col(input, e)?;
                Some(WatermarkCol {
                    col,
                    offset: w.offset,
                })
            })
            .collect()
    }

    fn push(&mut self, kind: NodeKind, inputs: Vec<NodeId>, schema: Arc<DFSchema>) -> NodeId {
        // The same computation over the same inputs is computed once (a query that repeats a
        // subquery, as Nexmark q5 does): operators are deterministic, so every consumer can
        // read one node's output.
        if let Some(i) = self
            .nodes
            .iter()
            .position(|n| n.kind == kind && n.inputs == inputs && n.schema == schema)
        {
            return i;
        }
        let first = inputs.first().map(|&i| &self.nodes[i]);
        let append_only = match &kind {
            NodeKind::Project { .. }
            | NodeKind::Filter { .. }
            | NodeKind::Union
            | NodeKind::WindowExpand { .. } => inputs.iter().all(|&i| self.nodes[i].append_only),
            // Rows are only delayed, never retracted, without an `until` bound.
            NodeKind::TemporalFilter { bounds } => {
                bounds
                    .iter()
                    .all(|b| b.edge == kappa_plan::TemporalEdge::From)
                    && inputs.iter().all(|&i| self.nodes[i].append_only)
            }
            // Merging and splitting sessions retracts rows.
            // An inner or semi join only retracts when an input does; outer and anti joins
            // retract unmatched rows when a match arrives.
            NodeKind::Join { kind, .. } => {
                matches!(
                    kind,
                    JoinKind::Inner | JoinKind::LeftSemi | JoinKind::RightSemi
                ) && inputs.iter().all(|&i| self.nodes[i].append_only)
            }
            NodeKind::Aggregate {
                emit_on_window_close,
                ..
            }
            | NodeKind::TopN {
                emit_on_window_close,
                ..
            } => *emit_on_window_close,
            _ => false,
        };
        let watermark_cols = match &kind {
            // A join's bounds come from its condition; the lowering sets them.
            // A temporal filter emits (and retracts) rows whenever time says so, however
            // old their event time.
            NodeKind::Source { .. }
            | NodeKind::Materialize { .. }
            | NodeKind::Join { .. }
            | NodeKind::TemporalJoin { .. }
            | NodeKind::Over { .. }
            | NodeKind::TemporalFilter { .. } => vec![],
            NodeKind::Filter { .. } => first.map(|n| n.watermark_cols.clone()).unwrap_or_default(),
            NodeKind::Project { exprs } => self.bounded_cols(inputs[0], exprs),
            NodeKind::WindowExpand { time_col, spec } => {
                let mut cols = first.map(|n| n.watermark_cols.clone()).unwrap_or_default();
                let n = first.map(|n| n.schema.fields().len()).unwrap_or(0);
                // Every window has end >= t + 1 µs and start + size >= end, so from
                // t + k > W follows end + (k - 1) > W and start + size + (k - 1) > W.
                if let Some(t) = first.and_then(|n| n.watermark_col(*time_col)) {
                    let k = t.offset - 1;
                    cols.push(WatermarkCol {
                        col: n,
                        offset: spec.size.saturating_add(k),
                    });
                    cols.push(WatermarkCol {
                        col: n + 1,
                        offset: k,
                    });
                }
                cols
            }
            // A change touches only sessions that end after its time t (t + k > W), so every
            // session retracted or emitted has end >= t + 1: window_end is bounded with
            // offset k - 1. Nothing else is: a retracted row can be old.
            NodeKind::SessionWindow { time_col, .. } => first
                .and_then(|n| {
                    let t = n.watermark_col(*time_col)?;
                    Some(vec![WatermarkCol {
                        col: n.schema.fields().len() + 1,
                        offset: t.offset - 1,
                    }])
                })
                .unwrap_or_default(),
            NodeKind::Aggregate { group_exprs, .. } => self.bounded_cols(inputs[0], group_exprs),
            // A change touches only open partitions, so the bound of a partition column
            // holds for every row emitted or retracted; other columns of a promoted row can
            // be old.
            NodeKind::TopN { partition_by, .. } => first
                .map(|n| {
                    n.watermark_cols
                        .iter()
                        .filter(|w| {
                            partition_by.iter().any(|e| match e {
                                Expr::Column(c) => n.schema.index_of_column(c).ok() == Some(w.col),
                                _ => false,
                            })
                        })
                        .copied()
                        .collect()
                })
                .unwrap_or_default(),
            NodeKind::Union => {
                let mut cols = first.map(|n| n.watermark_cols.clone()).unwrap_or_default();
                for &i in &inputs[1..] {
                    let other = &self.nodes[i].watermark_cols;
                    cols.retain_mut(|w| match other.iter().find(|o| o.col == w.col) {
                        Some(o) => {
                            w.offset = w.offset.max(o.offset);
                            true
                        }
                        None => false,
                    });
                }
                cols
            }
        };
        self.nodes.push(StreamNode {
            kind,
            inputs,
            schema,
            append_only,
            watermark_cols,
        });
        self.nodes.len() - 1
    }

    /// A scan; `alias` is the schema of a SubqueryAlias directly above it, which a window
    /// scan produces itself (so plans never show the synthetic window relation's name).
    fn lower_scan(
        &mut self,
        scan: &datafusion::logical_expr::TableScan,
        alias: Option<&Arc<DFSchema>>,
    ) -> Result<NodeId> {
        let src = (self.resolve)(&scan.table_name)?;
        let Some(window) = src.window else {
            let id = self.push(
                NodeKind::Source {
                    relation: src.relation,
                    name: src.name,
                    projection: scan.projection.clone(),
                },
                vec![],
                scan.projected_schema.clone(),
            );
            let wm = src.watermark_col.and_then(|c| match &scan.projection {
                None => Some(c),
                Some(p) => p.iter().position(|&x| x == c),
            });
            if let Some(col) = wm {
                self.nodes[id].watermark_cols = vec![WatermarkCol { col, offset: 1 }];
            }
            self.nodes[id].append_only = src.append_only;
            return Ok(id);
        };
        // The synthetic window relation: the input's columns, then window_start, window_end.
        // The source reads only the input columns the query uses, with the window's time
        // and partition columns: the window copies every column it keeps once per window a
        // row falls in (five times for a HOP of five slides). The watermark column stays:
        // the window's bounds derive their watermark from it.
        let full = scan.source.schema();
        let n = full.fields().len().saturating_sub(2);
        let all: Vec<usize> = (0..full.fields().len()).collect();
        let wanted = scan.projection.as_ref().unwrap_or(&all);
        let mut read: Vec<usize> = wanted.iter().copied().filter(|&i| i < n).collect();
        read.push(window.time_col);
        read.extend(src.watermark_col);
        if let TableWindow::Session(spec) = &window.window {
            read.extend(&spec.partition);
        }
        read.sort_unstable();
        read.dedup();
        // Where input column `i` of the full relation is among the columns read.
        let pos = |i: usize| read.iter().position(|&r| r == i);
        let fields: Vec<_> = read.iter().map(|&i| full.fields()[i].clone()).collect();
        let input_schema = Schema::new(fields.clone());
        let expanded_schema = Schema::new(
            fields
                .into_iter()
                .chain(full.fields()[n..].iter().cloned())
                .collect::<Vec<_>>(),
        );
        let qualifier = TableReference::bare(src.name.clone());
        let input_df = Arc::new(DFSchema::try_from_qualified_schema(
            qualifier.clone(),
            &input_schema,
        )?);
        let expanded_df = Arc::new(DFSchema::try_from_qualified_schema(
            qualifier,
            &expanded_schema,
        )?);
        let source = self.push(
            NodeKind::Source {
                relation: src.relation,
                name: src.name,
                projection: (read.len() < n).then(|| read.clone()),
            },
            vec![],
            input_df,
        );
        if let Some(col) = src.watermark_col.and_then(pos) {
            self.nodes[source].watermark_cols = vec![WatermarkCol { col, offset: 1 }];
        }
        self.nodes[source].append_only = src.append_only;
        let missing = || KappaError::internal("a window's column is not read from its source");
        let time_col = pos(window.time_col).ok_or_else(missing)?;
        let kind = match window.window {
            TableWindow::Fixed(spec) => NodeKind::WindowExpand { time_col, spec },
            TableWindow::Session(spec) => NodeKind::SessionWindow {
                time_col,
                spec: SessionSpec {
                    partition: spec
                        .partition
                        .iter()
                        .map(|&c| pos(c).ok_or_else(missing))
                        .collect::<Result<_>>()?,
                    ..spec
                },
            },
        };
        let expand = self.push(kind, vec![source], expanded_df.clone());
        // Window columns follow the columns read.
        let exprs = wanted
            .iter()
            .map(|&i| {
                let at = if i < n {
                    pos(i).ok_or_else(missing)?
                } else {
                    read.len() + i - n
                };
                Ok(Expr::Column(expanded_df.columns()[at].clone()))
            })
            .collect::<Result<_>>()?;
        let out = alias.unwrap_or(&scan.projected_schema).clone();
        Ok(self.push(NodeKind::Project { exprs }, vec![expand], out))
    }

    /// An aggregate already in the graph over `input` with the same aggregates and the same
    /// group expressions in another order (`GROUP BY a, b` and `GROUP BY b, a`), and the
    /// columns that reorder its output into this one's.
    fn same_aggregate(
        &self,
        input: NodeId,
        groups: &[Expr],
        aggregates: &[AggCall],
        window_close: Option<WatermarkCol>,
    ) -> Option<(NodeId, Vec<Expr>)> {
        let close = |g: &[Expr], w: Option<WatermarkCol>| w.map(|w| (g[w.col].clone(), w.offset));
        self.nodes.iter().enumerate().find_map(|(id, n)| {
            let NodeKind::Aggregate {
                group_exprs,
                aggregates: aggs,
                window_close: wc,
                emit_on_window_close,
            } = &n.kind
            else {
                return None;
            };
            if n.inputs != [input]
                || aggs.as_slice() != aggregates
                || *emit_on_window_close != self.emit_on_window_close
                || group_exprs.len() != groups.len()
                || close(group_exprs, *wc) != close(groups, window_close)
            {
                return None;
            }
            let cols = n.schema.columns();
            let mut exprs = Vec::with_capacity(cols.len());
            for g in groups {
                let j = group_exprs.iter().position(|e| e == g)?;
                exprs.push(Expr::Column(cols[j].clone()));
            }
            exprs.extend(cols[groups.len()..].iter().cloned().map(Expr::Column));
            Some((id, exprs))
        })
    }

    /// A top-N node over `input` (see [`NodeKind::TopN`]); in an `EMIT ON WINDOW CLOSE` view
    /// it must be partitioned by a window bound, and emits each partition when it closes.
    #[allow(clippy::too_many_arguments)]
    fn push_top_n(
        &mut self,
        input: NodeId,
        partition_by: Vec<Expr>,
        order_by: Vec<SortExpr>,
        func: RankFunc,
        (lo, hi): (u64, u64),
        emit_rank: bool,
        schema: Arc<DFSchema>,
    ) -> Result<NodeId> {
        check_exprs(partition_by.iter().chain(order_by.iter().map(|s| &s.expr)))?;
        let window_close = self.bounded_cols(input, &partition_by).first().copied();
        if self.emit_on_window_close {
            if window_close.is_none() {
                return Err(KappaError::not_supported(
                    "EMIT ON WINDOW CLOSE with a top-N (ROW_NUMBER, DISTINCT ON, LIMIT) that is not partitioned by window_start or window_end of a source with a WATERMARK",
                ));
            }
            self.aggregates += 1;
        }
        Ok(self.push(
            NodeKind::TopN {
                partition_by,
                order_by,
                func,
                lo,
                hi,
                emit_rank,
                window_close,
                emit_on_window_close: self.emit_on_window_close,
            },
            vec![input],
            schema,
        ))
    }

    /// `Filter(rank bounds) <- [Projection <-] Window(one ranking function)` as a top-N, or
    /// `None` when the plan is not that shape. `rank_read` says whether the consumer reads
    /// the rank column.
    fn lower_ranked_filter(
        &mut self,
        f: &datafusion::logical_expr::Filter,
        rank_read: bool,
    ) -> Result<Option<NodeId>> {
        let Some(ri) = crate::top_n::ranked_input(&f.input) else {
            return Ok(None);
        };
        let b = crate::top_n::rank_bounds(&f.predicate, &ri.rank);
        let Some(hi) = b.hi else {
            return Ok(None);
        };
        check_exprs(&b.rest)?;
        let emit_rank = rank_read || b.rest.iter().any(|e| crate::top_n::reads(e, &ri.rank));
        let input = self.lower(&ri.window.input)?;
        let schema = if emit_rank {
            ri.window.schema.clone()
        } else {
            self.nodes[input].schema.clone()
        };
        let r = ri.ranking;
        let mut node = self.push_top_n(
            input,
            r.partition_by,
            r.order_by,
            r.func,
            (b.lo, hi),
            emit_rank,
            schema,
        )?;
        if let Some((p, pos)) = ri.projection {
            let (exprs, schema) = match pos {
                Some(i) if !emit_rank => {
                    let mut exprs = p.expr.clone();
                    exprs.remove(i);
                    let fields = p
                        .schema
                        .iter()
                        .enumerate()
                        .filter(|(j, _)| *j != i)
                        .map(|(_, (q, f))| (q.cloned(), f.clone()))
                        .collect();
                    let schema = DFSchema::new_with_metadata(fields, Default::default())?;
                    (exprs, Arc::new(schema))
                }
                _ => (p.expr.clone(), p.schema.clone()),
            };
            node = self.push(NodeKind::Project { exprs }, vec![node], schema);
        }
        let schema = self.nodes[node].schema.clone();
        if let Some(predicate) = datafusion::logical_expr::utils::conjunction(b.rest) {
            node = self.push(NodeKind::Filter { predicate }, vec![node], schema);
        }
        Ok(Some(node))
    }

    /// `ORDER BY … LIMIT fetch OFFSET skip`: the rows ranked `skip + 1 ..= skip + fetch`.
    /// A `Window` node (OVER functions not bounded as a top-N) as one `Over` node: every
    /// function must share the node's PARTITION BY and ORDER BY.
    fn lower_over(&mut self, w: &datafusion::logical_expr::Window) -> Result<NodeId> {
        if self.emit_on_window_close {
            return Err(KappaError::not_supported(
                "window functions (OVER) in an EMIT ON WINDOW CLOSE view (a later row can change an earlier row's value, so the output is not final)",
            ));
        }
        let mut spec: Option<(Vec<Expr>, Vec<SortExpr>)> = None;
        for e in &w.window_expr {
            let Expr::WindowFunction(f) = e.clone().unalias() else {
                return Err(KappaError::not_supported(format!(
                    "the window expression {e} in a materialized view"
                )));
            };
            let p = &f.params;
            check_exprs(
                p.args
                    .iter()
                    .chain(&p.partition_by)
                    .chain(p.filter.as_deref())
                    .chain(p.order_by.iter().map(|s| &s.expr)),
            )?;
            match &spec {
                None => spec = Some((p.partition_by.clone(), p.order_by.clone())),
                Some((part, order)) if *part == p.partition_by && *order == p.order_by => {}
                Some(_) => {
                    return Err(KappaError::not_supported(
                        "window functions with different PARTITION BY in one query level of a materialized view (use a subquery per window)",
                    ));
                }
            }
        }
        let Some((partition_by, order_by)) = spec else {
            return Err(KappaError::internal("a window node without functions"));
        };
        let input = self.lower(&w.input)?;
        Ok(self.push(
            NodeKind::Over {
                partition_by,
                order_by,
                funcs: w.window_expr.clone(),
            },
            vec![input],
            w.schema.clone(),
        ))
    }

    fn lower_limit(&mut self, sort: &Sort, skip: usize, fetch: Option<usize>) -> Result<NodeId> {
        let input = self.lower(&sort.input)?;
        let schema = self.nodes[input].schema.clone();
        let skip = skip as u64;
        let hi = fetch.map_or(u64::MAX, |f| skip.saturating_add(f as u64));
        self.push_top_n(
            input,
            vec![],
            sort.expr.clone(),
            RankFunc::RowNumber,
            (skip + 1, hi),
            false,
            schema,
        )
    }

    /// A temporal join: `vt` and `probe` are the marker's arguments, `rest` the other
    /// conjuncts of the join's filter.
    fn lower_temporal_join(
        &mut self,
        j: &datafusion::logical_expr::Join,
        vt: Expr,
        probe: Expr,
        rest: Vec<Expr>,
    ) -> Result<NodeId> {
        use datafusion::logical_expr::JoinType;
        let left = match j.join_type {
            JoinType::Inner => false,
            JoinType::Left => true,
            _ => {
                return Err(KappaError::not_supported(
                    "FOR SYSTEM_TIME AS OF with a join other than [INNER] JOIN or LEFT JOIN",
                ));
            }
        };
        if let Some(extra) = rest.into_iter().reduce(datafusion::logical_expr::and) {
            return Err(KappaError::not_supported(format!(
                "the condition {extra} in a FOR SYSTEM_TIME AS OF join (only equalities between \
                 the two sides; filter either input in WHERE or in a subquery)"
            )));
        }
        if j.null_equality == datafusion::common::NullEquality::NullEqualsNull {
            return Err(KappaError::not_supported(
                "IS NOT DISTINCT FROM keys in a FOR SYSTEM_TIME AS OF join",
            ));
        }
        check_exprs(j.on.iter().flat_map(|(l, r)| [l, r]).chain([&probe]))?;
        let l = self.lower(&j.left)?;
        let r = self.lower(&j.right)?;
        let version_time = match vt.clone().unalias() {
            Expr::Column(c) => self.nodes[r].schema.index_of_column(&c).ok(),
            _ => None,
        }
        .ok_or_else(|| {
            KappaError::not_supported(format!(
                "FOR SYSTEM_TIME AS OF with the version time {vt}: it must be the versioned \
                 table's own TIMESTAMP column"
            ))
        })?;
        if probe
            .column_refs()
            .iter()
            .any(|c| self.nodes[l].schema.index_of_column(c).is_err())
        {
            return Err(KappaError::not_supported(format!(
                "FOR SYSTEM_TIME AS OF {probe}: the time must come from the left side of the join"
            )));
        }
        let version_bound = self.nodes[r].watermark_col(version_time).map(|w| w.offset);
        let probe_col = self.bounded_col(l, &probe);
        let id = self.push(
            NodeKind::TemporalJoin {
                left,
                on: j.on.clone(),
                probe_time: probe,
                version_time,
                probe_bound: probe_col.map(|w| w.offset),
                version_bound,
            },
            vec![l, r],
            j.schema.clone(),
        );
        // A probe row's pairs are emitted when it arrives (t + off_probe > W) or when a
        // version at or before t arrives (t >= v > W - off_version).
        if let (Some(p), Some(v)) = (probe_col, version_bound) {
            self.nodes[id].watermark_cols = vec![WatermarkCol {
                col: p.col,
                offset: p.offset.max(v),
            }];
        }
        Ok(id)
    }

    fn lower_join(&mut self, j: &datafusion::logical_expr::Join) -> Result<NodeId> {
        use datafusion::common::NullEquality;
        use datafusion::logical_expr::JoinType;
        if let Some(f) = &j.filter
            && let Some((vt, probe, rest)) = crate::as_of::split_marker(f)?
        {
            return self.lower_temporal_join(j, vt, probe, rest);
        }
        let kind = match j.join_type {
            JoinType::Inner => JoinKind::Inner,
            JoinType::Left => JoinKind::Left,
            JoinType::Right => JoinKind::Right,
            JoinType::Full => JoinKind::Full,
            JoinType::LeftSemi => JoinKind::LeftSemi,
            JoinType::RightSemi => JoinKind::RightSemi,
            JoinType::LeftAnti => JoinKind::LeftAnti,
            JoinType::RightAnti => JoinKind::RightAnti,
            other => {
                return Err(KappaError::not_supported(format!(
                    "a {other} join (EXISTS inside OR) in a materialized view"
                )));
            }
        };
        if j.null_aware {
            return Err(KappaError::not_supported(
                "NOT IN (subquery) in a materialized view; write NOT EXISTS",
            ));
        }
        check_exprs(j.on.iter().flat_map(|(l, r)| [l, r]))?;
        if let Some(f) = &j.filter {
            check_exprs([f])?;
        }
        let left = self.lower(&j.left)?;
        let right = self.lower(&j.right)?;
        let left_width = self.nodes[left].schema.fields().len();
        let pairs = self.nodes[left].schema.join(&self.nodes[right].schema)?;
        let bounds = crate::join::time_bounds(
            &j.on,
            j.filter.as_ref(),
            &pairs,
            left_width,
            [
                &self.nodes[left].watermark_cols,
                &self.nodes[right].watermark_cols,
            ],
        );
        // Output columns that are never NULL-extended keep their bounds.
        let shown = |side: usize| -> Vec<WatermarkCol> {
            let shift = match kind {
                JoinKind::RightSemi | JoinKind::RightAnti => left_width,
                _ => 0,
            };
            bounds
                .output
                .iter()
                .filter(|w| (w.col >= left_width) == (side == 1))
                .map(|w| WatermarkCol {
                    col: w.col - shift,
                    offset: w.offset,
                })
                .collect()
        };
        let watermark_cols = match kind {
            JoinKind::Inner => bounds.output.clone(),
            JoinKind::Left | JoinKind::LeftSemi | JoinKind::LeftAnti => shown(0),
            JoinKind::Right | JoinKind::RightSemi | JoinKind::RightAnti => shown(1),
            JoinKind::Full => vec![],
        };
        let id = self.push(
            NodeKind::Join {
                kind,
                on: j.on.clone(),
                filter: j.filter.clone(),
                null_equals_null: j.null_equality == NullEquality::NullEqualsNull,
                expiry: bounds.expiry,
            },
            vec![left, right],
            j.schema.clone(),
        );
        self.nodes[id].watermark_cols = watermark_cols;
        Ok(id)
    }

    fn lower(&mut self, plan: &LogicalPlan) -> Result<NodeId> {
        match plan {
            LogicalPlan::TableScan(scan) => {
                if scan.fetch.is_some() {
                    return Err(KappaError::not_supported(
                        "LIMIT without ORDER BY in a materialized view (which rows it keeps would be arbitrary)",
                    ));
                }
                if !scan.filters.is_empty() {
                    return Err(KappaError::internal(
                        "filters were pushed into a streaming scan",
                    ));
                }
                self.lower_scan(scan, None)
            }
            LogicalPlan::Projection(p) => {
                check_exprs(&p.expr)?;
                let top_n = match p.input.as_ref() {
                    LogicalPlan::Filter(f) => match crate::top_n::ranked_input(&f.input) {
                        Some(ri) => {
                            let read = p.expr.iter().any(|e| crate::top_n::reads(e, &ri.rank));
                            self.lower_ranked_filter(f, read)?
                        }
                        None => None,
                    },
                    _ => None,
                };
                let input = match top_n {
                    Some(n) => n,
                    None => self.lower(&p.input)?,
                };
                Ok(self.push(
                    NodeKind::Project {
                        exprs: p.expr.clone(),
                    },
                    vec![input],
                    p.schema.clone(),
                ))
            }
            LogicalPlan::Filter(f) => {
                if let Some(node) = self.lower_ranked_filter(f, true)? {
                    return Ok(node);
                }
                let (bounds, rest) = crate::temporal::split_temporal(&f.predicate)?;
                check_exprs(&rest)?;
                let mut node = self.lower(&f.input)?;
                let schema = self.nodes[node].schema.clone();
                if let Some(predicate) = datafusion::logical_expr::utils::conjunction(rest) {
                    node = self.push(NodeKind::Filter { predicate }, vec![node], schema.clone());
                }
                if !bounds.is_empty() {
                    node = self.push(NodeKind::TemporalFilter { bounds }, vec![node], schema);
                }
                Ok(node)
            }
            LogicalPlan::SubqueryAlias(a)
                if matches!(a.input.as_ref(), LogicalPlan::TableScan(s)
                    if WindowTable::decode(s.table_name.table()).is_some()) =>
            {
                let LogicalPlan::TableScan(scan) = a.input.as_ref() else {
                    return Err(KappaError::internal("window scan vanished"));
                };
                if scan.fetch.is_some() || !scan.filters.is_empty() {
                    return Err(KappaError::internal(
                        "a window scan with a limit or filters",
                    ));
                }
                self.lower_scan(scan, Some(&a.schema))
            }
            LogicalPlan::SubqueryAlias(a) => {
                // Same rows, new qualifiers: a projection of plain columns.
                let input = self.lower(&a.input)?;
                let exprs = self.nodes[input]
                    .schema
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                Ok(self.push(NodeKind::Project { exprs }, vec![input], a.schema.clone()))
            }
            LogicalPlan::Aggregate(a) => {
                check_exprs(&a.group_expr)?;
                if a.group_expr
                    .iter()
                    .any(|e| matches!(e, Expr::GroupingSet(_)))
                {
                    return Err(KappaError::not_supported(
                        "GROUPING SETS, CUBE and ROLLUP in a materialized view",
                    ));
                }
                // The first row of each group (DISTINCT ON, first_value/last_value). Not
                // without GROUP BY: a scalar aggregate has a row even over no input.
                if let Some((order_by, args)) = crate::top_n::first_values(&a.aggr_expr)
                    && !a.group_expr.is_empty()
                {
                    check_exprs(&args)?;
                    let input = self.lower(&a.input)?;
                    let schema = self.nodes[input].schema.clone();
                    let top = self.push_top_n(
                        input,
                        a.group_expr.clone(),
                        order_by,
                        RankFunc::RowNumber,
                        (1, 1),
                        false,
                        schema,
                    )?;
                    let exprs = a.group_expr.iter().cloned().chain(args).collect();
                    return Ok(self.push(NodeKind::Project { exprs }, vec![top], a.schema.clone()));
                }
                let input_schema = a.input.schema().clone();
                let mut aggregates = Vec::with_capacity(a.aggr_expr.len());
                for (i, e) in a.aggr_expr.iter().enumerate() {
                    let Expr::AggregateFunction(f) = e.clone().unalias() else {
                        return Err(KappaError::internal(format!("not an aggregate: {e}")));
                    };
                    let name = f.func.name().to_lowercase();
                    let func = match AggFunc::from_name(&name) {
                        Some(func) => func,
                        None if name == "grouping" => {
                            return Err(KappaError::not_supported(format!(
                                "the aggregate function {name} in a materialized view"
                            )));
                        }
                        None => AggFunc::Other,
                    };
                    check_exprs(f.params.order_by.iter().map(|s| &s.expr))?;
                    if func != AggFunc::Other && f.params.distinct && f.params.args.len() != 1 {
                        return Err(KappaError::not_supported(format!(
                            "{name}(DISTINCT …) of several arguments in a materialized view"
                        )));
                    }
                    check_exprs(&f.params.args)?;
                    if let Some(fl) = &f.params.filter {
                        check_exprs([fl.as_ref()])?;
                    }
                    let input_type = match f.params.args.first() {
                        Some(arg) => arg.get_type(&input_schema)?,
                        None => datafusion::arrow::datatypes::DataType::Null,
                    };
                    let output_type = a.schema.field(a.group_expr.len() + i).data_type().clone();
                    aggregates.push(AggCall {
                        func,
                        distinct: f.params.distinct && !matches!(func, AggFunc::Min | AggFunc::Max),
                        args: f.params.args.clone(),
                        filter: f.params.filter.as_deref().cloned(),
                        input_type,
                        output_type,
                        call: e.clone().unalias(),
                    });
                }
                let input = self.lower(&a.input)?;
                let window_close = self.bounded_cols(input, &a.group_expr).first().copied();
                if self.emit_on_window_close && window_close.is_none() {
                    return Err(KappaError::not_supported(
                        "EMIT ON WINDOW CLOSE on an aggregate that is not grouped by window_start or window_end of a source with a WATERMARK",
                    ));
                }
                self.aggregates += 1;
                if let Some((node, exprs)) =
                    self.same_aggregate(input, &a.group_expr, &aggregates, window_close)
                {
                    return Ok(self.push(
                        NodeKind::Project { exprs },
                        vec![node],
                        a.schema.clone(),
                    ));
                }
                Ok(self.push(
                    NodeKind::Aggregate {
                        group_exprs: a.group_expr.clone(),
                        aggregates,
                        window_close,
                        emit_on_window_close: self.emit_on_window_close,
                    },
                    vec![input],
                    a.schema.clone(),
                ))
            }
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::All(input)) => {
                let group_exprs = input
                    .schema()
                    .columns()
                    .into_iter()
                    .map(Expr::Column)
                    .collect();
                let id = self.lower(input)?;
                if self.emit_on_window_close {
                    return Err(KappaError::not_supported(
                        "EMIT ON WINDOW CLOSE with DISTINCT; use GROUP BY window_start, window_end",
                    ));
                }
                Ok(self.push(
                    NodeKind::Aggregate {
                        group_exprs,
                        aggregates: vec![],
                        window_close: None,
                        emit_on_window_close: false,
                    },
                    vec![id],
                    input.schema().clone(),
                ))
            }
            LogicalPlan::Union(u) => {
                let inputs = u
                    .inputs
                    .iter()
                    .map(|i| self.lower(i))
                    .collect::<Result<Vec<_>>>()?;
                Ok(self.push(NodeKind::Union, inputs, u.schema.clone()))
            }
            LogicalPlan::Sort(sort) => match sort.fetch {
                Some(fetch) => self.lower_limit(sort, 0, Some(fetch)),
                // A materialized view is a set; its order is chosen when it is read.
                None => self.lower(&sort.input),
            },
            LogicalPlan::Limit(limit) => {
                use datafusion::logical_expr::{FetchType, SkipType};
                let (SkipType::Literal(skip), FetchType::Literal(fetch)) =
                    (limit.get_skip_type()?, limit.get_fetch_type()?)
                else {
                    return Err(KappaError::not_supported(
                        "LIMIT or OFFSET that is not a constant in a materialized view",
                    ));
                };
                match limit.input.as_ref() {
                    LogicalPlan::Sort(sort) => self.lower_limit(sort, skip, fetch),
                    _ => Err(KappaError::not_supported(
                        "LIMIT without ORDER BY in a materialized view (which rows it keeps would be arbitrary)",
                    )),
                }
            }
            LogicalPlan::Join(j) => self.lower_join(j),
            LogicalPlan::Window(w) => self.lower_over(w),
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::On(_)) => Err(
                KappaError::not_supported("this form of DISTINCT ON in a materialized view"),
            ),
            LogicalPlan::EmptyRelation(_) | LogicalPlan::Values(_) => Err(
                KappaError::not_supported("a materialized view without a table or view in FROM"),
            ),
            other => Err(KappaError::not_supported(format!(
                "{} in a materialized view",
                other.display()
            ))),
        }
    }
}

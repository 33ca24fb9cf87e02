//! Lowering an optimized DataFusion `LogicalPlan` into a `StreamGraph`.
//!
//! Every supported logical node maps to streaming nodes that compute the same relation
//! incrementally; anything else is refused with 0A000 naming the construct, never run
//! approximately.

use std::sync::Arc;

use datafusion::arrow::datatypes::Schema;
use datafusion::common::{DFSchema, TableReference};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Sort};
use kappa_common::{KappaError, RelationId, Result};
use kappa_plan::{
    AggCall, AggFunc, JoinKind, NodeId, NodeKind, StreamGraph, StreamNode, WatermarkCol,
};

use crate::tvf::WindowTable;
use kappa_plan::window::TableWindow;

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
        let full = scan.source.schema();
        let n = full.fields().len().saturating_sub(2);
        let input_schema = Schema::new(full.fields()[..n].to_vec());
        let qualifier = TableReference::bare(src.name.clone());
        let input_df = Arc::new(DFSchema::try_from_qualified_schema(
            qualifier.clone(),
            &input_schema,
        )?);
        let full_df = Arc::new(DFSchema::try_from_qualified_schema(qualifier, &full)?);
        let source = self.push(
            NodeKind::Source {
                relation: src.relation,
                name: src.name,
                projection: None,
            },
            vec![],
            input_df,
        );
        if let Some(col) = src.watermark_col {
            self.nodes[source].watermark_cols = vec![WatermarkCol { col, offset: 1 }];
        }
        self.nodes[source].append_only = src.append_only;
        let kind = match window.window {
            TableWindow::Fixed(spec) => NodeKind::WindowExpand {
                time_col: window.time_col,
                spec,
            },
            TableWindow::Session(spec) => NodeKind::SessionWindow {
                time_col: window.time_col,
                spec,
            },
        };
        let expand = self.push(kind, vec![source], full_df.clone());
        let all: Vec<usize> = (0..full.fields().len()).collect();
        let exprs = scan
            .projection
            .as_ref()
            .unwrap_or(&all)
            .iter()
            .map(|&i| Expr::Column(full_df.columns()[i].clone()))
            .collect();
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

    fn lower_join(&mut self, j: &datafusion::logical_expr::Join) -> Result<NodeId> {
        use datafusion::common::NullEquality;
        use datafusion::logical_expr::JoinType;
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
                    return Err(KappaError::not_supported("LIMIT in a materialized view"));
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
                let input = self.lower(&p.input)?;
                Ok(self.push(
                    NodeKind::Project {
                        exprs: p.expr.clone(),
                    },
                    vec![input],
                    p.schema.clone(),
                ))
            }
            LogicalPlan::Filter(f) => {
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
                let input_schema = a.input.schema().clone();
                let mut aggregates = Vec::with_capacity(a.aggr_expr.len());
                for (i, e) in a.aggr_expr.iter().enumerate() {
                    let Expr::AggregateFunction(f) = e.clone().unalias() else {
                        return Err(KappaError::internal(format!("not an aggregate: {e}")));
                    };
                    let name = f.func.name().to_lowercase();
                    let func = AggFunc::from_name(&name).ok_or_else(|| {
                        KappaError::not_supported(format!(
                            "the aggregate function {name} in a materialized view"
                        ))
                    })?;
                    if f.params.distinct {
                        return Err(KappaError::not_supported(format!(
                            "{name}(DISTINCT …) in a materialized view"
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
                        args: f.params.args.clone(),
                        filter: f.params.filter.as_deref().cloned(),
                        input_type,
                        output_type,
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
            LogicalPlan::Sort(Sort { input, fetch, .. }) => {
                if fetch.is_some() {
                    return Err(KappaError::not_supported(
                        "ORDER BY … LIMIT (top-N) in a materialized view",
                    ));
                }
                // A materialized view is a set; its order is chosen when it is read.
                self.lower(input)
            }
            LogicalPlan::Limit(_) => Err(KappaError::not_supported("LIMIT in a materialized view")),
            LogicalPlan::Join(j) => self.lower_join(j),
            LogicalPlan::Window(_) => Err(KappaError::not_supported(
                "window functions (OVER) in a materialized view",
            )),
            LogicalPlan::Distinct(datafusion::logical_expr::Distinct::On(_)) => Err(
                KappaError::not_supported("DISTINCT ON in a materialized view"),
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

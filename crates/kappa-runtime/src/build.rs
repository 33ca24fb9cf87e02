//! From a `StreamGraph` to running operators.

use std::sync::{Arc, Mutex};

use datafusion::arrow::compute::SortOptions;
use datafusion::arrow::datatypes::{DataType, Schema, SchemaRef};
use datafusion::common::DFSchema;
use datafusion::logical_expr::{Expr, ExprSchemable, SortExpr};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::prelude::SessionContext;
use kappa_common::{KappaError, RelationId, Result};
use kappa_operators::{
    AggSpec, Filter, HashAggregate, HashJoin, JoinSide, Materialize, Operator, Over, OverSpec,
    Project, Recompute, SessionWindow, SideTables, SortKey, SourceScan, TemporalFilter,
    TemporalJoin, TemporalJoinSpec, TopN, TopNSpec, Union, ViewContents, WindowExpand,
};
use kappa_plan::{Distribution, NodeKind, StreamGraph};
use kappa_state::{RowMultiset, StateStore};

use crate::dataflow::Dataflow;
use crate::exchange::Route;

fn arrow_schema(s: &DFSchema) -> SchemaRef {
    Arc::new(Schema::new(s.as_arrow().fields().clone()))
}

fn compile(ctx: &SessionContext, e: &Expr, input: &DFSchema) -> Result<Arc<dyn PhysicalExpr>> {
    Ok(ctx.create_physical_expr(e.clone(), input)?)
}

type Typed = (Arc<dyn PhysicalExpr>, DataType);

/// Expressions compiled, each with its type.
fn compile_typed(ctx: &SessionContext, es: &[Expr], input: &DFSchema) -> Result<Vec<Typed>> {
    es.iter()
        .map(|e| Ok((compile(ctx, e, input)?, e.get_type(input)?)))
        .collect()
}

/// ORDER BY keys compiled: expression, type, direction and null placement.
fn compile_order(
    ctx: &SessionContext,
    order_by: &[SortExpr],
    input: &DFSchema,
) -> Result<Vec<SortKey>> {
    order_by
        .iter()
        .map(|s| {
            let opts = SortOptions {
                descending: !s.asc,
                nulls_first: s.nulls_first,
            };
            Ok((compile(ctx, &s.expr, input)?, s.expr.get_type(input)?, opts))
        })
        .collect()
}

/// One side's equi-join key expressions (`on` pairs a left key with a right one), compiled
/// over that side's schema.
fn join_keys(
    ctx: &SessionContext,
    on: &[(Expr, Expr)],
    side: &DFSchema,
    right: bool,
) -> Result<Vec<Arc<dyn PhysicalExpr>>> {
    on.iter()
        .map(|(l, r)| compile(ctx, if right { r } else { l }, side))
        .collect()
}

/// The equi-join keys' types (both sides have the same ones).
fn join_key_types(on: &[(Expr, Expr)], left: &DFSchema) -> Result<Vec<DataType>> {
    Ok(on
        .iter()
        .map(|(e, _)| e.get_type(left))
        .collect::<datafusion::error::Result<_>>()?)
}

/// DataFusion's accumulator for an aggregate call it knows and the runtime does not: the
/// call's arguments and ORDER BY keys are what each input row contributes.
fn recompute(ctx: &SessionContext, call: &Expr, input: &DFSchema) -> Result<Recompute> {
    let state = ctx.state();
    let lowered = datafusion::physical_expr::aggregate::LoweredAggregateBuilder::new(
        call,
        input,
        input.as_arrow(),
        state.execution_props(),
        &Default::default(),
    )
    .build()?;
    let aggregate = lowered.aggregate;
    let mut inputs = aggregate.expressions();
    inputs.extend(aggregate.order_bys().iter().map(|s| s.expr.clone()));
    let input_types = inputs
        .iter()
        .map(|e| Ok(e.data_type(input.as_arrow())?))
        .collect::<Result<_>>()?;
    Ok(Recompute {
        aggregate,
        inputs,
        input_types,
    })
}

pub(crate) fn build_dataflow(
    ctx: &SessionContext,
    relation: RelationId,
    graph: StreamGraph,
    store: &dyn StateStore,
    parallelism: usize,
) -> Result<Dataflow> {
    let sink = graph
        .sink()
        .ok_or_else(|| KappaError::internal("empty stream graph"))?;
    let contents = Arc::new(Mutex::new(if sink.append_only {
        ViewContents::AppendOnly(Arc::default())
    } else {
        ViewContents::Multiset(RowMultiset::new(
            arrow_schema(&sink.schema),
            store.create_table(&format!("mv{relation}.contents"))?,
        )?)
    }));
    let parallelism = parallelism.max(1);
    let mut ops: Vec<Vec<Box<dyn Operator>>> = Vec::with_capacity(graph.nodes.len());
    let mut routes: Vec<Vec<Route>> = Vec::with_capacity(graph.nodes.len());
    for i in 0..graph.nodes.len() {
        let (width, node_routes) = distribute(ctx, &graph, i, parallelism, &ops)?;
        let shards = (0..width)
            .map(|shard| build_op(ctx, &graph, i, relation, shard, store, &contents))
            .collect::<Result<Vec<_>>>()?;
        ops.push(shards);
        routes.push(node_routes);
    }
    let mut dataflow = Dataflow::new(relation, graph, ops, routes, contents);
    if store.checkpointed() {
        dataflow.checkpointed = Some(crate::dataflow::ViewTables {
            meta: store.create_table(&crate::dataflow::meta_table_name(relation))?,
            appended: store.create_cold_table(&format!("mv{relation}.appended"))?,
            appended_len: 0,
        });
    }
    Ok(dataflow)
}

/// The prefix of the names of every state table of relation `relation` (see
/// [`kappa_state::StateStore`]): views' are `mv{id}.…`, tables' `t{id}.…`.
pub(crate) fn state_prefix(relation: RelationId, is_view: bool) -> String {
    if is_view {
        format!("mv{relation}.")
    } else {
        format!("t{relation}.")
    }
}

/// How many shards node `i` runs in (out of `parallelism`), and the route of each of its
/// inputs (see [`kappa_plan::Distribution`]). `built` holds the earlier nodes' shards.
fn distribute(
    ctx: &SessionContext,
    graph: &StreamGraph,
    i: usize,
    parallelism: usize,
    built: &[Vec<Box<dyn Operator>>],
) -> Result<(usize, Vec<Route>)> {
    let node = &graph.nodes[i];
    if let NodeKind::Source { .. } = node.kind {
        return Ok((parallelism, Vec::new()));
    }
    let dists: Vec<Distribution> = (0..node.inputs.len())
        .map(|port| graph.input_distribution(i, port))
        .collect();
    let width = if dists.contains(&Distribution::Single) {
        1
    } else if dists.iter().any(|d| matches!(d, Distribution::Hash(_))) {
        parallelism
    } else {
        node.inputs
            .iter()
            .map(|&j| built[j].len())
            .max()
            .unwrap_or(1)
    };
    let key_types = match &node.kind {
        NodeKind::Join { on, .. } | NodeKind::TemporalJoin { on, .. } => {
            let left = graph.nodes[node.inputs[0]].schema.as_ref();
            Some(join_key_types(on, left)?)
        }
        _ => None,
    };
    let mut routes = Vec::with_capacity(dists.len());
    for (port, d) in dists.into_iter().enumerate() {
        let input = graph.nodes[node.inputs[port]].schema.as_ref();
        routes.push(match d {
            _ if width == 1 => Route::Single,
            Distribution::Any | Distribution::Single => Route::Forward,
            Distribution::Hash(keys) => Route::Hash {
                types: match &key_types {
                    Some(t) => t.clone(),
                    None => keys
                        .iter()
                        .map(|e| e.get_type(input))
                        .collect::<datafusion::error::Result<_>>()?,
                },
                keys: keys
                    .iter()
                    .map(|e| compile(ctx, e, input))
                    .collect::<Result<_>>()?,
            },
        });
    }
    Ok((width, routes))
}

/// Shard `shard` of node `i`'s operator, over state tables of its own.
fn build_op(
    ctx: &SessionContext,
    graph: &StreamGraph,
    i: usize,
    relation: RelationId,
    shard: usize,
    store: &dyn StateStore,
    contents: &Arc<Mutex<ViewContents>>,
) -> Result<Box<dyn Operator>> {
    let node = &graph.nodes[i];
    let table_name = |name: &str| {
        if shard == 0 {
            format!("mv{relation}.n{i}.{name}")
        } else {
            format!("mv{relation}.n{i}.s{shard}.{name}")
        }
    };
    let schema = arrow_schema(&node.schema);
    let input = || -> Result<&DFSchema> {
        node.inputs
            .first()
            .map(|&j| graph.nodes[j].schema.as_ref())
            .ok_or_else(|| KappaError::internal("node without input"))
    };
    let join_inputs = || -> Result<(&DFSchema, &DFSchema)> {
        match node.inputs.as_slice() {
            [l, r] => Ok((
                graph.nodes[*l].schema.as_ref(),
                graph.nodes[*r].schema.as_ref(),
            )),
            _ => Err(KappaError::internal("a join node needs two inputs")),
        }
    };
    let op: Box<dyn Operator> = match &node.kind {
        NodeKind::Source { projection, .. } => {
            Box::new(SourceScan::new(projection.clone(), schema))
        }
        NodeKind::Project { exprs } => {
            let input = input()?;
            let exprs = exprs
                .iter()
                .map(|e| compile(ctx, e, input))
                .collect::<Result<Vec<_>>>()?;
            Box::new(Project::new(exprs, schema))
        }
        NodeKind::Filter { predicate } => Box::new(Filter::new(compile(ctx, predicate, input()?)?)),
        NodeKind::WindowExpand { time_col, spec } => {
            Box::new(WindowExpand::new(*time_col, *spec, schema))
        }
        NodeKind::TemporalFilter { bounds } => {
            let input = input()?;
            let bounds = bounds
                .iter()
                .map(|b| Ok((compile(ctx, &b.expr, input)?, b.edge, b.offset)))
                .collect::<Result<Vec<_>>>()?;
            let op = TemporalFilter::new(bounds, schema)?;
            Box::new(if store.checkpointed() {
                op.with_checkpoints(store.create_table(&table_name("timed"))?, store.spills())
            } else {
                op
            })
        }
        NodeKind::SessionWindow { time_col, spec } => {
            let input_node = node
                .inputs
                .first()
                .map(|&i| &graph.nodes[i])
                .ok_or_else(|| KappaError::internal("a session window needs an input"))?;
            let time_offset = input_node.watermark_col(*time_col).map(|w| w.offset);
            let op = SessionWindow::new(
                *time_col,
                spec.clone(),
                time_offset,
                &arrow_schema(&input_node.schema),
                schema,
            )?;
            Box::new(if store.checkpointed() {
                op.with_checkpoints(store.create_table(&table_name("sessions"))?, store.spills())
            } else {
                op
            })
        }
        NodeKind::Aggregate {
            group_exprs,
            aggregates,
            window_close,
            emit_on_window_close,
        } => {
            let input = input()?;
            let groups = group_exprs
                .iter()
                .map(|e| compile(ctx, e, input))
                .collect::<Result<Vec<_>>>()?;
            let group_types = group_exprs
                .iter()
                .map(|e| e.get_type(input))
                .collect::<datafusion::error::Result<Vec<_>>>()?;
            let specs = aggregates
                .iter()
                .map(|a| {
                    Ok(AggSpec {
                        func: a.func,
                        distinct: a.distinct,
                        arg: match a.args.first() {
                            Some(e) => Some(compile(ctx, e, input)?),
                            None => None,
                        },
                        filter: match &a.filter {
                            Some(f) => Some(compile(ctx, f, input)?),
                            None => None,
                        },
                        input_type: a.input_type.clone(),
                        output_type: a.output_type.clone(),
                        recompute: match a.func {
                            kappa_plan::AggFunc::Other => Some(recompute(ctx, &a.call, input)?),
                            _ => None,
                        },
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let append_only = graph.nodes[node.inputs[0]].append_only;
            let extremes = if HashAggregate::multisets_read_in_order(
                &specs,
                append_only,
                window_close.is_some(),
            )? {
                store.create_table(&table_name("extremes"))?
            } else {
                store.create_keyed_table(&table_name("extremes"))?
            };
            let agg = HashAggregate::new(
                groups,
                group_types,
                specs,
                schema,
                store.create_keyed_table(&table_name("groups"))?,
                extremes,
            )?;
            let agg = if append_only {
                agg.with_append_only_input()?
            } else {
                agg
            };
            Box::new(match window_close {
                Some(c) => agg.with_window_close(*c, *emit_on_window_close),
                None => agg,
            })
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
            let input = input()?;
            let spec = TopNSpec {
                partition: compile_typed(ctx, partition_by, input)?,
                order: compile_order(ctx, order_by, input)?,
                func: *func,
                lo: *lo,
                hi: *hi,
                emit_rank: *emit_rank,
            };
            let mut op = TopN::new(spec, &arrow_schema(input), schema)?;
            if graph.nodes[node.inputs[0]].append_only {
                op = op.with_append_only_input();
            }
            if let Some(c) = window_close {
                op = op.with_window_close(*c, *emit_on_window_close);
            }
            if store.checkpointed() {
                op = op.with_checkpoints(store.create_table(&table_name("top"))?, store.spills());
            }
            Box::new(op)
        }
        NodeKind::Over {
            partition_by,
            order_by,
            funcs,
        } => {
            let input = input()?;
            let state = ctx.state();
            let funcs = funcs
                .iter()
                .map(|e| {
                    Ok(datafusion::physical_planner::create_window_expr(
                        e,
                        input,
                        state.execution_props(),
                        &Default::default(),
                    )?)
                })
                .collect::<Result<_>>()?;
            let spec = OverSpec {
                partition: compile_typed(ctx, partition_by, input)?,
                order: compile_order(ctx, order_by, input)?,
                funcs,
            };
            let table = store.create_table(&table_name("over"))?;
            Box::new(Over::new(spec, arrow_schema(input), schema, table)?)
        }
        NodeKind::Union => Box::new(Union::new(schema)),
        NodeKind::TemporalJoin {
            left,
            on,
            probe_time,
            version_time,
            probe_bound,
            version_bound,
        } => {
            let (ls, rs) = join_inputs()?;
            let spec = TemporalJoinSpec {
                left: *left,
                probe_keys: join_keys(ctx, on, ls, false)?,
                version_keys: join_keys(ctx, on, rs, true)?,
                key_types: join_key_types(on, ls)?,
                probe_time: compile(ctx, probe_time, ls)?,
                version_time: *version_time,
                probe_bound: *probe_bound,
                version_bound: *version_bound,
            };
            let table = store.create_table(&table_name("temporal"))?;
            let join =
                TemporalJoin::new(spec, &arrow_schema(ls), &arrow_schema(rs), schema, table)?;
            // An append-only probe input's rows are kept as batches in memory, unless the
            // store spills (then in the table).
            Box::new(if graph.nodes[node.inputs[0]].append_only {
                let log = if store.checkpointed() {
                    Some(store.create_cold_table(&table_name("temporal.probes"))?)
                } else {
                    None
                };
                join.with_append_only_probes(log, !store.spills())
            } else {
                join
            })
        }
        NodeKind::Join {
            kind,
            on,
            filter,
            null_equals_null,
            expiry,
        } => {
            let (ls, rs) = join_inputs()?;
            let key_types = join_key_types(on, ls)?;
            let side = |schema: &DFSchema, right: bool| -> Result<JoinSide> {
                Ok(JoinSide {
                    keys: join_keys(ctx, on, schema, right)?,
                    schema: arrow_schema(schema),
                    expiry: expiry[usize::from(right)].clone(),
                    append_only: graph.nodes[node.inputs[usize::from(right)]].append_only,
                })
            };
            let residual = match filter {
                Some(f) => Some(compile(ctx, f, &ls.join(rs)?)?),
                None => None,
            };
            let join = HashJoin::new(
                *kind,
                side(ls, false)?,
                side(rs, true)?,
                key_types,
                residual,
                *null_equals_null,
                schema,
            )?;
            Box::new(if store.checkpointed() {
                // Kept in memory, the sides' tables are only read at a restore that
                // takes up what a spilling run left in them.
                let spill = store.spills();
                let table = |name: String| {
                    if spill {
                        store.create_table(&name)
                    } else {
                        store.create_cold_table(&name)
                    }
                };
                let side = |name: &str| -> Result<SideTables> {
                    Ok(SideTables {
                        rows: table(table_name(name))?,
                        expiring: table(table_name(&format!("{name}.expiring")))?,
                    })
                };
                join.with_checkpoints(
                    store.create_cold_table(&table_name("join"))?,
                    [side("left")?, side("right")?],
                    spill,
                )
            } else {
                join
            })
        }
        NodeKind::Materialize { .. } => Box::new(Materialize::new(contents.clone())),
    };
    Ok(op)
}

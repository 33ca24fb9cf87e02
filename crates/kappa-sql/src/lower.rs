//! Lowering an optimized DataFusion `LogicalPlan` into a `StreamGraph`.
//!
//! Every supported logical node maps to streaming nodes that compute the same relation
//! incrementally; anything else is refused with 0A000 naming the construct, never run
//! approximately.

use std::sync::Arc;

use datafusion::common::{DFSchema, TableReference};
use datafusion::logical_expr::{Expr, ExprSchemable, LogicalPlan, Sort};
use kappa_common::{KappaError, RelationId, Result};
use kappa_plan::{AggCall, AggFunc, NodeId, NodeKind, StreamGraph, StreamNode};

/// Resolves a scanned table to the relation that feeds it.
pub type Resolver<'a> = dyn Fn(&TableReference) -> Result<RelationId> + 'a;

/// Lowers `plan` (the optimized plan of a materialized view's query) into a graph whose sink
/// materializes into `sink`.
pub fn lower_to_stream_graph(
    plan: &LogicalPlan,
    resolve: &Resolver<'_>,
    sink: (RelationId, &str),
) -> Result<StreamGraph> {
    let mut l = Lowering {
        nodes: vec![],
        resolve,
    };
    let top = l.lower(plan)?;
    l.nodes.push(StreamNode {
        kind: NodeKind::Materialize {
            relation: sink.0,
            name: sink.1.to_string(),
        },
        inputs: vec![top],
        schema: plan.schema().clone(),
        append_only: false,
    });
    Ok(StreamGraph { nodes: l.nodes })
}

struct Lowering<'a> {
    nodes: Vec<StreamNode>,
    resolve: &'a Resolver<'a>,
}

fn check_exprs<'e>(exprs: impl IntoIterator<Item = &'e Expr>) -> Result<()> {
    for e in exprs {
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
    fn push(&mut self, kind: NodeKind, inputs: Vec<NodeId>, schema: Arc<DFSchema>) -> NodeId {
        let append_only = match &kind {
            NodeKind::Project { .. } | NodeKind::Filter { .. } | NodeKind::Union => {
                inputs.iter().all(|&i| self.nodes[i].append_only)
            }
            _ => false,
        };
        self.nodes.push(StreamNode {
            kind,
            inputs,
            schema,
            append_only,
        });
        self.nodes.len() - 1
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
                let relation = (self.resolve)(&scan.table_name)?;
                Ok(self.push(
                    NodeKind::Source {
                        relation,
                        name: scan.table_name.table().to_string(),
                        projection: scan.projection.clone(),
                    },
                    vec![],
                    scan.projected_schema.clone(),
                ))
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
                check_exprs([&f.predicate])?;
                let input = self.lower(&f.input)?;
                let schema = self.nodes[input].schema.clone();
                Ok(self.push(
                    NodeKind::Filter {
                        predicate: f.predicate.clone(),
                    },
                    vec![input],
                    schema,
                ))
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
                Ok(self.push(
                    NodeKind::Aggregate {
                        group_exprs: a.group_expr.clone(),
                        aggregates,
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
                Ok(self.push(
                    NodeKind::Aggregate {
                        group_exprs,
                        aggregates: vec![],
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
            LogicalPlan::Join(_) => Err(KappaError::not_supported(
                "JOIN in a materialized view (streaming joins are planned)",
            )),
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

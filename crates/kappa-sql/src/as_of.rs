//! Temporal joins: `probe [LEFT] JOIN versioned FOR SYSTEM_TIME AS OF probe_time ON keys`.
//!
//! The versioned relation is a table or source with a watermark; its event-time column is
//! the version time. A probe row matches the rows of the latest version of its key at its
//! probe time (see `kappa_operators::TemporalJoin` for the exact semantics).
//!
//! DataFusion has no such join, so before planning [`rewrite_temporal_joins`] drops the
//! `FOR SYSTEM_TIME AS OF` clause and adds the conjunct `__kappa_as_of(version_time,
//! probe_time)` ([`AsOf`]) to the join condition. The view lowering turns a join whose
//! condition has it into a temporal join node; a batch query's plan is rewritten by
//! [`to_batch`] into the same relation in plain operators (join on `version_time <=
//! probe_time`, then keep, per probe row, the candidates ranked first by version time).

use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprFunctionExt, JoinType, LogicalPlan, LogicalPlanBuilder,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility, and, lit,
};
use datafusion::sql::sqlparser::ast::{
    self as ast, FunctionArg, FunctionArgExpr, FunctionArgumentList, FunctionArguments, Ident,
    JoinConstraint, JoinOperator, ObjectName, Query, SetExpr, TableFactor, TableVersion,
    TableWithJoins, VisitMut, VisitorMut,
};
use kappa_common::{KappaError, Result, SqlState};

use crate::catalog::{Catalog, RelationKind};
use crate::parse::object_name;

/// The name of the marker function.
pub const AS_OF: &str = "__kappa_as_of";

/// `__kappa_as_of(version_time, probe_time)`: marks a join as temporal. It has no value of
/// its own; reaching its evaluation means a plan escaped both rewrites.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct AsOf {
    signature: Signature,
}

impl Default for AsOf {
    fn default() -> Self {
        Self {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

impl AsOf {
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(Self::default())
    }
}

impl ScalarUDFImpl for AsOf {
    fn name(&self) -> &str {
        AS_OF
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Boolean)
    }

    /// Both times become timestamps in microseconds (Kappa's TIMESTAMP).
    fn coerce_types(&self, args: &[DataType]) -> datafusion::error::Result<Vec<DataType>> {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
        match args {
            [a, b]
                if args.iter().all(|t| {
                    matches!(
                        t,
                        DataType::Timestamp(..)
                            | DataType::Date32
                            | DataType::Date64
                            | DataType::Null
                    )
                }) =>
            {
                let _ = (a, b);
                Ok(vec![ts.clone(), ts])
            }
            [_, probe] => datafusion::common::plan_err!(
                "FOR SYSTEM_TIME AS OF needs a timestamp, not {probe}"
            ),
            _ => datafusion::common::plan_err!("{AS_OF} takes two arguments"),
        }
    }

    fn invoke_with_args(
        &self,
        _args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        Err(datafusion::error::DataFusionError::External(Box::new(
            KappaError::not_supported(
                "FOR SYSTEM_TIME AS OF here (it is supported in queries and materialized views, \
                 not inside a non-materialized view)",
            ),
        )))
    }
}

fn is_marker(e: &Expr) -> Option<(&Expr, &Expr)> {
    match e {
        Expr::ScalarFunction(f) if f.func.inner().is::<AsOf>() => match f.args.as_slice() {
            [vt, probe] => Some((vt, probe)),
            _ => None,
        },
        _ => None,
    }
}

/// A temporal join's condition, split: the version time and probe time (the marker's
/// arguments) and the other conjuncts. `None` if the condition has no marker.
pub(crate) fn split_marker(filter: &Expr) -> Result<Option<(Expr, Expr, Vec<Expr>)>> {
    let mut found = None;
    let mut rest = Vec::new();
    for conj in split_conjunction(filter) {
        match is_marker(conj) {
            Some(_) if found.is_some() => {
                return Err(KappaError::not_supported(
                    "two FOR SYSTEM_TIME AS OF clauses in one join",
                ));
            }
            Some((vt, probe)) => found = Some((vt.clone(), probe.clone())),
            None => rest.push(conj.clone()),
        }
    }
    Ok(found.map(|(vt, probe)| (vt, probe, rest)))
}

/// Whether `e` uses the marker anywhere.
pub(crate) fn mentions_marker(e: &Expr) -> bool {
    e.exists(|x| Ok(is_marker(x).is_some())).unwrap_or(false)
}

static RANKS: AtomicUsize = AtomicUsize::new(0);

/// Rewrites every temporal join in a batch query's plan into plain operators computing the
/// same relation: the join with `version_time <= probe_time` in place of the marker, the
/// candidates of each probe row ranked by version time, descending, and those ranked first
/// kept (all of them on a tie; a probe row without candidates keeps its NULL-extended row).
/// A probe row is identified by all its columns: identical probe rows have identical
/// candidates, so their copies stay together and each keeps the same matches.
pub fn to_batch(plan: LogicalPlan) -> Result<LogicalPlan> {
    let out = plan.transform_up_with_subqueries(|node| {
        let LogicalPlan::Join(j) = &node else {
            return Ok(Transformed::no(node));
        };
        let split = j.filter.as_ref().map(split_marker).transpose();
        let split = split.map_err(|e| datafusion::error::DataFusionError::External(Box::new(e)))?;
        let Some((vt, probe, rest)) = split.flatten() else {
            return Ok(Transformed::no(node));
        };
        if !matches!(j.join_type, JoinType::Inner | JoinType::Left) {
            return Err(datafusion::error::DataFusionError::External(Box::new(
                not_inner_or_left(),
            )));
        }
        let cond = rest.into_iter().fold(vt.clone().lt_eq(probe), and);
        let mut join = j.clone();
        join.filter = Some(cond);
        let probe_cols: Vec<Expr> = j
            .left
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        let out_cols: Vec<Expr> = j.schema.columns().into_iter().map(Expr::Column).collect();
        let name = format!(
            "__kappa_as_of_rank{}",
            RANKS.fetch_add(1, Ordering::Relaxed)
        );
        let rank = datafusion::functions_window::expr_fn::rank()
            .partition_by(probe_cols)
            .order_by(vec![vt.sort(false, true)])
            .build()?
            .alias(&name);
        let plan = LogicalPlanBuilder::from(LogicalPlan::Join(join))
            .window(vec![rank])?
            .filter(Expr::Column(name.as_str().into()).eq(lit(1u64)))?
            .project(out_cols)?
            .build()?;
        Ok(Transformed::yes(plan))
    })?;
    Ok(out.data)
}

fn not_inner_or_left() -> KappaError {
    KappaError::not_supported(
        "FOR SYSTEM_TIME AS OF with a join other than [INNER] JOIN or LEFT [OUTER] JOIN … ON",
    )
}

/// Replaces `FOR SYSTEM_TIME AS OF` in every join of `node` by the marker conjunct (see the
/// module documentation).
pub fn rewrite_temporal_joins<T: VisitMut>(node: &mut T, catalog: &Catalog) -> Result<()> {
    crate::tvf::visit_fallibly(node, &mut Rewriter { catalog })
}

struct Rewriter<'a> {
    catalog: &'a Catalog,
}

impl VisitorMut for Rewriter<'_> {
    type Break = KappaError;

    fn pre_visit_query(&mut self, q: &mut Query) -> ControlFlow<KappaError> {
        match self.rewrite_set(&mut q.body) {
            Ok(()) => ControlFlow::Continue(()),
            Err(e) => ControlFlow::Break(e),
        }
    }

    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<KappaError> {
        // Every clause in a join was rewritten before the visit reached its table.
        if let TableFactor::Table {
            version: Some(_), ..
        } = tf
        {
            return ControlFlow::Break(KappaError::not_supported(
                "FOR SYSTEM_TIME AS OF outside a join: it names the versioned side of \
                 `facts [LEFT] JOIN versioned FOR SYSTEM_TIME AS OF facts.time ON …`",
            ));
        }
        ControlFlow::Continue(())
    }
}

impl Rewriter<'_> {
    fn rewrite_set(&self, body: &mut SetExpr) -> Result<()> {
        match body {
            SetExpr::Select(s) => {
                for twj in &mut s.from {
                    self.rewrite_joins(twj)?;
                }
            }
            SetExpr::SetOperation { left, right, .. } => {
                self.rewrite_set(left)?;
                self.rewrite_set(right)?;
            }
            _ => {}
        }
        Ok(())
    }

    fn rewrite_joins(&self, twj: &mut TableWithJoins) -> Result<()> {
        if let TableFactor::NestedJoin {
            table_with_joins, ..
        } = &mut twj.relation
        {
            self.rewrite_joins(table_with_joins)?;
        }
        for j in &mut twj.joins {
            if let TableFactor::NestedJoin {
                table_with_joins, ..
            } = &mut j.relation
            {
                self.rewrite_joins(table_with_joins)?;
            }
            let TableFactor::Table {
                name,
                alias,
                version,
                ..
            } = &mut j.relation
            else {
                continue;
            };
            let Some(TableVersion::ForSystemTimeAsOf(probe_time)) = version.take() else {
                if version.is_some() {
                    return Err(KappaError::not_supported("this table version clause"));
                }
                continue;
            };
            let vt = self.version_column(name, alias.as_ref().map(|a| &a.name))?;
            let marker = ast::Expr::Function(ast::Function {
                name: ObjectName::from(vec![Ident::new(AS_OF)]),
                uses_odbc_syntax: false,
                parameters: FunctionArguments::None,
                args: FunctionArguments::List(FunctionArgumentList {
                    duplicate_treatment: None,
                    args: vec![
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(vt)),
                        FunctionArg::Unnamed(FunctionArgExpr::Expr(probe_time)),
                    ],
                    clauses: vec![],
                }),
                filter: None,
                null_treatment: None,
                over: None,
                within_group: vec![],
            });
            let constraint = match &mut j.join_operator {
                JoinOperator::Join(c)
                | JoinOperator::Inner(c)
                | JoinOperator::Left(c)
                | JoinOperator::LeftOuter(c) => c,
                _ => return Err(not_inner_or_left()),
            };
            let JoinConstraint::On(cond) = constraint else {
                return Err(KappaError::not_supported(
                    "FOR SYSTEM_TIME AS OF with USING or NATURAL: write the keys in ON",
                ));
            };
            *cond = ast::Expr::BinaryOp {
                left: Box::new(ast::Expr::Nested(Box::new(cond.clone()))),
                op: ast::BinaryOperator::And,
                right: Box::new(marker),
            };
        }
        Ok(())
    }

    /// The versioned relation's event-time column, qualified as the query names it.
    fn version_column(&self, name: &ObjectName, alias: Option<&Ident>) -> Result<ast::Expr> {
        let rel = self.catalog.require(&object_name(name)?)?;
        if !matches!(
            rel.kind,
            RelationKind::Table { .. } | RelationKind::Source { .. }
        ) {
            return Err(KappaError::not_supported(format!(
                "FOR SYSTEM_TIME AS OF on the {} \"{}\": the versioned side must be a table or source",
                rel.kind.describe(),
                rel.name
            )));
        }
        let Some(w) = &rel.watermark else {
            return Err(KappaError::user(
                SqlState::INVALID_TABLE_DEFINITION,
                format!(
                    "\"{}\" has no version time: declare its event-time column with \
                     WATERMARK FOR column AS … to join it FOR SYSTEM_TIME AS OF",
                    rel.name
                ),
            ));
        };
        let column = Ident::with_quote('"', rel.schema.field(w.column).name());
        let mut parts = match alias {
            Some(a) => vec![a.clone()],
            None => name
                .0
                .iter()
                .filter_map(|p| p.as_ident().cloned())
                .collect(),
        };
        parts.push(column);
        Ok(ast::Expr::CompoundIdentifier(parts))
    }
}

//! Recognising top-N in a view's optimized plan.
//!
//! SQL spells top-N several ways, and DataFusion's optimizer hands each over in its own shape:
//! - `… ROW_NUMBER() | RANK() | DENSE_RANK() OVER (PARTITION BY … ORDER BY …) AS rn …
//!   WHERE rn <= N`: a `Filter` (bounding the rank) over a `Window` with that one function;
//! - `SELECT DISTINCT ON (k) … ORDER BY k, …` and `first_value(x ORDER BY …)` per group: an
//!   `Aggregate` whose aggregates are all `first_value`/`last_value` with one ordering
//!   (the first row of each group, so every column comes from the same row);
//! - `ORDER BY … LIMIT n [OFFSET m]`: a `Sort` with a fetch, maybe under a `Limit`.
//!
//! Each becomes one `TopN` node; anything else with `OVER` or `LIMIT` stays refused.

use datafusion::arrow::datatypes::DataType;
use datafusion::common::{Column, ScalarValue};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    BinaryExpr, Expr, LogicalPlan, Operator, Projection, SortExpr, Window,
};
use kappa_plan::RankFunc;

/// The one ranking function of a `Window` node.
pub(crate) struct Ranking {
    pub func: RankFunc,
    pub partition_by: Vec<Expr>,
    pub order_by: Vec<SortExpr>,
    /// The rank's output column.
    pub rank: Column,
}

pub(crate) fn ranking(w: &Window) -> Option<Ranking> {
    let [e] = w.window_expr.as_slice() else {
        return None;
    };
    let Expr::WindowFunction(f) = e.clone().unalias() else {
        return None;
    };
    let func = RankFunc::from_name(f.fun.name())?;
    let p = &f.params;
    if !p.args.is_empty() || p.filter.is_some() || p.distinct {
        return None;
    }
    let rank = w
        .schema
        .columns()
        .get(w.input.schema().fields().len())?
        .clone();
    Some(Ranking {
        func,
        partition_by: p.partition_by.clone(),
        order_by: p.order_by.clone(),
        rank,
    })
}

/// The input of a filter that may bound a rank: a `Window` with one ranking function,
/// maybe under a `Projection` of plain columns (which keeps or drops the rank column).
pub(crate) struct RankedInput<'a> {
    pub window: &'a Window,
    pub ranking: Ranking,
    /// The projection and the position of the rank column in it (`None`: dropped).
    pub projection: Option<(&'a Projection, Option<usize>)>,
    /// The rank column as the filter above sees it.
    pub rank: Column,
}

pub(crate) fn ranked_input(plan: &LogicalPlan) -> Option<RankedInput<'_>> {
    match plan {
        LogicalPlan::Window(window) => {
            let ranking = ranking(window)?;
            let rank = ranking.rank.clone();
            Some(RankedInput {
                window,
                ranking,
                projection: None,
                rank,
            })
        }
        LogicalPlan::Projection(p) => {
            let LogicalPlan::Window(window) = p.input.as_ref() else {
                return None;
            };
            let ranking = ranking(window)?;
            if !p.expr.iter().all(|e| matches!(e, Expr::Column(_))) {
                return None;
            }
            let pos = p
                .expr
                .iter()
                .position(|e| matches!(e, Expr::Column(c) if c.name == ranking.rank.name));
            let rank = match pos {
                Some(i) => p.schema.columns()[i].clone(),
                None => ranking.rank.clone(),
            };
            Some(RankedInput {
                window,
                ranking,
                projection: Some((p, pos)),
                rank,
            })
        }
        _ => None,
    }
}

/// Whether `e` reads the column `c`.
pub(crate) fn reads(e: &Expr, c: &Column) -> bool {
    e.column_refs().iter().any(|r| r.name == c.name)
}

/// The conjuncts of a filter over a ranked relation: the range of ranks they keep (`hi` is
/// `None` without an upper bound: not a top-N) and the other conjuncts.
pub(crate) struct RankBounds {
    pub lo: u64,
    pub hi: Option<u64>,
    pub rest: Vec<Expr>,
}

fn integer(e: &Expr) -> Option<i128> {
    match e {
        Expr::Literal(v, _) => match v.cast_to(&DataType::Int64).ok()? {
            ScalarValue::Int64(Some(n)) => Some(n.into()),
            _ => None,
        },
        _ => None,
    }
}

fn is_col(e: &Expr, c: &Column) -> bool {
    match e {
        Expr::Column(x) => x.name == c.name,
        Expr::Cast(x) => is_col(&x.expr, c),
        Expr::TryCast(x) => is_col(&x.expr, c),
        _ => false,
    }
}

pub(crate) fn rank_bounds(predicate: &Expr, rank: &Column) -> RankBounds {
    let (mut lo, mut hi): (i128, Option<i128>) = (1, None);
    let mut rest = vec![];
    let mut upper = |v: i128| hi = Some(hi.map_or(v, |h| h.min(v)));
    for c in split_conjunction(predicate) {
        let bound = match c {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                let (op, v) = if is_col(left, rank) {
                    (Some(*op), integer(right))
                } else if is_col(right, rank) {
                    (op.swap(), integer(left))
                } else {
                    (None, None)
                };
                match (op, v) {
                    (Some(Operator::LtEq), Some(v)) => Some((None, Some(v))),
                    (Some(Operator::Lt), Some(v)) => Some((None, Some(v - 1))),
                    (Some(Operator::Eq), Some(v)) => Some((Some(v), Some(v))),
                    (Some(Operator::GtEq), Some(v)) => Some((Some(v), None)),
                    (Some(Operator::Gt), Some(v)) => Some((Some(v + 1), None)),
                    _ => None,
                }
            }
            Expr::Between(b) if !b.negated && is_col(&b.expr, rank) => {
                match (integer(&b.low), integer(&b.high)) {
                    (Some(l), Some(h)) => Some((Some(l), Some(h))),
                    _ => None,
                }
            }
            _ => None,
        };
        match bound {
            Some((l, h)) => {
                if let Some(l) = l {
                    lo = lo.max(l);
                }
                if let Some(h) = h {
                    upper(h);
                }
            }
            None => rest.push(c.clone()),
        }
    }
    // Ranks start at 1: an upper bound below it keeps nothing.
    let clamp = |v: i128| v.clamp(0, u64::MAX.into()) as u64;
    RankBounds {
        lo: clamp(lo.max(1)),
        hi: hi.map(clamp),
        rest,
    }
}

/// `first_value(x ORDER BY o)` / `last_value(x ORDER BY o)` aggregates with one ordering
/// (`last_value` is `first_value` in the reverse order): the ordering, as `first_value`'s,
/// and each aggregate's argument. `None` when the aggregates are anything else.
pub(crate) fn first_values(aggr_expr: &[Expr]) -> Option<(Vec<SortExpr>, Vec<Expr>)> {
    let mut order: Option<Vec<SortExpr>> = None;
    let mut args = Vec::with_capacity(aggr_expr.len());
    for e in aggr_expr {
        let Expr::AggregateFunction(f) = e.clone().unalias() else {
            return None;
        };
        let p = &f.params;
        let [arg] = p.args.as_slice() else {
            return None;
        };
        if p.distinct || p.filter.is_some() || p.null_treatment.is_some() {
            return None;
        }
        let this: Vec<SortExpr> = match f.func.name() {
            "first_value" => p.order_by.clone(),
            "last_value" => p.order_by.iter().map(SortExpr::reverse).collect(),
            _ => return None,
        };
        match &order {
            Some(o) if *o != this => return None,
            Some(_) => {}
            None => order = Some(this),
        }
        args.push(arg.clone());
    }
    Some((order?, args))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::logical_expr::{col, lit};

    fn bounds(e: Expr) -> (u64, Option<u64>, usize) {
        let b = rank_bounds(&e, &Column::from_name("rn"));
        (b.lo, b.hi, b.rest.len())
    }

    #[test]
    fn rank_conditions_become_a_range() {
        assert_eq!(bounds(col("rn").lt_eq(lit(3u64))), (1, Some(3), 0));
        assert_eq!(bounds(col("rn").lt(lit(3i64))), (1, Some(2), 0));
        assert_eq!(bounds(lit(1).eq(col("rn"))), (1, Some(1), 0));
        assert_eq!(
            bounds(
                col("rn")
                    .gt(lit(2))
                    .and(col("rn").lt_eq(lit(5)))
                    .and(col("b").gt(lit(0)))
            ),
            (3, Some(5), 1)
        );
        assert_eq!(bounds(col("rn").between(lit(2), lit(4))), (2, Some(4), 0));
        assert_eq!(bounds(col("rn").gt_eq(lit(2))), (2, None, 0));
        assert_eq!(bounds(col("rn").lt(lit(1))), (1, Some(0), 0));
        // Not a bound on the rank: kept as a filter.
        assert_eq!(bounds(col("rn").lt_eq(col("b"))), (1, None, 1));
    }
}

//! Temporal filters: `WHERE ts > now() - INTERVAL '1' HOUR` in a materialized view.
//!
//! In a view, `now()` is the processing time of the epoch being computed, not the time the
//! view was created: the view planner replaces DataFusion's `now()` (which it would fold into
//! a constant) by [`StreamNow`], which it never folds, and the lowering turns each conjunct
//! `e OP now() [± interval]` of a `WHERE` into a [`TemporalBound`]: from when, or until
//! when, a row is visible. Every other use of `now()` in a view is refused.

use datafusion::arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::TreeNode;
use datafusion::logical_expr::{
    BinaryExpr, ColumnarValue, Expr, Operator, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl,
    Signature, Volatility, utils::split_conjunction,
};
use kappa_common::{KappaError, Result};
use kappa_plan::{TemporalBound, TemporalEdge};

/// `now()` as a view sees it: the processing time, evaluated per epoch by the temporal
/// filter operator. Volatile, so DataFusion leaves it in the plan.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct StreamNow {
    signature: Signature,
    aliases: Vec<String>,
}

impl Default for StreamNow {
    fn default() -> Self {
        Self {
            signature: Signature::nullary(Volatility::Volatile),
            aliases: vec!["current_timestamp".into()],
        }
    }
}

impl StreamNow {
    pub fn udf() -> ScalarUDF {
        ScalarUDF::new_from_impl(Self::default())
    }
}

impl ScalarUDFImpl for StreamNow {
    fn name(&self) -> &str {
        "now"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn aliases(&self) -> &[String] {
        &self.aliases
    }

    fn return_type(&self, _args: &[DataType]) -> datafusion::error::Result<DataType> {
        Ok(DataType::Timestamp(TimeUnit::Nanosecond, None))
    }

    fn invoke_with_args(
        &self,
        _args: ScalarFunctionArgs,
    ) -> datafusion::error::Result<ColumnarValue> {
        // Only reached if a plan holding it is executed as a batch query (the streaming
        // operators evaluate the bound themselves): the current time, as DataFusion would.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64);
        Ok(ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(
            Some(now),
            None,
        )))
    }
}

/// The error for `now()` used in a view other than in a temporal filter.
pub(crate) fn now_outside_filter(e: &Expr) -> KappaError {
    KappaError::not_supported(format!(
        "now() in a materialized view outside a temporal filter (a WHERE conjunct \
         `time_expression {{< | <= | > | >= | =}} now() [± interval]`), here in {e},"
    ))
}

/// Whether `e` calls the view planner's `now()`.
pub(crate) fn calls_now(e: &Expr) -> bool {
    e.exists(|x| {
        Ok(matches!(x, Expr::ScalarFunction(f)
            if f.func.inner().is::<StreamNow>()))
    })
    .unwrap_or(false)
}

fn strip_casts(e: &Expr) -> &Expr {
    match e {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        Expr::Alias(a) => strip_casts(&a.expr),
        e => e,
    }
}

/// `now()`, `now() + c` or `now() - c` (c a constant interval of fixed length): `Some(c)`
/// in microseconds.
fn now_plus(e: &Expr) -> Result<Option<i64>> {
    match strip_casts(e) {
        Expr::ScalarFunction(f) if f.func.inner().is::<StreamNow>() => Ok(Some(0)),
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus) =>
        {
            let Some(base) = now_plus(left)? else {
                return Ok(None);
            };
            let c = match strip_casts(right) {
                Expr::Literal(ScalarValue::IntervalMonthDayNano(Some(iv)), _) => {
                    crate::tvf::fixed_micros(*iv).map_err(|why| {
                        KappaError::not_supported(format!(
                            "the interval in the temporal filter {e} {why}"
                        ))
                    })?
                }
                Expr::Literal(ScalarValue::IntervalDayTime(Some(iv)), _) => {
                    iv.days as i64 * 86_400_000_000 + iv.milliseconds as i64 * 1000
                }
                _ => return Ok(None),
            };
            let c = if *op == Operator::Minus { -c } else { c };
            Ok(base.checked_add(c))
        }
        _ => Ok(None),
    }
}

/// Splits a filter predicate into its temporal bounds and the rest (the other conjuncts,
/// which do not call `now()`). A conjunct that calls `now()` in any other way is refused.
pub(crate) fn split_temporal(predicate: &Expr) -> Result<(Vec<TemporalBound>, Vec<Expr>)> {
    let mut bounds = vec![];
    let mut rest = vec![];
    for c in split_conjunction(predicate) {
        if !calls_now(c) {
            rest.push(c.clone());
            continue;
        }
        let refuse = || now_outside_filter(c);
        let Expr::BinaryExpr(BinaryExpr { left, op, right }) = c else {
            return Err(refuse());
        };
        // Normalise to `e OP now() + k`.
        let (e, op, k) = match (now_plus(left)?, now_plus(right)?) {
            (None, Some(k)) if !calls_now(left) => (left.as_ref(), *op, k),
            (Some(k), None) if !calls_now(right) => {
                let flipped = op.swap().ok_or_else(refuse)?;
                (right.as_ref(), flipped, k)
            }
            _ => return Err(refuse()),
        };
        // e OP now + k  ⇔  (e - k) OP now.
        let mut push = |edge, extra: i64| {
            bounds.push(TemporalBound {
                expr: e.clone(),
                edge,
                offset: extra.saturating_sub(k),
            })
        };
        match op {
            Operator::Gt => push(TemporalEdge::Until, 0),
            Operator::GtEq => push(TemporalEdge::Until, 1),
            Operator::Lt => push(TemporalEdge::From, 1),
            Operator::LtEq => push(TemporalEdge::From, 0),
            Operator::Eq => {
                push(TemporalEdge::From, 0);
                push(TemporalEdge::Until, 1);
            }
            _ => return Err(refuse()),
        }
    }
    Ok((bounds, rest))
}

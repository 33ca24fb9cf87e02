//! What a join condition says about event time.
//!
//! From the conjuncts of a join condition of the form `x op y + c` — `x` a column of one
//! input, `y` a column of the other, `c` a constant interval, `op` one of `= < <= > >=`
//! (and `BETWEEN`) — we collect *time relations* `a >= b + c` between a column `a` of side
//! `s` and a column `b` of the other side. If `b` is bounded by the watermark (every future
//! row of the other side has `b + off_b > W`), then:
//!
//! - **expiry**: a stored row of side `s` can match a future row only if
//!   `b <= a - c`, which is impossible once `a + (off_b - c) <= W`. That is a
//!   [`WatermarkCol`] `{a, off_b - c}` on side `s`: the join frees the row.
//! - **output bound**: an output row produced by a future row of the other side has
//!   `a >= b + c > W - off_b + c`; one produced by a future row of side `s` has
//!   `a + off_a > W` if `a` is bounded there. So when both hold, the output column `a` is
//!   bounded with offset `max(off_a, off_b - c)`.
//!
//! Strict comparisons are treated as non-strict: the bounds are then merely one microsecond
//! more conservative.

use datafusion::arrow::datatypes::{DataType, IntervalMonthDayNano, TimeUnit};
use datafusion::common::DFSchema;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};
use datafusion::scalar::ScalarValue;
use kappa_plan::WatermarkCol;

/// `a` (a column of side `side`) `>= b` (a column of the other side) `+ c` µs.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Relation {
    side: usize,
    a: usize,
    b: usize,
    c: i64,
}

/// The join's time bounds; column indices are per input, except in `output`.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct TimeBounds {
    pub expiry: [Vec<WatermarkCol>; 2],
    /// Output columns (left's then right's) bounded by the watermark.
    pub output: Vec<WatermarkCol>,
}

/// `schema` is the join's output (the left's `left_width` columns, then the right's);
/// `bounded[s]` the watermark-bounded columns of input `s`.
pub(crate) fn time_bounds(
    on: &[(Expr, Expr)],
    filter: Option<&Expr>,
    schema: &DFSchema,
    left_width: usize,
    bounded: [&[WatermarkCol]; 2],
) -> TimeBounds {
    let mut rels = Vec::new();
    let term = |e: &Expr| term(e, schema, left_width);
    for (l, r) in on {
        relate(term(l), Operator::Eq, term(r), &mut rels);
    }
    for conj in filter.map(split_conjunction).unwrap_or_default() {
        match conj {
            Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
                relate(term(left), *op, term(right), &mut rels)
            }
            Expr::Between(b) if !b.negated => {
                relate(term(&b.expr), Operator::GtEq, term(&b.low), &mut rels);
                relate(term(&b.expr), Operator::LtEq, term(&b.high), &mut rels);
            }
            _ => {}
        }
    }
    let is_micros = |side: usize, col: usize| {
        let idx = col + if side == 0 { 0 } else { left_width };
        matches!(
            schema.fields().get(idx).map(|f| f.data_type()),
            Some(DataType::Timestamp(TimeUnit::Microsecond, None))
        )
    };
    let find = |side: usize, col: usize| bounded[side].iter().find(|w| w.col == col);
    let mut out = TimeBounds::default();
    for r in &rels {
        let Some(ob) = find(1 - r.side, r.b) else {
            continue;
        };
        if !is_micros(r.side, r.a) {
            continue;
        }
        let w = WatermarkCol {
            col: r.a,
            offset: ob.offset.saturating_sub(r.c),
        };
        if !out.expiry[r.side].contains(&w) {
            out.expiry[r.side].push(w);
        }
    }
    for (side, own) in bounded.iter().enumerate() {
        for wa in own.iter() {
            // The tightest cross bound on this column (any one of them holds).
            let Some(cross) = out.expiry[side]
                .iter()
                .filter(|e| e.col == wa.col)
                .map(|e| e.offset)
                .min()
            else {
                continue;
            };
            out.output.push(WatermarkCol {
                col: wa.col + if side == 0 { 0 } else { left_width },
                offset: wa.offset.max(cross),
            });
        }
    }
    out.output.sort_by_key(|w| w.col);
    out
}

/// `(side, column, c)` for an expression `column + c`.
fn term(e: &Expr, schema: &DFSchema, left_width: usize) -> Option<(usize, usize, i64)> {
    match e {
        Expr::Column(c) => {
            let idx = schema.index_of_column(c).ok()?;
            Some(if idx < left_width {
                (0, idx, 0)
            } else {
                (1, idx - left_width, 0)
            })
        }
        Expr::Alias(a) => term(&a.expr, schema, left_width),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let k = match op {
                Operator::Plus => 1,
                Operator::Minus => -1,
                _ => return None,
            };
            match (constant_micros(right), constant_micros(left)) {
                (Some(c), _) => {
                    let (s, col, c0) = term(left, schema, left_width)?;
                    Some((s, col, c0.checked_add(c.checked_mul(k)?)?))
                }
                (None, Some(c)) if k == 1 => {
                    let (s, col, c0) = term(right, schema, left_width)?;
                    Some((s, col, c0.checked_add(c)?))
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// A constant interval of fixed length, in microseconds.
fn constant_micros(e: &Expr) -> Option<i64> {
    let Expr::Literal(v, _) = e else {
        return None;
    };
    match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) => crate::tvf::fixed_micros(*i).ok(),
        ScalarValue::IntervalDayTime(Some(i)) => crate::tvf::fixed_micros(IntervalMonthDayNano {
            months: 0,
            days: i.days,
            nanoseconds: i.milliseconds as i64 * 1_000_000,
        })
        .ok(),
        ScalarValue::DurationMicrosecond(Some(us)) => Some(*us),
        ScalarValue::DurationMillisecond(Some(ms)) => ms.checked_mul(1000),
        ScalarValue::DurationSecond(Some(s)) => s.checked_mul(1_000_000),
        _ => None,
    }
}

/// Records what `x op y` says, for terms on different sides.
fn relate(
    x: Option<(usize, usize, i64)>,
    op: Operator,
    y: Option<(usize, usize, i64)>,
    rels: &mut Vec<Relation>,
) {
    let (Some((sx, a, ca)), Some((sy, b, cb))) = (x, y) else {
        return;
    };
    if sx == sy {
        return;
    }
    // a + ca op b + cb
    let ge = |rels: &mut Vec<Relation>| {
        if let Some(c) = cb.checked_sub(ca) {
            rels.push(Relation { side: sx, a, b, c });
        }
    };
    let le = |rels: &mut Vec<Relation>| {
        if let Some(c) = ca.checked_sub(cb) {
            rels.push(Relation {
                side: sy,
                a: b,
                b: a,
                c,
            });
        }
    };
    match op {
        Operator::Eq => {
            ge(rels);
            le(rels);
        }
        Operator::Gt | Operator::GtEq => ge(rels),
        Operator::Lt | Operator::LtEq => le(rels),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::logical_expr::{col, lit};
    use datafusion::prelude::Expr;

    const SEC: i64 = 1_000_000;

    fn schema() -> DFSchema {
        let ts = DataType::Timestamp(TimeUnit::Microsecond, None);
        let side = |q: &str| {
            DFSchema::try_from_qualified_schema(
                q,
                &Schema::new(vec![
                    Field::new("k", DataType::Int64, true),
                    Field::new("t", ts.clone(), true),
                ]),
            )
            .unwrap()
        };
        side("l").join(&side("r")).unwrap()
    }

    fn secs(n: i64) -> Expr {
        lit(ScalarValue::new_interval_mdn(0, 0, n * 1_000_000_000))
    }

    #[test]
    fn interval_join_expires_both_sides_and_bounds_the_output() {
        // r.t BETWEEN l.t AND l.t + 10 s, both t columns bounded with offset 1 µs.
        let filter = col("r.t").between(col("l.t"), col("l.t") + secs(10));
        let ts = [WatermarkCol { col: 1, offset: 1 }];
        let b = time_bounds(&[], Some(&filter), &schema(), 2, [&ts, &ts]);
        assert_eq!(
            b.expiry,
            [
                vec![WatermarkCol {
                    col: 1,
                    offset: 10 * SEC + 1
                }],
                vec![WatermarkCol { col: 1, offset: 1 }],
            ]
        );
        assert_eq!(
            b.output,
            vec![
                WatermarkCol {
                    col: 1,
                    offset: 10 * SEC + 1
                },
                WatermarkCol { col: 3, offset: 1 },
            ]
        );
    }

    #[test]
    fn window_join_on_window_end_and_unrelated_conditions() {
        // l.t = r.t (both window ends, offset 0) AND l.k >= r.k: only the time relation counts.
        let on = vec![(col("l.t"), col("r.t"))];
        let filter = col("l.k").gt_eq(col("r.k"));
        let we = [WatermarkCol { col: 1, offset: 0 }];
        let b = time_bounds(&on, Some(&filter), &schema(), 2, [&we, &we]);
        let w = |col| WatermarkCol { col, offset: 0 };
        assert_eq!(b.expiry, [vec![w(1)], vec![w(1)]]);
        assert_eq!(b.output, vec![w(1), w(3)]);
        // Without a watermark on the other side nothing expires.
        let none = time_bounds(&on, None, &schema(), 2, [&we, &[]]);
        assert_eq!(none.expiry, [vec![], vec![w(1)]]);
        assert!(none.output.is_empty());
    }
}

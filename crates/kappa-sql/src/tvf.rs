//! Window table functions in FROM: `TUMBLE(t, ts, size [, offset])`,
//! `HOP(t, ts, slide, size [, offset])`, `CUMULATE(t, ts, step, size [, offset])`,
//! `SESSION(t, ts, gap [, partition_column …])`.
//!
//! Before DataFusion plans a query, each call is replaced by a reference to a synthetic
//! relation whose name encodes the call ([`WindowTable::encode`]); the schema provider
//! answers that name with the input relation plus `window_start` and `window_end`, and the
//! lowering turns its scan into a scan of the input followed by a window node. The input
//! must be a table, source or materialized view named directly; the time column a
//! `TIMESTAMP`; the sizes constant intervals of fixed length (no months).

use std::ops::ControlFlow;

use datafusion::arrow::compute::kernels::cast_utils::parse_interval_month_day_nano;
use datafusion::arrow::datatypes::{DataType, IntervalMonthDayNano, TimeUnit};
use datafusion::sql::sqlparser::ast::{
    Expr, FunctionArg, FunctionArgExpr, Ident, ObjectName, TableAlias, TableFactor, Value,
    VisitMut, VisitorMut,
};
use kappa_common::{KappaError, RelationId, Result, SqlState};
use kappa_plan::window::{SessionSpec, TableWindow, WindowKind, WindowSpec};

use crate::catalog::{Catalog, RelationKind};
use crate::parse::normalize_ident;

pub const WINDOW_TABLE_PREFIX: &str = "__kappa_window:";

/// A window function applied to a relation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WindowTable {
    pub relation: RelationId,
    /// Index of the time column in the relation's schema.
    pub time_col: usize,
    pub window: TableWindow,
}

impl WindowTable {
    pub fn encode(&self) -> String {
        let (rel, col) = (self.relation, self.time_col);
        match &self.window {
            TableWindow::Fixed(spec) => {
                let k = match spec.kind {
                    WindowKind::Tumble => "tumble",
                    WindowKind::Hop => "hop",
                    WindowKind::Cumulate => "cumulate",
                };
                format!(
                    "{WINDOW_TABLE_PREFIX}{k}:{rel}:{col}:{}:{}:{}",
                    spec.size, spec.slide, spec.offset
                )
            }
            TableWindow::Session(spec) => {
                let parts: Vec<String> = spec.partition.iter().map(|p| p.to_string()).collect();
                format!(
                    "{WINDOW_TABLE_PREFIX}session:{rel}:{col}:{}:{}",
                    spec.gap,
                    parts.join(",")
                )
            }
        }
    }

    pub fn decode(name: &str) -> Option<Self> {
        let rest = name.strip_prefix(WINDOW_TABLE_PREFIX)?;
        let parts: Vec<&str> = rest.split(':').collect();
        if let ["session", rel, col, gap, partition] = parts.as_slice() {
            let partition = partition
                .split(',')
                .filter(|p| !p.is_empty())
                .map(|p| p.parse().ok())
                .collect::<Option<Vec<usize>>>()?;
            return Some(Self {
                relation: rel.parse().ok()?,
                time_col: col.parse().ok()?,
                window: TableWindow::Session(SessionSpec::new(gap.parse().ok()?, partition).ok()?),
            });
        }
        let [k, rel, col, size, slide, offset] = parts.as_slice() else {
            return None;
        };
        let kind = match *k {
            "tumble" => WindowKind::Tumble,
            "hop" => WindowKind::Hop,
            "cumulate" => WindowKind::Cumulate,
            _ => return None,
        };
        Some(Self {
            relation: rel.parse().ok()?,
            time_col: col.parse().ok()?,
            window: TableWindow::Fixed(
                WindowSpec::new(
                    kind,
                    size.parse().ok()?,
                    slide.parse().ok()?,
                    offset.parse().ok()?,
                )
                .ok()?,
            ),
        })
    }
}

fn bad_arg(msg: impl Into<String>) -> KappaError {
    KappaError::user(SqlState::INVALID_PARAMETER_VALUE, msg)
}

/// A constant interval of fixed length, in microseconds.
fn interval_micros(e: &Expr, what: &str) -> Result<i64> {
    let text = match e {
        Expr::Interval(i) => {
            let v = match i.value.as_ref() {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.clone(),
                    Value::Number(n, _) => n.clone(),
                    _ => return Err(bad_arg(format!("{what} must be a constant interval"))),
                },
                _ => return Err(bad_arg(format!("{what} must be a constant interval"))),
            };
            match &i.leading_field {
                Some(f) if i.last_field.is_none() => format!("{v} {f}"),
                None => v,
                Some(_) => {
                    return Err(KappaError::not_supported(format!(
                        "the interval {e} as {what}; write e.g. INTERVAL '90' SECOND"
                    )));
                }
            }
        }
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => s.clone(),
            _ => return Err(bad_arg(format!("{what} must be an interval, not {e}"))),
        },
        _ => {
            return Err(bad_arg(format!(
                "{what} must be a constant interval, not {e}"
            )));
        }
    };
    let iv = parse_interval_month_day_nano(&text)
        .map_err(|err| bad_arg(format!("invalid interval {e} as {what}: {err}")))?;
    fixed_micros(iv).map_err(|why| bad_arg(format!("{what} {e} {why}")))
}

/// The length of an interval in microseconds, if it has a fixed one; else why not.
pub(crate) fn fixed_micros(iv: IntervalMonthDayNano) -> std::result::Result<i64, &'static str> {
    if iv.months != 0 {
        return Err("has no fixed length (months); use days");
    }
    if iv.nanoseconds % 1000 != 0 {
        return Err("is finer than a microsecond");
    }
    (iv.days as i64)
        .checked_mul(86_400_000_000)
        .and_then(|d| d.checked_add(iv.nanoseconds / 1000))
        .ok_or("is too large")
}

struct Rewriter<'a> {
    catalog: &'a Catalog,
}

fn arg_expr(a: &FunctionArg) -> Option<&Expr> {
    match a {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
        _ => None,
    }
}

fn ident_of(e: &Expr) -> Option<String> {
    match e {
        Expr::Identifier(i) => Some(normalize_ident(i)),
        Expr::CompoundIdentifier(parts) => parts.last().map(normalize_ident),
        _ => None,
    }
}

impl Rewriter<'_> {
    fn rewrite(&self, tf: &TableFactor) -> Result<Option<TableFactor>> {
        let TableFactor::Table {
            name, alias, args, ..
        } = tf
        else {
            return Ok(None);
        };
        let Some(args) = args else { return Ok(None) };
        let Some(fname) = name.0.last().and_then(|p| p.as_ident()) else {
            return Ok(None);
        };
        let kind = match normalize_ident(fname).as_str() {
            "tumble" => Some(WindowKind::Tumble),
            "hop" => Some(WindowKind::Hop),
            "cumulate" => Some(WindowKind::Cumulate),
            "session" => None,
            _ => return Ok(None),
        };
        let fname = kind.map_or("SESSION", WindowKind::name);
        let usage = match kind {
            Some(WindowKind::Tumble) => "TUMBLE(relation, time_column, size [, offset])",
            Some(WindowKind::Hop) => "HOP(relation, time_column, slide, size [, offset])",
            Some(WindowKind::Cumulate) => "CUMULATE(relation, time_column, step, size [, offset])",
            None => "SESSION(relation, time_column, gap [, partition_column ...])",
        };
        let exprs: Vec<&Expr> = args.args.iter().filter_map(arg_expr).collect();
        let intervals = if kind == Some(WindowKind::Hop) || kind == Some(WindowKind::Cumulate) {
            2
        } else {
            1
        };
        if exprs.len() != args.args.len()
            || exprs.len() < 2 + intervals
            || (kind.is_some() && exprs.len() > 3 + intervals)
        {
            return Err(KappaError::user(
                SqlState::UNDEFINED_FUNCTION,
                format!("{fname} takes the arguments {usage}"),
            ));
        }
        let rel_name = ident_of(exprs[0]).ok_or_else(|| {
            KappaError::not_supported(format!(
                "{fname} over {}: its first argument must name a table, source or materialized view",
                exprs[0]
            ))
        })?;
        let rel = self.catalog.require(&rel_name)?;
        if matches!(rel.kind, RelationKind::View) {
            return Err(KappaError::not_supported(format!(
                "{fname} over the view {rel_name}; use a materialized view or a table"
            )));
        }
        let col_name = ident_of(exprs[1])
            .ok_or_else(|| bad_arg(format!("{fname}: the second argument must be a column")))?;
        let time_col = rel.schema.index_of(&col_name).map_err(|_| {
            KappaError::user(
                SqlState::UNDEFINED_COLUMN,
                format!("column \"{col_name}\" does not exist in {rel_name}"),
            )
        })?;
        match rel.schema.field(time_col).data_type() {
            DataType::Timestamp(TimeUnit::Microsecond, _) => {}
            other => {
                return Err(KappaError::user(
                    SqlState::DATATYPE_MISMATCH,
                    format!("{fname}: the time column {col_name} must be a TIMESTAMP, not {other}"),
                ));
            }
        }
        let window = match kind {
            Some(kind) => {
                let first = interval_micros(exprs[2], "the window size")?;
                let (size, slide) = if kind == WindowKind::Tumble {
                    (first, first)
                } else {
                    (interval_micros(exprs[3], "the window size")?, first)
                };
                let offset = match exprs.get(2 + intervals) {
                    Some(e) => interval_micros(e, "the window offset")?,
                    None => 0,
                };
                TableWindow::Fixed(WindowSpec::new(kind, size, slide, offset)?)
            }
            None => {
                let gap = interval_micros(exprs[2], "the session gap")?;
                let mut partition = vec![];
                for e in &exprs[3..] {
                    let name = ident_of(e).ok_or_else(|| {
                        bad_arg(format!("SESSION: partition by columns, not {e}"))
                    })?;
                    let idx = rel.schema.index_of(&name).map_err(|_| {
                        KappaError::user(
                            SqlState::UNDEFINED_COLUMN,
                            format!("column \"{name}\" does not exist in {rel_name}"),
                        )
                    })?;
                    if !partition.contains(&idx) {
                        partition.push(idx);
                    }
                }
                TableWindow::Session(SessionSpec::new(gap, partition)?)
            }
        };
        let table = WindowTable {
            relation: rel.id,
            time_col,
            window,
        };
        let alias = alias.clone().unwrap_or_else(|| TableAlias {
            explicit: false,
            name: Ident::new(rel_name),
            columns: vec![],
            at: None,
        });
        Ok(Some(TableFactor::Table {
            name: ObjectName::from(vec![Ident::with_quote('"', table.encode())]),
            alias: Some(alias),
            args: None,
            with_hints: vec![],
            version: None,
            with_ordinality: false,
            partitions: vec![],
            json_path: None,
            sample: None,
            index_hints: vec![],
        }))
    }
}

impl VisitorMut for Rewriter<'_> {
    type Break = KappaError;

    fn pre_visit_table_factor(&mut self, tf: &mut TableFactor) -> ControlFlow<KappaError> {
        match self.rewrite(tf) {
            Ok(Some(new)) => *tf = new,
            Ok(None) => {}
            Err(e) => return ControlFlow::Break(e),
        }
        ControlFlow::Continue(())
    }
}

/// Runs a rewriting visitor that stops at its first error.
pub(crate) fn visit_fallibly<T: VisitMut>(
    node: &mut T,
    visitor: &mut impl VisitorMut<Break = KappaError>,
) -> Result<()> {
    match node.visit(visitor) {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Replaces every window table function call in `query` by its synthetic relation.
pub fn rewrite_window_tvfs<T: VisitMut>(node: &mut T, catalog: &Catalog) -> Result<()> {
    visit_fallibly(node, &mut Rewriter { catalog })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_roundtrip() {
        let t = WindowTable {
            relation: 7,
            time_col: 2,
            window: TableWindow::Fixed(
                WindowSpec::new(WindowKind::Hop, 10_000_000, 2_000_000, -5).unwrap(),
            ),
        };
        assert_eq!(WindowTable::decode(&t.encode()), Some(t));
        for partition in [vec![], vec![3], vec![1, 0]] {
            let t = WindowTable {
                relation: 7,
                time_col: 2,
                window: TableWindow::Session(SessionSpec::new(5, partition).unwrap()),
            };
            assert_eq!(WindowTable::decode(&t.encode()), Some(t));
        }
        assert_eq!(WindowTable::decode("bid"), None);
    }

    #[test]
    fn intervals() {
        let parse = |s: &str| {
            let stmt = crate::parse::parse_statements(&format!("SELECT {s}")).unwrap();
            let datafusion::sql::sqlparser::ast::Statement::Query(q) = &stmt[0] else {
                panic!()
            };
            let datafusion::sql::sqlparser::ast::SetExpr::Select(sel) = q.body.as_ref() else {
                panic!()
            };
            let datafusion::sql::sqlparser::ast::SelectItem::UnnamedExpr(e) = &sel.projection[0]
            else {
                panic!()
            };
            interval_micros(e, "size")
        };
        assert_eq!(parse("INTERVAL '10' SECOND").unwrap(), 10_000_000);
        assert_eq!(parse("INTERVAL '2 minutes'").unwrap(), 120_000_000);
        assert_eq!(parse("INTERVAL '1' DAY").unwrap(), 86_400_000_000);
        assert_eq!(parse("INTERVAL '5' MILLISECOND").unwrap(), 5_000);
        assert!(parse("INTERVAL '1' MONTH").is_err());
        assert!(parse("1 + 1").is_err());
    }
}

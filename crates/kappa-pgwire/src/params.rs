//! Binding extended-protocol parameters: each `$n` in the statement is replaced by a typed
//! SQL literal built from the client's value, so every statement kind accepts parameters and
//! no value is ever spliced in as SQL text.

use std::ops::ControlFlow;

use chrono::{Duration, NaiveDate, NaiveDateTime};
use datafusion::arrow::datatypes::DataType;
use datafusion::sql::sqlparser::ast::{
    Expr, Statement, Value, ValueWithSpan, visit_expressions_mut,
};
use datafusion::sql::sqlparser::dialect::PostgreSqlDialect;
use datafusion::sql::sqlparser::parser::Parser;
use kappa_common::{KappaError, Result, SqlState};
use pgwire::api::Type;

fn bad(msg: impl Into<String>) -> KappaError {
    KappaError::user(SqlState::INVALID_PARAMETER_VALUE, msg)
}

fn value(v: Value) -> Expr {
    Expr::Value(ValueWithSpan::from(v))
}

fn cast(literal: &str, sql_type: &str) -> Result<Expr> {
    let quoted = Value::SingleQuotedString(literal.to_string()).to_string();
    Parser::new(&PostgreSqlDialect {})
        .try_with_sql(&format!("CAST({quoted} AS {sql_type})"))
        .and_then(|mut p| p.parse_expr())
        .map_err(|e| KappaError::internal(format!("building a parameter literal: {e}")))
}

fn number(text: &str) -> Result<Expr> {
    let t = text.trim();
    if t.parse::<f64>().is_err() && !t.eq_ignore_ascii_case("nan") {
        return Err(KappaError::user(
            SqlState::INVALID_TEXT_REPRESENTATION,
            format!("invalid input syntax for a number: \"{t}\""),
        ));
    }
    if t.starts_with('-') {
        // Negative numbers are a unary minus over a literal in SQL.
        return Parser::new(&PostgreSqlDialect {})
            .try_with_sql(t)
            .and_then(|mut p| p.parse_expr())
            .map_err(|e| bad(e.to_string()));
    }
    Ok(value(Value::Number(t.to_string(), false)))
}

/// The literal for one parameter. `ty` is the type the client declared or the server
/// inferred (`None`: unknown, taken as text and left to the statement's own coercion).
pub fn literal(raw: Option<&[u8]>, binary: bool, ty: Option<&Type>) -> Result<Expr> {
    let Some(raw) = raw else {
        return Ok(value(Value::Null));
    };
    let ty = ty.cloned().unwrap_or(Type::UNKNOWN);
    if binary {
        let arr = |n: usize| -> Result<&[u8]> {
            if raw.len() == n {
                Ok(raw)
            } else {
                Err(bad(format!(
                    "binary parameter of type {} has {} bytes",
                    ty.name(),
                    raw.len()
                )))
            }
        };
        return match ty {
            Type::INT2 => {
                number(&i16::from_be_bytes(arr(2)?.try_into().unwrap_or_default()).to_string())
            }
            Type::INT4 => {
                number(&i32::from_be_bytes(arr(4)?.try_into().unwrap_or_default()).to_string())
            }
            Type::INT8 => {
                number(&i64::from_be_bytes(arr(8)?.try_into().unwrap_or_default()).to_string())
            }
            Type::FLOAT4 => {
                let f = f32::from_be_bytes(arr(4)?.try_into().unwrap_or_default());
                float_literal(f64::from(f), "REAL")
            }
            Type::FLOAT8 => {
                let f = f64::from_be_bytes(arr(8)?.try_into().unwrap_or_default());
                float_literal(f, "DOUBLE PRECISION")
            }
            Type::BOOL => Ok(value(Value::Boolean(arr(1)?[0] != 0))),
            Type::TEXT | Type::VARCHAR | Type::UNKNOWN | Type::NAME | Type::BPCHAR => {
                let s =
                    std::str::from_utf8(raw).map_err(|_| bad("parameter is not valid UTF-8"))?;
                Ok(value(Value::SingleQuotedString(s.to_string())))
            }
            Type::TIMESTAMP | Type::TIMESTAMPTZ => {
                let us = i64::from_be_bytes(arr(8)?.try_into().unwrap_or_default());
                let epoch = NaiveDate::from_ymd_opt(2000, 1, 1)
                    .and_then(|d| d.and_hms_opt(0, 0, 0))
                    .unwrap_or(NaiveDateTime::MIN);
                let t = epoch + Duration::microseconds(us);
                let text = t.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
                if ty == Type::TIMESTAMP {
                    cast(&text, "TIMESTAMP")
                } else {
                    cast(&format!("{text}+00:00"), "TIMESTAMPTZ")
                }
            }
            Type::DATE => {
                let days = i32::from_be_bytes(arr(4)?.try_into().unwrap_or_default());
                let d = NaiveDate::from_ymd_opt(2000, 1, 1)
                    .and_then(|d| d.checked_add_signed(Duration::days(i64::from(days))))
                    .ok_or_else(|| bad("date parameter out of range"))?;
                cast(&d.to_string(), "DATE")
            }
            other => Err(KappaError::not_supported(format!(
                "binary-format parameters of type {}",
                other.name()
            ))),
        };
    }
    let text = std::str::from_utf8(raw).map_err(|_| bad("parameter is not valid UTF-8"))?;
    match ty {
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => number(text),
        Type::FLOAT4 | Type::FLOAT8 | Type::NUMERIC => match text.trim().parse::<f64>() {
            Ok(f) if !f.is_finite() => cast(text.trim(), "DOUBLE PRECISION"),
            _ => number(text),
        },
        Type::BOOL => match text.trim().to_lowercase().as_str() {
            "t" | "true" | "y" | "yes" | "on" | "1" => Ok(value(Value::Boolean(true))),
            "f" | "false" | "n" | "no" | "off" | "0" => Ok(value(Value::Boolean(false))),
            other => Err(KappaError::user(
                SqlState::INVALID_TEXT_REPRESENTATION,
                format!("invalid input syntax for type boolean: \"{other}\""),
            )),
        },
        Type::TIMESTAMP => cast(text, "TIMESTAMP"),
        Type::TIMESTAMPTZ => cast(text, "TIMESTAMPTZ"),
        Type::DATE => cast(text, "DATE"),
        Type::INTERVAL => cast(text, "INTERVAL"),
        _ => Ok(value(Value::SingleQuotedString(text.to_string()))),
    }
}

fn float_literal(f: f64, sql_type: &str) -> Result<Expr> {
    if f.is_finite() {
        number(&format!("{f:?}"))
    } else {
        cast(&f.to_string(), sql_type)
    }
}

/// Replaces `$1…$n` in `stmt` with `values[0..n]`. A placeholder without a value is an
/// error (08P01), as in PostgreSQL.
pub fn bind(stmt: &mut Statement, values: &[Expr]) -> Result<()> {
    let mut err = None;
    let _ = visit_expressions_mut(stmt, |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
        {
            let idx = p
                .strip_prefix('$')
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n >= 1);
            match idx.and_then(|n| values.get(n - 1)) {
                Some(lit) => *e = Expr::Nested(Box::new(lit.clone())),
                None => {
                    err = Some(KappaError::user(
                        SqlState::PROTOCOL_VIOLATION,
                        format!("no value was bound for parameter {p}"),
                    ));
                    return ControlFlow::Break(());
                }
            }
        }
        ControlFlow::<()>::Continue(())
    });
    match err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Number of distinct `$n` placeholders (the highest n).
pub fn count_placeholders(stmt: &Statement) -> usize {
    let mut max = 0;
    let _ = datafusion::sql::sqlparser::ast::visit_expressions(stmt, |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
            && let Some(n) = p.strip_prefix('$').and_then(|n| n.parse::<usize>().ok())
        {
            max = max.max(n);
        }
        ControlFlow::<()>::Continue(())
    });
    max
}

/// A parameter type reported in Describe, from the type DataFusion inferred.
pub fn inferred_pg_type(t: Option<&DataType>) -> Type {
    t.map(crate::encode::pg_type).unwrap_or(Type::UNKNOWN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binds_typed_literals_safely() {
        let mut stmt = kappa_sql::parse::parse_statements("SELECT $1, $2, $3 WHERE x = $1")
            .unwrap()
            .remove(0);
        let vals = vec![
            literal(Some(b"42"), false, Some(&Type::INT8)).unwrap(),
            literal(Some(b"it's"), false, None).unwrap(),
            literal(None, false, None).unwrap(),
        ];
        bind(&mut stmt, &vals).unwrap();
        assert_eq!(
            stmt.to_string(),
            "SELECT (42), ('it''s'), (NULL) WHERE x = (42)"
        );
        assert!(literal(Some(b"1; DROP TABLE t"), false, Some(&Type::INT8)).is_err());
        let mut stmt = kappa_sql::parse::parse_statements("SELECT $2")
            .unwrap()
            .remove(0);
        assert!(bind(&mut stmt, &vals[..1]).is_err());
    }
}

//! SQL type names to Arrow types, as Kappa stores them.

use datafusion::arrow::datatypes::{DataType, IntervalUnit, TimeUnit};
use datafusion::sql::sqlparser::ast::DataType as SqlType;
use kappa_common::{KappaError, Result};

/// Maps a column type of CREATE TABLE. Timestamps are stored with microsecond precision, as
/// PostgreSQL does; `TIMESTAMPTZ` is stored in UTC.
pub fn arrow_type(t: &SqlType) -> Result<DataType> {
    let text = t.to_string().to_uppercase();
    let (base, args) = match text.split_once('(') {
        Some((b, rest)) => (b.trim().to_string(), rest.trim_end_matches(')').to_string()),
        None => (text.clone(), String::new()),
    };
    let nums: Vec<u8> = args
        .split(',')
        .filter_map(|s| s.trim().parse::<u8>().ok())
        .collect();
    Ok(match base.as_str() {
        "BIGINT" | "INT8" => DataType::Int64,
        "INT" | "INTEGER" | "INT4" => DataType::Int32,
        "SMALLINT" | "INT2" => DataType::Int16,
        "BOOLEAN" | "BOOL" => DataType::Boolean,
        "DOUBLE" | "DOUBLE PRECISION" | "FLOAT8" | "FLOAT" => DataType::Float64,
        "REAL" | "FLOAT4" => DataType::Float32,
        "TEXT" | "VARCHAR" | "CHARACTER VARYING" | "STRING" | "CHAR" | "CHARACTER" => {
            DataType::Utf8
        }
        "BYTEA" => DataType::Binary,
        "DATE" => DataType::Date32,
        "TIMESTAMP" | "TIMESTAMP WITHOUT TIME ZONE" => {
            DataType::Timestamp(TimeUnit::Microsecond, None)
        }
        "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => {
            DataType::Timestamp(TimeUnit::Microsecond, Some("+00:00".into()))
        }
        "INTERVAL" => DataType::Interval(IntervalUnit::MonthDayNano),
        "NUMERIC" | "DECIMAL" => {
            let p = nums.first().copied().unwrap_or(38);
            let s = nums
                .get(1)
                .copied()
                .unwrap_or(if nums.is_empty() { 10 } else { 0 });
            if p == 0 || p > 38 || s > p {
                return Err(KappaError::user(
                    kappa_common::SqlState::INVALID_PARAMETER_VALUE,
                    format!(
                        "NUMERIC precision {p} and scale {s} must satisfy 1 <= precision <= 38 and scale <= precision"
                    ),
                ));
            }
            DataType::Decimal128(p, s as i8)
        }
        _ => return Err(KappaError::not_supported(format!("the column type {t}"))),
    })
}

/// The PostgreSQL name of an Arrow type, for DESCRIBE and error messages.
pub fn pg_type_name(t: &DataType) -> String {
    match t {
        DataType::Int64 => "bigint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int16 | DataType::Int8 => "smallint".into(),
        DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => "bigint".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Float32 | DataType::Float16 => "real".into(),
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => "bytea".into(),
        DataType::Date32 | DataType::Date64 => "date".into(),
        DataType::Timestamp(_, None) => "timestamp".into(),
        DataType::Timestamp(_, Some(_)) => "timestamptz".into(),
        DataType::Interval(_) => "interval".into(),
        DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
        other => other.to_string().to_lowercase(),
    }
}

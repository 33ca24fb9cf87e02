//! Arrow → PostgreSQL: column types and value encoding (text and binary formats).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int8Type, Int16Type, Int32Type,
    Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use pgwire::api::Type;
use pgwire::api::portal::Format;
use pgwire::api::results::{DataRowEncoder, FieldInfo};
use pgwire::error::PgWireResult;
use pgwire::messages::data::DataRow;

/// The PostgreSQL type a column of this Arrow type is sent as.
pub fn pg_type(t: &DataType) -> Type {
    match t {
        DataType::Boolean => Type::BOOL,
        DataType::Int8 | DataType::Int16 | DataType::UInt8 => Type::INT2,
        DataType::Int32 | DataType::UInt16 => Type::INT4,
        DataType::Int64 | DataType::UInt32 | DataType::UInt64 => Type::INT8,
        DataType::Float16 | DataType::Float32 => Type::FLOAT4,
        DataType::Float64 => Type::FLOAT8,
        DataType::Decimal128(..) => Type::NUMERIC,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Type::TEXT,
        DataType::Binary | DataType::LargeBinary | DataType::BinaryView => Type::BYTEA,
        DataType::Date32 => Type::DATE,
        DataType::Timestamp(_, None) => Type::TIMESTAMP,
        DataType::Timestamp(_, Some(_)) => Type::TIMESTAMPTZ,
        _ => Type::TEXT,
    }
}

pub fn fields(schema: &SchemaRef, format: &Format) -> Vec<FieldInfo> {
    schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, f)| {
            FieldInfo::new(
                f.name().clone(),
                None,
                None,
                pg_type(f.data_type()),
                format.format_for(i),
            )
        })
        .collect()
}

fn ts_utc(unit: &TimeUnit, v: i64) -> Option<DateTime<Utc>> {
    match unit {
        TimeUnit::Second => DateTime::from_timestamp(v, 0),
        TimeUnit::Millisecond => DateTime::from_timestamp_millis(v),
        TimeUnit::Microsecond => DateTime::from_timestamp_micros(v),
        TimeUnit::Nanosecond => Some(DateTime::from_timestamp_nanos(v)),
    }
}

/// A float as PostgreSQL prints it (extra_float_digits ≥ 1): the shortest text that reads
/// back as the same value, `Infinity`/`NaN` spelled out, and exponent form (`1e+21`,
/// `1.5e-05`) outside [1e-4, 1e15).
pub fn pg_float_text(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e15).contains(&a) {
        let s = format!("{f:e}");
        if let Some((mantissa, exp)) = s.split_once('e') {
            let (sign, digits) = match exp.strip_prefix('-') {
                Some(d) => ('-', d),
                None => ('+', exp),
            };
            return format!("{mantissa}e{sign}{digits:0>2}");
        }
        return s;
    }
    format!("{f}")
}

/// A timestamp as PostgreSQL prints it: fractional seconds only when non-zero, without
/// trailing zeros; `+00` for timestamptz (Kappa stores and sends them in UTC).
pub fn pg_timestamp_text(t: &chrono::NaiveDateTime, utc: bool) -> String {
    let mut s = t.format("%Y-%m-%d %H:%M:%S%.6f").to_string();
    while s.ends_with('0') {
        s.pop();
    }
    if s.ends_with('.') {
        s.pop();
    }
    if utc {
        s.push_str("+00");
    }
    s
}

fn pg_float32_text(f: f32) -> String {
    if f.is_finite() && f.abs() >= 1e-4 && f.abs() < 1e15 || f == 0.0 {
        format!("{f}")
    } else {
        pg_float_text(f64::from(f))
    }
}

/// Encodes every row of `batches` as DataRows for `fields`.
pub fn encode_rows(
    fields: Arc<Vec<FieldInfo>>,
    batches: &[RecordBatch],
) -> PgWireResult<Vec<DataRow>> {
    let text: Vec<bool> = fields
        .iter()
        .map(|f| f.format() == pgwire::api::results::FieldFormat::Text)
        .collect();
    let mut rows = Vec::with_capacity(batches.iter().map(|b| b.num_rows()).sum());
    let mut enc = DataRowEncoder::new(fields);
    let opts = FormatOptions::default();
    for batch in batches {
        let fallback: Vec<Option<ArrayFormatter>> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts).ok())
            .collect();
        for r in 0..batch.num_rows() {
            for (ci, col) in batch.columns().iter().enumerate() {
                encode_value(&mut enc, col.as_ref(), r, fallback[ci].as_ref(), text[ci])?;
            }
            rows.push(enc.take_row());
        }
    }
    Ok(rows)
}

fn encode_value(
    enc: &mut DataRowEncoder,
    col: &dyn Array,
    r: usize,
    fallback: Option<&ArrayFormatter>,
    text: bool,
) -> PgWireResult<()> {
    if col.is_null(r) {
        return enc.encode_field(&None::<i8>);
    }
    macro_rules! prim {
        ($t:ty, $rust:ty) => {
            enc.encode_field(&(col.as_primitive::<$t>().value(r) as $rust))
        };
    }
    match col.data_type() {
        DataType::Boolean => enc.encode_field(&col.as_boolean().value(r)),
        DataType::Int8 => prim!(Int8Type, i16),
        DataType::Int16 => prim!(Int16Type, i16),
        DataType::UInt8 => prim!(UInt8Type, i16),
        DataType::Int32 => prim!(Int32Type, i32),
        DataType::UInt16 => prim!(UInt16Type, i32),
        DataType::Int64 => prim!(Int64Type, i64),
        DataType::UInt32 => prim!(UInt32Type, i64),
        DataType::UInt64 => prim!(UInt64Type, i64),
        DataType::Float32 if text => {
            enc.encode_field(&pg_float32_text(col.as_primitive::<Float32Type>().value(r)).as_str())
        }
        DataType::Float64 if text => {
            enc.encode_field(&pg_float_text(col.as_primitive::<Float64Type>().value(r)).as_str())
        }
        DataType::Float32 => prim!(Float32Type, f32),
        DataType::Float64 => prim!(Float64Type, f64),
        DataType::Utf8 => enc.encode_field(&col.as_string::<i32>().value(r)),
        DataType::LargeUtf8 => enc.encode_field(&col.as_string::<i64>().value(r)),
        DataType::Utf8View => enc.encode_field(&col.as_string_view().value(r)),
        DataType::Binary => enc.encode_field(&col.as_binary::<i32>().value(r)),
        DataType::Date32 => {
            let days = col.as_primitive::<Date32Type>().value(r);
            let d = NaiveDate::from_num_days_from_ce_opt(days + 719_163);
            enc.encode_field(&d)
        }
        DataType::Timestamp(unit, tz) => {
            let v = match unit {
                TimeUnit::Second => col.as_primitive::<TimestampSecondType>().value(r),
                TimeUnit::Millisecond => col.as_primitive::<TimestampMillisecondType>().value(r),
                TimeUnit::Microsecond => col.as_primitive::<TimestampMicrosecondType>().value(r),
                TimeUnit::Nanosecond => col.as_primitive::<TimestampNanosecondType>().value(r),
            };
            let t = ts_utc(unit, v);
            match (tz, text) {
                (None, true) => {
                    enc.encode_field(&t.map(|t| pg_timestamp_text(&t.naive_utc(), false)))
                }
                (Some(_), true) => {
                    enc.encode_field(&t.map(|t| pg_timestamp_text(&t.naive_utc(), true)))
                }
                (None, false) => enc.encode_field(&t.map(|t| t.naive_utc())),
                (Some(_), false) => enc.encode_field(&t),
            }
        }
        DataType::Decimal128(_, s) => {
            let v = col.as_primitive::<Decimal128Type>().value(r);
            match u32::try_from(*s)
                .ok()
                .and_then(|s| rust_decimal::Decimal::try_from_i128_with_scale(v, s).ok())
            {
                Some(d) => enc.encode_field(&d),
                None => enc.encode_field(&fallback.map(|f| f.value(r).to_string())),
            }
        }
        _ => enc.encode_field(&fallback.map(|f| f.value(r).to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_postgres() {
        for (f, want) in [
            (17.0, "17"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e21, "1e+21"),
            (1.5e-5, "1.5e-05"),
            (123456789012345.0, "123456789012345"),
            (1e15, "1e+15"),
            (0.0001, "0.0001"),
            (f64::INFINITY, "Infinity"),
            (f64::NAN, "NaN"),
            (0.0, "0"),
        ] {
            assert_eq!(pg_float_text(f), want);
        }
    }

    #[test]
    fn timestamps_print_like_postgres() {
        let t = |s: &str| chrono::NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f").unwrap();
        assert_eq!(
            pg_timestamp_text(&t("2024-01-02 00:00:00.000"), false),
            "2024-01-02 00:00:00"
        );
        assert_eq!(
            pg_timestamp_text(&t("2024-05-06 07:08:09.500"), false),
            "2024-05-06 07:08:09.5"
        );
        assert_eq!(
            pg_timestamp_text(&t("2024-05-06 07:08:09.000120"), true),
            "2024-05-06 07:08:09.00012+00"
        );
    }
}

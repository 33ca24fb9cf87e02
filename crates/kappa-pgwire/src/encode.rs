//! Arrow → PostgreSQL: column types and value encoding (text and binary formats).

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{
    DataType, Date32Type, Decimal128Type, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, SchemaRef, TimeUnit, TimestampMicrosecondType,
    TimestampMillisecondType, TimestampNanosecondType, TimestampSecondType, UInt8Type,
    UInt16Type, UInt32Type, UInt64Type,
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

/// The Arrow type a parameter of this PostgreSQL type becomes.
pub fn arrow_type(t: &Type) -> Option<DataType> {
    Some(match *t {
        Type::BOOL => DataType::Boolean,
        Type::INT2 => DataType::Int16,
        Type::INT4 => DataType::Int32,
        Type::INT8 => DataType::Int64,
        Type::FLOAT4 => DataType::Float32,
        Type::FLOAT8 => DataType::Float64,
        Type::TEXT | Type::VARCHAR => DataType::Utf8,
        _ => return None,
    })
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

/// Encodes every row of `batches` as DataRows for `fields`.
pub fn encode_rows(fields: Arc<Vec<FieldInfo>>, batches: &[RecordBatch]) -> PgWireResult<Vec<DataRow>> {
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
                encode_value(&mut enc, col.as_ref(), r, fallback[ci].as_ref())?;
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
            match tz {
                None => enc.encode_field(&t.map(|t| t.naive_utc())),
                Some(_) => enc.encode_field(&t),
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

//! `connector = 'datagen'`: random rows for any schema of BIGINT, INT, DOUBLE, BOOLEAN,
//! VARCHAR and TIMESTAMP columns.
//!
//! Options: `datagen.rows` (total rows; default unbounded), `datagen.seed`, and per column
//! `fields.<col>.min` / `fields.<col>.max` (integers, doubles; default 0..1000),
//! `fields.<col>.length` (strings; default 10). A TIMESTAMP column is event time: it starts
//! at `datagen.start.time.ms` (default 2024-01-01) and advances by
//! `datagen.interval.us` (default 1000) per row, so a watermark on it advances with the data.
//! Row `n`'s values depend only on `(seed, n, column)`.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch, RecordBatchOptions,
    StringBuilder, TimestampMicrosecondArray,
};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit};
use kappa_common::{KappaError, Result, SqlState};

use crate::rng::Rng;
use crate::{Batches, ColumnSet, RowStream, int_option};

const CHUNK: u64 = 8192;

pub struct DatagenReader {
    schema: SchemaRef,
    seed: u64,
    rows: Option<u64>,
    next: u64,
    start_us: i64,
    interval_us: i64,
    ranges: Vec<(f64, f64)>,
    lengths: Vec<usize>,
    /// The columns anyone reads; the others are left unfilled.
    read: ColumnSet,
}

fn float_option(o: &BTreeMap<String, String>, key: &str, default: f64) -> Result<f64> {
    match o.get(key) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|_| {
            KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("option {key} must be a number, not '{v}'"),
            )
        }),
    }
}

impl DatagenReader {
    pub fn start(o: &BTreeMap<String, String>, schema: SchemaRef) -> Result<Self> {
        let mut known: Vec<String> = [
            "datagen.rows",
            "datagen.seed",
            "datagen.start.time.ms",
            "datagen.interval.us",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut ranges = vec![];
        let mut lengths = vec![];
        for f in schema.fields() {
            let p = format!("fields.{}.", f.name());
            for k in ["min", "max", "length"] {
                known.push(format!("{p}{k}"));
            }
            match f.data_type() {
                DataType::Int64
                | DataType::Int32
                | DataType::Float64
                | DataType::Boolean
                | DataType::Utf8
                | DataType::Timestamp(TimeUnit::Microsecond, _) => {}
                other => {
                    return Err(KappaError::not_supported(format!(
                        "datagen column \"{}\" of type {other}",
                        f.name()
                    )));
                }
            }
            let min = float_option(o, &format!("{p}min"), 0.0)?;
            let max = float_option(o, &format!("{p}max"), 1000.0)?;
            if max < min {
                return Err(KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("fields.{}.max is below its min", f.name()),
                ));
            }
            ranges.push((min, max));
            lengths.push(int_option(o, &format!("{p}length"), Some(10))?.unwrap_or(10) as usize);
        }
        let known_refs: Vec<&str> = known.iter().map(String::as_str).collect();
        crate::check_known(o, &known_refs)?;
        Ok(Self {
            schema,
            seed: int_option(o, "datagen.seed", Some(0))?.unwrap_or(0),
            rows: int_option(o, "datagen.rows", None)?,
            next: 0,
            start_us: int_option(o, "datagen.start.time.ms", Some(1_704_067_200_000))?.unwrap_or(0)
                as i64
                * 1000,
            interval_us: int_option(o, "datagen.interval.us", Some(1000))?.unwrap_or(1000) as i64,
            ranges,
            lengths,
            read: ColumnSet::ALL,
        })
    }

    fn generate(&self, start: u64, end: u64) -> Result<RecordBatch> {
        let n = (end - start) as usize;
        let mut cols: Vec<ArrayRef> = vec![];
        for (i, f) in self.schema.fields().iter().enumerate() {
            if !self.read.contains(i) {
                cols.push(crate::unread_column(f, n)?);
                continue;
            }
            let s = i as u64 + 1;
            let (lo, hi) = self.ranges[i];
            let rng = |r: u64| Rng::new(self.seed, r, s);
            let int = |r: u64| lo as i64 + rng(r).below((hi - lo) as u64 + 1) as i64;
            let col: ArrayRef = match f.data_type() {
                DataType::Int64 => Arc::new(Int64Array::from_iter_values((start..end).map(int))),
                DataType::Int32 => Arc::new(Int32Array::from_iter_values(
                    (start..end).map(|r| int(r) as i32),
                )),
                DataType::Float64 => Arc::new(Float64Array::from_iter_values(
                    (start..end).map(|r| lo + rng(r).unit() * (hi - lo)),
                )),
                DataType::Boolean => Arc::new(BooleanArray::from_iter(
                    (start..end).map(|r| Some(rng(r).below(2) == 1)),
                )),
                DataType::Timestamp(_, tz) => Arc::new(
                    TimestampMicrosecondArray::from_iter_values(
                        (start..end).map(|r| self.start_us + r as i64 * self.interval_us),
                    )
                    .with_timezone_opt(tz.clone()),
                ),
                _ => {
                    let mut b = StringBuilder::with_capacity(n, n * self.lengths[i]);
                    let mut scratch = String::new();
                    for r in start..end {
                        scratch.clear();
                        let mut g = rng(r);
                        for _ in 0..self.lengths[i] {
                            scratch.push((b'a' + g.below(26) as u8) as char);
                        }
                        b.append_value(&scratch);
                    }
                    Arc::new(b.finish())
                }
            };
            cols.push(col);
        }
        let opts = RecordBatchOptions::new().with_row_count(Some(n));
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            cols,
            &opts,
        )?)
    }
}

impl RowStream for DatagenReader {
    fn poll_batches(&mut self, max_rows: usize) -> Result<Batches> {
        let mut batches = vec![];
        let mut rows = 0;
        loop {
            let end = match self.rows {
                Some(t) if self.next >= t => {
                    return Ok(Batches {
                        batches,
                        finished: true,
                    });
                }
                Some(t) => (self.next + CHUNK).min(t),
                None => self.next + CHUNK,
            };
            if rows >= max_rows {
                break;
            }
            let b = self.generate(self.next, end)?;
            rows += b.num_rows();
            batches.push(b);
            self.next = end;
        }
        Ok(Batches {
            batches,
            finished: false,
        })
    }

    fn read_rows(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>> {
        crate::chunks(from, to, CHUNK)
            .map(|(start, end)| self.generate(start, end))
            .collect()
    }

    fn seek_rows(&mut self, rows: u64) -> Result<()> {
        self.next = rows;
        Ok(())
    }

    fn next_row(&self) -> u64 {
        self.next
    }

    fn set_read(&mut self, read: ColumnSet) {
        self.read = read;
    }
}

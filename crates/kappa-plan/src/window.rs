//! Window table functions: which windows an event-time instant belongs to.
//!
//! All times are microseconds since the epoch (Kappa stores timestamps with microsecond
//! precision). A window is the half-open interval `[start, end)`. Windows are aligned to
//! `offset` (default 0, i.e. to the Unix epoch, as in Flink and RisingWave):
//! - `TUMBLE(size)`: the one window of length `size` containing `t`;
//! - `HOP(slide, size)`: every window of length `size` whose start is a multiple of `slide`
//!   (plus offset) and that contains `t` — `ceil(size / slide)` windows per row;
//! - `CUMULATE(step, size)`: within the tumbling window `[S, S + size)` containing `t`, the
//!   windows `[S, S + k·step)` for every `k ≥ 1` whose end is after `t` (so `size / step`
//!   windows share a start and grow by `step`).
//!
//! - `SESSION(gap)`: per partition (the values of the partition columns), the rows sorted by
//!   time fall into maximal runs whose consecutive times are less than `gap` apart; a run
//!   `t1 <= … <= tn` is the window `[t1, tn + gap)`. Unlike the others, a row's session
//!   depends on the other rows: a new row can merge two sessions, a deleted one split one.
//!
//! A row whose time is NULL belongs to no window.

use std::fmt;
use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, RecordBatch, TimestampMicrosecondArray, UInt32Array,
};
use datafusion::arrow::compute::take;
use datafusion::arrow::datatypes::{DataType, TimeUnit, TimestampMicrosecondType};
use kappa_common::{KappaError, Result, SqlState};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WindowKind {
    Tumble,
    Hop,
    Cumulate,
}

impl WindowKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Tumble => "TUMBLE",
            Self::Hop => "HOP",
            Self::Cumulate => "CUMULATE",
        }
    }
}

/// A window function's parameters, in microseconds. `slide` is HOP's slide, CUMULATE's step,
/// and equal to `size` for TUMBLE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WindowSpec {
    pub kind: WindowKind,
    pub size: i64,
    pub slide: i64,
    pub offset: i64,
}

fn invalid(msg: String) -> KappaError {
    KappaError::user(SqlState::INVALID_PARAMETER_VALUE, msg)
}

fn overflow() -> KappaError {
    KappaError::user(
        SqlState::DATETIME_FIELD_OVERFLOW,
        "window bounds out of the timestamp range",
    )
}

impl WindowSpec {
    pub fn new(kind: WindowKind, size: i64, slide: i64, offset: i64) -> Result<Self> {
        let name = kind.name();
        if size <= 0 || slide <= 0 {
            return Err(invalid(format!(
                "{name} window size and slide must be positive intervals"
            )));
        }
        if kind == WindowKind::Cumulate && size % slide != 0 {
            return Err(invalid(format!(
                "CUMULATE window size must be a multiple of its step (got size {size} µs, step {slide} µs)"
            )));
        }
        if kind == WindowKind::Hop && size / slide > 10_000 {
            return Err(invalid(format!(
                "HOP window size / slide = {} windows per row is too many (at most 10000)",
                size / slide
            )));
        }
        Ok(Self {
            kind,
            size,
            slide,
            offset,
        })
    }

    /// Calls `f(start, end)` for every window containing `t`.
    pub fn assign(&self, t: i64, mut f: impl FnMut(i64, i64)) -> Result<()> {
        let align = |unit: i64| -> Result<i64> {
            let r = t
                .checked_sub(self.offset)
                .ok_or_else(overflow)?
                .rem_euclid(unit);
            Ok(t - r)
        };
        match self.kind {
            WindowKind::Tumble => {
                let s = align(self.size)?;
                f(s, s.checked_add(self.size).ok_or_else(overflow)?);
            }
            WindowKind::Hop => {
                let mut s = align(self.slide)?;
                let lowest = t.saturating_sub(self.size);
                while s > lowest {
                    f(s, s.checked_add(self.size).ok_or_else(overflow)?);
                    s = match s.checked_sub(self.slide) {
                        Some(s) => s,
                        None => break,
                    };
                }
            }
            WindowKind::Cumulate => {
                let s = align(self.size)?;
                let first = (t - s) / self.slide + 1;
                for k in first..=self.size / self.slide {
                    f(s, s.checked_add(k * self.slide).ok_or_else(overflow)?);
                }
            }
        }
        Ok(())
    }

    /// Expands `batch` into one row per (row, window) and appends `window_start` and
    /// `window_end` columns (same type as the time column). Returns the expanded batch and,
    /// per output row, the input row it came from.
    pub fn expand(
        &self,
        batch: &RecordBatch,
        time_col: usize,
        out_schema: datafusion::arrow::datatypes::SchemaRef,
    ) -> Result<(RecordBatch, Option<UInt32Array>)> {
        let col = batch.column(time_col);
        let (times, tz) = time_column(col)?;
        let n = batch.num_rows();
        let mut starts = Vec::with_capacity(n);
        let mut ends = Vec::with_capacity(n);
        let (indices, columns) = if self.kind == WindowKind::Tumble && times.null_count() == 0 {
            // One window per row: no row is repeated or dropped.
            for &t in times.values().iter() {
                self.assign(t, |s, e| {
                    starts.push(s);
                    ends.push(e);
                })?;
            }
            (None, batch.columns().to_vec())
        } else {
            let mut idx: Vec<u32> = Vec::with_capacity(n);
            for row in 0..n {
                if times.is_null(row) {
                    continue;
                }
                self.assign(times.value(row), |s, e| {
                    idx.push(row as u32);
                    starts.push(s);
                    ends.push(e);
                })?;
            }
            let idx = UInt32Array::from(idx);
            let cols = batch
                .columns()
                .iter()
                .map(|c| take(c.as_ref(), &idx, None))
                .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
            (Some(idx), cols)
        };
        let mut columns = columns;
        columns.extend(bound_columns(starts, ends, tz));
        let rows = indices.as_ref().map(|i| i.len()).unwrap_or(n);
        let opts = datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(rows));
        let out = RecordBatch::try_new_with_options(out_schema, columns, &opts)?;
        Ok((out, indices))
    }
}

/// A window function's time column: its values, and its time zone (which the window
/// bounds keep).
fn time_column(col: &ArrayRef) -> Result<(&TimestampMicrosecondArray, Option<Arc<str>>)> {
    match col.data_type() {
        DataType::Timestamp(TimeUnit::Microsecond, tz) => {
            Ok((col.as_primitive::<TimestampMicrosecondType>(), tz.clone()))
        }
        other => Err(KappaError::user(
            SqlState::DATATYPE_MISMATCH,
            format!("window time column must be a TIMESTAMP, not {other}"),
        )),
    }
}

/// The `window_start` and `window_end` columns, in the time column's time zone.
pub fn bound_columns(starts: Vec<i64>, ends: Vec<i64>, tz: Option<Arc<str>>) -> [ArrayRef; 2] {
    [
        Arc::new(TimestampMicrosecondArray::from(starts).with_timezone_opt(tz.clone())),
        Arc::new(TimestampMicrosecondArray::from(ends).with_timezone_opt(tz)),
    ]
}

/// A session window's parameters: the gap (microseconds) and the partition columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionSpec {
    pub gap: i64,
    pub partition: Vec<usize>,
}

impl SessionSpec {
    pub fn new(gap: i64, partition: Vec<usize>) -> Result<Self> {
        if gap <= 0 {
            return Err(invalid("SESSION gap must be a positive interval".into()));
        }
        Ok(Self { gap, partition })
    }

    /// The sessions over the times `sorted` (ascending, repeats allowed) of one partition,
    /// as `[start, end)` in ascending order.
    pub fn sessions(&self, sorted: impl IntoIterator<Item = i64>) -> Vec<(i64, i64)> {
        let mut out: Vec<(i64, i64)> = Vec::new();
        for t in sorted {
            let end = t.saturating_add(self.gap);
            match out.last_mut() {
                Some(last) if t < last.1 => last.1 = last.1.max(end),
                _ => out.push((t, end)),
            }
        }
        out
    }

    /// Every row of `batches` (NULL times dropped) with the bounds of its session appended,
    /// computed over all of them: the batch form of the streaming operator, for ad-hoc
    /// queries.
    pub fn assign_all(
        &self,
        batches: &[RecordBatch],
        time_col: usize,
        out_schema: datafusion::arrow::datatypes::SchemaRef,
    ) -> Result<RecordBatch> {
        use datafusion::arrow::row::{RowConverter, SortField};
        let in_schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Ok(RecordBatch::new_empty(out_schema)),
        };
        let all = datafusion::arrow::compute::concat_batches(&in_schema, batches)?;
        let col = all.column(time_col);
        let (times, tz) = time_column(col)?;
        let keys: Vec<ArrayRef> = self
            .partition
            .iter()
            .map(|&c| all.column(c).clone())
            .collect();
        let conv = RowConverter::new(
            keys.iter()
                .map(|k| SortField::new(k.data_type().clone()))
                .collect(),
        )?;
        let rows = conv.convert_columns(&keys)?;
        let mut parts: std::collections::HashMap<&[u8], Vec<(i64, u32)>> = Default::default();
        for i in (0..all.num_rows()).filter(|&i| times.is_valid(i)) {
            let key: &[u8] = if keys.is_empty() {
                &[]
            } else {
                rows.row(i).data()
            };
            parts
                .entry(key)
                .or_default()
                .push((times.value(i), i as u32));
        }
        let (mut idx, mut starts, mut ends) = (vec![], vec![], vec![]);
        for part in parts.values_mut() {
            part.sort_unstable();
            let sessions = self.sessions(part.iter().map(|p| p.0));
            let mut s = 0;
            for &(t, i) in part.iter() {
                while t >= sessions[s].1 {
                    s += 1;
                }
                idx.push(i);
                starts.push(sessions[s].0);
                ends.push(sessions[s].1);
            }
        }
        let idx = UInt32Array::from(idx);
        let mut columns = all
            .columns()
            .iter()
            .map(|c| take(c.as_ref(), &idx, None))
            .collect::<std::result::Result<Vec<ArrayRef>, _>>()?;
        columns.extend(bound_columns(starts, ends, tz));
        let opts =
            datafusion::arrow::array::RecordBatchOptions::new().with_row_count(Some(idx.len()));
        Ok(RecordBatch::try_new_with_options(
            out_schema, columns, &opts,
        )?)
    }
}

impl fmt::Display for SessionSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SESSION(gap={}us)", self.gap)
    }
}

/// What a window table function computes: fixed windows (each row's own) or sessions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TableWindow {
    Fixed(WindowSpec),
    Session(SessionSpec),
}

impl TableWindow {
    /// The windows of all of `batches` (a whole relation), for ad-hoc queries.
    pub fn expand_all(
        &self,
        batches: &[RecordBatch],
        time_col: usize,
        out_schema: datafusion::arrow::datatypes::SchemaRef,
    ) -> Result<Vec<RecordBatch>> {
        match self {
            Self::Fixed(spec) => batches
                .iter()
                .map(|b| spec.expand(b, time_col, out_schema.clone()).map(|(b, _)| b))
                .collect(),
            Self::Session(spec) => Ok(vec![spec.assign_all(batches, time_col, out_schema)?]),
        }
    }
}

impl fmt::Display for TableWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Fixed(s) => s.fmt(f),
            Self::Session(s) => s.fmt(f),
        }
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let us = |v: i64| format!("{v}us");
        match self.kind {
            WindowKind::Tumble => write!(f, "TUMBLE(size={}", us(self.size))?,
            WindowKind::Hop => write!(f, "HOP(slide={}, size={}", us(self.slide), us(self.size))?,
            WindowKind::Cumulate => write!(
                f,
                "CUMULATE(step={}, size={}",
                us(self.slide),
                us(self.size)
            )?,
        }
        if self.offset != 0 {
            write!(f, ", offset={}", us(self.offset))?;
        }
        write!(f, ")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn windows(spec: WindowSpec, t: i64) -> Vec<(i64, i64)> {
        let mut v = vec![];
        spec.assign(t, |s, e| v.push((s, e))).unwrap();
        v.sort();
        v
    }

    #[test]
    fn tumble() {
        let w = WindowSpec::new(WindowKind::Tumble, 10, 10, 0).unwrap();
        assert_eq!(windows(w, 0), vec![(0, 10)]);
        assert_eq!(windows(w, 9), vec![(0, 10)]);
        assert_eq!(windows(w, 10), vec![(10, 20)]);
        assert_eq!(windows(w, -1), vec![(-10, 0)]);
        let w = WindowSpec::new(WindowKind::Tumble, 10, 10, 3).unwrap();
        assert_eq!(windows(w, 2), vec![(-7, 3)]);
        assert_eq!(windows(w, 3), vec![(3, 13)]);
    }

    #[test]
    fn hop() {
        let w = WindowSpec::new(WindowKind::Hop, 10, 2, 0).unwrap();
        assert_eq!(
            windows(w, 9),
            vec![(0, 10), (2, 12), (4, 14), (6, 16), (8, 18)]
        );
        assert_eq!(windows(w, 10).len(), 5);
        // Slide that does not divide the size: windows start at multiples of 4.
        let w = WindowSpec::new(WindowKind::Hop, 10, 4, 0).unwrap();
        assert_eq!(windows(w, 9), vec![(0, 10), (4, 14), (8, 18)]);
        assert_eq!(windows(w, 11), vec![(4, 14), (8, 18)]);
    }

    #[test]
    fn sessions() {
        let s = SessionSpec::new(10, vec![]).unwrap();
        assert_eq!(s.sessions([]), vec![]);
        assert_eq!(s.sessions([5]), vec![(5, 15)]);
        // 14 - 5 < 10 joins; 24 - 14 = 10 does not.
        assert_eq!(s.sessions([5, 5, 14, 24]), vec![(5, 24), (24, 34)]);
        assert!(SessionSpec::new(0, vec![]).is_err());
    }

    #[test]
    fn cumulate() {
        let w = WindowSpec::new(WindowKind::Cumulate, 10, 2, 0).unwrap();
        assert_eq!(windows(w, 0), vec![(0, 2), (0, 4), (0, 6), (0, 8), (0, 10)]);
        assert_eq!(windows(w, 5), vec![(0, 6), (0, 8), (0, 10)]);
        assert_eq!(windows(w, 19), vec![(10, 20)]);
        assert!(WindowSpec::new(WindowKind::Cumulate, 10, 3, 0).is_err());
        assert!(WindowSpec::new(WindowKind::Tumble, 0, 0, 0).is_err());
    }
}

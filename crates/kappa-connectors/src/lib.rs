//! Connectors: where a source's rows come from.
//!
//! A connector is a [`SourceReader`]: an append-only stream of Arrow batches, split at
//! offsets (events), that can be read from any offset again. The runtime polls it at each
//! barrier; a materialized view created later replays the source from offset 0, so a
//! deterministic connector (a generator with a seed) gives every view the same stream.

pub mod datagen;
pub mod nexmark;
mod rng;

use std::collections::BTreeMap;

use datafusion::arrow::array::{ArrayRef, RecordBatch, new_null_array};
use datafusion::arrow::datatypes::{Field, SchemaRef};
use datafusion::common::ScalarValue;
use kappa_common::{KappaError, Result, SqlState};

/// What one poll returned.
pub struct Poll {
    pub batches: Vec<RecordBatch>,
    /// The stream has ended: nothing will ever follow.
    pub finished: bool,
}

/// A live source stream.
pub trait SourceReader: Send {
    /// Everything available now, without waiting, up to roughly `max_rows` rows.
    fn poll(&mut self, max_rows: usize) -> Result<Poll>;

    /// The rows from offset `from` up to (excluding) offset `to`, in the same batches `poll`
    /// hands out when `from` is where a poll began.
    fn read_range(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>>;

    /// Continues the stream at offset `rows`: the next poll starts there. Recovery uses it
    /// after replaying a source's history.
    fn seek(&mut self, rows: u64) -> Result<()>;

    /// The rows from the start of the stream up to (excluding) row offset `rows`, as a
    /// view created later replays them.
    fn replay(&self, rows: u64) -> Result<Vec<RecordBatch>> {
        self.read_range(0, rows)
    }

    /// Tells the reader which of its schema's columns anyone reads: the views' scans and
    /// the watermark expression. It may leave the others unfilled ([`unread_column`]),
    /// which spares generating or decoding them. Every batch handed out after this call,
    /// by any method, holds real values in every column of `read`. A reader that ignores
    /// the call fills every column.
    fn set_columns_read(&mut self, _read: ColumnSet) {}
}

/// A set of a schema's columns by position. Columns from 64 on are always in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnSet(u64);

impl ColumnSet {
    pub const ALL: ColumnSet = ColumnSet(u64::MAX);
    pub const NONE: ColumnSet = ColumnSet(0);

    pub fn of(columns: impl IntoIterator<Item = usize>) -> Self {
        let mut bits = 0;
        for c in columns {
            bits |= if c >= 64 { u64::MAX } else { 1 << c };
        }
        ColumnSet(bits)
    }

    pub fn contains(self, column: usize) -> bool {
        column >= 64 || self.0 & (1 << column) != 0
    }

    /// Every column of `other` is in this set.
    pub fn covers(self, other: ColumnSet) -> bool {
        other.0 & !self.0 == 0
    }

    pub fn union(self, other: ColumnSet) -> ColumnSet {
        ColumnSet(self.0 | other.0)
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    pub fn from_bits(bits: u64) -> Self {
        ColumnSet(bits)
    }
}

/// A column nobody reads, `n` rows of it: NULL, or where the column is NOT NULL its type's
/// zero (0, '', false, the epoch). Costs a zeroed buffer, not a generated value.
pub fn unread_column(field: &Field, n: usize) -> Result<ArrayRef> {
    if field.is_nullable() {
        return Ok(new_null_array(field.data_type(), n));
    }
    Ok(ScalarValue::new_default(field.data_type())?.to_array_of_size(n)?)
}

/// Splits `[from, to)` at multiples of `chunk`: the batches a chunked generator hands out.
pub(crate) fn chunks(from: u64, to: u64, chunk: u64) -> impl Iterator<Item = (u64, u64)> {
    let chunk = chunk.max(1);
    let mut start = from;
    std::iter::from_fn(move || {
        if start >= to {
            return None;
        }
        let end = ((start / chunk + 1) * chunk).min(to);
        let range = (start, end);
        start = end;
        Some(range)
    })
}

/// Builds the reader for `CREATE SOURCE … WITH (connector = …, …)` producing `schema`.
pub fn create_reader(
    options: &BTreeMap<String, String>,
    schema: SchemaRef,
) -> Result<Box<dyn SourceReader>> {
    match options.get("connector").map(String::as_str) {
        Some("nexmark") => Ok(Box::new(nexmark::NexmarkReader::start(
            nexmark::NexmarkConfig::from_options(options)?,
            schema,
        )?)),
        Some("datagen") => Ok(Box::new(datagen::DatagenReader::start(options, schema)?)),
        Some(other) => Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("unknown connector '{other}' (available: nexmark, datagen)"),
        )),
        None => Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            "CREATE SOURCE needs WITH (connector = '…')",
        )),
    }
}

/// Parses an integer option, with a clear error.
pub(crate) fn int_option(
    options: &BTreeMap<String, String>,
    key: &str,
    default: Option<u64>,
) -> Result<Option<u64>> {
    match options.get(key) {
        None => Ok(default),
        Some(v) => v
            .trim()
            .replace('_', "")
            .parse::<u64>()
            .map(Some)
            .map_err(|_| {
                KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("option {key} must be a non-negative integer, not '{v}'"),
                )
            }),
    }
}

/// Refuses options the connector does not know (typos must not be silently ignored).
pub(crate) fn check_known(options: &BTreeMap<String, String>, known: &[&str]) -> Result<()> {
    for k in options.keys() {
        if k != "connector" && !known.contains(&k.as_str()) {
            return Err(KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("unknown option \"{k}\" (known: {})", known.join(", ")),
            ));
        }
    }
    Ok(())
}

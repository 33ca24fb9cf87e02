//! Connectors: where a source's rows come from.
//!
//! A connector is a [`Source`] (see `source.rs` for the contract): a stream of changes with
//! an envelope and opaque positions, which the runtime polls at each barrier, reads again
//! between two positions (recovery, and a view created later, which replays it from its
//! earliest position), and tells when a checkpoint holding a position is durable. The
//! generators here are deterministic functions of their options and a row number, so every
//! view gets the same stream.

pub mod datagen;
pub mod nexmark;
mod rng;
pub mod sink;
pub mod source;

pub use sink::{FileSink, Sink};
pub use source::{Poll, Position, Source};

use std::collections::BTreeMap;

use datafusion::arrow::array::{ArrayRef, RecordBatch, new_null_array};
use datafusion::arrow::datatypes::{Field, SchemaRef};
use datafusion::common::ScalarValue;
use kappa_common::{KappaError, Result, SqlState};

/// What a generator's poll returned: append-only batches, and whether the stream ended.
pub struct Batches {
    pub batches: Vec<RecordBatch>,
    /// The stream has ended: nothing will ever follow.
    pub finished: bool,
}

/// A generator, split at row offsets: a [`Source`] whose position is a row count.
pub(crate) trait RowStream: Send {
    /// Everything available now, up to roughly `max_rows` rows.
    fn poll_batches(&mut self, max_rows: usize) -> Result<Batches>;
    /// The rows from offset `from` up to (excluding) `to`, in the batches `poll_batches`
    /// hands out when `from` is where a poll began.
    fn read_rows(&self, from: u64, to: u64) -> Result<Vec<RecordBatch>>;
    /// Continues at row `rows`.
    fn seek_rows(&mut self, rows: u64) -> Result<()>;
    /// The next poll's first row.
    fn next_row(&self) -> u64;
    fn set_read(&mut self, read: ColumnSet);
}

/// Every row stream is a source whose position is its row count (one split), which can
/// replay from row 0, and whose rows are inserts.
impl<T: RowStream> Source for T {
    fn position(&self) -> Position {
        Position::rows(self.next_row())
    }

    fn earliest(&self) -> Position {
        Position::rows(0)
    }

    fn poll(&mut self, max_rows: usize) -> Result<Poll> {
        let b = self.poll_batches(max_rows)?;
        Ok(Poll::inserts(b.batches, b.finished))
    }

    fn read_range(&self, from: &Position, to: &Position) -> Result<Vec<kappa_common::ChangeBatch>> {
        Ok(self
            .read_rows(from.as_rows()?, to.as_rows()?)?
            .into_iter()
            .map(kappa_common::ChangeBatch::inserts)
            .collect())
    }

    fn seek(&mut self, to: &Position) -> Result<()> {
        self.seek_rows(to.as_rows()?)
    }

    fn rows_until(&self, at: &Position) -> Option<u64> {
        at.as_rows().ok()
    }

    fn set_columns_read(&mut self, read: ColumnSet) {
        self.set_read(read);
    }
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

/// Builds the source for `CREATE SOURCE … WITH (connector = …, …)` producing `schema`.
pub fn create_source(
    options: &BTreeMap<String, String>,
    schema: SchemaRef,
) -> Result<Box<dyn Source>> {
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

/// Builds the sink for `CREATE SINK … WITH (connector = …, …)` writing `columns`' changes.
pub fn create_sink(
    options: &BTreeMap<String, String>,
    columns: &datafusion::arrow::datatypes::Schema,
) -> Result<Box<dyn Sink>> {
    match options.get("connector").map(String::as_str) {
        Some("file") => Ok(Box::new(FileSink::new(options, columns)?)),
        Some(other) => Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("unknown sink connector '{other}' (available: file)"),
        )),
        None => Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            "CREATE SINK needs WITH (connector = '…')",
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

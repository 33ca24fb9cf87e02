//! One representation of change, everywhere: an Arrow batch plus a signed weight per row.

use datafusion::arrow::array::{Array, ArrayRef, Int64Array, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;
use datafusion::arrow::datatypes::SchemaRef;

use crate::{KappaError, Result};

/// The multiplicity of a row in a change: `+n` inserts `n` copies, `-n` deletes `n` copies.
/// An update is a `-1` for the old row and a `+1` for the new one.
pub type Weight = i64;

/// A batch of changes to one relation.
///
/// # Invariants
/// - `weights.len() == data.num_rows()` and `weights` has no nulls.
/// - A weight is never 0 after [`ChangeBatch::new`]'s caller is done; operators may produce
///   zero weights transiently but filter them before emitting.
/// - Applying a batch to a multiset `M` means: for each row `r` with weight `w`, `M[r] += w`.
///   A relation's contents are the sum of all batches ever applied; every count stays ≥ 0.
#[derive(Clone, Debug)]
pub struct ChangeBatch {
    data: RecordBatch,
    weights: Int64Array,
}

impl ChangeBatch {
    pub fn new(data: RecordBatch, weights: Int64Array) -> Result<Self> {
        if weights.len() != data.num_rows() || weights.null_count() != 0 {
            return Err(KappaError::internal(format!(
                "change batch has {} rows but {} weights ({} null)",
                data.num_rows(),
                weights.len(),
                weights.null_count()
            )));
        }
        Ok(Self { data, weights })
    }

    /// Every row inserted once.
    pub fn inserts(data: RecordBatch) -> Self {
        let weights = Int64Array::from_value(1, data.num_rows());
        Self { data, weights }
    }

    /// Every row deleted once.
    pub fn deletes(data: RecordBatch) -> Self {
        let weights = Int64Array::from_value(-1, data.num_rows());
        Self { data, weights }
    }

    pub fn data(&self) -> &RecordBatch {
        &self.data
    }

    pub fn weights(&self) -> &Int64Array {
        &self.weights
    }

    pub fn schema(&self) -> SchemaRef {
        self.data.schema()
    }

    pub fn num_rows(&self) -> usize {
        self.data.num_rows()
    }

    pub fn is_empty(&self) -> bool {
        self.data.num_rows() == 0
    }

    pub fn columns(&self) -> &[ArrayRef] {
        self.data.columns()
    }

    /// The same changes over other columns (same row count), e.g. after a projection.
    pub fn with_data(&self, data: RecordBatch) -> Result<Self> {
        Self::new(data, self.weights.clone())
    }

    /// Keeps the rows where `mask` is true (null counts as false).
    pub fn filter(&self, mask: &datafusion::arrow::array::BooleanArray) -> Result<Self> {
        let data = filter_record_batch(&self.data, mask)?;
        let weights = datafusion::arrow::compute::filter(&self.weights, mask)?;
        Self::new(data, as_weights(&weights)?)
    }

    /// Rows `offset..offset + len` (zero-copy). Panics if the range is out of bounds.
    pub fn slice(&self, offset: usize, len: usize) -> Self {
        Self {
            data: self.data.slice(offset, len),
            weights: self.weights.slice(offset, len),
        }
    }

    /// The rows at `indices`, in that order.
    pub fn take(&self, indices: &datafusion::arrow::array::UInt32Array) -> Result<Self> {
        let data = datafusion::arrow::compute::take_record_batch(&self.data, indices)?;
        let weights = datafusion::arrow::compute::take(&self.weights, indices, None)?;
        Self::new(data, as_weights(&weights)?)
    }

    pub fn into_parts(self) -> (RecordBatch, Int64Array) {
        (self.data, self.weights)
    }
}

/// Weights selected from a batch's by an Arrow kernel (which returns an untyped array).
fn as_weights(a: &ArrayRef) -> Result<Int64Array> {
    a.as_any()
        .downcast_ref::<Int64Array>()
        .cloned()
        .ok_or_else(|| KappaError::internal("weights are not Int64"))
}

impl std::fmt::Display for ChangeBatch {
    /// Prints the changelog as `+ a | b` / `- a | b` lines, one per unit of weight sign.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
        let opts = FormatOptions::default().with_null("NULL");
        let fmts: Vec<_> = self
            .data
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &opts))
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| std::fmt::Error)?;
        for row in 0..self.num_rows() {
            let w = self.weights.value(row);
            let sign = if w > 0 { "+" } else { "-" };
            let cells: Vec<String> = fmts.iter().map(|c| c.value(row).to_string()).collect();
            if w.abs() == 1 {
                writeln!(f, "{sign} {}", cells.join(" | "))?;
            } else {
                writeln!(f, "{sign}{} {}", w.abs(), cells.join(" | "))?;
            }
        }
        Ok(())
    }
}

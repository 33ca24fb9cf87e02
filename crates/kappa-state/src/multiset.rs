//! A relation's contents: a multiset of rows, stored as encoded row → count.
//!
//! Rows are encoded with Arrow's row format, which is order-preserving, so the stored order
//! is the rows' sort order and a snapshot decodes back into Arrow batches without any
//! per-row allocation beyond the key itself.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch, UInt32Array};
use datafusion::arrow::compute::take_record_batch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use kappa_common::{ChangeBatch, Result};

use crate::{StateSnapshot, StateTable, add_to_count, decode_count};

/// Builds the row converter for a schema (all columns, ascending, nulls first).
pub fn row_converter(schema: &SchemaRef) -> Result<RowConverter> {
    let fields = schema
        .fields()
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    Ok(RowConverter::new(fields)?)
}

/// The keys of a batch's rows over some (already evaluated) key columns, in a converter's
/// row format. With no key columns every key is empty — the one group or partition of a
/// query without `GROUP BY` / `PARTITION BY`; Arrow's converter cannot represent rows of
/// zero columns, so this is the one place that special case lives.
#[derive(Default)]
pub struct KeyRows(Option<datafusion::arrow::row::Rows>);

impl KeyRows {
    pub fn new(conv: &RowConverter, cols: &[ArrayRef]) -> Result<Self> {
        Ok(Self(if cols.is_empty() {
            None
        } else {
            Some(conv.convert_columns(cols)?)
        }))
    }

    /// Row `i`'s key.
    pub fn get(&self, i: usize) -> &[u8] {
        self.0.as_ref().map_or(&[], |r| r.row(i).data())
    }
}

/// Rows in `conv`'s row format (as stored in state), back as columns.
pub fn decode_rows<'a>(
    conv: &RowConverter,
    rows: impl IntoIterator<Item = &'a [u8]>,
) -> Result<Vec<ArrayRef>> {
    let parser = conv.parser();
    Ok(conv.convert_rows(rows.into_iter().map(|r| parser.parse(r)))?)
}

/// A multiset of rows of one schema over a [`StateTable`].
///
/// # Invariant
/// Every stored count is > 0; a row whose count reaches 0 is removed. A change that would
/// make a count negative is refused with an internal error: it means some upstream
/// operator retracted a row it never emitted.
pub struct RowMultiset {
    schema: SchemaRef,
    converter: RowConverter,
    table: Box<dyn StateTable>,
}

impl RowMultiset {
    pub fn new(schema: SchemaRef, table: Box<dyn StateTable>) -> Result<Self> {
        let converter = row_converter(&schema)?;
        Ok(Self {
            schema,
            converter,
            table,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Number of distinct rows.
    pub fn distinct_rows(&self) -> usize {
        self.table.len()
    }

    pub fn apply(&mut self, change: &ChangeBatch) -> Result<()> {
        if change.is_empty() {
            return Ok(());
        }
        let rows = self.converter.convert_columns(change.columns())?;
        let weights = change.weights();
        for (i, row) in rows.iter().enumerate() {
            add_to_count(
                self.table.as_mut(),
                row.as_ref(),
                weights.value(i),
                &self.schema,
            )?;
        }
        Ok(())
    }

    /// Count of an exact row, given in encoded form.
    pub fn count_encoded(&self, key: &[u8]) -> i64 {
        self.table.get(key).map(|v| decode_count(&v)).unwrap_or(0)
    }

    pub fn converter(&self) -> &RowConverter {
        &self.converter
    }

    pub fn snapshot(&self) -> MultisetSnapshot {
        MultisetSnapshot {
            schema: self.schema.clone(),
            state: self.table.snapshot(),
        }
    }
}

/// The immutable contents of a relation at one epoch.
#[derive(Clone)]
pub struct MultisetSnapshot {
    schema: SchemaRef,
    state: Arc<dyn StateSnapshot>,
}

impl MultisetSnapshot {
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    pub fn distinct_rows(&self) -> usize {
        self.state.len()
    }

    /// Decodes the contents into batches of at most `batch_size` distinct rows, each row
    /// repeated as often as it occurs.
    pub fn to_batches(&self, batch_size: usize) -> Result<Vec<RecordBatch>> {
        let converter = row_converter(&self.schema)?;
        let mut out = Vec::new();
        let mut keys = Vec::with_capacity(batch_size.min(self.state.len()));
        let mut counts = Vec::with_capacity(keys.capacity());
        let mut flush = |keys: &mut Vec<crate::Bytes>, counts: &mut Vec<i64>| -> Result<()> {
            if keys.is_empty() {
                return Ok(());
            }
            let columns = decode_rows(&converter, keys.iter().map(|k| &k[..]))?;
            let mut batch = RecordBatch::try_new(self.schema.clone(), columns)?;
            if counts.iter().any(|&c| c != 1) {
                let idx: UInt32Array = counts
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &c)| std::iter::repeat_n(i as u32, c.max(0) as usize))
                    .collect();
                batch = take_record_batch(&batch, &idx)?;
            }
            out.push(batch);
            keys.clear();
            counts.clear();
            Ok(())
        };
        for (k, v) in self.state.iter() {
            keys.push(k);
            counts.push(decode_count(&v));
            if keys.len() >= batch_size {
                flush(&mut keys, &mut counts)?;
            }
        }
        flush(&mut keys, &mut counts)?;
        Ok(out)
    }
}

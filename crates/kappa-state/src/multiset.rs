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

    /// The encoded keys (`None`: there are no key columns).
    pub fn into_rows(self) -> Option<datafusion::arrow::row::Rows> {
        self.0
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

    /// The table the multiset is stored in (for checkpoints).
    pub fn table_mut(&mut self) -> &mut dyn StateTable {
        &mut *self.table
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
        self.decode(self.state.iter(), batch_size)
    }

    /// The rows whose leading columns equal `leading` (one value per column, for the first
    /// `leading.len()` columns, each a one-row array of the column's type), found by a range
    /// scan: rows are stored in row-format order and a row's encoding begins with the
    /// encoding of its leading columns. Equality here is the row format's (byte) equality,
    /// which is SQL equality for integers, strings, booleans, decimals, dates and timestamps
    /// but not for floats (-0.0, NaN); callers only look up by the former.
    pub fn lookup(&self, leading: &[ArrayRef], batch_size: usize) -> Result<Vec<RecordBatch>> {
        let fields = self
            .schema
            .fields()
            .iter()
            .take(leading.len())
            .map(|f| SortField::new(f.data_type().clone()))
            .collect();
        let prefix = RowConverter::new(fields)?.convert_columns(leading)?;
        if prefix.num_rows() != 1 {
            return Err(kappa_common::KappaError::internal(
                "a lookup takes one value per leading column",
            ));
        }
        let prefix = prefix.row(0);
        self.decode(self.state.scan_prefix(prefix.data()), batch_size)
    }

    fn decode(
        &self,
        entries: impl Iterator<Item = (crate::Bytes, crate::Bytes)>,
        batch_size: usize,
    ) -> Result<Vec<RecordBatch>> {
        let converter = row_converter(&self.schema)?;
        let mut out = Vec::new();
        let mut keys = Vec::with_capacity(batch_size.min(self.state.len()).max(1));
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
        for (k, v) in entries {
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

#[cfg(test)]
mod tests {
    use datafusion::arrow::array::{Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Field, Schema};

    use super::*;
    use crate::MemStateTable;

    fn rows(owners: &[&str], ns: &[i64]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("owner", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(owners.to_vec())),
                Arc::new(Int64Array::from(ns.to_vec())),
            ],
        )
        .unwrap()
    }

    fn pairs(batches: &[RecordBatch]) -> Vec<(String, i64)> {
        let mut out = vec![];
        for b in batches {
            let o = b.column(0).as_any().downcast_ref::<StringArray>().unwrap();
            let n = b.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
            for i in 0..b.num_rows() {
                out.push((o.value(i).to_string(), n.value(i)));
            }
        }
        out
    }

    #[test]
    fn lookup_finds_exactly_the_rows_with_the_leading_values() {
        let b = rows(
            &["an", "ann", "ann", "ann", "anna", "bob"],
            &[1, 2, 3, 3, 4, 5],
        );
        let mut m = RowMultiset::new(b.schema(), Box::new(MemStateTable::default())).unwrap();
        m.apply(&ChangeBatch::inserts(b)).unwrap();
        let snap = m.snapshot();
        let owner = |s: &str| -> ArrayRef { Arc::new(StringArray::from(vec![s])) };
        let n = |v: i64| -> ArrayRef { Arc::new(Int64Array::from(vec![v])) };
        // Neither "an" nor "anna" shares the encoded prefix of "ann".
        assert_eq!(
            pairs(&snap.lookup(&[owner("ann")], 2).unwrap()),
            vec![("ann".into(), 2), ("ann".into(), 3), ("ann".into(), 3)]
        );
        assert_eq!(
            pairs(&snap.lookup(&[owner("ann"), n(3)], 8).unwrap()),
            vec![("ann".into(), 3), ("ann".into(), 3)]
        );
        assert!(snap.lookup(&[owner("zed")], 8).unwrap().is_empty());
    }
}

//! A partition's rows in a state table, in rank order (top-N, OVER), and input batches
//! keyed for it.
//!
//! Per partition, entries `len ‖ partition ‖ sort key ‖ row ‖ len(sort key)` → multiplicity
//! (8-byte count). Sort keys and rows are in Arrow's row format, whose encodings are
//! self-delimiting (none is a prefix of another), so the bytes of `sort key ‖ row` compare
//! like the pair and a partition's entries are one prefix range in rank order; the length
//! at the end only splits them. An operator may keep other keys under the bare prefix
//! (top-N keeps a header there); [`table_entries`] skips it.

use std::sync::Arc;

use datafusion::arrow::array::ArrayRef;
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Result};
use kappa_state::{KeyRows, StateTable};

type Bytes = Arc<[u8]>;

/// A partition's entry: sort key, row, multiplicity.
pub(crate) type PartEntry = (Bytes, Bytes, i64);

/// `len ‖ partition`: the prefix of a partition's entries' keys.
pub(crate) fn part_prefix(part: &[u8]) -> Vec<u8> {
    kappa_state::codec::len_prefix(part)
}

/// `len ‖ partition ‖ sort key ‖ row ‖ len(sort key)`: an entry's key.
pub(crate) fn entry_key(prefix: &[u8], sk: &[u8], row: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(prefix.len() + sk.len() + row.len() + 4);
    k.extend_from_slice(prefix);
    k.extend_from_slice(sk);
    k.extend_from_slice(row);
    k.extend_from_slice(&(sk.len() as u32).to_be_bytes());
    Arc::from(k)
}

/// An entry's sort key and row, from its key after the partition's prefix; `what` names
/// the operator when the key is damaged.
pub(crate) fn split_entry<'k>(rest: &'k [u8], what: &str) -> Result<(&'k [u8], &'k [u8])> {
    let damaged = || kappa_state::codec::damaged(what);
    let (pair, len) = rest
        .split_at_checked(rest.len().wrapping_sub(4))
        .ok_or_else(damaged)?;
    let len = u32::from_be_bytes(len.try_into().map_err(|_| damaged())?) as usize;
    pair.split_at_checked(len).ok_or_else(damaged)
}

/// A stored partition's entries (after whatever sits under the bare prefix), in rank order.
pub(crate) fn table_entries<'a>(
    table: &'a dyn StateTable,
    prefix: &'a [u8],
    what: &'a str,
) -> impl Iterator<Item = Result<PartEntry>> + 'a {
    table
        .scan_prefix(prefix)
        .filter(move |(k, _)| k.len() > prefix.len())
        .map(move |(k, v)| {
            let (sk, row) = split_entry(&k[prefix.len()..], what)?;
            Ok((Arc::from(sk), Arc::from(row), kappa_state::decode_count(&v)))
        })
}

/// A batch keyed for a partitioned, ordered operator: its partition columns, and per row
/// the partition key and sort key (Arrow's row format; empty without such columns) and the
/// row itself.
pub(crate) struct KeyedBatch {
    pub part_cols: Vec<ArrayRef>,
    pub part_keys: KeyRows,
    pub sort_keys: KeyRows,
    pub rows: Rows,
}

/// How a partitioned, ordered operator encodes its input: partition keys, sort keys (with
/// each ORDER BY key's direction and null placement) and whole rows, in Arrow's row format.
pub(crate) struct RowKeys {
    part_keys: RowConverter,
    sort_keys: RowConverter,
    /// Whole input rows (also how the operator decodes what it stored).
    pub rows: RowConverter,
}

impl RowKeys {
    pub fn new(
        partition: &[(Arc<dyn PhysicalExpr>, DataType)],
        order: &[crate::SortKey],
        input: &SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            part_keys: RowConverter::new(
                partition
                    .iter()
                    .map(|(_, t)| SortField::new(t.clone()))
                    .collect(),
            )?,
            sort_keys: RowConverter::new(
                order
                    .iter()
                    .map(|(_, t, o)| SortField::new_with_options(t.clone(), *o))
                    .collect(),
            )?,
            rows: kappa_state::row_converter(input)?,
        })
    }

    /// Evaluates the partition and ORDER BY expressions over `batch` and encodes its rows.
    pub fn key(
        &self,
        batch: &ChangeBatch,
        partition: &[(Arc<dyn PhysicalExpr>, DataType)],
        order: &[crate::SortKey],
    ) -> Result<KeyedBatch> {
        let n = batch.num_rows();
        let eval = |e: &Arc<dyn PhysicalExpr>| -> Result<ArrayRef> {
            Ok(e.evaluate(batch.data())?.into_array(n)?)
        };
        let part_cols = partition
            .iter()
            .map(|(e, _)| eval(e))
            .collect::<Result<Vec<_>>>()?;
        let sort_cols = order
            .iter()
            .map(|(e, _, _)| eval(e))
            .collect::<Result<Vec<_>>>()?;
        Ok(KeyedBatch {
            part_keys: KeyRows::new(&self.part_keys, &part_cols)?,
            sort_keys: KeyRows::new(&self.sort_keys, &sort_cols)?,
            rows: self.rows.convert_columns(batch.columns())?,
            part_cols,
        })
    }
}

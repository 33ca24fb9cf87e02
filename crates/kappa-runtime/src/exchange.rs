//! Keyed parallelism: how a view's changes move between its shards.
//!
//! A view running with parallelism `P` has up to `P` copies (shards) of each node's operator,
//! each with its own state. What a node's shards together emit must be what one copy would
//! emit over the whole input, so the node's [`Distribution`](kappa_plan::Distribution)
//! decides which shard sees which rows: by a hash of the node's keys (the rows of one group,
//! join key or partition all meet in one shard and nowhere else), all in one shard, or
//! wherever they already are.
//!
//! # Order
//! Within an epoch the changes of one row must reach an operator in the order they were
//! made (a retraction after the insertion it retracts). Sources are split into contiguous
//! runs (shard 0 the first rows of the epoch, shard 1 the next), stateless operators keep
//! order, a keyed operator emits a key's changes from one shard, and an exchange delivers
//! the producer shards' changes in shard order: so every row's changes arrive in order.
//!
//! # Stability
//! The shard of a key is `hash(key) * P >> 64` with DataFusion's `create_hashes` at a fixed
//! seed over the key values (cast to the node's key types, so both sides of a join agree).
//! Checkpointed shard state is only valid for the same hash and the same `P`: a view
//! restored from a checkpoint keeps the parallelism it was created with.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, UInt32Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::DataType;
use datafusion::common::hash_utils::{RandomState, create_hashes};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Result};

/// How the batches of one input of a node reach the node's shards.
pub(crate) enum Route {
    /// Producer shard `k`'s batches go to consumer shard `k` (the consumer has at least as
    /// many shards as the producer).
    Forward,
    /// Every batch goes to the consumer's only shard.
    Single,
    /// Each row goes to the shard its key values hash to.
    Hash {
        keys: Vec<Arc<dyn PhysicalExpr>>,
        types: Vec<DataType>,
    },
}

const SEED: u64 = 0x6b61_7070_615f_7368; // "kappa_sh"

/// The shard of each row of `batch` under `keys` (evaluated and cast to `types`), among `n`.
pub(crate) fn shard_of_rows(
    batch: &ChangeBatch,
    keys: &[Arc<dyn PhysicalExpr>],
    types: &[DataType],
    n: usize,
) -> Result<Vec<u32>> {
    let rows = batch.num_rows();
    let mut arrays: Vec<ArrayRef> = Vec::with_capacity(keys.len());
    for (k, t) in keys.iter().zip(types) {
        let a = k.evaluate(batch.data())?.into_array(rows)?;
        arrays.push(if a.data_type() == t { a } else { cast(&a, t)? });
    }
    let mut hashes = vec![0u64; rows];
    create_hashes(&arrays, &RandomState::with_seed(SEED), &mut hashes)?;
    Ok(hashes
        .into_iter()
        .map(|h| ((u128::from(h) * n as u128) >> 64) as u32)
        .collect())
}

/// `batch` split by hash into `n` parts, in shard order; a part is `None` when no row goes
/// there. Rows keep their order within a part.
pub(crate) fn partition(
    batch: &ChangeBatch,
    keys: &[Arc<dyn PhysicalExpr>],
    types: &[DataType],
    n: usize,
) -> Result<Vec<Option<ChangeBatch>>> {
    let mut parts: Vec<Option<ChangeBatch>> = (0..n).map(|_| None).collect();
    if batch.is_empty() {
        return Ok(parts);
    }
    let shards = shard_of_rows(batch, keys, types, n)?;
    if let Some(&first) = shards.first()
        && shards.iter().all(|&s| s == first)
    {
        parts[first as usize] = Some(batch.clone());
        return Ok(parts);
    }
    let mut idx: Vec<Vec<u32>> = vec![Vec::with_capacity(shards.len() / n + 1); n];
    for (row, &s) in shards.iter().enumerate() {
        idx[s as usize].push(row as u32);
    }
    for (part, rows) in parts.iter_mut().zip(idx) {
        if rows.is_empty() {
            continue;
        }
        let rows = UInt32Array::from(rows);
        *part = Some(batch.take(&rows)?);
    }
    Ok(parts)
}

/// A source's batches of one epoch split into `n` contiguous runs of about equal row
/// counts (batches are sliced, not copied, where a run ends inside one).
pub(crate) fn split_contiguous(batches: &[ChangeBatch], n: usize) -> Vec<Vec<ChangeBatch>> {
    let mut out: Vec<Vec<ChangeBatch>> = (0..n).map(|_| Vec::new()).collect();
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    if n == 1 || total == 0 {
        out[0] = batches.to_vec();
        return out;
    }
    // Shard k takes rows [k * total / n, (k + 1) * total / n) of the epoch.
    let bound = |k: usize| k * total / n;
    let mut shard = 0;
    let mut start = 0; // the epoch's row at which the current batch starts
    for b in batches {
        let len = b.num_rows();
        let mut off = 0;
        while off < len {
            while start + off >= bound(shard + 1) && shard + 1 < n {
                shard += 1;
            }
            let end = if shard + 1 < n {
                (bound(shard + 1) - start).min(len)
            } else {
                len
            };
            out[shard].push(if off == 0 && end == len {
                b.clone()
            } else {
                b.slice(off, end - off)
            });
            off = end;
        }
        start += len;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Array, Int64Array};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::arrow::record_batch::RecordBatch;
    use datafusion::physical_expr::expressions::Column;

    fn batch(values: &[i64], weights: &[i64]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, true)]));
        let data = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(values.to_vec())) as ArrayRef],
        )
        .unwrap();
        ChangeBatch::new(data, Int64Array::from(weights.to_vec())).unwrap()
    }

    fn values(b: &ChangeBatch) -> Vec<(i64, i64)> {
        let k = b
            .data()
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        (0..b.num_rows())
            .map(|i| (k.value(i), b.weights().value(i)))
            .collect()
    }

    #[test]
    fn equal_keys_meet_in_one_shard_in_order() {
        let key: Vec<Arc<dyn PhysicalExpr>> = vec![Arc::new(Column::new("k", 0))];
        let b = batch(&[1, 2, 3, 1, 2, 3, 1], &[1, 1, 1, -1, -1, 2, 1]);
        let parts = partition(&b, &key, &[DataType::Int64], 2).unwrap();
        let mut seen = vec![];
        for (shard, p) in parts.iter().enumerate() {
            for (k, w) in p.as_ref().map(values).unwrap_or_default() {
                seen.push((k, shard, w));
            }
        }
        for k in [1, 2, 3] {
            let shards: Vec<usize> = seen.iter().filter(|s| s.0 == k).map(|s| s.1).collect();
            assert!(
                shards.windows(2).all(|w| w[0] == w[1]),
                "key {k}: {shards:?}"
            );
        }
        let ones: Vec<i64> = seen.iter().filter(|s| s.0 == 1).map(|s| s.2).collect();
        assert_eq!(ones, vec![1, -1, 1]);
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn a_join_key_hashes_alike_on_both_sides_after_the_cast() {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int32, true)]));
        let data = RecordBatch::try_new(
            schema,
            vec![Arc::new(datafusion::arrow::array::Int32Array::from(vec![7, 8, 9])) as ArrayRef],
        )
        .unwrap();
        let narrow = ChangeBatch::inserts(data);
        let key: Vec<Arc<dyn PhysicalExpr>> = vec![Arc::new(Column::new("k", 0))];
        let wide = batch(&[7, 8, 9], &[1, 1, 1]);
        for n in [2, 3, 5] {
            assert_eq!(
                shard_of_rows(&narrow, &key, &[DataType::Int64], n).unwrap(),
                shard_of_rows(&wide, &key, &[DataType::Int64], n).unwrap()
            );
        }
    }

    #[test]
    fn contiguous_runs_keep_the_epoch_order() {
        let bs = vec![
            batch(&[1, 2, 3], &[1; 3]),
            batch(&[4], &[1]),
            batch(&[5, 6], &[1; 2]),
        ];
        let runs = split_contiguous(&bs, 2);
        let flat = |r: &Vec<ChangeBatch>| -> Vec<i64> {
            r.iter()
                .flat_map(|b| values(b).into_iter().map(|v| v.0))
                .collect()
        };
        assert_eq!(flat(&runs[0]), vec![1, 2, 3]);
        assert_eq!(flat(&runs[1]), vec![4, 5, 6]);
        let runs = split_contiguous(&bs, 4);
        let all: Vec<i64> = runs.iter().flat_map(flat).collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5, 6]);
        assert!(runs.iter().all(|r| !flat(r).is_empty()));
        assert_eq!(split_contiguous(&[], 3).len(), 3);
        let one = split_contiguous(&[batch(&[1, 2, 3, 4], &[1; 4])], 3);
        assert_eq!(
            one.iter().map(|r| flat(r).len()).collect::<Vec<_>>(),
            vec![1, 1, 2]
        );
    }
}

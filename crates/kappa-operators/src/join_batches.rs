//! One side of a join kept as the Arrow batches its rows arrived in: the form for a side
//! whose input never retracts (an append-only stream) and whose rows carry no match count
//! (the sides of an inner join, the non-preserved side of an outer join). See `join.rs`
//! for what the stored rows mean; this is only how they are held.
//!
//! # Representation
//! ```text
//!  heads: key hash ──► newest stored row with that hash
//!                         │
//!  batches (oldest first) ▼
//!  ┌ batch 7 ─────────────────┐   ┌ batch 8 ──────────────────┐
//!  │ columns, weights         │   │ columns, weights          │
//!  │ keys (row format)        │   │ keys                      │
//!  │ next[r] ──► older row ◄──┼───┼─ next[r]                  │
//!  └──────────────────────────┘   └───────────────────────────┘
//! ```
//! Storing a batch hashes each row's join key and links the row in front of its hash's
//! chain: no row is encoded, copied or allocated (the batch's arrays are kept as they
//! came). A probe hashes its key once and walks the chain, comparing key bytes (two keys
//! may share a hash). A found row is named by a [`RowRef`] and its columns are gathered
//! with one `interleave` per column for all the pairs of a probe batch.
//!
//! # Expiry
//! A batch is freed when every row in it has expired (`expiry <= W`), and only from the
//! front: chains point from newer rows to older ones, so a walk stops at the first row
//! older than the oldest batch kept. A row that has expired while others of its batch
//! have not stays in memory until its batch goes, but a probe skips it (its expiry time
//! is kept per row), so the output is the row form's exactly, also for a late row of the
//! other side, and also after a restore (which keeps only the live rows).
//! [`BatchRows::len`] counts only the rows that have not expired.
//!
//! # Invariants
//! Every linked row has weight > 0 (a retraction reaching this form is an internal
//! error). `heads` holds a hash only while its newest row is in a kept batch.

use std::collections::VecDeque;
use std::hash::BuildHasher;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::array::{Array, ArrayRef, BooleanArray, Int64Array};
use datafusion::arrow::compute::{filter, interleave};
use datafusion::arrow::datatypes::Int64Type;
use datafusion::arrow::row::Rows;
use kappa_common::{KappaError, Result};

type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// A stored row: its batch's id (40 bits) and its index in that batch (24 bits).
pub(crate) type RowRef = u64;

const ROW_BITS: u32 = 24;
/// Larger batches are stored in slices of this many rows.
const MAX_BATCH_ROWS: usize = 1 << ROW_BITS;
/// The end of a chain.
const NIL: RowRef = u64::MAX;
/// A row that is kept with its batch but can never be found (its key cannot match, or it
/// had expired when it came).
const UNLINKED: RowRef = u64::MAX - 1;

fn row_ref(batch: u64, row: usize) -> RowRef {
    (batch << ROW_BITS) | row as u64
}

fn split_ref(r: RowRef) -> (u64, usize) {
    (r >> ROW_BITS, (r & ((1 << ROW_BITS) - 1)) as usize)
}

struct Stored {
    columns: Vec<ArrayRef>,
    weights: Int64Array,
    keys: Rows,
    /// Per row: the next older row with the same key hash, [`NIL`], or [`UNLINKED`].
    next: Vec<RowRef>,
    /// The expiry times of the linked rows that expire, sorted: counts the live rows at a
    /// watermark in O(log n) (`expiry` holds the same times in row order).
    times: Vec<i64>,
    /// Per row, its expiry time (`i64::MAX`: never): a probe skips expired rows.
    expiry: Vec<i64>,
    /// Linked rows that never expire (no expiry column, or a NULL time).
    never: usize,
}

impl Stored {
    /// Linked rows not expired at `w`.
    fn live(&self, w: Option<i64>) -> usize {
        let expired = w.map_or(0, |w| self.times.partition_point(|&t| t <= w));
        self.never + self.times.len() - expired
    }

    /// Whether every row has expired at `w` (a batch with a row that never expires never
    /// has).
    fn expired(&self, w: i64) -> bool {
        self.never == 0 && self.times.last().is_none_or(|&t| t <= w)
    }
}

/// One join side's stored rows, as batches (see the module doc).
#[derive(Default)]
pub(crate) struct BatchRows {
    batches: VecDeque<Stored>,
    /// The id of `batches[0]`; ids grow by one per stored batch.
    first: u64,
    heads: HashMap<u64, RowRef>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Linked rows not expired at `watermark`.
    len: usize,
    watermark: Option<i64>,
}

impl BatchRows {
    /// Stores the rows of a batch for which `keep` is true. `keys` are its rows' join keys,
    /// `expiry` when each row expires (`None`: never).
    pub fn add(
        &mut self,
        columns: &[ArrayRef],
        weights: &Int64Array,
        keys: Rows,
        keep: impl Fn(usize) -> bool,
        expiry: &[Option<i64>],
    ) -> Result<()> {
        let n = weights.len();
        if n > MAX_BATCH_ROWS {
            return Err(KappaError::internal(
                "a join batch too large for the batch store",
            ));
        }
        if (0..n).any(|i| keep(i) && weights.value(i) <= 0) {
            return Err(KappaError::internal(
                "a retraction reached a join side stored as an append-only stream",
            ));
        }
        let id = self.first + self.batches.len() as u64;
        let mut next = vec![UNLINKED; n];
        let (mut times, mut never) = (Vec::new(), 0);
        for (i, link) in next.iter_mut().enumerate() {
            if !keep(i) {
                continue;
            }
            let h = self.hasher.hash_one(keys.row(i).as_ref());
            *link = self.heads.insert(h, row_ref(id, i)).unwrap_or(NIL);
            match expiry[i] {
                Some(t) => times.push(t),
                None => never += 1,
            }
        }
        if times.is_empty() && never == 0 {
            return Ok(());
        }
        times.sort_unstable();
        let row_expiry = expiry.iter().map(|t| t.unwrap_or(i64::MAX)).collect();
        let stored = Stored {
            expiry: row_expiry,
            columns: columns.to_vec(),
            weights: weights.clone(),
            keys,
            next,
            times,
            never,
        };
        self.len += stored.live(self.watermark);
        self.batches.push_back(stored);
        Ok(())
    }

    /// Calls `f` with each stored row whose key is `key`, and its count.
    pub fn probe(&self, key: &[u8], mut f: impl FnMut(RowRef, i64)) {
        let Some(&head) = self.heads.get(&self.hasher.hash_one(key)) else {
            return;
        };
        let mut at = head;
        while at != NIL {
            let (batch, row) = split_ref(at);
            let Some(b) = batch
                .checked_sub(self.first)
                .and_then(|i| self.batches.get(i as usize))
            else {
                // Older than the oldest batch kept: the rest of the chain is freed.
                break;
            };
            // An expired row is not found, as if freed (the row form frees it at once).
            let live = self.watermark.is_none_or(|w| b.expiry[row] > w);
            if live && b.keys.row(row).as_ref() == key {
                f(at, b.weights.value(row));
            }
            at = b.next[row];
        }
    }

    /// The columns of the given stored rows, in order.
    pub fn gather(&self, rows: &[RowRef]) -> Result<Vec<ArrayRef>> {
        // The batches the rows are in, numbered in order of first use.
        let mut slots: HashMap<u64, usize> = HashMap::default();
        let mut used: Vec<&Stored> = Vec::new();
        let mut idx = Vec::with_capacity(rows.len());
        for &r in rows {
            let (batch, row) = split_ref(r);
            let slot = match slots.get(&batch) {
                Some(&s) => s,
                None => {
                    let b = batch
                        .checked_sub(self.first)
                        .and_then(|i| self.batches.get(i as usize))
                        .ok_or_else(|| KappaError::internal("a probed join row was freed"))?;
                    used.push(b);
                    slots.insert(batch, used.len() - 1);
                    used.len() - 1
                }
            };
            idx.push((slot, row));
        }
        let Some(width) = used.first().map(|b| b.columns.len()) else {
            return Err(KappaError::internal("gathering no join rows"));
        };
        (0..width)
            .map(|c| {
                let arrays: Vec<&dyn Array> = used.iter().map(|b| b.columns[c].as_ref()).collect();
                Ok(interleave(&arrays, &idx)?)
            })
            .collect()
    }

    /// Column `col` of the batch holding stored row `r`, and `r`'s index in it.
    pub fn column_of(&self, r: RowRef, col: usize) -> Option<(&dyn Array, usize)> {
        let (batch, row) = split_ref(r);
        let b = self.batches.get(batch.checked_sub(self.first)? as usize)?;
        Some((b.columns.get(col)?.as_ref(), row))
    }

    /// Frees the batches whose rows have all expired at `w`, from the front.
    pub fn expire(&mut self, w: i64) {
        while let Some(b) = self.batches.front()
            && b.expired(w)
        {
            let id = self.first;
            for (row, &link) in b.next.iter().enumerate() {
                if link == UNLINKED {
                    continue;
                }
                let h = self.hasher.hash_one(b.keys.row(row).as_ref());
                if self.heads.get(&h) == Some(&row_ref(id, row)) {
                    self.heads.remove(&h);
                }
            }
            self.batches.pop_front();
            self.first += 1;
        }
        self.watermark = Some(self.watermark.map_or(w, |old| old.max(w)));
        self.len = self.batches.iter().map(|b| b.live(self.watermark)).sum();
    }

    /// Rows stored and not expired.
    pub fn len(&self) -> usize {
        self.len
    }

    /// The live rows (stored and not expired at the watermark), batch by batch: the first
    /// `width` columns and the weights, filtered to them, and their number. Batches with
    /// none are skipped.
    pub fn live_rows(
        &self,
        width: usize,
    ) -> impl Iterator<Item = Result<(Vec<ArrayRef>, Int64Array, usize)>> {
        self.batches.iter().filter_map(move |b| {
            let live: BooleanArray = b
                .next
                .iter()
                .zip(&b.expiry)
                .map(|(&l, &t)| Some(l != UNLINKED && self.watermark.is_none_or(|w| t > w)))
                .collect();
            let n = live.true_count();
            (n > 0).then(|| {
                let columns = b.columns[..width.min(b.columns.len())]
                    .iter()
                    .map(|c| Ok(filter(c, &live)?))
                    .collect::<Result<Vec<_>>>()?;
                let weights = filter(&b.weights, &live)?
                    .as_primitive::<Int64Type>()
                    .clone();
                Ok((columns, weights, n))
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{AsArray, Int64Array, StringArray};
    use datafusion::arrow::datatypes::{DataType, Int64Type};
    use datafusion::arrow::row::{RowConverter, SortField};
    use std::sync::Arc;

    /// Stores rows `(key, tag)` with weights and expiry times.
    fn add(s: &mut BatchRows, rows: &[(i64, &str, i64, Option<i64>)], keep: &[usize]) {
        let conv = RowConverter::new(vec![SortField::new(DataType::Int64)]).unwrap();
        let key: ArrayRef = Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.0)));
        let tag: ArrayRef = Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1)));
        let weights = Int64Array::from_iter_values(rows.iter().map(|r| r.2));
        let expiry: Vec<Option<i64>> = rows.iter().map(|r| r.3).collect();
        let keys = conv.convert_columns(std::slice::from_ref(&key)).unwrap();
        s.add(&[key, tag], &weights, keys, |i| keep.contains(&i), &expiry)
            .unwrap();
    }

    /// The (tag, count) of the rows stored under `key`, gathered, sorted.
    fn probe(s: &BatchRows, key: i64) -> Vec<(String, i64)> {
        let conv = RowConverter::new(vec![SortField::new(DataType::Int64)]).unwrap();
        let k = conv
            .convert_columns(&[Arc::new(Int64Array::from(vec![key])) as ArrayRef])
            .unwrap();
        let (mut refs, mut counts) = (vec![], vec![]);
        s.probe(k.row(0).as_ref(), |r, c| {
            refs.push(r);
            counts.push(c)
        });
        if refs.is_empty() {
            return vec![];
        }
        let cols = s.gather(&refs).unwrap();
        assert_eq!(
            cols[0].as_primitive::<Int64Type>().values().to_vec(),
            vec![key; refs.len()]
        );
        let mut out: Vec<(String, i64)> = cols[1]
            .as_string::<i32>()
            .iter()
            .map(|t| t.unwrap_or_default().to_string())
            .zip(counts)
            .collect();
        out.sort();
        out
    }

    fn row(t: &str, n: i64) -> (String, i64) {
        (t.to_string(), n)
    }

    #[test]
    fn probes_find_every_stored_row_of_a_key_across_batches() {
        let mut s = BatchRows::default();
        add(
            &mut s,
            &[
                (1, "a", 1, Some(10)),
                (2, "b", 2, None),
                (1, "c", 1, Some(20)),
            ],
            &[0, 1, 2],
        );
        // Row 1 is not stored (e.g. its key is NULL): kept with its batch, never found.
        add(&mut s, &[(1, "d", 1, Some(30)), (1, "x", 1, None)], &[0]);
        assert_eq!(probe(&s, 1), vec![row("a", 1), row("c", 1), row("d", 1)]);
        assert_eq!(probe(&s, 2), vec![row("b", 2)]);
        assert_eq!(probe(&s, 3), vec![]);
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn batches_are_freed_from_the_front_when_all_their_rows_expired() {
        let mut s = BatchRows::default();
        add(
            &mut s,
            &[(1, "a", 1, Some(10)), (2, "b", 1, Some(12))],
            &[0, 1],
        );
        add(
            &mut s,
            &[(1, "c", 1, Some(11)), (2, "d", 1, Some(40))],
            &[0, 1],
        );
        add(&mut s, &[(1, "e", 1, Some(5))], &[0]);
        // W = 11: "a", "c" and "e" expired (a probe no longer finds them), but no batch
        // has expired whole.
        s.expire(11);
        assert_eq!(s.len(), 2, "b and d are live");
        assert_eq!(probe(&s, 1), vec![]);
        assert_eq!(probe(&s, 2), vec![row("b", 1), row("d", 1)]);
        assert_eq!(s.batches.len(), 3);
        // W = 12: the first batch goes; the chains through it end there.
        s.expire(12);
        assert_eq!(s.len(), 1);
        assert_eq!(s.batches.len(), 2);
        assert_eq!(probe(&s, 1), vec![]);
        assert_eq!(probe(&s, 2), vec![row("d", 1)]);
        // The third batch expired long ago but waits behind the second.
        s.expire(40);
        assert_eq!(s.len(), 0);
        assert_eq!(probe(&s, 1), vec![]);
        assert!(s.batches.is_empty() && s.heads.is_empty());
        // A row added after everything was freed is found alone.
        add(&mut s, &[(1, "f", 3, Some(50))], &[0]);
        assert_eq!(probe(&s, 1), vec![row("f", 3)]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_batch_with_a_row_that_never_expires_stays() {
        let mut s = BatchRows::default();
        add(&mut s, &[(1, "a", 1, Some(1)), (1, "b", 1, None)], &[0, 1]);
        s.expire(100);
        assert_eq!(s.len(), 1);
        assert_eq!(s.batches.len(), 1);
        assert_eq!(probe(&s, 1), vec![row("b", 1)]);
    }

    #[test]
    fn a_retraction_is_refused() {
        let mut s = BatchRows::default();
        let conv = RowConverter::new(vec![SortField::new(DataType::Int64)]).unwrap();
        let key: ArrayRef = Arc::new(Int64Array::from(vec![1]));
        let keys = conv.convert_columns(std::slice::from_ref(&key)).unwrap();
        let err = s.add(&[key], &Int64Array::from(vec![-1]), keys, |_| true, &[None]);
        assert!(err.is_err());
    }
}

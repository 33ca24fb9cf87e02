//! One side of a join's stored rows: join key → row → [`Entry`], and the index that expires
//! them by event time. See `join.rs` for what the rows and their counts mean.
//!
//! # Three representations, the same contents
//! - [`SideRows::Memory`]: hash maps (one hash lookup per probe or update) and an ordered
//!   in-memory expiry index. The join checkpoints them as the log of its inputs.
//! - [`SideRows::Batches`]: for an append-only side without match counts, the Arrow
//!   batches the rows came in and a hash index over them (`join_batches.rs`): no per-row
//!   encoding or allocation. Checkpointed as the memory form is.
//! - [`SideRows::Tables`]: state tables, for a store that spills (state larger than memory).
//!   The tables are the checkpoint: their changes are written like any other state's, and
//!   only the changes since the last checkpoint stay in memory. `rows` maps
//!   `len(key) ‖ key ‖ row` (the length a 4-byte big-endian integer, so a key's rows are one
//!   prefix range) to the entry (count then match count, 8 bytes each, little-endian);
//!   `expiring` holds `time ‖ len(key) ‖ key ‖ row` (time order-preserving, 8 bytes) for each
//!   stored row that expires, so the rows a watermark closes are a scan from the start.
//!
//! A probe costs one prefix scan of the rows table instead of one hash lookup: spilling
//! trades speed for memory, which is why the in-memory form stays when nothing spills.
//!
//! # Invariants
//! Every stored count is > 0 (a row whose count reaches 0 is removed). An index entry may
//! outlive its row (a row retracted before it expires); removing an absent row is harmless.

use std::collections::BTreeMap;
use std::sync::Arc;

use kappa_common::{KappaError, Result};
use kappa_state::{BytesMap, StateTable};

use crate::join_batches::{BatchRows, RowRef};
use kappa_state::codec::{
    damaged, len_prefix, len_prefixed, ordered_i64, split_len_prefixed, split_ordered_i64,
};

type Bytes = Arc<[u8]>;
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// A stored row: how many copies, and (on sides that track it) the weighted number of
/// rows of the other side it matches.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Entry {
    pub count: i64,
    pub matches: i64,
}

impl Entry {
    fn encode(self) -> Bytes {
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&self.count.to_le_bytes());
        v[8..].copy_from_slice(&self.matches.to_le_bytes());
        Arc::from(v.as_slice())
    }

    fn decode(v: &[u8]) -> Result<Self> {
        let int = |r: std::ops::Range<usize>| -> Result<i64> {
            let b: [u8; 8] = v
                .get(r)
                .and_then(|b| b.try_into().ok())
                .ok_or_else(|| damaged("a join"))?;
            Ok(i64::from_le_bytes(b))
        };
        Ok(Self {
            count: int(0..8)?,
            matches: int(8..16)?,
        })
    }
}

/// The state tables one side keeps its rows in when they spill.
pub struct SideTables {
    pub rows: Box<dyn StateTable>,
    pub expiring: Box<dyn StateTable>,
}

pub(crate) enum SideRows {
    Memory(MemRows),
    Batches(BatchRows),
    Tables(SideTables),
}

/// A stored row a probe found: its row-format bytes, or where it is in the batch store.
#[derive(Clone)]
pub(crate) enum Found {
    Row(Bytes),
    At(RowRef),
}

/// A call that stores or updates one row at a time, made on the batch store.
fn by_batch() -> KappaError {
    KappaError::internal("a join side stored as batches was updated row by row")
}

#[derive(Default)]
pub(crate) struct MemRows {
    buckets: BytesMap<BytesMap<Entry>>,
    len: usize,
    /// Expiry time → (key, row) of the rows stored with it; with `by_key`, (key, `None`)
    /// for each key's whole bucket.
    expiring: BTreeMap<i64, Vec<(Bytes, Option<Bytes>)>>,
    /// A row's expiry time is a function of its join key (it is computed from key columns
    /// only, as in a window join on `window_start`): a key's rows all expire together, so
    /// the index holds each key once, when its bucket is created, and expiry drops the
    /// bucket whole. A side whose rows retract and come back (an aggregate's updates) then
    /// costs no index entry per row, and no lookup per row to expire it.
    by_key: bool,
}

fn row_key(key: &[u8], row: &[u8]) -> Bytes {
    let mut k = Vec::with_capacity(4 + key.len() + row.len());
    len_prefixed(&mut k, key);
    k.extend_from_slice(row);
    Arc::from(k)
}

/// An expiry index key's time and the rows table key after it.
fn split_index_key(k: &[u8]) -> Result<(i64, &[u8])> {
    split_ordered_i64(k).ok_or_else(|| damaged("a join"))
}

impl SideRows {
    /// Calls `f` with each row stored under `key` and its count.
    pub fn probe(&self, key: &[u8], mut f: impl FnMut(Found, i64)) -> Result<()> {
        match self {
            SideRows::Memory(m) => {
                if let Some(bucket) = m.buckets.get(key) {
                    for (row, e) in bucket.iter() {
                        f(Found::Row(row.clone()), e.count);
                    }
                }
            }
            SideRows::Batches(b) => b.probe(key, |at, count| f(Found::At(at), count)),
            SideRows::Tables(t) => {
                // `len(key) ‖ key`: the prefix of the key's rows.
                let prefix = len_prefix(key);
                for (k, v) in t.rows.scan_prefix(&prefix) {
                    let row = k.get(prefix.len()..).unwrap_or_default();
                    f(Found::Row(Arc::from(row)), Entry::decode(&v)?.count);
                }
            }
        }
        Ok(())
    }

    /// Adds `delta` to the match count of a stored row; returns its entry before.
    pub fn add_matches(&mut self, key: &[u8], row: &[u8], delta: i64) -> Result<Entry> {
        let vanished = || KappaError::internal("probed join row vanished");
        let check = |e: Entry| -> Result<i64> {
            match e.matches + delta {
                n if n < 0 => Err(KappaError::internal(format!(
                    "join match count became negative ({n})"
                ))),
                n => Ok(n),
            }
        };
        match self {
            SideRows::Memory(m) => {
                let e = m
                    .buckets
                    .get_mut(key)
                    .and_then(|b| b.get_mut(row))
                    .ok_or_else(vanished)?;
                let before = *e;
                e.matches = check(before)?;
                Ok(before)
            }
            SideRows::Batches(_) => Err(by_batch()),
            SideRows::Tables(t) => {
                let k = row_key(key, row);
                let before = Entry::decode(&t.rows.get(&k).ok_or_else(vanished)?)?;
                let after = Entry {
                    matches: check(before)?,
                    ..before
                };
                t.rows.put(k, after.encode());
                Ok(before)
            }
        }
    }

    /// Adds `weight` copies of `row` under `key`, with match count `matches`; a new row
    /// that expires at `expires` is indexed.
    pub fn add(
        &mut self,
        key: &[u8],
        row: &[u8],
        weight: i64,
        matches: i64,
        expires: Option<i64>,
    ) -> Result<()> {
        match self {
            SideRows::Memory(m) => m.add(key, row, weight, matches, expires)?,
            SideRows::Batches(_) => return Err(by_batch()),
            SideRows::Tables(t) => {
                let k = row_key(key, row);
                let before = match t.rows.get(&k) {
                    Some(v) => Entry::decode(&v)?,
                    None => Entry::default(),
                };
                let count = added_count(before.count, weight)?;
                if count == 0 {
                    t.rows.delete(&k);
                    return Ok(());
                }
                t.rows.put(k.clone(), Entry { count, matches }.encode());
                if before.count == 0
                    && let Some(time) = expires
                {
                    let mut ik = Vec::with_capacity(8 + k.len());
                    ik.extend_from_slice(&ordered_i64(time));
                    ik.extend_from_slice(&k);
                    t.expiring.put(Arc::from(ik), Arc::from(&[][..]));
                }
            }
        }
        Ok(())
    }

    /// Removes the rows whose expiry time is `<= w`.
    pub fn expire(&mut self, w: i64) -> Result<()> {
        match self {
            SideRows::Memory(m) => {
                for (key, row) in crate::take_closed(&mut m.expiring, w)
                    .into_values()
                    .flatten()
                {
                    match row {
                        Some(row) => m.remove(&key, &row),
                        None => {
                            if let Some(bucket) = m.buckets.remove(&key) {
                                m.len -= bucket.len();
                            }
                        }
                    }
                }
            }
            SideRows::Batches(b) => b.expire(w),
            SideRows::Tables(t) => {
                let mut closed = Vec::new();
                for (k, _) in t.expiring.scan_prefix(&[]) {
                    if split_index_key(&k)?.0 > w {
                        break;
                    }
                    closed.push(k);
                }
                for k in closed {
                    t.rows.delete(split_index_key(&k)?.1);
                    t.expiring.delete(&k);
                }
            }
        }
        Ok(())
    }

    /// Rows stored (distinct).
    pub fn len(&self) -> usize {
        match self {
            SideRows::Memory(m) => m.len,
            SideRows::Batches(b) => b.len(),
            SideRows::Tables(t) => t.rows.len(),
        }
    }

    /// Every stored row with its entry (of the in-memory form, which the join snapshots
    /// into its log; the tables are their own checkpoint).
    pub fn mem_entries(&self) -> Result<impl Iterator<Item = (&Bytes, &Entry)>> {
        match self {
            SideRows::Memory(m) => Ok(m.buckets.values().flat_map(|b| b.iter())),
            SideRows::Batches(_) => Err(by_batch()),
            SideRows::Tables(_) => Err(KappaError::internal(
                "spilled join rows are not snapshotted into a log",
            )),
        }
    }

    pub fn is_spilled(&self) -> bool {
        matches!(self, SideRows::Tables(_))
    }

    /// The tables of spilled rows.
    pub fn tables_mut(&mut self) -> Option<&mut SideTables> {
        match self {
            SideRows::Memory(_) | SideRows::Batches(_) => None,
            SideRows::Tables(t) => Some(t),
        }
    }

    /// Empties the in-memory forms (before restoring them).
    pub fn clear_memory(&mut self) {
        match self {
            SideRows::Memory(m) => *m = MemRows::new(m.by_key),
            SideRows::Batches(b) => *b = BatchRows::default(),
            SideRows::Tables(_) => {}
        }
    }
}

impl SideTables {
    /// Moves the rows (and their expiry times) these tables hold into `into`, leaving the
    /// tables empty: state a spilling run left, taken up by one that keeps it in memory.
    pub(crate) fn drain_into(&mut self, into: &mut SideRows) -> Result<()> {
        let mut times: HashMap<Bytes, i64> = HashMap::default();
        let index: Vec<Bytes> = self.expiring.scan_prefix(&[]).map(|(k, _)| k).collect();
        for k in index {
            let (time, row_key) = split_index_key(&k)?;
            times.insert(Arc::from(row_key), time);
            self.expiring.delete(&k);
        }
        let rows: Vec<(Bytes, Bytes)> = self.rows.scan_prefix(&[]).collect();
        for (k, v) in rows {
            let (key, row) = split_len_prefixed(&k).ok_or_else(|| damaged("a join"))?;
            let e = Entry::decode(&v)?;
            into.add(key, row, e.count, e.matches, times.get(&k).copied())?;
            self.rows.delete(&k);
        }
        Ok(())
    }
}

/// A count after adding `weight`, refusing a negative one.
fn added_count(count: i64, weight: i64) -> Result<i64> {
    match count + weight {
        n if n < 0 && count == 0 => Err(KappaError::internal(
            "join state: retraction of a row never stored",
        )),
        n if n < 0 => Err(KappaError::internal(format!(
            "join state count became negative ({n})"
        ))),
        n => Ok(n),
    }
}

impl MemRows {
    /// `by_key`: a row's expiry time follows from its key (see the field).
    pub fn new(by_key: bool) -> Self {
        Self {
            by_key,
            ..Self::default()
        }
    }

    /// Adds `weight` copies of `row` under `key` (with match count `matches`); a new row
    /// (with `by_key`, a new key) that expires at `expires` is indexed.
    fn add(
        &mut self,
        key: &[u8],
        row: &[u8],
        weight: i64,
        matches: i64,
        expires: Option<i64>,
    ) -> Result<()> {
        let (created, bucket_key, bucket) =
            self.buckets.entry_or_insert_with(key, BytesMap::default);
        if created
            && self.by_key
            && let Some(t) = expires
        {
            self.expiring
                .entry(t)
                .or_default()
                .push((bucket_key.clone(), None));
        }
        if let Some(e) = bucket.get_mut(row) {
            e.count = added_count(e.count, weight)?;
            e.matches = matches;
            if e.count > 0 {
                return Ok(());
            }
            bucket.remove(row);
            self.len -= 1;
            if bucket.is_empty() {
                self.buckets.remove(key);
            }
            return Ok(());
        }
        let count = added_count(0, weight)?;
        if count == 0 {
            if bucket.is_empty() {
                self.buckets.remove(key);
            }
            return Ok(());
        }
        let row: Bytes = Arc::from(row);
        bucket.insert_absent(row.clone(), Entry { count, matches });
        self.len += 1;
        if !self.by_key
            && let Some(t) = expires
        {
            let key = bucket_key.clone();
            self.expiring.entry(t).or_default().push((key, Some(row)));
        }
        Ok(())
    }

    fn remove(&mut self, key: &[u8], row: &[u8]) {
        if let Some(bucket) = self.buckets.get_mut(key)
            && bucket.remove(row).is_some()
        {
            self.len -= 1;
            if bucket.is_empty() {
                self.buckets.remove(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kappa_state::MemStateTable;

    fn tables() -> SideRows {
        SideRows::Tables(SideTables {
            rows: Box::new(MemStateTable::default()),
            expiring: Box::new(MemStateTable::default()),
        })
    }

    fn probe(s: &SideRows, key: &[u8]) -> Vec<(Vec<u8>, i64)> {
        let mut out = vec![];
        s.probe(key, |row, count| {
            let Found::Row(row) = row else {
                panic!("a row-format side found a batch row")
            };
            out.push((row.to_vec(), count))
        })
        .unwrap();
        out.sort();
        out
    }

    /// The same changes give the same contents in both forms.
    #[test]
    fn memory_and_tables_store_and_expire_alike() {
        for mut s in [SideRows::Memory(MemRows::default()), tables()] {
            // Key "a" is a prefix of key "ab": the length keeps their rows apart.
            s.add(b"a", b"r1", 2, 0, Some(10)).unwrap();
            s.add(b"ab", b"r2", 1, 0, Some(-5)).unwrap();
            s.add(b"a", b"r3", 1, 0, None).unwrap();
            assert_eq!(
                probe(&s, b"a"),
                vec![(b"r1".to_vec(), 2), (b"r3".to_vec(), 1)]
            );
            assert_eq!(probe(&s, b"ab"), vec![(b"r2".to_vec(), 1)]);
            let before = s.add_matches(b"a", b"r1", 3).unwrap();
            assert_eq!(
                before,
                Entry {
                    count: 2,
                    matches: 0
                }
            );
            assert!(s.add_matches(b"a", b"r1", -4).is_err());
            assert!(s.add_matches(b"a", b"zz", 1).is_err());
            assert!(s.add(b"a", b"zz", -1, 0, None).is_err());
            // A negative time sorts before a positive one.
            s.expire(0).unwrap();
            assert!(probe(&s, b"ab").is_empty());
            assert_eq!(s.len(), 2);
            // Retracted before it expires: the index entry outlives it harmlessly.
            s.add(b"a", b"r1", -2, 0, None).unwrap();
            s.expire(10).unwrap();
            assert_eq!(probe(&s, b"a"), vec![(b"r3".to_vec(), 1)]);
            assert_eq!(s.len(), 1);
        }
    }

    /// Rows whose expiry follows from their key, as a window join's: the memory form that
    /// indexes keys expires exactly the rows the per-row forms do, through retractions
    /// and rows that come back.
    #[test]
    fn expiry_by_key_frees_the_rows_per_row_expiry_does() {
        let changes: &[(&[u8], &[u8], i64, i64)] = &[
            (b"w10", b"a1", 1, 10),
            (b"w10", b"a2", 1, 10),
            (b"w20", b"a1", 2, 20),
            (b"w10", b"a1", -1, 10),
            (b"w10", b"a1", 1, 10),
            (b"w20", b"a1", -2, 20),
            (b"w20", b"a3", 1, 20),
            (b"w30", b"a4", 1, 30),
            (b"w30", b"a4", -1, 30),
        ];
        let forms = || {
            [
                SideRows::Memory(MemRows::new(true)),
                SideRows::Memory(MemRows::new(false)),
                tables(),
            ]
        };
        let mut sides = forms();
        for s in &mut sides {
            for (key, row, w, t) in changes {
                s.add(key, row, *w, 0, Some(*t)).unwrap();
            }
        }
        let contents = |s: &SideRows| -> Vec<Vec<(Vec<u8>, i64)>> {
            [&b"w10"[..], b"w20", b"w30"]
                .iter()
                .map(|k| probe(s, k))
                .collect()
        };
        let expected = |w10: bool, w20: bool| {
            vec![
                if w10 {
                    vec![(b"a1".to_vec(), 1), (b"a2".to_vec(), 1)]
                } else {
                    vec![]
                },
                if w20 {
                    vec![(b"a3".to_vec(), 1)]
                } else {
                    vec![]
                },
                vec![],
            ]
        };
        for (w, live) in [(5, (true, true)), (10, (false, true)), (25, (false, false))] {
            for s in &mut sides {
                s.expire(w).unwrap();
                assert_eq!(contents(s), expected(live.0, live.1), "at watermark {w}");
                assert_eq!(s.len(), live.0 as usize * 2 + live.1 as usize);
            }
        }
        // A key that comes back after its bucket emptied is indexed again.
        let mut s = SideRows::Memory(MemRows::new(true));
        s.add(b"w40", b"a5", 1, 0, Some(40)).unwrap();
        s.add(b"w40", b"a5", -1, 0, Some(40)).unwrap();
        s.add(b"w40", b"a6", 1, 0, Some(40)).unwrap();
        s.expire(40).unwrap();
        assert!(probe(&s, b"w40").is_empty());
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn spilled_rows_move_into_memory_with_their_expiry() {
        let SideRows::Tables(mut t) = ({
            let mut s = tables();
            s.add(b"k", b"r1", 1, 4, Some(7)).unwrap();
            s.add(b"k", b"r2", 2, 0, None).unwrap();
            s
        }) else {
            unreachable!()
        };
        let mut m = SideRows::Memory(MemRows::default());
        t.drain_into(&mut m).unwrap();
        assert!(t.rows.is_empty() && t.expiring.is_empty());
        assert_eq!(
            probe(&m, b"k"),
            vec![(b"r1".to_vec(), 1), (b"r2".to_vec(), 2)]
        );
        assert_eq!(m.add_matches(b"k", b"r1", 0).unwrap().matches, 4);
        m.expire(7).unwrap();
        assert_eq!(probe(&m, b"k"), vec![(b"r2".to_vec(), 2)]);
    }
}

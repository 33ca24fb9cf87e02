//! The groups an aggregate has touched in the current epoch: keyed entries in the order
//! they were first touched, found by a hash the caller computes once per input row.
//!
//! An aggregate meets the same group many times in one input batch (a hot key, or one row
//! copied into several hopping windows), while the epoch's set of touched groups is large
//! and misses the cache. [`BatchGroups`] resolves a batch's rows to entries of the epoch's
//! [`DirtySet`] through a small per-batch table, so the large one is probed once per
//! distinct group per batch instead of once per row.

use std::hash::BuildHasher;

use hashbrown::HashTable;

/// Entries keyed by bytes, in the order inserted.
pub(crate) struct DirtySet<V> {
    entries: Vec<(Box<[u8]>, V)>,
    /// Positions in `entries`, hashed by their key.
    index: HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl<V> Default for DirtySet<V> {
    fn default() -> Self {
        Self {
            entries: Vec::new(),
            index: HashTable::new(),
            hasher: Default::default(),
        }
    }
}

impl<V> DirtySet<V> {
    pub fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    /// The position of `key` (whose hash is `hash`), if present.
    pub fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        self.index
            .find(hash, |&i| &*self.entries[i as usize].0 == key)
            .map(|&i| i as usize)
    }

    /// Adds an entry for a key not present; returns its position.
    pub fn insert(&mut self, hash: u64, key: &[u8], value: V) -> usize {
        let i = self.entries.len();
        self.entries.push((key.into(), value));
        let (entries, hasher) = (&self.entries, &self.hasher);
        self.index.insert_unique(hash, i as u32, |&j| {
            hasher.hash_one(&*entries[j as usize].0)
        });
        i
    }

    pub fn at(&mut self, i: usize) -> &mut V {
        &mut self.entries[i].1
    }

    pub fn get(&self, i: usize) -> &V {
        &self.entries[i].1
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let i = self.find(self.hash(key), key)?;
        Some(self.at(i))
    }

    pub fn contains(&self, key: &[u8]) -> bool {
        self.find(self.hash(key), key).is_some()
    }

    /// Takes every entry out, in the order inserted.
    pub fn take(&mut self) -> Vec<(Box<[u8]>, V)> {
        self.index.clear();
        std::mem::take(&mut self.entries)
    }
}

/// One input batch's groups: each distinct key of the batch, with the position of its
/// entry in the epoch's [`DirtySet`].
#[derive(Default)]
pub(crate) struct BatchGroups {
    /// (a row of the batch with this key, the entry's position in the dirty set).
    index: HashTable<(u32, u32)>,
}

impl BatchGroups {
    /// The dirty-set position of `row`'s group, if the batch met it before. `key(r)` is
    /// row `r`'s key, `hash` the dirty set's hash of row `row`'s key.
    pub fn find<'k>(
        &self,
        hash: u64,
        row: usize,
        key: impl Fn(usize) -> &'k [u8],
    ) -> Option<usize> {
        let k = key(row);
        self.index
            .find(hash, |&(r, _)| key(r as usize) == k)
            .map(|&(_, i)| i as usize)
    }

    /// Records that `row`'s group is at dirty-set position `at`.
    pub fn insert(&mut self, hash: u64, row: usize, at: usize, rehash: impl Fn(usize) -> u64) {
        self.index
            .insert_unique(hash, (row as u32, at as u32), |&(r, _)| rehash(r as usize));
    }

    pub fn clear(&mut self) {
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_probes_the_dirty_set_once_per_distinct_key() {
        let mut dirty: DirtySet<i64> = DirtySet::default();
        let pre = dirty.hash(b"old");
        dirty.insert(pre, b"old", 100);
        let rows: Vec<&[u8]> = vec![b"a", b"old", b"a", b"b", b"old", b"a"];
        let mut batch = BatchGroups::default();
        let mut probes = 0;
        for (row, key) in rows.iter().enumerate() {
            let h = dirty.hash(key);
            let at = match batch.find(h, row, |r| rows[r]) {
                Some(at) => at,
                None => {
                    probes += 1;
                    let at = match dirty.find(h, key) {
                        Some(at) => at,
                        None => dirty.insert(h, key, 0),
                    };
                    batch.insert(h, row, at, |r| dirty.hash(rows[r]));
                    at
                }
            };
            *dirty.at(at) += 1;
        }
        assert_eq!(probes, 3);
        assert_eq!(dirty.get_mut(b"a"), Some(&mut 3));
        assert!(dirty.contains(b"b") && !dirty.contains(b"c"));
        let all: Vec<(Vec<u8>, i64)> = dirty
            .take()
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v))
            .collect();
        assert_eq!(
            all,
            vec![
                (b"old".to_vec(), 102),
                (b"a".to_vec(), 3),
                (b"b".to_vec(), 1)
            ]
        );
        assert!(!dirty.contains(b"a"));
    }
}

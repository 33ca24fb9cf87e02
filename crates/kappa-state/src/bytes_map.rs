//! A hash map keyed by shared byte strings that keeps each key's hash beside it.
//!
//! The state tables and join buckets hold millions of `Arc<[u8]>` keys. A plain hash map
//! recomputes every key's hash when it grows, which means following each key's pointer to
//! bytes that are no longer in cache: growing the tables was a tenth of Nexmark q5's
//! profile. Here growth moves entries by their stored hash alone, and a probe compares
//! the full hash before it reads a key's bytes.

use std::hash::BuildHasher;

use hashbrown::{DefaultHashBuilder, HashTable};

use crate::Bytes;

#[derive(Clone)]
pub struct BytesMap<V> {
    table: HashTable<Slot<V>>,
    hasher: DefaultHashBuilder,
}

impl<V> Default for BytesMap<V> {
    fn default() -> Self {
        BytesMap {
            table: HashTable::new(),
            hasher: DefaultHashBuilder::default(),
        }
    }
}

#[derive(Clone)]
struct Slot<V> {
    hash: u64,
    key: Bytes,
    value: V,
}

/// Whether `slot` holds `key`, whose hash is `hash`: the stored hash first, the bytes
/// (behind a pointer) only when it agrees.
fn holds<V>(hash: u64, key: &[u8]) -> impl Fn(&Slot<V>) -> bool + '_ {
    move |s| s.hash == hash && *s.key == *key
}

impl<V> BytesMap<V> {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    pub fn get(&self, key: &[u8]) -> Option<&V> {
        let hash = self.hash(key);
        self.table.find(hash, holds(hash, key)).map(|s| &s.value)
    }

    pub fn get_mut(&mut self, key: &[u8]) -> Option<&mut V> {
        let hash = self.hash(key);
        self.table
            .find_mut(hash, holds(hash, key))
            .map(|s| &mut s.value)
    }

    /// Sets `key` to `value`; returns the value it held.
    pub fn insert(&mut self, key: Bytes, value: V) -> Option<V> {
        let hash = self.hash(&key);
        match self.table.entry(hash, holds(hash, &key), |s| s.hash) {
            hashbrown::hash_table::Entry::Occupied(mut o) => {
                Some(std::mem::replace(&mut o.get_mut().value, value))
            }
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(Slot { hash, key, value });
                None
            }
        }
    }

    /// Inserts `key`, which the caller has just looked up and not found (a second probe
    /// for it would be wasted).
    pub fn insert_absent(&mut self, key: Bytes, value: V) {
        let hash = self.hash(&key);
        self.table
            .insert_unique(hash, Slot { hash, key, value }, |s| s.hash);
    }

    /// The value of `key`, inserted as `make()` first if absent; with whether it was
    /// inserted, and the stored key (to share rather than copy).
    pub fn entry_or_insert_with(
        &mut self,
        key: &[u8],
        make: impl FnOnce() -> V,
    ) -> (bool, &Bytes, &mut V) {
        let hash = self.hash(key);
        let mut inserted = false;
        let slot = self
            .table
            .entry(hash, holds(hash, key), |s| s.hash)
            .or_insert_with(|| {
                inserted = true;
                Slot {
                    hash,
                    key: Bytes::from(key),
                    value: make(),
                }
            })
            .into_mut();
        (inserted, &slot.key, &mut slot.value)
    }

    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        self.remove_entry(key).map(|(_, v)| v)
    }

    pub fn remove_entry(&mut self, key: &[u8]) -> Option<(Bytes, V)> {
        let hash = self.hash(key);
        let found = self.table.find_entry(hash, holds(hash, key)).ok()?;
        let (slot, _) = found.remove();
        Some((slot.key, slot.value))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Bytes, &V)> {
        self.table.iter().map(|s| (&s.key, &s.value))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.table.iter().map(|s| &s.value)
    }
}

impl<V> FromIterator<(Bytes, V)> for BytesMap<V> {
    fn from_iter<I: IntoIterator<Item = (Bytes, V)>>(iter: I) -> Self {
        let mut map = BytesMap::default();
        for (k, v) in iter {
            map.insert(k, v);
        }
        map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.as_bytes())
    }

    #[test]
    fn inserts_replaces_finds_and_removes_across_growth() {
        let mut m: BytesMap<u64> = BytesMap::default();
        for i in 0..10_000u64 {
            assert_eq!(m.insert(b(&format!("k{i}")), i), None);
        }
        assert_eq!(m.insert(b("k7"), 70), Some(7));
        assert_eq!(m.len(), 10_000);
        assert_eq!(m.get(b"k7"), Some(&70));
        assert_eq!(m.get(b"k9999"), Some(&9999));
        assert_eq!(m.get(b"k10000"), None);
        *m.entry_or_insert_with(b"new", || 1).2 += 1;
        let (inserted, key, n) = m.entry_or_insert_with(b"new", || 100);
        assert_eq!((inserted, &**key, *n), (false, &b"new"[..], 2));
        *m.get_mut(b"new").unwrap() += 1;
        assert!(m.entry_or_insert_with(b"newer", || 0).0);
        assert_eq!(m.remove(b"newer"), Some(0));
        m.insert_absent(b("newest"), 5);
        assert_eq!(m.get(b"newest"), Some(&5));
        assert_eq!(m.remove(b"newest"), Some(5));
        assert_eq!(m.get(b"new"), Some(&3));
        assert_eq!(m.remove_entry(b"k3"), Some((b("k3"), 3)));
        assert_eq!(m.remove(b"k3"), None);
        assert_eq!(m.get(b"k3"), None);
        assert_eq!(m.len(), 10_000);
        assert_eq!(
            m.values().sum::<u64>(),
            (0..10_000).sum::<u64>() + 63 - 3 + 3
        );
        let mut small: Vec<_> = m
            .iter()
            .filter(|(k, _)| k.len() == 2)
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        small.sort();
        let want: Vec<_> = (0..10u64)
            .filter(|i| *i != 3)
            .map(|i| (b(&format!("k{i}")), if i == 7 { 70 } else { i }))
            .collect();
        assert_eq!(small, want);
        let copy: BytesMap<u64> = small.into_iter().collect();
        assert_eq!(copy.len(), 9);
        assert_eq!(copy.get(b"k7"), Some(&70));
    }
}

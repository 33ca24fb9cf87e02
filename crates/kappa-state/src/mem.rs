//! In-memory state on persistent ordered maps (`im::OrdMap`), whose clone is O(1) and
//! shares structure, so snapshots stay free; or, for the tables their owner reads only by
//! key (see [`StateStore::create_keyed_table`]), on hash maps, whose snapshot is a copy.

use std::ops::Bound;
use std::sync::Arc;

use im::OrdMap;

use crate::{Bytes, BytesMap, StateSnapshot, StateStore, StateTable, prefix_end};

#[derive(Default, Debug)]
pub struct MemStateStore;

impl StateStore for MemStateStore {
    fn create_table(&self, _name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        Ok(Box::new(MemStateTable::default()))
    }

    fn create_keyed_table(&self, _name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        Ok(Box::new(MemStateTable::keyed()))
    }
}

/// A table's entries. A lookup in the hashed form costs a hash and a probe instead of a
/// binary search per B-tree level, and an entry takes less memory; but its prefix scans
/// sort what they find (so they stay correct) and its snapshot copies it, which is why
/// only tables read by key alone, and snapshotted only when restored, are hashed.
#[derive(Clone)]
enum Map {
    Ordered(OrdMap<Bytes, Bytes>),
    Hashed(BytesMap<Bytes>),
}

impl Default for Map {
    fn default() -> Self {
        Map::Ordered(OrdMap::new())
    }
}

impl Map {
    fn get(&self, key: &[u8]) -> Option<&Bytes> {
        match self {
            Map::Ordered(m) => m.get(key),
            Map::Hashed(m) => m.get(key),
        }
    }

    fn insert(&mut self, key: Bytes, value: Bytes) {
        match self {
            Map::Ordered(m) => m.insert(key, value),
            Map::Hashed(m) => m.insert(key, value),
        };
    }

    fn remove(&mut self, key: &[u8]) -> Option<(Bytes, Bytes)> {
        match self {
            Map::Ordered(m) => m.remove_with_key(key),
            Map::Hashed(m) => m.remove_entry(key),
        }
    }

    fn len(&self) -> usize {
        match self {
            Map::Ordered(m) => m.len(),
            Map::Hashed(m) => m.len(),
        }
    }

    /// The entries whose key starts with `prefix`, in key order.
    fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        match self {
            Map::Ordered(m) => Box::new(prefix_range(m, prefix)),
            Map::Hashed(m) => {
                let mut found: Vec<(Bytes, Bytes)> = m
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                found.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                Box::new(found.into_iter())
            }
        }
    }
}

impl FromIterator<(Bytes, Bytes)> for Map {
    fn from_iter<I: IntoIterator<Item = (Bytes, Bytes)>>(iter: I) -> Self {
        Map::Ordered(iter.into_iter().collect())
    }
}

#[derive(Default, Clone)]
pub struct MemStateTable {
    map: Map,
    /// With checkpoints: what changed since the last checkpoint written.
    tracking: Option<Tracking>,
}

#[derive(Default, Clone)]
struct Tracking {
    name: String,
    /// Keys written since the changes were last taken, with their values now.
    changed: hashbrown::HashMap<Bytes, Change>,
    /// Changes taken for a checkpoint not yet written.
    in_flight: hashbrown::HashMap<Bytes, Change>,
}

#[derive(Clone)]
struct Change {
    /// The value now (`None`: deleted).
    value: Option<Bytes>,
    /// Known to be absent from the last checkpoint written: deleting it again need not be
    /// written (keys created and deleted between two checkpoints cost nothing).
    fresh: bool,
}

impl MemStateTable {
    /// A table named `name` holding `entries` (as restored from a checkpoint) that
    /// remembers which keys change, for the next checkpoint.
    pub fn tracked(name: &str, entries: impl IntoIterator<Item = (Bytes, Bytes)>) -> Self {
        Self {
            map: entries.into_iter().collect(),
            tracking: Some(Tracking {
                name: name.to_string(),
                ..Tracking::default()
            }),
        }
    }

    /// An empty table read only by key (see [`StateStore::create_keyed_table`]).
    pub fn keyed() -> Self {
        Self {
            map: Map::Hashed(BytesMap::default()),
            tracking: None,
        }
    }

    /// [`MemStateTable::tracked`], read only by key.
    pub fn tracked_keyed(name: &str, entries: impl IntoIterator<Item = (Bytes, Bytes)>) -> Self {
        Self {
            map: Map::Hashed(entries.into_iter().collect()),
            ..Self::tracked(name, [])
        }
    }

    /// Records that `key` now holds `value`; `existed`: whether it held one before.
    fn touch(&mut self, key: &Bytes, value: Option<&Bytes>, existed: bool) {
        let Some(t) = &mut self.tracking else {
            return;
        };
        let value = value.cloned();
        match t.changed.get_mut(key) {
            Some(c) => c.value = value,
            None => {
                // Untouched since the last checkpoint written, unless in flight (whose
                // outcome is not known yet): the map holds what that checkpoint has.
                let fresh = !existed && !t.in_flight.contains_key(key);
                t.changed.insert(key.clone(), Change { value, fresh });
            }
        }
    }
}

impl StateTable for MemStateTable {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    fn put(&mut self, key: Bytes, value: Bytes) {
        if self.tracking.is_some() {
            let existed = match self.map.get(&key) {
                Some(v) if *v == value => return,
                old => old.is_some(),
            };
            self.touch(&key, Some(&value), existed);
        }
        self.map.insert(key, value);
    }

    fn delete(&mut self, key: &[u8]) {
        if let Some((k, _)) = self.map.remove(key) {
            self.touch(&k, None, true);
        }
    }

    fn take_changes(&mut self, out: &mut crate::TableChanges) {
        let Some(t) = &mut self.tracking else {
            return;
        };
        for (k, c) in t.changed.drain() {
            match t.in_flight.get_mut(&k) {
                // Still in flight from an earlier take: what the base holds is that one's.
                Some(old) => old.value = c.value,
                None => {
                    t.in_flight.insert(k, c);
                }
            }
        }
        let changes = t
            .in_flight
            .iter()
            .filter(|(_, c)| c.value.is_some() || !c.fresh)
            .map(|(k, c)| (k.clone(), c.value.clone()))
            .collect::<Vec<_>>();
        out.push((t.name.clone(), Box::new(changes.into_iter())));
        if !t.in_flight.is_empty() {
            let len = (
                Bytes::from(&[][..]),
                Some(crate::encode_count(self.map.len() as i64)),
            );
            out.push((crate::len_table(&t.name), Box::new(std::iter::once(len))));
        }
    }

    fn checkpoint_done(&mut self, written: bool) {
        let Some(t) = &mut self.tracking else {
            return;
        };
        if written {
            t.in_flight.clear();
            return;
        }
        // Abandoned: handed out again; a key changed since keeps its new value but what the
        // base holds is still as it was before this take.
        for (k, c) in t.in_flight.drain() {
            match t.changed.get_mut(&k) {
                Some(newer) => newer.fresh = c.fresh,
                None => {
                    t.changed.insert(k, c);
                }
            }
        }
    }

    fn first_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)> {
        match &self.map {
            Map::Ordered(m) => prefix_range(m, prefix).next(),
            hashed => hashed.scan_prefix(prefix).next(),
        }
    }

    fn last_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)> {
        match &self.map {
            Map::Ordered(m) => prefix_range(m, prefix).next_back(),
            hashed => hashed.scan_prefix(prefix).last(),
        }
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        self.map.scan_prefix(prefix)
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn clear(&mut self) {
        if self.tracking.is_some() {
            // Each deleted key is a change the next checkpoint writes.
            crate::delete_all(self);
            return;
        }
        self.map = match self.map {
            Map::Ordered(_) => Map::Ordered(OrdMap::new()),
            Map::Hashed(_) => Map::Hashed(BytesMap::default()),
        };
    }

    fn snapshot(&self) -> Arc<dyn StateSnapshot> {
        Arc::new(MemSnapshot {
            map: self.map.clone(),
        })
    }
}

struct MemSnapshot {
    map: Map,
}

impl StateSnapshot for MemSnapshot {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + '_> {
        self.map.scan_prefix(&[])
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        self.map.scan_prefix(prefix)
    }
}

/// The entries of `map` whose key starts with `prefix`, in key order, both ends reachable.
fn prefix_range<'a>(
    map: &'a OrdMap<Bytes, Bytes>,
    prefix: &'a [u8],
) -> impl DoubleEndedIterator<Item = (Bytes, Bytes)> + 'a {
    let upper = match prefix_end(prefix) {
        Some(e) => Bound::Excluded(e),
        None => Bound::Unbounded,
    };
    map.range::<_, [u8]>((
        Bound::Included(prefix),
        upper.as_ref().map(|e| e.as_slice()),
    ))
    .map(|(k, v)| (k.clone(), v.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &[u8]) -> Bytes {
        Arc::from(s)
    }

    #[test]
    fn prefix_bounds_and_snapshots() {
        for t in [MemStateTable::default(), MemStateTable::keyed()] {
            prefix_bounds_and_snapshots_of(t);
        }
    }

    /// The same answers from the ordered and the hashed form.
    fn prefix_bounds_and_snapshots_of(mut t: MemStateTable) {
        for k in [&b"a\x01"[..], b"a\x02", b"a\xff", b"b\x00", b"\xff\xff"] {
            t.put(b(k), b(b"v"));
        }
        assert_eq!(
            &*t.first_with_prefix(b"a").map(|e| e.0).unwrap_or_default(),
            b"a\x01"
        );
        assert_eq!(
            &*t.last_with_prefix(b"a").map(|e| e.0).unwrap_or_default(),
            b"a\xff"
        );
        assert_eq!(
            &*t.last_with_prefix(b"\xff").map(|e| e.0).unwrap_or_default(),
            b"\xff\xff"
        );
        assert!(t.first_with_prefix(b"c").is_none());
        let snap = t.snapshot();
        t.delete(b"a\x01");
        assert_eq!(snap.len(), 5);
        assert_eq!(t.len(), 4);
        assert!(snap.get(b"a\x01").is_some());
        let keys = |it: Box<dyn Iterator<Item = (Bytes, Bytes)> + '_>| -> Vec<Bytes> {
            it.map(|(k, _)| k).collect()
        };
        assert_eq!(
            keys(t.scan_prefix(b"a")),
            vec![b(b"a\x02"), b(b"a\xff")],
            "in key order"
        );
        assert_eq!(keys(snap.iter()).len(), 5);
        assert!(keys(snap.iter()).is_sorted());
    }

    #[test]
    fn a_tracked_table_reports_each_changed_key_once_with_its_final_value() {
        let base = || [(b(b"k0"), b(b"0"))];
        for t in [
            MemStateTable::tracked("t", base()),
            MemStateTable::tracked_keyed("t", base()),
        ] {
            tracked_changes_of(t);
        }
    }

    fn tracked_changes_of(mut t: MemStateTable) {
        t.put(b(b"k1"), b(b"1"));
        t.put(b(b"k1"), b(b"2"));
        t.put(b(b"k0"), b(b"0")); // unchanged: not reported
        t.put(b(b"k2"), b(b"x"));
        t.delete(b"k2"); // created and deleted since the checkpoint: nothing to write
        t.delete(b"absent");
        t.put(b(b"k4"), b(b"4"));
        t.delete(b"k0"); // deleted from the checkpoint: written
        let take = |t: &mut MemStateTable| {
            let mut out = Vec::new();
            t.take_changes(&mut out);
            let (name, changes) = out.remove(0);
            assert_eq!(name, "t");
            // Changes come with the table's entry count.
            if let Some((name, mut len)) = out.pop() {
                assert_eq!(name, "t\u{1}len");
                let count = Some(crate::encode_count(t.len() as i64));
                assert_eq!(len.next(), Some((b(b""), count)));
            }
            let mut changes: Vec<_> = changes.collect();
            changes.sort();
            changes
        };
        let some = |v: &[u8]| Some(b(v));
        assert_eq!(
            take(&mut t),
            vec![
                (b(b"k0"), None),
                (b(b"k1"), some(b"2")),
                (b(b"k4"), some(b"4"))
            ]
        );
        // Abandoned: handed out again, with what changed since.
        t.checkpoint_done(false);
        t.put(b(b"k3"), b(b"3"));
        t.delete(b"k4"); // fresh still: the abandoned checkpoint never wrote it
        assert_eq!(
            take(&mut t),
            vec![
                (b(b"k0"), None),
                (b(b"k1"), some(b"2")),
                (b(b"k3"), some(b"3"))
            ]
        );
        // A key changed while a checkpoint is in flight may be in it: its delete is written.
        t.put(b(b"k5"), b(b"5"));
        t.delete(b"k3");
        t.checkpoint_done(true);
        assert_eq!(take(&mut t), vec![(b(b"k3"), None), (b(b"k5"), some(b"5"))]);
        t.checkpoint_done(true);
        // Written: nothing left.
        assert!(take(&mut t).is_empty());
        let mut out = Vec::new();
        MemStateTable::default().take_changes(&mut out);
        assert!(out.is_empty());
    }
}

//! State larger than memory: tables whose checkpointed contents stay in RocksDB.
//!
//! # Model
//! A [`SpillTable`] is its *base* — its entries as of the last checkpoint written, stored in
//! the history's database under `s ‖ name ‖ 0 ‖ key` and read through RocksDB's block cache
//! (whose size is the memory budget) — plus an *overlay* in memory: every key written since
//! that checkpoint, with its value or a tombstone. Reads look in the overlay first. A
//! checkpoint takes the overlay as it is (an O(1) clone of a persistent map), writes it into
//! the base, and only then drops from the overlay the entries that have not changed again.
//! So memory holds the changes of about one checkpoint interval, not the state; the store
//! asks for a checkpoint early once the overlays pass [`SpillStore::pending_limit`].
//!
//! # Snapshots
//! A snapshot is the overlay at that moment (O(1)) over the base. The base changes only when
//! a checkpoint is written, and then only at the keys of the overlay it took; a snapshot
//! that includes every write the checkpoint took holds those keys itself and reads the same
//! before and after. One taken earlier (a long query) would not, so before writing, the
//! table reads the base's current values at those keys — only when such a snapshot is alive
//! (every snapshot pins the count of writes it includes) — and hangs them on a chain every
//! snapshot follows from the moment it was taken: a read looks in the snapshot's overlay,
//! then in what each later checkpoint overwrote (the first one that wrote the key has the
//! value the snapshot saw), then in the base. Checkpoints never wait for readers.
//!
//! # Errors
//! The table interface has no error channel for reads. A read of the base that fails is
//! logged, reads as absent, and is kept for [`StateStore::take_error`]: the runtime then
//! fails the views (their state can no longer be trusted) instead of going on silently.

use std::cmp::Ordering;
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use im::OrdMap;
use kappa_common::{KappaError, Result};

use crate::{
    Bytes, History, StateSnapshot, StateStore, StateTable, TableChanges, len_table, prefix_end,
};

/// What the tables of one store share: the history's database, the bytes their overlays
/// hold, and the first read error.
struct Shared {
    history: Arc<History>,
    pending: AtomicU64,
    error: Mutex<Option<KappaError>>,
}

impl Shared {
    fn failed(&self, e: KappaError) {
        tracing::error!(error = %e, "cannot read stored state");
        if let Ok(mut slot) = self.error.lock() {
            slot.get_or_insert(e);
        }
    }

    fn get(&self, table: &str, key: &[u8]) -> Option<Bytes> {
        match self.history.state_get(table, key) {
            Ok(v) => v,
            Err(e) => {
                self.failed(e);
                None
            }
        }
    }
}

/// Hands out tables that keep their checkpointed contents on disk.
pub struct SpillStore {
    shared: Arc<Shared>,
    limit: u64,
}

impl SpillStore {
    /// `pending_limit`: overlay bytes that call for a checkpoint before the interval ends.
    pub fn new(history: Arc<History>, pending_limit: u64) -> Self {
        Self {
            shared: Arc::new(Shared {
                history,
                pending: AtomicU64::new(0),
                error: Mutex::new(None),
            }),
            limit: pending_limit,
        }
    }
}

impl StateStore for SpillStore {
    fn create_table(&self, name: &str) -> Result<Box<dyn StateTable>> {
        let history = &self.shared.history;
        let len = match history.state_get(&len_table(name), &[])? {
            Some(v) => crate::decode_count(&v) as usize,
            // Not written by a version that kept no count: counted once.
            None => history
                .state_range(name, &[], None, false)
                .try_fold(0, |n, e| e.map(|_| n + 1))?,
        };
        Ok(Box::new(SpillTable {
            shared: self.shared.clone(),
            name: name.to_string(),
            overlay: OrdMap::new(),
            len,
            writes: 0,
            pins: Mutex::new(Vec::new()),
            taken: None,
            link: Arc::default(),
            preimages: None,
            last_base_read: Mutex::new(None),
        }))
    }

    fn checkpointed(&self) -> bool {
        true
    }

    fn spills(&self) -> bool {
        true
    }

    fn pending_bytes(&self) -> u64 {
        self.shared.pending.load(AtomicOrdering::Relaxed)
    }

    fn pending_limit(&self) -> Option<u64> {
        Some(self.limit)
    }

    fn take_error(&self) -> Option<KappaError> {
        self.shared.error.lock().ok()?.take()
    }
}

type Overlay = OrdMap<Bytes, Option<Bytes>>;

pub struct SpillTable {
    shared: Arc<Shared>,
    name: String,
    /// Every key written since the last checkpoint written: its value, or `None` (deleted).
    overlay: Overlay,
    len: usize,
    /// Writes applied so far (what a snapshot pins).
    writes: u64,
    /// Live snapshots, each with the write count it includes.
    pins: Mutex<Vec<Weak<u64>>>,
    /// The overlay and write count a checkpoint took and has not yet reported on.
    taken: Option<(Overlay, u64)>,
    /// Where snapshots taken now find what later checkpoints overwrite.
    link: Arc<Link>,
    /// The base values the checkpoint about to be written overwrites, if an older snapshot
    /// needs them.
    preimages: Option<Overlay>,
    /// The last key read from the base and whether it was there: a write right after a
    /// read of the same key (read-modify-write, as counts are kept) need not read it again
    /// to keep `len`. The base changes only when a checkpoint is written, and only at keys
    /// the overlay holds, which are never read from the base; it is cleared then anyway.
    last_base_read: Mutex<Option<(Bytes, bool)>>,
}

/// One step of the chain of overwritten values (see the module docs).
#[derive(Default)]
struct Link {
    /// Set when a checkpoint is written: the base values it replaced (`None`: absent) at
    /// the keys it wrote — only if a snapshot needed them — and the next link.
    next: OnceLock<(Overlay, Arc<Link>)>,
}

fn entry_bytes(k: &Bytes, v: &Option<Bytes>) -> u64 {
    (k.len() + v.as_ref().map_or(0, |v| v.len()) + 64) as u64
}

impl SpillTable {
    fn exists(&self, key: &[u8]) -> bool {
        if let Some(v) = self.overlay.get(key) {
            return v.is_some();
        }
        if let Ok(last) = self.last_base_read.lock()
            && let Some((k, there)) = &*last
            && **k == *key
        {
            return *there;
        }
        self.shared.get(&self.name, key).is_some()
    }

    fn set(&mut self, key: Bytes, value: Option<Bytes>) {
        let added = entry_bytes(&key, &value);
        if let Some(old) = self.overlay.insert(key.clone(), value) {
            self.shared
                .pending
                .fetch_sub(entry_bytes(&key, &old), AtomicOrdering::Relaxed);
        }
        self.shared
            .pending
            .fetch_add(added, AtomicOrdering::Relaxed);
        self.writes += 1;
    }

    fn view(&self) -> View<'_> {
        View {
            shared: &self.shared,
            name: &self.name,
            overlay: &self.overlay,
            link: None,
        }
    }
}

impl StateTable for SpillTable {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        if let Some(v) = self.overlay.get(key) {
            return v.clone();
        }
        let v = self.shared.get(&self.name, key);
        if let Ok(mut last) = self.last_base_read.lock() {
            *last = Some((Bytes::from(key), v.is_some()));
        }
        v
    }

    fn put(&mut self, key: Bytes, value: Bytes) {
        if !self.exists(&key) {
            self.len += 1;
        }
        self.set(key, Some(value));
    }

    fn delete(&mut self, key: &[u8]) {
        if self.exists(key) {
            self.len -= 1;
            self.set(Bytes::from(key), None);
        }
    }

    fn first_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)> {
        self.view().prefix(prefix, false).next()
    }

    fn last_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)> {
        self.view().prefix(prefix, true).next()
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        self.view().prefix(prefix, false)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn snapshot(&self) -> Arc<dyn StateSnapshot> {
        let pin = Arc::new(self.writes);
        if let Ok(mut pins) = self.pins.lock() {
            pins.retain(|p| p.strong_count() > 0);
            pins.push(Arc::downgrade(&pin));
        }
        Arc::new(SpillSnapshot {
            shared: self.shared.clone(),
            name: self.name.clone(),
            overlay: self.overlay.clone(),
            len: self.len,
            link: self.link.clone(),
            _pin: pin,
        })
    }

    fn take_changes(&mut self, out: &mut TableChanges) {
        // The overlay is persistent: the writer iterates this version while writes go on.
        out.push((
            self.name.clone(),
            Box::new(self.overlay.clone().into_iter()),
        ));
        out.push((
            len_table(&self.name),
            Box::new(std::iter::once((
                Bytes::from(&[][..]),
                Some(crate::encode_count(self.len as i64)),
            ))),
        ));
        self.taken = Some((self.overlay.clone(), self.writes));
    }

    fn checkpoint_done(&mut self, written: bool) {
        if let Ok(mut last) = self.last_base_read.lock() {
            *last = None;
        }
        let preimages = self.preimages.take();
        let Some((taken, _)) = self.taken.take() else {
            return;
        };
        if !written {
            return;
        }
        let next = Arc::new(Link::default());
        // Set once: a link is replaced by its successor right here.
        let _ = self
            .link
            .next
            .set((preimages.unwrap_or_default(), next.clone()));
        self.link = next;
        // What was written is in the base now: forget it unless it changed again since.
        for (k, v) in taken.iter() {
            let same = match (self.overlay.get(k), v) {
                (Some(Some(now)), Some(then)) => Arc::ptr_eq(now, then),
                (Some(None), None) => true,
                _ => false,
            };
            if same && let Some(old) = self.overlay.remove(k) {
                self.shared
                    .pending
                    .fetch_sub(entry_bytes(k, &old), AtomicOrdering::Relaxed);
            }
        }
    }

    fn before_checkpoint_write(&mut self) {
        let Some((taken, taken_at)) = &self.taken else {
            return;
        };
        let older_snapshot = self.pins.lock().map_or(true, |pins| {
            pins.iter()
                .filter_map(Weak::upgrade)
                .any(|w| *w < *taken_at)
        });
        if older_snapshot {
            self.preimages = Some(
                taken
                    .keys()
                    .map(|k| (k.clone(), self.shared.get(&self.name, k)))
                    .collect(),
            );
        }
    }
}

/// Reads over an overlay and the base: what a table and its snapshots share.
struct View<'a> {
    shared: &'a Shared,
    name: &'a str,
    overlay: &'a Overlay,
    /// For a snapshot, the chain of what checkpoints since overwrote (a table reads the
    /// base as it is now).
    link: Option<&'a Arc<Link>>,
}

impl<'a> View<'a> {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        if let Some(v) = self.overlay.get(key) {
            return v.clone();
        }
        let mut link = self.link;
        while let Some((overwritten, next)) = link.and_then(|l| l.next.get()) {
            if let Some(v) = overwritten.get(key) {
                return v.clone();
            }
            link = Some(next);
        }
        self.shared.get(self.name, key)
    }

    /// The overlay, with what later checkpoints overwrote under it.
    fn effective_overlay(&self) -> std::borrow::Cow<'a, Overlay> {
        let mut patch: Option<Overlay> = None;
        let mut link = self.link;
        while let Some((overwritten, next)) = link.and_then(|l| l.next.get()) {
            for (k, v) in overwritten.iter() {
                // The earliest checkpoint's value is what the snapshot saw.
                let p = patch.get_or_insert_with(Overlay::new);
                if !p.contains_key(k) {
                    p.insert(k.clone(), v.clone());
                }
            }
            link = Some(next);
        }
        match patch {
            None => std::borrow::Cow::Borrowed(self.overlay),
            Some(mut p) => {
                // The snapshot's own writes win over everything.
                for (k, v) in self.overlay.iter() {
                    p.insert(k.clone(), v.clone());
                }
                std::borrow::Cow::Owned(p)
            }
        }
    }

    /// The live entries with keys starting with `prefix`, in key order or reversed.
    fn prefix(
        &self,
        prefix: &'a [u8],
        reverse: bool,
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        let end = prefix_end(prefix);
        let range = |o: &Overlay| -> Vec<(Bytes, Option<Bytes>)> {
            let upper = match &end {
                Some(e) => Bound::Excluded(e.as_slice()),
                None => Bound::Unbounded,
            };
            o.range::<_, [u8]>((Bound::Included(prefix), upper))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let overlay: Box<dyn Iterator<Item = (Bytes, Option<Bytes>)> + 'a> =
            match self.effective_overlay() {
                std::borrow::Cow::Borrowed(o) => {
                    let upper = match &end {
                        Some(e) => Bound::Excluded(e.as_slice()),
                        None => Bound::Unbounded,
                    };
                    let r = o
                        .range::<_, [u8]>((Bound::Included(prefix), upper))
                        .map(|(k, v)| (k.clone(), v.clone()));
                    if reverse {
                        Box::new(r.rev())
                    } else {
                        Box::new(r)
                    }
                }
                std::borrow::Cow::Owned(o) => {
                    let entries = range(&o);
                    if reverse {
                        Box::new(entries.into_iter().rev())
                    } else {
                        Box::new(entries.into_iter())
                    }
                }
            };
        let shared = self.shared;
        let base = self
            .shared
            .history
            .state_range(self.name, prefix, end.as_deref(), reverse)
            .map_while(move |r| match r {
                Ok(e) => Some(e),
                Err(e) => {
                    shared.failed(e);
                    None
                }
            });
        Box::new(Merge {
            overlay: overlay.peekable(),
            base: base.peekable(),
            reverse,
        })
    }
}

/// Merges overlay entries over base entries, both in the same order: an overlay entry
/// replaces the base entry with its key, a tombstone hides it.
struct Merge<O: Iterator<Item = (Bytes, Option<Bytes>)>, B: Iterator<Item = (Bytes, Bytes)>> {
    overlay: std::iter::Peekable<O>,
    base: std::iter::Peekable<B>,
    reverse: bool,
}

impl<O, B> Iterator for Merge<O, B>
where
    O: Iterator<Item = (Bytes, Option<Bytes>)>,
    B: Iterator<Item = (Bytes, Bytes)>,
{
    type Item = (Bytes, Bytes);

    fn next(&mut self) -> Option<(Bytes, Bytes)> {
        loop {
            let order = match (self.overlay.peek(), self.base.peek()) {
                (None, None) => return None,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((o, _)), Some((b, _))) => {
                    let c = o.as_ref().cmp(b.as_ref());
                    if self.reverse { c.reverse() } else { c }
                }
            };
            if order == Ordering::Greater {
                return self.base.next();
            }
            if order == Ordering::Equal {
                self.base.next();
            }
            if let Some((k, Some(v))) = self.overlay.next() {
                return Some((k, v));
            }
        }
    }
}

/// A table's contents at one moment: its overlay then over the base (see the module docs).
struct SpillSnapshot {
    shared: Arc<Shared>,
    name: String,
    overlay: Overlay,
    len: usize,
    link: Arc<Link>,
    /// Tells checkpoints that this snapshot needs what they overwrite.
    _pin: Arc<u64>,
}

impl SpillSnapshot {
    fn view(&self) -> View<'_> {
        View {
            shared: &self.shared,
            name: &self.name,
            overlay: &self.overlay,
            link: Some(&self.link),
        }
    }
}

impl StateSnapshot for SpillSnapshot {
    fn get(&self, key: &[u8]) -> Option<Bytes> {
        self.view().get(key)
    }

    fn len(&self) -> usize {
        self.len
    }

    fn iter(&self) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + '_> {
        self.view().prefix(&[], false)
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &'a [u8],
    ) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a> {
        self.view().prefix(prefix, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::HistoryOptions;

    fn b(s: &[u8]) -> Bytes {
        Arc::from(s)
    }

    /// Writes what a table's checkpoint took, as the runtime does.
    fn checkpoint(h: &History, t: &mut dyn StateTable, seq: u64) -> bool {
        let mut changes = Vec::new();
        t.take_changes(&mut changes);
        t.before_checkpoint_write();
        h.checkpoint(
            seq,
            b"",
            crate::CheckpointState {
                tables: changes,
                dropped: vec![],
            },
        )
        .unwrap();
        t.checkpoint_done(true);
        true
    }

    #[test]
    fn reads_merge_the_overlay_over_the_base_and_snapshots_stay_put() {
        let dir = std::env::temp_dir().join(format!("kappa-spill-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = Arc::new(History::open(&dir, HistoryOptions::default()).unwrap());
        let store = SpillStore::new(h.clone(), 1 << 20);
        let mut t = store.create_table("t").unwrap();
        for k in [&b"a1"[..], b"a2", b"a3", b"b1"] {
            t.put(b(k), b(b"base"));
        }
        assert!(store.pending_bytes() > 0);
        assert!(checkpoint(&h, t.as_mut(), 1));
        assert_eq!(
            store.pending_bytes(),
            0,
            "the overlay is empty after a checkpoint"
        );
        // Overlay over base: a changed, a deleted, a new key.
        t.put(b(b"a2"), b(b"new"));
        t.delete(b"a3");
        t.put(b(b"a0"), b(b"new"));
        t.delete(b"zz");
        assert_eq!(t.len(), 4);
        assert_eq!(t.get(b"a2").as_deref(), Some(&b"new"[..]));
        assert_eq!(t.get(b"a3"), None);
        assert_eq!(t.get(b"b1").as_deref(), Some(&b"base"[..]));
        assert_eq!(t.first_with_prefix(b"a").map(|e| e.0), Some(b(b"a0")));
        assert_eq!(t.last_with_prefix(b"a").map(|e| e.0), Some(b(b"a2")));
        let snap = t.snapshot();
        let all: Vec<_> = snap.iter().collect();
        assert_eq!(
            all,
            vec![
                (b(b"a0"), b(b"new")),
                (b(b"a1"), b(b"base")),
                (b(b"a2"), b(b"new")),
                (b(b"b1"), b(b"base"))
            ]
        );
        assert_eq!(snap.scan_prefix(b"b").count(), 1);
        // A snapshot older than two checkpoints still reads what it saw.
        let old = t.snapshot();
        t.put(b(b"b1"), b(b"newer"));
        t.delete(b"a1");
        assert!(checkpoint(&h, t.as_mut(), 2));
        t.put(b(b"a1"), b(b"back"));
        t.put(b(b"b1"), b(b"newest"));
        assert!(checkpoint(&h, t.as_mut(), 3));
        assert_eq!(old.get(b"b1").as_deref(), Some(&b"base"[..]));
        assert_eq!(old.get(b"a1").as_deref(), Some(&b"base"[..]));
        assert_eq!(old.get(b"a2").as_deref(), Some(&b"new"[..]));
        assert_eq!(old.iter().collect::<Vec<_>>(), all);
        let keys: Vec<_> = old.scan_prefix(b"a").map(|e| e.0).collect();
        assert_eq!(keys, vec![b(b"a0"), b(b"a1"), b(b"a2")]);
        drop((old, snap));
        let current = t.snapshot();
        assert_eq!(current.get(b"b1").as_deref(), Some(&b"newest"[..]));
        assert_eq!(current.iter().count(), 4);
        // A new table object over the same name sees the checkpointed contents and count.
        let t2 = store.create_table("t").unwrap();
        assert_eq!(t2.len(), 4);
        assert_eq!(t2.get(b"a3"), None);
        assert_eq!(t2.get(b"b1").as_deref(), Some(&b"newest"[..]));
        assert_eq!(t2.get(b"a1").as_deref(), Some(&b"back"[..]));
        drop((t, t2, current, store));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Writes that follow a read of the same key keep the count without reading the base
    /// again; what they remember of the base is forgotten once a checkpoint rewrites it.
    #[test]
    fn read_then_write_keeps_the_count_across_checkpoints() {
        let dir = std::env::temp_dir().join(format!("kappa-rmw-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = Arc::new(History::open(&dir, HistoryOptions::default()).unwrap());
        let store = SpillStore::new(h.clone(), 1 << 20);
        let mut t = store.create_table("t").unwrap();
        t.put(b(b"a"), b(b"1"));
        assert!(checkpoint(&h, t.as_mut(), 1));
        // In the base: read, then overwritten (no new entry) and deleted (one fewer).
        assert!(t.get(b"a").is_some());
        t.put(b(b"a"), b(b"2"));
        assert_eq!(t.len(), 1);
        // Absent: read, then written (one more).
        assert!(t.get(b"b").is_none());
        t.put(b(b"b"), b(b"1"));
        assert_eq!(t.len(), 2);
        assert!(checkpoint(&h, t.as_mut(), 2));
        // "b" was last read as absent from the base; the checkpoint wrote it there.
        t.delete(b"b");
        t.delete(b"b");
        assert_eq!(t.len(), 1);
        assert!(t.get(b"a").is_some());
        t.delete(b"a");
        assert_eq!(t.len(), 0);
        assert!(checkpoint(&h, t.as_mut(), 3));
        assert_eq!(store.create_table("t").unwrap().len(), 0);
        drop((t, store));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A restart may switch between keeping state in memory and spilling it: each store
    /// finds the entries and their count as the other wrote them.
    #[test]
    fn tables_checkpointed_in_memory_are_read_back_spilled_and_back() {
        let dir = std::env::temp_dir().join(format!("kappa-switch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let h = Arc::new(History::open(&dir, HistoryOptions::default()).unwrap());
        let in_memory = crate::CheckpointedStore::new(h.clone());
        let mut t = in_memory.create_table("t").unwrap();
        for k in [&b"a"[..], b"b", b"c"] {
            t.put(b(k), b(b"1"));
        }
        assert!(checkpoint(&h, t.as_mut(), 1));
        let spilled = SpillStore::new(h.clone(), 1 << 20);
        let mut s = spilled.create_table("t").unwrap();
        assert_eq!(s.len(), 3);
        s.delete(b"a");
        s.delete(b"b");
        assert!(checkpoint(&h, s.as_mut(), 2));
        let mut t = in_memory.create_table("t").unwrap();
        assert_eq!(t.len(), 1);
        t.put(b(b"d"), b(b"1"));
        assert!(checkpoint(&h, t.as_mut(), 3));
        let s = spilled.create_table("t").unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s.scan_prefix(b"").count(), 2);
        drop((t, s, in_memory, spilled));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

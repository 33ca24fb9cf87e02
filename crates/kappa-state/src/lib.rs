//! State behind one interface.
//!
//! Operators keep their state in [`StateTable`]s: ordered maps from byte keys to byte values,
//! keys compared bytewise (encode keys with an order-preserving encoding such as Arrow's row
//! format and prefix scans become range scans). A table's [`StateTable::snapshot`] is a
//! read-only view of its contents at that moment that later writes never change: the runtime
//! takes one per relation at each epoch commit and readers query those.
//!
//! State lives in memory: persistent ordered maps whose clone is O(1) and shares structure,
//! so a snapshot per epoch costs nothing until the next write. [`MemStateStore`] keeps
//! nothing across restarts; [`CheckpointedStore`] restores each table from the last
//! checkpoint in the [`History`] and tracks the keys that change, which the runtime writes at
//! the next checkpoint (only the changes: a checkpoint costs what changed, not what is held).
//! [`SpillStore`] keeps only the changes since the last checkpoint in memory and reads the
//! rest from RocksDB (whose cache has a memory budget): state larger than memory.

mod bytes_map;
mod checkpointed;
pub mod codec;
mod history;
mod mem;
mod multiset;
mod spill;

use std::sync::Arc;

pub use bytes_map::BytesMap;
pub use checkpointed::CheckpointedStore;
pub use history::{CheckpointState, EpochRecord, History, HistoryOptions, Record, SourcePosition};
pub use mem::{MemStateStore, MemStateTable};
pub use multiset::{KeyRows, MultisetSnapshot, RowMultiset, decode_rows, row_converter};
pub use spill::SpillStore;

/// A key or value as stored. Cheap to clone.
pub type Bytes = Arc<[u8]>;

/// An ordered, mutable key-value table owned by one operator (or one relation).
pub trait StateTable: Send + Sync {
    fn get(&self, key: &[u8]) -> Option<Bytes>;
    fn put(&mut self, key: Bytes, value: Bytes);
    fn delete(&mut self, key: &[u8]);
    /// The entry with the smallest key that starts with `prefix`.
    fn first_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)>;
    /// The entry with the largest key that starts with `prefix`.
    fn last_with_prefix(&self, prefix: &[u8]) -> Option<(Bytes, Bytes)>;
    /// The entries whose key starts with `prefix`, in key order, found without visiting
    /// the others (an empty prefix: all, so a scan that stops early reads only the first).
    fn scan_prefix<'a>(&'a self, prefix: &'a [u8])
    -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The contents as of now, unaffected by later writes.
    fn snapshot(&self) -> Arc<dyn StateSnapshot>;

    /// Deletes every entry, as deleting each would (a table that can drops them at once).
    fn clear(&mut self) {
        delete_all(self);
    }

    // Checkpoints (tables of a checkpointed store; the defaults are for tables that are not
    // checkpointed). `take_changes` hands out the changes since the last checkpoint that was
    // written; the table holds them as in flight until `checkpoint_done` says whether that
    // checkpoint was written (they are then in the base) or abandoned (they are handed out
    // again next time).

    /// Appends the table's name and every key written since the last checkpoint written,
    /// each with its value now (`None`: deleted).
    fn take_changes(&mut self, _out: &mut TableChanges) {}

    /// The checkpoint holding the changes last taken was written (`true`) or abandoned.
    fn checkpoint_done(&mut self, _written: bool) {}

    /// Right before the checkpoint holding the changes last taken is written: a table whose
    /// snapshots read the stored base keeps what live snapshots taken before those changes
    /// need of it.
    fn before_checkpoint_write(&mut self) {}
}

/// Deletes every entry of `t`, one by one.
pub(crate) fn delete_all<T: StateTable + ?Sized>(t: &mut T) {
    let keys: Vec<Bytes> = t.scan_prefix(&[]).map(|(k, _)| k).collect();
    for k in keys {
        t.delete(&k);
    }
}

/// One state table's changes for a checkpoint: each key written since the last checkpoint
/// written with its value now (`None`: deleted). The writer consumes it once, off the
/// barrier, so a table can hand out a view of its changes instead of a copy.
pub type Changes = Box<dyn Iterator<Item = (Bytes, Option<Bytes>)> + Send>;

/// State tables' changes for a checkpoint, by table name.
pub type TableChanges = Vec<(String, Changes)>;

/// A read-only, immutable view of a state table.
pub trait StateSnapshot: Send + Sync {
    fn get(&self, key: &[u8]) -> Option<Bytes>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// All entries in key order.
    fn iter(&self) -> Box<dyn Iterator<Item = (Bytes, Bytes)> + '_>;
    /// The entries whose key starts with `prefix`, in key order, found without visiting
    /// the others.
    fn scan_prefix<'a>(&'a self, prefix: &'a [u8])
    -> Box<dyn Iterator<Item = (Bytes, Bytes)> + 'a>;
}

/// Hands out state tables. One store per server. The name is the table's identity across
/// restarts: a checkpointed store gives a table back the contents last checkpointed under
/// its name. Names are unique among live tables; a relation's tables' names start with its
/// prefix (so dropping the relation drops them all).
pub trait StateStore: Send + Sync {
    fn create_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>>;
    /// A table its owner reads only by key (`get`; no prefix scans on its hot path, and
    /// none that needs to be fast) and snapshots only when restoring: a store that can keeps
    /// it hashed rather than ordered, and its snapshot may cost a copy. Its scans still
    /// return entries in key order.
    fn create_keyed_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        self.create_table(name)
    }
    /// A table its owner writes only at checkpoints and reads only when it is restored (a
    /// log of its changes, or a copy of state it keeps in its own structures): a store
    /// that can keeps only the changes not yet checkpointed in memory, the rest on disk.
    fn create_cold_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        self.create_table(name)
    }
    /// Whether tables survive restarts (and operators should keep their whole state in them).
    fn checkpointed(&self) -> bool {
        false
    }
    /// Whether tables keep only their recent changes in memory (state larger than memory):
    /// operators that could keep their state in their own in-memory structures instead
    /// (a join's hash maps) should keep it in tables.
    fn spills(&self) -> bool {
        false
    }
    /// Bytes of changes the tables hold in memory until the next checkpoint writes them; a
    /// store that spills asks for a checkpoint when they pass its budget.
    fn pending_bytes(&self) -> u64 {
        0
    }
    /// How many pending bytes call for a checkpoint (`None`: only the interval does).
    fn pending_limit(&self) -> Option<u64> {
        None
    }
    /// The first error reading stored state since the last call (reads that fail are logged
    /// and surface here, where the runtime fails the views that depend on them).
    fn take_error(&self) -> Option<kappa_common::KappaError> {
        None
    }
}

/// The pseudo-table holding a checkpointed table's entry count (under the empty key), which
/// every store writes with the table's changes, so a restart may read the table through
/// another store (spilling or not). Its name is the table's followed by 1, so it is never a
/// table's own key space but shares its name prefix (a dropped relation's counts go with
/// its state).
pub(crate) fn len_table(name: &str) -> String {
    format!("{name}\u{1}len")
}

/// Multiset counts are stored as 8-byte little-endian values.
pub fn encode_count(n: i64) -> Bytes {
    Arc::from(n.to_le_bytes().as_slice())
}

pub fn decode_count(v: &[u8]) -> i64 {
    let mut b = [0u8; 8];
    let n = v.len().min(8);
    b[..n].copy_from_slice(&v[..n]);
    i64::from_le_bytes(b)
}

/// Adds `delta` to the count stored under `key` (absent = 0) and returns the new count. A
/// count that reaches 0 is deleted. A count may never become negative: that means a
/// retraction of something never inserted, and is refused (with the table unchanged) as an
/// internal error whose message names `what`.
pub fn add_to_count(
    table: &mut dyn StateTable,
    key: &[u8],
    delta: i64,
    what: &dyn std::fmt::Display,
) -> kappa_common::Result<i64> {
    let new = table.get(key).map(|v| decode_count(&v)).unwrap_or(0) + delta;
    if new < 0 {
        return Err(kappa_common::KappaError::internal(format!(
            "count became negative ({new}) in {what}"
        )));
    }
    if new == 0 {
        table.delete(key);
    } else {
        table.put(Arc::from(key), encode_count(new));
    }
    Ok(new)
}

/// The smallest byte string greater than every string with prefix `p`, or `None` if there
/// is none (p is all 0xFF).
pub fn prefix_end(p: &[u8]) -> Option<Vec<u8>> {
    let mut end = p.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

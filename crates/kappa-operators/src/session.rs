//! Session windows: each row with the bounds of its session appended.
//!
//! # Semantics
//! Per partition (the values of the partition columns; NULL is a value of its own), the
//! rows sorted by time fall into sessions: maximal runs whose consecutive times are less
//! than `gap` apart, each the window `[first, last + gap)` ([`SessionSpec::sessions`]).
//! The output is every input row (weight and all) with its session's `window_start` and
//! `window_end`; a row whose time is NULL is in no session and is dropped.
//!
//! # Incremental rule
//! A row's session depends on its neighbours: an insert can extend or merge sessions, a
//! delete shorten or split one. Changes are collected over the epoch and applied at the
//! barrier, per touched partition: the sessions before and after are compared, and every
//! stored row whose bounds changed is retracted with the old ones and emitted with the new
//! ones; rows of unchanged sessions emit only their own changes. So a growing session is
//! re-emitted at most once per epoch, not once per row.
//!
//! # Watermark
//! With the time column bounded by the watermark (`t + k > W` for every future row, `k` its
//! offset), a change can only touch sessions that end after its time, so a session with
//! `end + k - 1 <= W` is final: its rows are freed. A change whose time has `t + k <= W` is
//! late (it could only touch final sessions): it is dropped and counted. The output's
//! `window_end` is bounded with offset `k - 1`, which lets an aggregate grouped by it close
//! and emit on window close.
//!
//! # Checkpoints
//! The partitions changed since the last checkpoint are rewritten whole to a `StateTable`
//! (`len ‖ partition ‖ time ‖ row` → count): a partition holds the rows of its open
//! sessions only, so this costs what the changed sessions hold. A restart rebuilds the
//! partitions and, from their sessions, the closing index.
//!
//! When the store spills (state larger than memory) the table is the state between
//! barriers: a barrier loads the partitions it touches (changed, or with a session due to
//! close), applies the same rules, writes the changed ones back and drops them from memory.
//! Only the closing index stays in memory; a restart rebuilds it (and the entry count) in
//! one scan of the table, one partition at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, Int64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use datafusion::arrow::row::{RowConverter, SortField};
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_plan::window::SessionSpec;

use crate::Operator;

type Bytes = Arc<[u8]>;
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// One partition's stored rows: time → row (row format) → count (> 0).
type Partition = BTreeMap<i64, HashMap<Bytes, i64>>;

pub struct SessionWindow {
    time_col: usize,
    spec: SessionSpec,
    /// The time column's watermark offset `k`, if the watermark bounds it.
    time_offset: Option<i64>,
    keys: RowConverter,
    rows: RowConverter,
    schema: SchemaRef,
    parts: HashMap<Bytes, Partition>,
    /// This epoch's changes per partition: (time, row, weight).
    pending: HashMap<Bytes, Vec<(i64, Bytes, i64)>>,
    /// Session end → partitions that had a session ending then (checked at close).
    closing: BTreeMap<i64, Vec<Bytes>>,
    watermark: Option<i64>,
    entries: usize,
    late_rows: u64,
    /// With checkpoints: the table written at each, and the partitions changed since.
    checkpointed: Option<(Box<dyn kappa_state::StateTable>, hashbrown::HashSet<Bytes>)>,
    /// `parts` holds only the partitions of the barrier running (see the module docs).
    spilled: bool,
}

/// A partition's key in the checkpoint table: its length (4 bytes) ‖ the key.
fn part_prefix(key: &[u8]) -> Vec<u8> {
    kappa_state::codec::len_prefix(key)
}

/// A stored row's time and row, from its key after the partition's prefix.
fn split_entry(rest: &[u8]) -> Result<(i64, &[u8])> {
    kappa_state::codec::split_ordered_i64(rest)
        .ok_or_else(|| kappa_state::codec::damaged("a session window"))
}

/// Rows to emit: row, weight, session bounds.
#[derive(Default)]
struct Emit {
    rows: Vec<Bytes>,
    weights: Vec<i64>,
    starts: Vec<i64>,
    ends: Vec<i64>,
}

impl Emit {
    fn push(&mut self, row: &Bytes, w: i64, (start, end): (i64, i64)) {
        if w != 0 {
            self.rows.push(row.clone());
            self.weights.push(w);
            self.starts.push(start);
            self.ends.push(end);
        }
    }
}

/// The session containing `t`, among `sessions` (sorted, and one of them contains it).
fn session_of(sessions: &[(i64, i64)], t: i64) -> Option<(i64, i64)> {
    let i = sessions.partition_point(|s| s.0 <= t).checked_sub(1)?;
    Some(sessions[i]).filter(|s| t < s.1)
}

impl SessionWindow {
    /// `input` is the input's schema, `schema` the output's (input columns, then
    /// `window_start` and `window_end`).
    pub fn new(
        time_col: usize,
        spec: SessionSpec,
        time_offset: Option<i64>,
        input: &SchemaRef,
        schema: SchemaRef,
    ) -> Result<Self> {
        let keys = RowConverter::new(
            spec.partition
                .iter()
                .map(|&c| SortField::new(input.field(c).data_type().clone()))
                .collect(),
        )?;
        Ok(Self {
            time_col,
            spec,
            time_offset,
            keys,
            rows: kappa_state::row_converter(input)?,
            schema,
            parts: HashMap::default(),
            pending: HashMap::default(),
            closing: BTreeMap::new(),
            watermark: None,
            entries: 0,
            late_rows: 0,
            checkpointed: None,
            spilled: false,
        })
    }

    /// Keeps the state in `table` at checkpoints; with `spill`, there between barriers.
    pub fn with_checkpoints(
        mut self,
        table: Box<dyn kappa_state::StateTable>,
        spill: bool,
    ) -> Self {
        self.checkpointed = Some((table, hashbrown::HashSet::new()));
        self.spilled = spill;
        self
    }

    /// Spilled: loads partition `key` from the table unless it is loaded.
    fn page_in(&mut self, key: &Bytes) -> Result<()> {
        let Some((table, changed)) = &self.checkpointed else {
            return Ok(());
        };
        // Changed this barrier: what memory holds is newer than the table (even if gone).
        if !self.spilled || self.parts.contains_key(key) || changed.contains(key) {
            return Ok(());
        }
        let prefix = part_prefix(key);
        let mut part = Partition::new();
        for (k, v) in table.scan_prefix(&prefix) {
            let (t, row) = split_entry(&k[prefix.len()..])?;
            part.entry(t)
                .or_default()
                .insert(Arc::from(row), kappa_state::decode_count(&v));
        }
        if !part.is_empty() {
            self.parts.insert(key.clone(), part);
        }
        Ok(())
    }

    /// Reads the table one partition at a time (it is in partition order): each one's
    /// sessions go into the closing index, and the partition into memory unless spilled.
    fn restore_from(&mut self, table: &dyn kappa_state::StateTable) -> Result<()> {
        let damaged = || kappa_state::codec::damaged("a session window");
        self.parts.clear();
        self.closing.clear();
        self.entries = 0;
        let mut current: Option<(Bytes, Partition)> = None;
        let done = |this: &mut Self, (key, part): (Bytes, Partition)| {
            for (_, end) in this.spec.sessions(part.keys().copied()) {
                this.closing.entry(end).or_default().push(key.clone());
            }
            if !this.spilled {
                this.parts.insert(key, part);
            }
        };
        for (k, v) in table.scan_prefix(&[]) {
            let (key, rest) = kappa_state::codec::split_len_prefixed(&k).ok_or_else(damaged)?;
            let (t, row) = split_entry(rest)?;
            if current.as_ref().is_some_and(|(c, _)| **c != *key)
                && let Some(finished) = current.take()
            {
                done(self, finished);
            }
            let (_, part) = current.get_or_insert_with(|| (Arc::from(key), Partition::new()));
            part.entry(t)
                .or_default()
                .insert(Arc::from(row), kappa_state::decode_count(&v));
            self.entries += 1;
        }
        if let Some(finished) = current {
            done(self, finished);
        }
        Ok(())
    }

    /// Rewrites the partitions changed since the last call to the table.
    fn write_changed(&mut self) {
        if let Some((table, changed)) = &mut self.checkpointed {
            for key in changed.drain() {
                let prefix = part_prefix(&key);
                let old: Vec<Bytes> = table.scan_prefix(&prefix).map(|(k, _)| k).collect();
                for k in old {
                    table.delete(&k);
                }
                for (t, rows) in self.parts.get(&key).into_iter().flatten() {
                    for (row, c) in rows {
                        let mut k = prefix.clone();
                        k.extend_from_slice(&kappa_state::codec::ordered_i64(*t));
                        k.extend_from_slice(row);
                        table.put(Arc::from(k), kappa_state::encode_count(*c));
                    }
                }
            }
        }
    }

    fn changed(&mut self, key: &Bytes) {
        if let Some((_, changed)) = &mut self.checkpointed {
            changed.insert(key.clone());
        }
    }

    /// Applies one partition's changes and records what they do to the output.
    fn apply(
        &mut self,
        key: &Bytes,
        changes: Vec<(i64, Bytes, i64)>,
        emit: &mut Emit,
    ) -> Result<()> {
        self.changed(key);
        let part = self.parts.entry(key.clone()).or_default();
        let old = self.spec.sessions(part.keys().copied());
        // Times present before the changes, and each changed time's deltas.
        let mut deltas: BTreeMap<i64, (bool, Vec<(Bytes, i64)>)> = BTreeMap::new();
        for (t, row, w) in changes {
            let present = part.contains_key(&t);
            deltas
                .entry(t)
                .or_insert_with(|| (present, vec![]))
                .1
                .push((row.clone(), w));
            let rows = part.entry(t).or_default();
            let count = rows.entry(row.clone()).or_insert(0);
            if *count == 0 {
                self.entries += 1;
            }
            *count += w;
            if *count < 0 {
                return Err(KappaError::internal(
                    "session window: retraction of a row never stored",
                ));
            }
            if *count == 0 {
                rows.remove(&row);
                self.entries -= 1;
                if rows.is_empty() {
                    part.remove(&t);
                }
            }
        }
        let new = self.spec.sessions(part.keys().copied());
        // Times whose bounds may differ: those of sessions that are not in both lists.
        let mut visit: Vec<i64> = deltas.keys().copied().collect();
        for &(s, e) in old.iter().chain(&new) {
            if old.binary_search(&(s, e)).is_err() || new.binary_search(&(s, e)).is_err() {
                visit.extend(part.range(s..e).map(|(t, _)| *t));
            }
        }
        visit.sort_unstable();
        visit.dedup();
        for t in visit {
            let (was, delta) = match deltas.get(&t) {
                Some((was, d)) => (*was, d.as_slice()),
                None => (true, &[][..]),
            };
            let before = if was { session_of(&old, t) } else { None };
            let now = part.get(&t);
            let after = now.and_then(|_| session_of(&new, t));
            if before.is_some() && before == after {
                for (row, w) in delta {
                    emit.push(row, *w, after.unwrap_or_default());
                }
                continue;
            }
            if let Some(b) = before {
                // The rows as they were: the current ones minus this epoch's deltas.
                for (row, c) in now.into_iter().flatten() {
                    emit.push(row, -c, b);
                }
                for (row, w) in delta {
                    emit.push(row, *w, b);
                }
            }
            if let (Some(a), Some(rows)) = (after, now) {
                for (row, c) in rows {
                    emit.push(row, *c, a);
                }
            }
        }
        for &(s, e) in &new {
            if old.binary_search(&(s, e)).is_err() {
                self.closing.entry(e).or_default().push(key.clone());
            }
        }
        if part.is_empty() {
            self.parts.remove(key);
        }
        Ok(())
    }

    /// Frees the sessions of `key` that end at or before `upto` (a prefix of them).
    fn free(&mut self, key: &Bytes, upto: i64) {
        let Some(part) = self.parts.get_mut(key) else {
            return;
        };
        let closed = self
            .spec
            .sessions(part.keys().copied())
            .into_iter()
            .take_while(|s| s.1 <= upto)
            .last();
        if let Some((_, end)) = closed {
            if let Some((_, changed)) = &mut self.checkpointed {
                changed.insert(key.clone());
            }
            let open = part.split_off(&end);
            let gone = std::mem::replace(part, open);
            self.entries -= gone.values().map(|r| r.len()).sum::<usize>();
            if part.is_empty() {
                self.parts.remove(key);
            }
        }
    }

    fn output(&self, emit: Emit) -> Result<Option<ChangeBatch>> {
        if emit.rows.is_empty() {
            return Ok(None);
        }
        let mut columns = kappa_state::decode_rows(&self.rows, emit.rows.iter().map(|r| &r[..]))?;
        let tz = match self
            .schema
            .field(self.schema.fields().len() - 1)
            .data_type()
        {
            DataType::Timestamp(TimeUnit::Microsecond, tz) => tz.clone(),
            _ => None,
        };
        columns.extend(kappa_plan::window::bound_columns(
            emit.starts,
            emit.ends,
            tz,
        ));
        let n = emit.weights.len();
        let data = crate::batch_with_rows(self.schema.clone(), columns, n)?;
        Ok(Some(ChangeBatch::new(
            data,
            Int64Array::from(emit.weights),
        )?))
    }
}

impl Operator for SessionWindow {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let times = batch.data().column(self.time_col);
        let times = times
            .as_primitive_opt::<TimestampMicrosecondType>()
            .ok_or_else(|| KappaError::internal("session time column is not a timestamp"))?;
        let key_cols: Vec<_> = self
            .spec
            .partition
            .iter()
            .map(|&c| batch.data().column(c).clone())
            .collect();
        let keys = kappa_state::KeyRows::new(&self.keys, &key_cols)?;
        let rows = self.rows.convert_columns(batch.columns())?;
        let weights = batch.weights();
        for i in (0..batch.num_rows()).filter(|&i| times.is_valid(i)) {
            let t = times.value(i);
            let w = weights.value(i);
            if let (Some(k), Some(wm)) = (self.time_offset, self.watermark)
                && t.saturating_add(k) <= wm
            {
                self.late_rows += w.unsigned_abs();
                continue;
            }
            let key = keys.get(i);
            let changes = match self.pending.get_mut(key) {
                Some(c) => c,
                None => self.pending.entry(Arc::from(key)).or_default(),
            };
            changes.push((t, Arc::from(rows.row(i).data()), w));
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        watermark: Option<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let mut emit = Emit::default();
        for (key, changes) in std::mem::take(&mut self.pending) {
            self.page_in(&key)?;
            self.apply(&key, changes, &mut emit)?;
        }
        if let Some(b) = self.output(emit)? {
            out.push(b);
        }
        self.watermark = watermark.max(self.watermark);
        if let (Some(k), Some(wm)) = (self.time_offset, self.watermark) {
            let upto = wm.saturating_sub(k - 1);
            for (_, keys) in crate::take_closed(&mut self.closing, upto) {
                for key in keys {
                    self.page_in(&key)?;
                    self.free(&key, upto);
                }
            }
        }
        if self.spilled {
            self.write_changed();
            self.parts.clear();
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamSessionWindow"
    }

    fn checkpointable(&self) -> bool {
        self.checkpointed.is_some()
    }

    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        self.write_changed();
        Ok(crate::save_progress(self.watermark, self.late_rows))
    }

    fn state_tables(&mut self) -> Vec<&mut dyn kappa_state::StateTable> {
        match &mut self.checkpointed {
            Some((t, _)) => vec![&mut **t],
            None => Vec::new(),
        }
    }

    /// Rebuilds the closing index from the partitions' sessions and, in memory, the
    /// partitions.
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        (self.watermark, self.late_rows) = crate::restore_progress(saved, "a session window")?;
        let Some(checkpointed) = self.checkpointed.take() else {
            return Ok(());
        };
        let restored = self.restore_from(checkpointed.0.as_ref());
        self.checkpointed = Some(checkpointed);
        restored
    }

    fn state_entries(&self) -> usize {
        self.entries
    }

    fn late_rows(&self) -> u64 {
        self.late_rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_changes, changes, schema};

    const S: i64 = 1_000_000;

    fn op() -> SessionWindow {
        SessionWindow::new(
            1,
            SessionSpec::new(10 * S, vec![0]).unwrap(),
            Some(1),
            &schema("k:i64, t:ts"),
            schema("k:i64, t:ts, ws:ts, we:ts"),
        )
        .unwrap()
    }

    /// One epoch: `lines` (`k | t` in seconds), then a barrier at watermark `wm` seconds.
    fn epoch(op: &mut SessionWindow, lines: &str, wm: Option<i64>) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(0, changes("k:i64, t:ts", lines), &mut out)
            .unwrap();
        op.on_barrier(0, wm.map(|w| w * S), &mut out).unwrap();
        out
    }

    #[test]
    fn sessions_grow_merge_split_and_close() {
        let spilled = op().with_checkpoints(Box::new(kappa_state::MemStateTable::default()), true);
        for op in [op(), spilled] {
            sessions_grow_merge_split_and_close_in(op);
        }
    }

    fn sessions_grow_merge_split_and_close_in(mut op: SessionWindow) {
        let out = epoch(&mut op, "+ 1 | 0\n+ 1 | 5\n+ 2 | 3\n+ 2 | NULL", None);
        assert_changes(
            &out,
            "+ 1 | 1970-01-01T00:00:00 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             + 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             + 2 | 1970-01-01T00:00:03 | 1970-01-01T00:00:03 | 1970-01-01T00:00:13",
        );
        // 20 - 5 is not less than the gap: a session of its own.
        let out = epoch(&mut op, "+ 1 | 20", None);
        assert_changes(
            &out,
            "+ 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30",
        );
        // 12 bridges both sessions of key 1: every row moves to [0, 30).
        let out = epoch(&mut op, "+ 1 | 12", None);
        assert_changes(
            &out,
            "- 1 | 1970-01-01T00:00:00 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             - 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             - 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:00 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:12 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30",
        );
        // A second copy inside the session changes no bounds: only itself.
        let out = epoch(&mut op, "+ 1 | 5", None);
        assert_changes(
            &out,
            "+ 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30",
        );
        // Deleting the bridge splits the session again.
        let out = epoch(&mut op, "- 1 | 12\n- 1 | 5", None);
        assert_changes(
            &out,
            "- 1 | 1970-01-01T00:00:00 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             -2 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             - 1 | 1970-01-01T00:00:12 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             - 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:00 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:00 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             + 1 | 1970-01-01T00:00:05 | 1970-01-01T00:00:00 | 1970-01-01T00:00:15
             + 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30",
        );
        assert_eq!(op.state_entries(), 4);
        // Watermark 16 s: the sessions ending at 13 s and 15 s are final and freed.
        assert!(epoch(&mut op, "", Some(16)).is_empty());
        assert_eq!(op.state_entries(), 1);
        // 14 s is late (it could only have joined a final session); 16 s extends the last.
        let out = epoch(&mut op, "+ 1 | 14\n+ 1 | 16", Some(16));
        assert_changes(
            &out,
            "- 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:20 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:16 | 1970-01-01T00:00:16 | 1970-01-01T00:00:30
             + 1 | 1970-01-01T00:00:20 | 1970-01-01T00:00:16 | 1970-01-01T00:00:30",
        );
        assert_eq!(op.late_rows(), 1);
    }

    /// The same random changes give the same output epoch by epoch whether the partitions
    /// stay in memory or are loaded from their table at each barrier.
    #[test]
    fn spilled_and_in_memory_agree_on_random_changes() {
        let mut mem = op();
        let mut disk = op().with_checkpoints(Box::new(kappa_state::MemStateTable::default()), true);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as i64
        };
        let mut present: Vec<(i64, i64)> = Vec::new();
        for e in 0..60 {
            let mut lines = String::new();
            for _ in 0..5 {
                if !present.is_empty() && next(3) == 0 {
                    let (k, t) = present.swap_remove(next(present.len() as u64) as usize);
                    lines.push_str(&format!("- {k} | {t}\n"));
                } else {
                    let row = (next(3), 2 * e + next(30));
                    present.push(row);
                    lines.push_str(&format!("+ {} | {}\n", row.0, row.1));
                }
            }
            // The watermark trails; rows it has passed are late in both (and stay in
            // `present`: deleting them later is late too).
            let wm = Some(2 * e - 5);
            assert_eq!(
                crate::testing::consolidate(&epoch(&mut disk, &lines, wm)),
                crate::testing::consolidate(&epoch(&mut mem, &lines, wm)),
                "epoch {e}: {lines}"
            );
            assert_eq!(disk.state_entries(), mem.state_entries());
            assert_eq!(disk.late_rows(), mem.late_rows());
        }
        assert!(mem.late_rows() > 0);
    }

    #[test]
    fn a_restored_session_window_continues_exactly() {
        let c = |l: &str| (0, changes("k:i64, t:ts", l));
        let epochs = vec![
            (vec![c("+ 1 | 0\n+ 1 | 5\n+ 2 | 3\n+ 1 | 40")], Some(0)),
            (vec![c("+ 1 | 20\n+ 2 | 30")], Some(10 * S)),
            // Restored: 12 bridges the checkpointed sessions of key 1; 2@3 closes at 13.
            (vec![c("+ 1 | 12\n- 1 | 40")], Some(14 * S)),
            (vec![c("- 1 | 5\n+ 2 | 35")], Some(100 * S)),
        ];
        let make = |spill| {
            move |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
                let mut tables = tables;
                Box::new(op().with_checkpoints(tables.remove(0), spill))
            }
        };
        // In memory or spilled, and across a restart that switches between the two.
        for (before, after) in [(false, false), (true, true), (false, true), (true, false)] {
            crate::testing::assert_restores_across(make(before), make(after), 1, &epochs, 2);
        }
    }
}

//! Top-N per partition: the rows ranked within `[lo, hi]` by ROW_NUMBER, RANK or DENSE_RANK.
//!
//! # Semantics
//! Per partition (the values of the partition expressions; NULL is a value of its own), the
//! input's rows — a multiset — are ordered by the sort key (SQL `ORDER BY`, with direction
//! and NULLS FIRST/LAST) and then by the row itself, so ties are always broken the same way:
//! a batch engine breaks ROW_NUMBER ties arbitrarily, and ours is one of its answers.
//! - ROW_NUMBER: positions 1, 2, …; a row with multiplicity `c` takes `c` positions.
//! - RANK: 1 + the number of rows with a smaller sort key.
//! - DENSE_RANK: 1 + the number of distinct smaller sort keys.
//!
//! The output is every row whose rank lies in `[lo, hi]`, with the rank appended when asked.
//!
//! # Incremental rule
//! Changes are collected over the epoch. At the barrier, per touched partition, the visible
//! rows before and after applying them are compared and only the difference is emitted: a
//! deletion promotes the next row, and a row whose rank shifts is retracted with the old
//! rank and emitted with the new one (only when the rank is an output column). Cost per
//! touched partition: O(hi + changes · log n).
//!
//! # State
//! Every row of a partition is kept, since a deletion can promote any of them — unless the
//! input is append-only: then a row ranked beyond `hi` can never rise again and is dropped,
//! so a partition holds at most `hi` rows (plus ties for RANK and DENSE_RANK).
//! With a partition column bounded by the watermark (a window bound), a partition closes
//! when the watermark passes it: its state is freed, later changes to it are late (dropped
//! and counted), and with emit-on-close its rows are emitted only then, once, final.
//!
//! With checkpoints, the entries and partitions changed since the last one are remembered
//! and written at the checkpoint to a `StateTable`: per partition a header
//! (`len ‖ partition` → its bound) and its entries (`len ‖ partition ‖ sort key ‖ row ‖
//! len(sort key)` → multiplicity). Sort keys and rows are in Arrow's row format, whose
//! encodings are self-delimiting (none is a prefix of another), so the bytes of
//! `sort key ‖ row` compare like the pair and a partition's entries are a prefix range in
//! rank order (the length at the end only splits them). A restart rebuilds the partitions
//! and the closing index from the table.
//!
//! When the store spills (state larger than memory), that table *is* the state: nothing is
//! kept in memory between barriers but the closing index (partition keys by bound). A
//! touched partition's visible rows are read as a prefix scan that stops past rank `hi`,
//! and its changes are written straight to the table. Both forms write the same table, so
//! a restart may switch between them; a spilled restart scans the table once to count its
//! entries and rebuild the closing index, without keeping it.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, Int64Array, UInt64Array};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimestampMicrosecondType};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_plan::{RankFunc, WatermarkCol};

use crate::Operator;
use crate::partition_rows::{
    PartEntry, RowKeys, entry_key, part_prefix, split_entry, table_entries,
};
use kappa_state::codec::{len_prefixed, split_len_prefixed};

const WHAT: &str = "a top-N";

type Bytes = Arc<[u8]>;
type HashMap<K, V> = hashbrown::HashMap<K, V>;

/// What to rank by and which ranks to keep.
pub struct TopNSpec {
    /// Partition expressions with their types.
    pub partition: Vec<(Arc<dyn PhysicalExpr>, DataType)>,
    /// Sort keys: expression, type, direction and null placement.
    pub order: Vec<crate::SortKey>,
    pub func: RankFunc,
    pub lo: u64,
    pub hi: u64,
    /// Append the rank as a `UInt64` column.
    pub emit_rank: bool,
}

impl TopNSpec {
    /// The rows of a partition (its entries in rank order) whose rank lies in `[lo, hi]`, in rank order; also the first entry
    /// ranked beyond `hi` and, for ROW_NUMBER, how many copies of the entry that straddles
    /// `hi` fit (the rest can never be visible over an append-only input).
    fn visible(&self, entries: impl Iterator<Item = Result<PartEntry>>) -> Result<VisibleRows> {
        let (lo, hi, emit_rank) = (self.lo, self.hi, self.emit_rank);
        let mut out = Vec::new();
        let mut pos: u64 = 0; // rows before this entry
        let mut rank: u64 = 0;
        let mut prev: Option<Bytes> = None;
        let mut fit = None;
        for entry in entries {
            let (sk, row, c) = entry?;
            let c = c as u64;
            let tie = prev.as_ref() == Some(&sk);
            match self.func {
                RankFunc::RowNumber => rank = pos + 1,
                RankFunc::Rank if !tie => rank = pos + 1,
                RankFunc::DenseRank if !tie => rank += 1,
                _ => {}
            }
            if rank > hi {
                return Ok((out, Some((sk, row)), fit));
            }
            match self.func {
                RankFunc::RowNumber => {
                    let (first, last) = (rank.max(lo), (pos + c).min(hi));
                    if emit_rank {
                        out.extend((first..=last).map(|r| (sk.clone(), row.clone(), r, 1)));
                    } else if first <= last {
                        out.push((sk.clone(), row.clone(), 0, (last - first + 1) as i64));
                    }
                    if pos + c > hi {
                        fit = Some((hi - pos) as i64);
                    }
                }
                _ if rank >= lo => {
                    let shown = if emit_rank { rank } else { 0 };
                    out.push((sk.clone(), row.clone(), shown, c as i64))
                }
                _ => {}
            }
            pos += c;
            prev = Some(sk);
        }
        Ok((out, None, fit))
    }
}

/// One partition: (sort key, row) → multiplicity (> 0), in rank order.
#[derive(Default)]
struct Partition {
    rows: BTreeMap<(Bytes, Bytes), i64>,
    /// The sum of the multiplicities.
    total: i64,
    /// The value of the partition's closing column, if it closes with the watermark.
    bound: Option<i64>,
}

/// What changed since the last checkpoint: a partition (its header, or all of it when it is
/// gone) or one of its entries.
type Changed = (Bytes, Option<(Bytes, Bytes)>);

/// An epoch's changes to one partition: its bound value when a partition column closes with
/// the watermark, and (sort key, row, weight) per change.
type Pending = (Option<i64>, Vec<(Bytes, Bytes, i64)>);

/// The visible rows of a partition in rank order: sort key, row, rank (0 when the rank is
/// not emitted) and multiplicity. Ordered by (sort key, row, rank).
type Visible = Vec<(Bytes, Bytes, u64, i64)>;

/// What `TopN::visible` finds: the visible rows, the first entry ranked beyond `hi`, and how
/// many copies of the entry straddling `hi` fit (ROW_NUMBER).
type VisibleRows = (Visible, Option<(Bytes, Bytes)>, Option<i64>);

fn encode_bound(bound: Option<i64>) -> Bytes {
    Arc::from(kappa_state::codec::Encoder::new().opt_i64(bound).finish())
}

/// A partition's entries in rank order.
fn mem_entries(part: &Partition) -> impl Iterator<Item = Result<PartEntry>> + '_ {
    part.rows
        .iter()
        .map(|((sk, row), &c)| Ok((sk.clone(), row.clone(), c)))
}

/// Appends `after - before` (both in their common order) as (row, rank, weight) changes.
/// One merge pass: rows visible in both with the same rank and multiplicity cost one
/// comparison, usually of the sort key alone.
fn diff_into(before: Visible, after: Visible, out: &mut Vec<(Bytes, u64, i64)>) {
    use std::cmp::Ordering;
    let mut before = before.into_iter().peekable();
    let mut after = after.into_iter().peekable();
    loop {
        let ord = match (before.peek(), after.peek()) {
            (Some(b), Some(a)) => (&b.0, &b.1, b.2).cmp(&(&a.0, &a.1, a.2)),
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (None, None) => return,
        };
        match ord {
            Ordering::Less => {
                if let Some((_, row, rank, c)) = before.next() {
                    out.push((row, rank, -c));
                }
            }
            Ordering::Greater => {
                if let Some((_, row, rank, c)) = after.next() {
                    out.push((row, rank, c));
                }
            }
            Ordering::Equal => {
                if let (Some((_, _, _, b)), Some((_, row, rank, a))) = (before.next(), after.next())
                    && a != b
                {
                    out.push((row, rank, a - b));
                }
            }
        }
    }
}

pub struct TopN {
    spec: TopNSpec,
    keys: RowKeys,
    schema: SchemaRef,
    append_only_input: bool,
    close: Option<WatermarkCol>,
    emit_on_close: bool,
    parts: HashMap<Bytes, Partition>,
    pending: HashMap<Bytes, Pending>,
    /// Bound value → partitions that close when the watermark passes it.
    closing: BTreeMap<i64, Vec<Bytes>>,
    watermark: Option<i64>,
    entries: usize,
    late_rows: u64,
    /// With checkpoints: the table written at each, and what changed since the last.
    checkpointed: Option<(
        Box<dyn kappa_state::StateTable>,
        hashbrown::HashSet<Changed>,
    )>,
    /// The partitions live in the checkpoint table, not in `parts` (see the module docs).
    spilled: bool,
}

impl TopN {
    /// `input` is the input's schema; `schema` the output's (the input's columns, then the
    /// rank when `spec.emit_rank`).
    pub fn new(spec: TopNSpec, input: &SchemaRef, schema: SchemaRef) -> Result<Self> {
        let keys = RowKeys::new(&spec.partition, &spec.order, input)?;
        Ok(Self {
            spec,
            keys,
            schema,
            append_only_input: false,
            close: None,
            emit_on_close: false,
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

    /// Keeps the state in `table` at checkpoints; with `spill`, keeps it there all along.
    pub fn with_checkpoints(
        mut self,
        table: Box<dyn kappa_state::StateTable>,
        spill: bool,
    ) -> Self {
        self.checkpointed = Some((table, hashbrown::HashSet::new()));
        self.spilled = spill;
        self
    }

    fn changed(&mut self, part: &Bytes, entry: Option<(&Bytes, &Bytes)>) {
        if self.spilled {
            return;
        }
        if let Some((_, changed)) = &mut self.checkpointed {
            changed.insert((part.clone(), entry.map(|(s, r)| (s.clone(), r.clone()))));
        }
    }

    /// The input never retracts: rows ranked beyond `hi` are dropped for good.
    pub fn with_append_only_input(mut self) -> Self {
        self.append_only_input = true;
        self
    }

    /// Partition column `close.col` is bounded by the watermark: closed partitions are
    /// freed, and with `emit_on_close` emitted only when they close.
    pub fn with_window_close(mut self, close: WatermarkCol, emit_on_close: bool) -> Self {
        self.close = Some(close);
        self.emit_on_close = emit_on_close;
        self
    }

    /// Applies one partition's changes; appends the difference in its visible rows.
    fn apply(
        &mut self,
        key: Bytes,
        bound: Option<i64>,
        changes: Vec<(Bytes, Bytes, i64)>,
        diff: &mut Vec<(Bytes, u64, i64)>,
    ) -> Result<()> {
        if self.spilled {
            return self.apply_spilled(key, bound, changes, diff);
        }
        let mut part = match self.parts.remove(&key) {
            Some(p) => p,
            None => {
                if let Some(b) = bound {
                    self.closing.entry(b).or_default().push(key.clone());
                }
                Partition {
                    bound,
                    ..Partition::default()
                }
            }
        };
        self.changed(&key, None);
        let before = if self.emit_on_close {
            Vec::new()
        } else {
            self.spec.visible(mem_entries(&part))?.0
        };
        use std::collections::btree_map::Entry;
        for (sk, row, w) in changes {
            part.total += w;
            self.changed(&key, Some((&sk, &row)));
            match part.rows.entry((sk, row)) {
                Entry::Occupied(mut e) => {
                    *e.get_mut() += w;
                    if *e.get() < 0 {
                        return Err(KappaError::internal(
                            "top-N: retraction of a row never stored",
                        ));
                    }
                    if *e.get() == 0 {
                        e.remove();
                        self.entries -= 1;
                    }
                }
                Entry::Vacant(e) if w > 0 => {
                    e.insert(w);
                    self.entries += 1;
                }
                Entry::Vacant(_) => {
                    return Err(KappaError::internal(
                        "top-N: retraction of a row never stored",
                    ));
                }
            }
        }
        // Trimming removes only entries and copies ranked beyond `hi`, so the visible rows
        // are the same before and after it.
        let (after, beyond, fit) = self.spec.visible(mem_entries(&part))?;
        if self.append_only_input {
            if let Some(first) = beyond {
                // Usually one entry or none: pop rather than split off a new map.
                while part.rows.last_key_value().is_some_and(|(k, _)| *k >= first) {
                    if let Some(((sk, row), _)) = part.rows.pop_last() {
                        self.changed(&key, Some((&sk, &row)));
                    }
                    self.entries -= 1;
                }
            }
            if let (Some(fit), Some(mut last)) = (fit, part.rows.last_entry()) {
                *last.get_mut() = fit;
                let (sk, row) = last.key().clone();
                self.changed(&key, Some((&sk, &row)));
            }
            part.total = part.rows.values().sum();
        }
        if !self.emit_on_close {
            diff_into(before, after, diff);
        }
        if !part.rows.is_empty() || bound.is_some() {
            self.parts.insert(key, part);
        }
        Ok(())
    }

    /// [`TopN::apply`] on the partition as stored in the table (see the module docs).
    fn apply_spilled(
        &mut self,
        key: Bytes,
        bound: Option<i64>,
        changes: Vec<(Bytes, Bytes, i64)>,
        diff: &mut Vec<(Bytes, u64, i64)>,
    ) -> Result<()> {
        let Some((table, _)) = &mut self.checkpointed else {
            return Err(KappaError::internal("a spilled top-N without its table"));
        };
        let table = table.as_mut();
        let prefix = part_prefix(&key);
        if table.get(&prefix).is_none() {
            if let Some(b) = bound {
                self.closing.entry(b).or_default().push(key.clone());
            }
            table.put(Arc::from(prefix.as_slice()), encode_bound(bound));
        }
        let before = if self.emit_on_close {
            Vec::new()
        } else {
            self.spec.visible(table_entries(table, &prefix, WHAT))?.0
        };
        for (sk, row, w) in changes {
            let k = entry_key(&prefix, &sk, &row);
            let now = kappa_state::add_to_count(table, &k, w, &"a top-N partition")?;
            if now == 0 {
                self.entries -= 1;
            } else if now == w {
                self.entries += 1;
            }
        }
        let (after, beyond, fit) = self.spec.visible(table_entries(table, &prefix, WHAT))?;
        if self.append_only_input {
            if let Some((sk, row)) = beyond {
                // What an append-only partition holds beyond `hi` is this epoch's rows.
                let first = entry_key(&prefix, &sk, &row);
                let doomed: Vec<Bytes> = table
                    .scan_prefix(&prefix)
                    .map(|(k, _)| k)
                    .filter(|k| *k >= first)
                    .collect();
                for k in doomed {
                    table.delete(&k);
                    self.entries -= 1;
                }
            }
            if let Some(fit) = fit
                && let Some((last, _)) = table.last_with_prefix(&prefix)
                && last.len() > prefix.len()
            {
                table.put(last, kappa_state::encode_count(fit));
            }
        }
        if !self.emit_on_close {
            diff_into(before, after, diff);
        }
        if bound.is_none() && table_entries(table, &prefix, WHAT).next().is_none() {
            table.delete(&prefix);
        }
        Ok(())
    }

    /// Frees a closed partition; with emit-on-close, appends its visible rows first.
    fn close_partition(&mut self, key: &Bytes, diff: &mut Vec<(Bytes, u64, i64)>) -> Result<()> {
        if !self.spilled {
            let Some(part) = self.parts.remove(key) else {
                return Ok(());
            };
            self.changed(key, None);
            self.entries -= part.rows.len();
            if self.emit_on_close {
                diff_into(Vec::new(), self.spec.visible(mem_entries(&part))?.0, diff);
            }
            return Ok(());
        }
        let Some((table, _)) = &mut self.checkpointed else {
            return Err(KappaError::internal("a spilled top-N without its table"));
        };
        let prefix = part_prefix(key);
        if self.emit_on_close {
            let shown = self
                .spec
                .visible(table_entries(table.as_ref(), &prefix, WHAT))?
                .0;
            diff_into(Vec::new(), shown, diff);
        }
        let keys: Vec<Bytes> = table.scan_prefix(&prefix).map(|(k, _)| k).collect();
        for k in keys {
            if k.len() > prefix.len() {
                self.entries -= 1;
            }
            table.delete(&k);
        }
        Ok(())
    }

    /// Whether a new row with this key cannot enter `part` (append-only input only): the
    /// partition already has `hi` rows ranked before it.
    fn beyond_full(&self, part: &Partition, sk: &[u8], row: &[u8]) -> bool {
        let Some(((last_sk, last_row), _)) = part.rows.last_key_value() else {
            return false;
        };
        let total = part.total;
        match self.spec.func {
            RankFunc::RowNumber => {
                total as u64 >= self.spec.hi && (last_sk.as_ref(), last_row.as_ref()) < (sk, row)
            }
            RankFunc::Rank => total as u64 >= self.spec.hi && last_sk.as_ref() < sk,
            RankFunc::DenseRank => false,
        }
    }

    /// The changes of an epoch: each row and rank at most once (a row belongs to one
    /// partition, and each partition is diffed once).
    fn output(&self, merged: Vec<(Bytes, u64, i64)>) -> Result<Option<ChangeBatch>> {
        if merged.is_empty() {
            return Ok(None);
        }
        let mut columns =
            kappa_state::decode_rows(&self.keys.rows, merged.iter().map(|e| &e.0[..]))?;
        if self.spec.emit_rank {
            columns.push(
                Arc::new(UInt64Array::from_iter_values(merged.iter().map(|e| e.1))) as ArrayRef,
            );
        }
        let weights = Int64Array::from_iter_values(merged.iter().map(|e| e.2));
        let data = crate::batch_with_rows(self.schema.clone(), columns, merged.len())?;
        Ok(Some(ChangeBatch::new(data, weights)?))
    }
}

impl Operator for TopN {
    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let n = batch.num_rows();
        if n == 0 {
            return Ok(());
        }
        let crate::partition_rows::KeyedBatch {
            part_cols,
            part_keys,
            sort_keys,
            rows,
        } = self
            .keys
            .key(&batch, &self.spec.partition, &self.spec.order)?;
        let bounds = match self.close {
            Some(c) => Some(
                part_cols[c.col]
                    .as_primitive_opt::<TimestampMicrosecondType>()
                    .ok_or_else(|| {
                        KappaError::internal("top-N: the closing column is not a timestamp")
                    })?,
            ),
            None => None,
        };
        let weights = batch.weights();
        for i in 0..n {
            let w = weights.value(i);
            if w == 0 {
                continue;
            }
            let bound = bounds.and_then(|b| b.is_valid(i).then(|| b.value(i)));
            if let (Some(c), Some(b), Some(wm)) = (self.close, bound, self.watermark)
                && c.is_closed(b, wm)
            {
                self.late_rows += w.unsigned_abs();
                continue;
            }
            let (key, sk) = (part_keys.get(i), sort_keys.get(i));
            let row = rows.row(i);
            if self.append_only_input
                && let Some(part) = self.parts.get(key)
                && self.beyond_full(part, sk, row.data())
            {
                continue;
            }
            let changes = match self.pending.get_mut(key) {
                Some(c) => c,
                None => self
                    .pending
                    .entry(Arc::from(key))
                    .or_insert_with(|| (bound, vec![])),
            };
            changes.1.push((Arc::from(sk), Arc::from(row.data()), w));
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        watermark: Option<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let mut diff = Vec::new();
        for (key, (bound, changes)) in std::mem::take(&mut self.pending) {
            self.apply(key, bound, changes, &mut diff)?;
        }
        self.watermark = watermark.max(self.watermark);
        if let (Some(c), Some(wm)) = (self.close, self.watermark) {
            let upto = wm.saturating_sub(c.offset);
            for (_, keys) in crate::take_closed(&mut self.closing, upto) {
                for key in keys {
                    self.close_partition(&key, &mut diff)?;
                }
            }
        }
        if let Some(b) = self.output(diff)? {
            out.push(b);
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamTopN"
    }

    fn checkpointable(&self) -> bool {
        self.checkpointed.is_some()
    }

    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        if let Some((table, changed)) = &mut self.checkpointed {
            let mut k = Vec::new();
            for (part, entry) in changed.drain() {
                k.clear();
                len_prefixed(&mut k, &part);
                let p = self.parts.get(&part);
                match entry {
                    None => match p {
                        Some(p) => table.put(Arc::from(k.as_slice()), encode_bound(p.bound)),
                        // Gone: its header and every entry.
                        None => {
                            while let Some((key, _)) = table.first_with_prefix(&k) {
                                table.delete(&key);
                            }
                        }
                    },
                    Some((sk, row)) => {
                        let k = entry_key(&k, &sk, &row);
                        match p.and_then(|p| p.rows.get(&(sk, row))) {
                            Some(c) => table.put(k, kappa_state::encode_count(*c)),
                            None => table.delete(&k),
                        }
                    }
                }
            }
        }
        Ok(crate::save_progress(self.watermark, self.late_rows))
    }

    fn state_tables(&mut self) -> Vec<&mut dyn kappa_state::StateTable> {
        match &mut self.checkpointed {
            Some((t, _)) => vec![&mut **t],
            None => Vec::new(),
        }
    }

    /// Rebuilds the partitions (in memory) or just the entry count (spilled), and the
    /// closing index, from the table.
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        (self.watermark, self.late_rows) = crate::restore_progress(saved, "a top-N")?;
        let Some((table, _)) = &self.checkpointed else {
            return Ok(());
        };
        let damaged = || kappa_state::codec::damaged("a top-N");
        self.parts.clear();
        self.closing.clear();
        self.entries = 0;
        for (k, v) in table.scan_prefix(&[]) {
            let (part, rest) = split_len_prefixed(&k).ok_or_else(damaged)?;
            if rest.is_empty() {
                let mut d = kappa_state::codec::Decoder::new(&v, "a top-N partition");
                let bound = d.opt_i64()?;
                if let Some(b) = bound {
                    self.closing.entry(b).or_default().push(Arc::from(part));
                }
                if !self.spilled {
                    self.parts.entry(Arc::from(part)).or_default().bound = bound;
                }
                continue;
            }
            self.entries += 1;
            if self.spilled {
                continue;
            }
            let (sk, row) = split_entry(rest, WHAT)?;
            let c = kappa_state::decode_count(&v);
            let p = self.parts.entry(Arc::from(part)).or_default();
            p.rows.insert((Arc::from(sk), Arc::from(row)), c);
            p.total += c;
        }
        Ok(())
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
    use datafusion::arrow::compute::SortOptions;
    use datafusion::physical_expr::expressions::col;

    const S: i64 = 1_000_000;

    /// Top-N over `k:i64, v:i64, t:ts`, partitioned by k, ordered by v descending.
    fn op(func: RankFunc, lo: u64, hi: u64, emit_rank: bool) -> TopN {
        let input = schema("k:i64, v:i64, t:ts");
        let out = if emit_rank {
            let mut f: Vec<_> = input.fields().iter().cloned().collect();
            f.push(Arc::new(datafusion::arrow::datatypes::Field::new(
                "rn",
                DataType::UInt64,
                false,
            )));
            Arc::new(datafusion::arrow::datatypes::Schema::new(f))
        } else {
            input.clone()
        };
        let spec = TopNSpec {
            partition: vec![(col("k", &input).unwrap(), DataType::Int64)],
            order: vec![(
                col("v", &input).unwrap(),
                DataType::Int64,
                SortOptions {
                    descending: true,
                    nulls_first: false,
                },
            )],
            func,
            lo,
            hi,
            emit_rank,
        };
        TopN::new(spec, &input, out).unwrap()
    }

    fn epoch(op: &mut TopN, lines: &str, wm: Option<i64>) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(0, changes("k:i64, v:i64, t:ts", lines), &mut out)
            .unwrap();
        op.on_barrier(0, wm.map(|w| w * S), &mut out).unwrap();
        out
    }

    #[test]
    fn deletion_promotes_the_next_row_and_ranks_shift() {
        let mut op = op(RankFunc::RowNumber, 1, 2, true);
        let out = epoch(
            &mut op,
            "+ 1 | 10 | 0\n+ 1 | 30 | 0\n+ 1 | 20 | 0\n+ 2 | 5 | 0",
            None,
        );
        assert_changes(
            &out,
            "+ 1 | 30 | 1970-01-01T00:00:00 | 1
             + 1 | 20 | 1970-01-01T00:00:00 | 2
             + 2 | 5 | 1970-01-01T00:00:00 | 1",
        );
        // A new leader shifts 30 to rank 2 and pushes 20 out.
        let out = epoch(&mut op, "+ 1 | 40 | 0", None);
        assert_changes(
            &out,
            "- 1 | 30 | 1970-01-01T00:00:00 | 1
             - 1 | 20 | 1970-01-01T00:00:00 | 2
             + 1 | 40 | 1970-01-01T00:00:00 | 1
             + 1 | 30 | 1970-01-01T00:00:00 | 2",
        );
        // Deleting the leader promotes 20 again; a change below the top emits nothing.
        let out = epoch(&mut op, "- 1 | 40 | 0\n+ 1 | 1 | 0", None);
        assert_changes(
            &out,
            "- 1 | 40 | 1970-01-01T00:00:00 | 1
             - 1 | 30 | 1970-01-01T00:00:00 | 2
             + 1 | 30 | 1970-01-01T00:00:00 | 1
             + 1 | 20 | 1970-01-01T00:00:00 | 2",
        );
        assert!(epoch(&mut op, "- 1 | 1 | 0", None).is_empty());
        assert_eq!(op.state_entries(), 4);
    }

    #[test]
    fn without_the_rank_only_membership_changes_are_emitted() {
        let mut op = op(RankFunc::RowNumber, 1, 2, false);
        epoch(&mut op, "+ 1 | 10 | 0\n+ 1 | 30 | 0", None);
        let out = epoch(&mut op, "+ 1 | 40 | 0", None);
        assert_changes(
            &out,
            "- 1 | 10 | 1970-01-01T00:00:00\n+ 1 | 40 | 1970-01-01T00:00:00",
        );
        // Duplicates take one position each.
        let out = epoch(&mut op, "+2 1 | 50 | 0", None);
        assert_changes(
            &out,
            "- 1 | 40 | 1970-01-01T00:00:00
             - 1 | 30 | 1970-01-01T00:00:00
             +2 1 | 50 | 1970-01-01T00:00:00",
        );
    }

    #[test]
    fn rank_and_dense_rank_keep_ties() {
        let mut op = op(RankFunc::Rank, 1, 2, true);
        let out = epoch(&mut op, "+ 1 | 9 | 0\n+ 1 | 9 | 1\n+ 1 | 8 | 0", None);
        assert_changes(
            &out,
            "+ 1 | 9 | 1970-01-01T00:00:00 | 1
             + 1 | 9 | 1970-01-01T00:00:01 | 1",
        );
        let mut op = self::op(RankFunc::DenseRank, 2, 2, true);
        let out = epoch(&mut op, "+ 1 | 9 | 0\n+ 1 | 9 | 1\n+ 1 | 8 | 0", None);
        assert_changes(&out, "+ 1 | 8 | 1970-01-01T00:00:00 | 2");
    }

    #[test]
    fn append_only_input_keeps_only_what_can_be_visible() {
        let mut op = op(RankFunc::RowNumber, 1, 2, false).with_append_only_input();
        epoch(
            &mut op,
            "+ 1 | 10 | 0\n+ 1 | 30 | 0\n+ 1 | 20 | 0\n+ 1 | 5 | 0",
            None,
        );
        assert_eq!(op.state_entries(), 2);
        let out = epoch(&mut op, "+3 1 | 25 | 0\n+ 1 | 1 | 0", None);
        assert_changes(
            &out,
            "- 1 | 20 | 1970-01-01T00:00:00\n+ 1 | 25 | 1970-01-01T00:00:00",
        );
        assert_eq!(op.state_entries(), 2);
    }

    #[test]
    fn closed_partitions_are_freed_or_emitted_once() {
        let mut op = closing_op(true);
        assert!(epoch(&mut op, "+ 1 | 7 | 10\n+ 2 | 3 | 10\n+ 3 | 1 | 20", Some(5)).is_empty());
        let out = epoch(&mut op, "- 2 | 3 | 10", Some(10));
        assert_changes(&out, "+ 1 | 7 | 1970-01-01T00:00:10");
        assert_eq!(op.state_entries(), 1);
        assert!(epoch(&mut op, "+ 4 | 0 | 10", Some(10)).is_empty());
        assert_eq!(op.late_rows(), 1);

        let mut op = closing_op(false);
        let out = epoch(&mut op, "+ 1 | 7 | 10\n+ 2 | 3 | 10", Some(5));
        assert_changes(&out, "+ 2 | 3 | 1970-01-01T00:00:10");
        assert!(epoch(&mut op, "", Some(10)).is_empty());
        assert_eq!(op.state_entries(), 0);
    }

    #[test]
    fn a_restored_top_n_continues_exactly() {
        let c = |l: &str| (0, changes("k:i64, v:i64, t:ts", l));
        let epochs = vec![
            (
                vec![c("+ 1 | 7 | 10\n+ 1 | 5 | 10\n+2 1 | 3 | 10\n+ 2 | 9 | 20")],
                Some(S),
            ),
            (vec![c("- 1 | 7 | 10\n+ 3 | 1 | 30")], Some(2 * S)),
            // After the restore: a deletion promotes a row the checkpoint had kept.
            (vec![c("- 1 | 5 | 10\n+ 2 | 8 | 20")], Some(3 * S)),
            (vec![c("- 3 | 1 | 30\n+ 1 | 4 | 10")], Some(4 * S)),
        ];
        let plain = |spill| {
            move |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
                let mut tables = tables;
                Box::new(op(RankFunc::Rank, 1, 2, true).with_checkpoints(tables.remove(0), spill))
            }
        };
        // In memory or spilled, and across a restart that switches between the two.
        for (before, after) in [(false, false), (true, true), (false, true), (true, false)] {
            crate::testing::assert_restores_across(plain(before), plain(after), 1, &epochs, 2);
        }
        // Partitions by the closing column, emitted on close: the closing index comes back.
        let closing = |spill| {
            move |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
                let mut tables = tables;
                let op = closing_op(true).with_append_only_input();
                Box::new(op.with_checkpoints(tables.remove(0), spill))
            }
        };
        let epochs = vec![
            (
                vec![c("+ 1 | 7 | 10\n+ 2 | 3 | 10\n+ 3 | 1 | 20")],
                Some(5 * S),
            ),
            (vec![c("+ 4 | 2 | 20")], Some(6 * S)),
            (vec![c("+ 5 | 0 | 30")], Some(10 * S)),
            (vec![c("+ 6 | 9 | 10")], Some(25 * S)),
        ];
        for (before, after) in [(false, false), (true, true), (false, true), (true, false)] {
            crate::testing::assert_restores_across(closing(before), closing(after), 1, &epochs, 2);
        }
    }

    /// Top-1 per partition column `t`, which closes (offset 0) when the watermark reaches
    /// it, emitted on close or not.
    fn closing_op(emit_on_close: bool) -> TopN {
        let input = schema("k:i64, v:i64, t:ts");
        let spec = TopNSpec {
            partition: vec![(
                col("t", &input).unwrap(),
                DataType::Timestamp(datafusion::arrow::datatypes::TimeUnit::Microsecond, None),
            )],
            order: vec![(
                col("v", &input).unwrap(),
                DataType::Int64,
                SortOptions::default(),
            )],
            func: RankFunc::RowNumber,
            lo: 1,
            hi: 1,
            emit_rank: false,
        };
        TopN::new(spec, &input, input.clone())
            .unwrap()
            .with_window_close(WatermarkCol { col: 0, offset: 0 }, emit_on_close)
    }

    /// The same random changes give the same output epoch by epoch whether the partitions
    /// are in memory or spilled into their table.
    #[test]
    fn spilled_and_in_memory_agree_on_random_changes() {
        let spilled =
            |op: TopN| op.with_checkpoints(Box::new(kappa_state::MemStateTable::default()), true);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move |n: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n) as i64
        };
        let mut ops: Vec<(TopN, TopN, bool)> = Vec::new();
        for func in [RankFunc::RowNumber, RankFunc::Rank, RankFunc::DenseRank] {
            for (lo, hi, emit_rank) in [(1, 2, true), (2, 3, false), (1, 1, false)] {
                ops.push((
                    op(func, lo, hi, emit_rank),
                    spilled(op(func, lo, hi, emit_rank)),
                    false,
                ));
                let append = || op(func, lo, hi, emit_rank).with_append_only_input();
                ops.push((append(), spilled(append()), true));
            }
        }
        for emit in [true, false] {
            let closing = || closing_op(emit).with_append_only_input();
            ops.push((closing(), spilled(closing()), true));
        }
        for (mut mem, mut disk, append_only) in ops {
            let mut present: Vec<(i64, i64, i64)> = Vec::new();
            for e in 0..40 {
                let mut lines = String::new();
                for _ in 0..6 {
                    if !append_only && !present.is_empty() && next(3) == 0 {
                        let (k, v, t) = present.swap_remove(next(present.len() as u64) as usize);
                        lines.push_str(&format!("- {k} | {v} | {t}\n"));
                    } else {
                        let row = (next(3), next(6), e / 4 + next(3));
                        present.push(row);
                        lines.push_str(&format!("+ {} | {} | {}\n", row.0, row.1, row.2));
                    }
                }
                let wm = Some(e / 4);
                assert_eq!(
                    crate::testing::consolidate(&epoch(&mut disk, &lines, wm)),
                    crate::testing::consolidate(&epoch(&mut mem, &lines, wm)),
                    "epoch {e}: {lines}"
                );
                assert_eq!(disk.state_entries(), mem.state_entries());
                assert_eq!(disk.late_rows(), mem.late_rows());
            }
        }
    }
}

//! Temporal join: `probe JOIN versioned FOR SYSTEM_TIME AS OF probe.t ON keys` (inner or
//! left), incrementally.
//!
//! # Semantics
//! The versioned input (the right) is a relation of *versions*: each row is valid from its
//! version time (the versioned table's event-time column) until the next version time of
//! the same key. A probe row `l` (the left) with key `k` and probe time `t` matches the
//! rows of the latest version of `k` at `t`: among the right rows with key `k` and version
//! time `<= t`, those with the greatest version time (all of them if several rows share
//! it). So the output equals a batch ASOF join over both inputs' current contents —
//! `l ASOF JOIN r ON l.k = r.k AND l.t >= r.vt` — with weights multiplied, and, for a
//! left join, `l` NULL-extended when nothing matches. A NULL key, probe time or version
//! time matches nothing (SQL comparison).
//!
//! # Incremental rule
//! A probe change is joined with the versions stored now and then stored itself. A
//! version change at `(k, v)` changes the match of exactly the stored probe rows of `k`
//! with `v <= t < next` (`next` the following version time of `k`): their pairs with the
//! old match are retracted and their pairs with the new one emitted. Changes are applied
//! one `(key, version time)` group at a time, so any interleaving of the two inputs gives
//! the same sum. Inserting a version in the past (a late correction, a deleted version)
//! re-joins the facts it covers: the output is exact for any order of arrival.
//!
//! # State (one state table; it is the whole state)
//! - `0 ‖ key ‖ version time ‖ row` → count: the versioned input's rows;
//! - `1 ‖ key ‖ probe time ‖ row` → count: the probe rows whose match can still change;
//! - `2 ‖ probe time ‖ key`: when the version time is watermark-bounded (`version_bound`:
//!   every future version row has `vt + offset > W`), the probe rows by time: a probe row
//!   with `t + offset <= W` can never change its match again and is freed (its output
//!   stays, final);
//! - `3 ‖ version time ‖ key`: when the probe time is bounded too, versions by time: once
//!   a version `v'` is closed for both inputs, no probe row, stored or future, can fall
//!   before it any more, and the versions of its key older than `v'` are freed.
//!
//! So with both bounds the state holds the probe rows of the last moments (those above the
//! versioned input's watermark) and about one version per key. Without them it holds
//! every row of both inputs, as a regular join does.
//!
//! When the probe input is append-only, its stored rows are instead kept as the batches
//! they came in (`temporal_probes.rs`; no entries under tags 1 and 2), checkpointed as a
//! log. Each key's versions are also cached in memory as read from the table (the table
//! stays the truth; a key's entry is dropped whenever its versions change).

use std::sync::Arc;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, UInt32Array, new_null_array};
use datafusion::arrow::compute::{cast, take_arrays};
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_state::codec::{len_prefixed, ordered_i64, split_ordered_i64};
use kappa_state::{KeyRows, StateTable};

use crate::Operator;
use crate::join_batches::RowRef;
use crate::temporal_probes::{ProbeBatches, Replayed};

type Bytes = Arc<[u8]>;
type HashMap<K, V> = hashbrown::HashMap<K, V>;

const WHAT: &str = "a temporal join";
const VERSIONS: u8 = 0;
const PROBES: u8 = 1;
const PROBES_BY_TIME: u8 = 2;
const VERSIONS_BY_TIME: u8 = 3;

/// What the join matches on.
pub struct TemporalJoinSpec {
    /// Left join: a probe row without a version at its time is emitted NULL-extended.
    pub left: bool,
    /// Equi-join keys over the probe input and over the versioned input, pairwise.
    pub probe_keys: Vec<Arc<dyn PhysicalExpr>>,
    pub version_keys: Vec<Arc<dyn PhysicalExpr>>,
    pub key_types: Vec<DataType>,
    /// The time each probe row looks up (over the probe input).
    pub probe_time: Arc<dyn PhysicalExpr>,
    /// The versioned input's version-time column (a timestamp in microseconds).
    pub version_time: usize,
    /// Every future probe row has `t + offset > W`.
    pub probe_bound: Option<i64>,
    /// Every future versioned row has `vt + offset > W`.
    pub version_bound: Option<i64>,
}

/// The rows of one version: (row, multiplicity), in row order.
type VersionRows = Vec<(Bytes, i64)>;

/// The most keys whose versions are cached; the cache starts over when full.
const CACHED_KEYS: usize = 1 << 20;

pub struct TemporalJoin {
    spec: TemporalJoinSpec,
    keys: RowConverter,
    probe_rows: RowConverter,
    version_rows: RowConverter,
    /// The version side's column types (for NULL extension).
    version_types: Vec<DataType>,
    schema: SchemaRef,
    table: Box<dyn StateTable>,
    watermark: Option<i64>,
    /// The stored probe rows, when not in `table` (an append-only probe input).
    batches: Option<ProbeBatches>,
    /// Kept in `table` although the probe input is append-only (a store that spills): the
    /// log the batch form would use, emptied into the table by a restore that finds rows
    /// in it (the run before did not spill).
    unused_log: Option<ProbeBatches>,
    probe_schema: SchemaRef,
    /// Keys' versions as in `table`, in time order.
    cache: HashMap<Bytes, Vec<(i64, VersionRows)>>,
}

fn key_with(tag: u8, key: &[u8], t: i64, row: &[u8]) -> Vec<u8> {
    let mut k = key_prefix(tag, key);
    k.reserve(8 + row.len());
    k.extend_from_slice(&ordered_i64(t));
    k.extend_from_slice(row);
    k
}

/// `tag ‖ key`: the prefix of a key's entries under `tag`, in time order.
fn key_prefix(tag: u8, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 4 + key.len());
    k.push(tag);
    len_prefixed(&mut k, key);
    k
}

fn index_key(tag: u8, t: i64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + 8 + key.len());
    k.push(tag);
    k.extend_from_slice(&ordered_i64(t));
    k.extend_from_slice(key);
    k
}

fn damaged() -> KappaError {
    kappa_state::codec::damaged(WHAT)
}

/// (time, row) of an entry of one key, from its key after the key's prefix.
fn split_timed(rest: &[u8]) -> Result<(i64, &[u8])> {
    split_ordered_i64(rest).ok_or_else(damaged)
}

/// A key's entries under `tag`: (time, row, count) in time order.
fn entries(table: &dyn StateTable, tag: u8, key: &[u8]) -> Result<Vec<(i64, Bytes, i64)>> {
    let prefix = key_prefix(tag, key);
    table
        .scan_prefix(&prefix)
        .map(|(k, v)| {
            let (t, row) = split_timed(&k[prefix.len()..])?;
            Ok((t, Arc::from(row), kappa_state::decode_count(&v)))
        })
        .collect()
}

/// A key's versions in time order, each with its rows.
fn versions(table: &dyn StateTable, key: &[u8]) -> Result<Vec<(i64, VersionRows)>> {
    let mut out: Vec<(i64, VersionRows)> = Vec::new();
    for (t, row, c) in entries(table, VERSIONS, key)? {
        match out.last_mut() {
            Some((last, rows)) if *last == t => rows.push((row, c)),
            _ => out.push((t, vec![(row, c)])),
        }
    }
    Ok(out)
}

/// The rows of the latest version at or before `t` (empty: none).
fn version_at(versions: &[(i64, VersionRows)], t: i64) -> &[(Bytes, i64)] {
    let i = versions.partition_point(|(v, _)| *v <= t);
    match i.checked_sub(1) {
        Some(i) => &versions[i].1,
        None => &[],
    }
}

/// Output rows being collected: the probe row (an index into the probe batch, or stored
/// bytes), the matched version row (`None`: NULL-extended) and the weight.
#[derive(Default)]
struct Pairs<L> {
    left: Vec<L>,
    right: Vec<Option<Bytes>>,
    weights: Vec<i64>,
}

impl<L: Clone> Pairs<L> {
    /// `l`'s output for the match `rows` with weight `w`.
    fn push(&mut self, l: &L, rows: &[(Bytes, i64)], w: i64, left_join: bool) {
        for (r, c) in rows {
            self.left.push(l.clone());
            self.right.push(Some(r.clone()));
            self.weights.push(w * c);
        }
        if rows.is_empty() && left_join {
            self.left.push(l.clone());
            self.right.push(None);
            self.weights.push(w);
        }
    }
}

impl TemporalJoin {
    /// `probe` and `versioned` are the inputs' schemas, `schema` the output's (the probe's
    /// columns, then the versioned input's); `table` holds the state.
    pub fn new(
        spec: TemporalJoinSpec,
        probe: &SchemaRef,
        versioned: &SchemaRef,
        schema: SchemaRef,
        table: Box<dyn StateTable>,
    ) -> Result<Self> {
        let vt = versioned
            .fields()
            .get(spec.version_time)
            .map(|f| f.data_type());
        if vt != Some(&DataType::Timestamp(TimeUnit::Microsecond, None)) {
            return Err(KappaError::internal(
                "a temporal join's version time is not a timestamp column",
            ));
        }
        if schema.fields().len() != probe.fields().len() + versioned.fields().len() {
            return Err(KappaError::internal(
                "a temporal join's schema is not its inputs' columns",
            ));
        }
        Ok(Self {
            keys: RowConverter::new(
                spec.key_types
                    .iter()
                    .map(|t| SortField::new(t.clone()))
                    .collect(),
            )?,
            probe_rows: kappa_state::row_converter(probe)?,
            version_rows: kappa_state::row_converter(versioned)?,
            version_types: versioned
                .fields()
                .iter()
                .map(|f| f.data_type().clone())
                .collect(),
            spec,
            schema,
            table,
            watermark: None,
            batches: None,
            unused_log: None,
            probe_schema: probe.clone(),
            cache: HashMap::default(),
        })
    }

    /// For a probe input that never retracts: with `in_memory`, keeps the stored probe
    /// rows as the batches they came in, checkpointed into `log_table` (`None`: not
    /// checkpointed); otherwise in the table, as always. The log table is given either way,
    /// so a restart can switch between the two forms (a restore moves the rows). A join
    /// without keys keeps them in its table.
    pub fn with_append_only_probes(
        mut self,
        log_table: Option<Box<dyn StateTable>>,
        in_memory: bool,
    ) -> Self {
        let store = ProbeBatches::new(&self.probe_schema, log_table);
        if in_memory && !self.spec.probe_keys.is_empty() {
            self.batches = Some(store);
        } else if store.checkpointed() {
            self.unused_log = Some(store);
        }
        self
    }

    /// `key`'s versions in time order (cached).
    fn versions_of(&mut self, key: &[u8]) -> Result<&[(i64, VersionRows)]> {
        if !self.cache.contains_key(key) {
            if self.cache.len() >= CACHED_KEYS {
                self.cache.clear();
            }
            let vs = versions(self.table.as_ref(), key)?;
            self.cache.insert(Arc::from(key), vs);
        }
        Ok(self.cache.get(key).map(Vec::as_slice).unwrap_or_default())
    }

    /// Whether a probe row at `t` can no longer change its match.
    fn probe_closed(&self, t: i64) -> bool {
        match (self.spec.version_bound, self.watermark) {
            (Some(off), Some(w)) => t.saturating_add(off) <= w,
            _ => false,
        }
    }

    /// Key columns evaluated, their encoding, and which rows have a NULL key.
    fn keyed(
        &self,
        batch: &ChangeBatch,
        exprs: &[Arc<dyn PhysicalExpr>],
    ) -> Result<(KeyRows, Vec<bool>)> {
        let n = batch.num_rows();
        let cols = exprs
            .iter()
            .zip(&self.spec.key_types)
            .map(|(e, t)| Ok(cast(&e.evaluate(batch.data())?.into_array(n)?, t)?))
            .collect::<Result<Vec<ArrayRef>>>()?;
        let null: Vec<bool> = (0..n).map(|i| cols.iter().any(|c| c.is_null(i))).collect();
        Ok((KeyRows::new(&self.keys, &cols)?, null))
    }

    /// The right half of output rows: the matched version rows, NULL where `None`.
    fn version_columns(&self, right: &[Option<Bytes>]) -> Result<Vec<ArrayRef>> {
        let some: Vec<&[u8]> = right.iter().flatten().map(|r| r.as_ref()).collect();
        if some.is_empty() {
            return Ok(self
                .version_types
                .iter()
                .map(|t| new_null_array(t, right.len()))
                .collect());
        }
        let cols = kappa_state::decode_rows(&self.version_rows, some)?;
        if some_len(right) == right.len() {
            return Ok(cols);
        }
        let mut next = 0u32;
        let idx: UInt32Array = right
            .iter()
            .map(|r| {
                r.as_ref().map(|_| {
                    next += 1;
                    next - 1
                })
            })
            .collect();
        Ok(take_arrays(&cols, &idx, None)?)
    }

    fn emit(
        &self,
        left: Vec<ArrayRef>,
        pairs_right: &[Option<Bytes>],
        weights: Vec<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if weights.is_empty() {
            return Ok(());
        }
        let mut cols = left;
        cols.extend(self.version_columns(pairs_right)?);
        let n = weights.len();
        let data = crate::batch_with_rows(self.schema.clone(), cols, n)?;
        out.push(ChangeBatch::new(data, weights.into())?);
        Ok(())
    }

    /// Each row's probe time, as microseconds.
    fn probe_times(&self, batch: &ChangeBatch) -> Result<ArrayRef> {
        let n = batch.num_rows();
        Ok(cast(
            &self.spec.probe_time.evaluate(batch.data())?.into_array(n)?,
            &DataType::Timestamp(TimeUnit::Microsecond, None),
        )?)
    }

    /// Stores probe row `row` (key `key`, time `t`) in the table form, `w` more copies.
    fn store_in_table(&mut self, key: &[u8], t: i64, row: &[u8], w: i64) -> Result<()> {
        kappa_state::add_to_count(
            self.table.as_mut(),
            &key_with(PROBES, key, t, row),
            w,
            &WHAT,
        )?;
        if self.spec.version_bound.is_some() {
            self.table
                .put(Arc::from(index_key(PROBES_BY_TIME, t, key)), Arc::from([]));
        }
        Ok(())
    }

    /// A batch of the probe input: joined with the versions now, then stored.
    fn probe(&mut self, batch: ChangeBatch, out: &mut Vec<ChangeBatch>) -> Result<()> {
        let n = batch.num_rows();
        let (keys, null_key) = self.keyed(&batch, &self.spec.probe_keys)?;
        let times_array = self.probe_times(&batch)?;
        let times = times_array.as_primitive::<TimestampMicrosecondType>();
        let rows: Option<Rows> = match self.batches {
            Some(_) => None,
            None => Some(self.probe_rows.convert_columns(batch.columns())?),
        };
        let weights = batch.weights();
        let mut pairs: Pairs<u32> = Pairs::default();
        let mut keep = vec![false; n];
        let left_join = self.spec.left;
        for (i, &null) in null_key.iter().enumerate() {
            let w = weights.value(i);
            if null || times.is_null(i) {
                pairs.push(&(i as u32), &[], w, left_join);
                continue;
            }
            let (key, t) = (keys.get(i), times.value(i));
            let vs = self.versions_of(key)?;
            pairs.push(&(i as u32), version_at(vs, t), w, left_join);
            if self.probe_closed(t) {
                // Its match is final: joined, not stored.
                continue;
            }
            let Some(rows) = &rows else {
                keep[i] = true;
                continue;
            };
            self.store_in_table(key, t, rows.row(i).data(), w)?;
        }
        let idx = UInt32Array::from(pairs.left);
        let left = take_arrays(batch.columns(), &idx, None)?;
        self.emit(left, &pairs.right, pairs.weights, out)?;
        if keep.contains(&true) {
            let bound = self.spec.version_bound;
            store_probes(
                self.batches.as_mut(),
                bound,
                &batch,
                keys,
                times_array,
                &keep,
            )?;
        }
        Ok(())
    }

    /// Moves the probe rows a run that kept them in the table left there into the batch
    /// form (logged, so the next checkpoint has them).
    fn probes_from_table(&mut self) -> Result<()> {
        let found: Vec<(Bytes, Bytes)> = self.table.scan_prefix(&[PROBES]).collect();
        for chunk in found.chunks(crate::change_log::CHUNK_ROWS) {
            let mut rows = Vec::with_capacity(chunk.len());
            for (k, _) in chunk {
                let (_, rest) =
                    kappa_state::codec::split_len_prefixed(&k[1..]).ok_or_else(damaged)?;
                let (_, row) = split_timed(rest)?;
                rows.push(row);
            }
            let cols = kappa_state::decode_rows(&self.probe_rows, rows)?;
            let weights: Vec<i64> = chunk
                .iter()
                .map(|(_, v)| kappa_state::decode_count(v))
                .collect();
            let data = crate::batch_with_rows(self.probe_schema.clone(), cols, chunk.len())?;
            let batch = ChangeBatch::new(data, weights.into())?;
            let mut store = self.batches.take();
            let stored = match &mut store {
                Some(s) => self.replay(s, Replayed::Stored(batch)),
                None => Err(KappaError::internal(
                    "no batch form to move probe rows into",
                )),
            };
            self.batches = store;
            stored?;
        }
        for (k, _) in &found {
            self.table.delete(k);
        }
        delete_prefix(self.table.as_mut(), &[PROBES_BY_TIME]);
        Ok(())
    }

    /// Moves the probe rows a run that kept them as batches logged into the table, and
    /// empties the log.
    fn probes_into_table(&mut self) -> Result<()> {
        let Some(mut log) = self.unused_log.take() else {
            return Ok(());
        };
        let moved = log.drain(|batch| {
            let n = batch.num_rows();
            let (keys, null_key) = self.keyed(&batch, &self.spec.probe_keys)?;
            let times = self.probe_times(&batch)?;
            let times = times.as_primitive::<TimestampMicrosecondType>();
            let rows = self.probe_rows.convert_columns(batch.columns())?;
            for i in (0..n).filter(|&i| !null_key[i] && times.is_valid(i)) {
                let w = batch.weights().value(i);
                self.store_in_table(keys.get(i), times.value(i), rows.row(i).data(), w)?;
            }
            Ok(())
        });
        self.unused_log = Some(log);
        moved
    }

    /// Applies one entry of the probe rows' log being restored to `store`.
    fn replay(&mut self, store: &mut ProbeBatches, entry: Replayed) -> Result<()> {
        match entry {
            Replayed::Watermark(w) => {
                self.watermark = Some(w);
                store.expire(w);
            }
            Replayed::Stored(batch) => {
                let n = batch.num_rows();
                let (keys, null_key) = self.keyed(&batch, &self.spec.probe_keys)?;
                let times = self.probe_times(&batch)?;
                let keep: Vec<bool> = (0..n).map(|i| !null_key[i] && times.is_valid(i)).collect();
                store_probes(
                    Some(store),
                    self.spec.version_bound,
                    &batch,
                    keys,
                    times,
                    &keep,
                )?;
            }
        }
        Ok(())
    }

    /// A batch of the versioned input, applied one (key, version time) at a time.
    fn version(&mut self, batch: ChangeBatch, out: &mut Vec<ChangeBatch>) -> Result<()> {
        let (keys, null_key) = self.keyed(&batch, &self.spec.version_keys)?;
        let times =
            batch.columns()[self.spec.version_time].as_primitive::<TimestampMicrosecondType>();
        let rows = self.version_rows.convert_columns(batch.columns())?;
        let weights = batch.weights();
        // Rows with a NULL key or version time match nothing, ever: not stored.
        let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut group_of: HashMap<(&[u8], i64), usize> = HashMap::default();
        for (i, &null) in null_key.iter().enumerate() {
            if null || times.is_null(i) {
                continue;
            }
            let g = *group_of
                .entry((keys.get(i), times.value(i)))
                .or_insert_with(|| {
                    groups.push((i, Vec::new()));
                    groups.len() - 1
                });
            groups[g].1.push(i);
        }
        // The stored probe rows rejoined: in the table form, or in the batch form.
        let mut pairs: Pairs<Bytes> = Pairs::default();
        let mut batch_pairs: Pairs<RowRef> = Pairs::default();
        let left_join = self.spec.left;
        for (first, members) in groups {
            let (key, v) = (keys.get(first), times.value(first));
            self.cache.remove(key);
            let before = versions(self.table.as_ref(), key)?;
            let at = before.partition_point(|(t, _)| *t < v);
            let next = before
                .get(at)
                .filter(|(t, _)| *t == v)
                .map_or(at, |_| at + 1);
            let next = before.get(next).map(|(t, _)| *t);
            let old = version_at(&before, v).to_vec();
            for &i in &members {
                kappa_state::add_to_count(
                    self.table.as_mut(),
                    &key_with(VERSIONS, key, v, rows.row(i).data()),
                    weights.value(i),
                    &WHAT,
                )?;
            }
            let after = versions(self.table.as_ref(), key)?;
            let new = version_at(&after, v);
            if self.spec.probe_bound.is_some() && after.iter().any(|(t, _)| *t == v) {
                self.table.put(
                    Arc::from(index_key(VERSIONS_BY_TIME, v, key)),
                    Arc::from([]),
                );
            }
            if old.as_slice() == new {
                continue;
            }
            let covered = |t: i64| t >= v && next.is_none_or(|n| t < n);
            if let Some(store) = &self.batches {
                store.probe(key, |l, t, c| {
                    if covered(t) {
                        batch_pairs.push(&l, &old, -c, left_join);
                        batch_pairs.push(&l, new, c, left_join);
                    }
                })?;
                continue;
            }
            for (t, l, c) in entries(self.table.as_ref(), PROBES, key)? {
                if covered(t) {
                    pairs.push(&l, &old, -c, left_join);
                    pairs.push(&l, new, c, left_join);
                }
            }
        }
        if let Some(store) = self
            .batches
            .as_ref()
            .filter(|_| !batch_pairs.left.is_empty())
        {
            let left = store.gather(&batch_pairs.left)?;
            self.emit(left, &batch_pairs.right, batch_pairs.weights, out)?;
        }
        let left = kappa_state::decode_rows(&self.probe_rows, pairs.left.iter().map(|r| &r[..]))?;
        self.emit(left, &pairs.right, pairs.weights, out)
    }

    /// Frees the probe rows and superseded versions the watermark has closed.
    fn expire(&mut self, w: i64) -> Result<()> {
        if let Some(store) = &mut self.batches {
            store.expire(w);
        } else if let Some(off) = self.spec.version_bound {
            let closed = closed_index(self.table.as_ref(), PROBES_BY_TIME, off, w)?;
            for (index, t, key) in closed {
                let mut prefix = key_prefix(PROBES, &key);
                prefix.extend_from_slice(&ordered_i64(t));
                delete_prefix(self.table.as_mut(), &prefix);
                self.table.delete(&index);
            }
        }
        if let (Some(po), Some(vo)) = (self.spec.probe_bound, self.spec.version_bound) {
            let closed = closed_index(self.table.as_ref(), VERSIONS_BY_TIME, po.max(vo), w)?;
            for (index, v, key) in closed {
                let stale: Vec<Bytes> = {
                    let prefix = key_prefix(VERSIONS, &key);
                    let mut older = Vec::new();
                    let mut exists = false;
                    for (k, _) in self.table.scan_prefix(&prefix) {
                        let (t, _) = split_timed(&k[prefix.len()..])?;
                        if t >= v {
                            exists = t == v;
                            break;
                        }
                        older.push(k);
                    }
                    // A version deleted since its index entry was written supersedes
                    // nothing.
                    if exists { older } else { Vec::new() }
                };
                if !stale.is_empty() {
                    self.cache.remove(&key[..]);
                }
                for k in stale {
                    self.table.delete(&k);
                }
                self.table.delete(&index);
            }
        }
        Ok(())
    }
}

/// Stores the rows of `batch` for which `keep` is true in the batch form: `times` are
/// their probe times, and with a `version_bound` a row expires once `t + bound <= W`.
fn store_probes(
    store: Option<&mut ProbeBatches>,
    version_bound: Option<i64>,
    batch: &ChangeBatch,
    keys: KeyRows,
    times: ArrayRef,
    keep: &[bool],
) -> Result<()> {
    let expiry: Vec<Option<i64>> = match version_bound {
        Some(off) => {
            let t = times.as_primitive::<TimestampMicrosecondType>();
            (0..t.len())
                .map(|i| t.is_valid(i).then(|| t.value(i).saturating_add(off)))
                .collect()
        }
        None => vec![None; times.len()],
    };
    let (Some(store), Some(keys)) = (store, keys.into_rows()) else {
        return Err(KappaError::internal(
            "a temporal join's probe rows stored as batches without a store or keys",
        ));
    };
    store.add(batch, keys, times, keep, &expiry)
}

fn some_len(v: &[Option<Bytes>]) -> usize {
    v.iter().filter(|r| r.is_some()).count()
}

/// The entries of the time index `tag` that `w` has closed (`t + offset <= w`): (index
/// key, time, join key), in time order.
fn closed_index(
    table: &dyn StateTable,
    tag: u8,
    offset: i64,
    w: i64,
) -> Result<Vec<(Bytes, i64, Vec<u8>)>> {
    let mut out = Vec::new();
    for (k, _) in table.scan_prefix(&[tag]) {
        let (t, key) = split_ordered_i64(&k[1..]).ok_or_else(damaged)?;
        if t.saturating_add(offset) > w {
            break;
        }
        let key = key.to_vec();
        out.push((k, t, key));
    }
    Ok(out)
}

fn delete_prefix(table: &mut dyn StateTable, prefix: &[u8]) {
    let keys: Vec<Bytes> = table.scan_prefix(prefix).map(|(k, _)| k).collect();
    for k in keys {
        table.delete(&k);
    }
}

impl Operator for TemporalJoin {
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        match input {
            0 => self.probe(batch, out),
            1 => self.version(batch, out),
            _ => Err(KappaError::internal("a temporal join has two inputs")),
        }
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        watermark: Option<i64>,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if let Some(w) = watermark {
            if self.watermark.is_some_and(|old| old >= w) {
                return Ok(());
            }
            self.watermark = Some(w);
            self.expire(w)?;
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamTemporalJoin"
    }

    fn state_entries(&self) -> usize {
        self.table.len() + self.batches.as_ref().map_or(0, ProbeBatches::len)
    }

    fn checkpointable(&self) -> bool {
        self.batches.as_ref().is_none_or(ProbeBatches::checkpointed)
    }

    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        if let Some(store) = &mut self.batches {
            store.checkpoint(self.watermark)?;
        }
        Ok(crate::save_progress(self.watermark, 0))
    }

    fn state_tables(&mut self) -> Vec<&mut dyn StateTable> {
        let mut tables: Vec<&mut dyn StateTable> = vec![self.table.as_mut()];
        let log = self.batches.as_mut().or(self.unused_log.as_mut());
        if let Some(t) = log.and_then(ProbeBatches::table_mut) {
            tables.push(t);
        }
        tables
    }

    /// The versions are in the table; probe rows kept as batches are rebuilt from their
    /// log (which leaves the watermark where the checkpoint did).
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        let (watermark, _) = crate::restore_progress(saved, WHAT)?;
        self.cache.clear();
        self.watermark = None;
        let in_memory = self.batches.is_some();
        if let Some(mut store) = self.batches.take().or(self.unused_log.take()) {
            let probe = self.probe_schema.clone();
            let replayed = store.restore(&probe, |store, entry| self.replay(store, entry));
            if in_memory {
                self.batches = Some(store);
            } else {
                self.unused_log = Some(store);
            }
            replayed?;
            if self.watermark.is_some_and(|w| Some(w) != watermark) {
                return Err(kappa_state::codec::damaged(WHAT));
            }
        }
        self.watermark = watermark;
        if in_memory {
            self.probes_from_table()
        } else {
            self.probes_into_table()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestEpoch, assert_changes, assert_restores_exactly, changes, schema};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::physical_expr::expressions::col as pcol;

    const FACTS: &str = "k:i64, t:ts, amount:i64";
    const RATES: &str = "k:i64, vt:ts, rate:i64";

    fn op(
        left: bool,
        bounds: (Option<i64>, Option<i64>),
        table: Box<dyn StateTable>,
    ) -> TemporalJoin {
        let (facts, rates) = (schema(FACTS), schema(RATES));
        let mut fields: Vec<Field> = facts.fields().iter().map(|f| (**f).clone()).collect();
        fields.extend(rates.fields().iter().map(|f| (**f).clone()));
        let spec = TemporalJoinSpec {
            left,
            probe_keys: vec![pcol("k", &facts).unwrap()],
            version_keys: vec![pcol("k", &rates).unwrap()],
            key_types: vec![DataType::Int64],
            probe_time: pcol("t", &facts).unwrap(),
            version_time: 1,
            probe_bound: bounds.0,
            version_bound: bounds.1,
        };
        TemporalJoin::new(spec, &facts, &rates, Arc::new(Schema::new(fields)), table).unwrap()
    }

    /// `@N` cells are timestamps N seconds after the epoch, as batches print them.
    fn at(expected: &str) -> String {
        expected
            .split(' ')
            .map(
                |w| match w.strip_prefix('@').and_then(|n| n.parse::<i64>().ok()) {
                    Some(s) => format!(
                        "1970-01-01T{:02}:{:02}:{:02}",
                        s / 3600,
                        s / 60 % 60,
                        s % 60
                    ),
                    None => w.to_string(),
                },
            )
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn table() -> Box<dyn StateTable> {
        Box::new(kappa_state::MemStateTable::default())
    }

    fn facts(op: &mut TemporalJoin, lines: &str) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(0, changes(FACTS, lines), &mut out).unwrap();
        out
    }

    fn rates(op: &mut TemporalJoin, lines: &str) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(1, changes(RATES, lines), &mut out).unwrap();
        out
    }

    #[test]
    fn a_fact_picks_the_version_valid_at_its_time() {
        let mut op = op(false, (None, None), table());
        assert!(rates(&mut op, "+ 1 | 10 | 100\n+ 1 | 20 | 200\n+ 2 | 10 | 7").is_empty());
        let out = facts(
            &mut op,
            "+ 1 | 5 | 1\n+ 1 | 10 | 2\n+ 1 | 15 | 3\n+ 1 | 25 | 4\n+ 2 | 30 | 5\n+ 3 | 30 | 6\n+ NULL | 30 | 7",
        );
        assert_changes(
            &out,
            &at("+ 1 | @10 | 2 | 1 | @10 | 100
             + 1 | @15 | 3 | 1 | @10 | 100
             + 1 | @25 | 4 | 1 | @20 | 200
             + 2 | @30 | 5 | 2 | @10 | 7"),
        );
    }

    #[test]
    fn a_new_version_rejoins_only_the_facts_it_covers() {
        let mut op = op(true, (None, None), table());
        rates(&mut op, "+ 1 | 10 | 100\n+ 1 | 30 | 300");
        let out = facts(
            &mut op,
            "+ 1 | 5 | 1\n+ 1 | 15 | 2\n+ 1 | 25 | 3\n+ 1 | 35 | 4",
        );
        assert_changes(
            &out,
            &at("+ 1 | @5 | 1 | NULL | NULL | NULL
             + 1 | @15 | 2 | 1 | @10 | 100
             + 1 | @25 | 3 | 1 | @10 | 100
             + 1 | @35 | 4 | 1 | @30 | 300"),
        );
        // A version at 20, arriving late: the facts in [20, 30) switch to it.
        let out = rates(&mut op, "+ 1 | 20 | 200");
        assert_changes(
            &out,
            &at("- 1 | @25 | 3 | 1 | @10 | 100
             + 1 | @25 | 3 | 1 | @20 | 200"),
        );
        // Deleting the first version: the facts it covered lose their match.
        let out = rates(&mut op, "- 1 | 10 | 100");
        assert_changes(
            &out,
            &at("- 1 | @15 | 2 | 1 | @10 | 100
             + 1 | @15 | 2 | NULL | NULL | NULL"),
        );
        // An update of a version in place (same time): the facts in its range follow.
        let out = rates(&mut op, "- 1 | 30 | 300\n+ 1 | 30 | 301");
        assert_changes(
            &out,
            &at("- 1 | @35 | 4 | 1 | @30 | 300
             + 1 | @35 | 4 | 1 | @30 | 301"),
        );
        // A fact deleted: its pair with the current version is retracted.
        let out = facts(&mut op, "- 1 | 25 | 3");
        assert_changes(&out, &at("- 1 | @25 | 3 | 1 | @20 | 200"));
    }

    #[test]
    fn rows_sharing_a_version_time_all_match_with_their_multiplicities() {
        let mut op = op(false, (None, None), table());
        rates(&mut op, "+2 1 | 10 | 100\n+ 1 | 10 | 101");
        let out = facts(&mut op, "+3 1 | 12 | 1");
        assert_changes(
            &out,
            &at("+6 1 | @12 | 1 | 1 | @10 | 100
             +3 1 | @12 | 1 | 1 | @10 | 101"),
        );
        let out = rates(&mut op, "- 1 | 10 | 100");
        assert_changes(&out, &at("-3 1 | @12 | 1 | 1 | @10 | 100"));
        // A retraction of a version never stored is an error, not a negative count.
        let mut out = vec![];
        assert!(
            op.process(1, changes(RATES, "- 1 | 10 | 999"), &mut out)
                .is_err()
        );
    }

    #[test]
    fn the_watermark_frees_final_facts_and_superseded_versions() {
        // Both times are event-time columns (future rows have t >= W).
        let mut op = op(false, (Some(1), Some(1)), table());
        let mut out = vec![];
        rates(&mut op, "+ 1 | 10 | 100\n+ 2 | 10 | 7");
        facts(&mut op, "+ 1 | 12 | 1\n+ 1 | 18 | 2");
        rates(&mut op, "+ 1 | 15 | 150");
        // 2 versions of key 1 and one of key 2 (+ index), 2 facts (+ index).
        op.on_barrier(0, Some(16 * 1_000_000), &mut out).unwrap();
        // W = 16 s: the fact at 12 s is final and freed; the version at 10 s of key 1 is
        // superseded by the one at 15 s, which no fact can fall before any more.
        let left: Vec<(u8, usize)> = (0..4u8)
            .map(|tag| (tag, op.table.scan_prefix(&[tag]).count()))
            .collect();
        assert_eq!(left, vec![(0, 2), (1, 1), (2, 1), (3, 0)]);
        // The fact at 18 s still sees corrections.
        let out = rates(&mut op, "+ 1 | 17 | 170");
        assert_changes(
            &out,
            &at("- 1 | @18 | 2 | 1 | @15 | 150
             + 1 | @18 | 2 | 1 | @17 | 170"),
        );
        let mut out = vec![];
        op.on_barrier(1, Some(100 * 1_000_000), &mut out).unwrap();
        // One version per key, nothing else.
        assert_eq!(op.state_entries(), 2);
        let out = facts(&mut op, "+ 1 | 200 | 3");
        assert_changes(&out, &at("+ 1 | @200 | 3 | 1 | @17 | 170"));
    }

    #[test]
    fn restores_from_its_table() {
        let f = |l: &str| (0, changes(FACTS, l));
        let r = |l: &str| (1, changes(RATES, l));
        let epochs: Vec<TestEpoch> = vec![
            (
                vec![r("+ 1 | 10 | 100"), f("+ 1 | 12 | 1\n+ 2 | 12 | 2")],
                Some(5_000_000),
            ),
            (
                vec![r("+ 2 | 11 | 20\n+ 1 | 14 | 140"), f("+ 1 | 15 | 3")],
                Some(13_000_000),
            ),
            (
                vec![f("- 1 | 15 | 3\n+ 1 | 16 | 4"), r("- 1 | 14 | 140")],
                Some(15_000_000),
            ),
            (
                vec![r("+ 1 | 16 | 160"), f("+ 2 | 20 | 5")],
                Some(30_000_000),
            ),
        ];
        for at in 1..epochs.len() {
            assert_restores_exactly(
                |mut t| Box::new(op(true, (Some(1), Some(1)), t.remove(0))),
                1,
                &epochs,
                at,
            );
        }
    }

    /// The join over an append-only probe input, its probe rows kept as batches
    /// (`in_memory`) or in the table; `tables` are the state table and the probes' log.
    fn append_only(
        bounds: (Option<i64>, Option<i64>),
        mut tables: Vec<Box<dyn StateTable>>,
        in_memory: bool,
    ) -> TemporalJoin {
        let log = tables.pop();
        let table = tables.pop().unwrap_or_else(table);
        op(true, bounds, table).with_append_only_probes(log, in_memory)
    }

    /// Append-only facts and changing versions, with the watermark advancing: the batch
    /// form emits what the table form does, step by step, and frees its rows as it does.
    #[test]
    fn facts_kept_as_batches_join_as_in_the_table() {
        use rand::{Rng, SeedableRng};
        for seed in 0..30u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let bounds = if seed % 3 == 0 {
                (None, None)
            } else {
                (Some(1), Some(1))
            };
            let mut in_table = append_only(bounds, vec![table(), table()], false);
            let mut batched = append_only(bounds, vec![table(), table()], true);
            assert!(batched.batches.is_some() && in_table.batches.is_none());
            let (mut a, mut b) = (vec![], vec![]);
            let mut rates: Vec<(i64, i64, i64)> = vec![];
            let mut w = 0i64;
            let mut amount = 0;
            for step in 0..80 {
                match rng.gen_range(0..4) {
                    0 => {
                        w += rng.gen_range(0..4);
                        in_table
                            .on_barrier(step, Some(w * 1_000_000), &mut a)
                            .unwrap();
                        batched
                            .on_barrier(step, Some(w * 1_000_000), &mut b)
                            .unwrap();
                        // Equal live rows: the table keeps one probe entry per row plus
                        // its index, the batches one per row.
                        let facts = in_table.table.scan_prefix(&[PROBES]).count();
                        assert_eq!(batched.batches.as_ref().map(ProbeBatches::len), Some(facts));
                    }
                    // Only versions above the watermark change (the bounds' promise;
                    // older ones may have been freed).
                    1 if rates.iter().any(|r| r.1 > w) && rng.gen_bool(0.5) => {
                        let open: Vec<usize> =
                            (0..rates.len()).filter(|&i| rates[i].1 > w).collect();
                        let r = rates.swap_remove(open[rng.gen_range(0..open.len())]);
                        let lines = format!("- {} | {} | {}", r.0, r.1, r.2);
                        in_table.process(1, changes(RATES, &lines), &mut a).unwrap();
                        batched.process(1, changes(RATES, &lines), &mut b).unwrap();
                    }
                    1 => {
                        let r = (
                            rng.gen_range(0..3),
                            w + rng.gen_range(1..10),
                            rng.gen_range(0..5),
                        );
                        rates.push(r);
                        let lines = format!("+ {} | {} | {}", r.0, r.1, r.2);
                        in_table.process(1, changes(RATES, &lines), &mut a).unwrap();
                        batched.process(1, changes(RATES, &lines), &mut b).unwrap();
                    }
                    _ => {
                        let mut lines = String::new();
                        for _ in 0..rng.gen_range(1..5) {
                            let k = match rng.gen_range(-1..3) {
                                -1 => "NULL".to_string(),
                                k => k.to_string(),
                            };
                            let t = w + rng.gen_range(1..10);
                            // A distinct amount: the table merges equal rows into one
                            // entry, the batches do not.
                            amount += 1;
                            lines.push_str(&format!(
                                "+{} {k} | {t} | {amount}\n",
                                rng.gen_range(1..3)
                            ));
                        }
                        in_table.process(0, changes(FACTS, &lines), &mut a).unwrap();
                        batched.process(0, changes(FACTS, &lines), &mut b).unwrap();
                    }
                }
                assert_eq!(
                    crate::testing::consolidate(&a),
                    crate::testing::consolidate(&b),
                    "seed {seed} step {step}"
                );
            }
        }
    }

    fn append_only_epochs() -> Vec<TestEpoch> {
        let f = |l: &str| (0, changes(FACTS, l));
        let r = |l: &str| (1, changes(RATES, l));
        vec![
            (
                vec![r("+ 1 | 10 | 100"), f("+ 1 | 12 | 1\n+ 2 | 12 | 2")],
                Some(5_000_000),
            ),
            (
                vec![r("+ 2 | 11 | 20\n+ 1 | 14 | 140"), f("+2 1 | 15 | 3")],
                Some(13_000_000),
            ),
            (
                vec![f("+ 1 | 16 | 4\n+ NULL | 16 | 9"), r("- 1 | 14 | 140")],
                Some(15_000_000),
            ),
            (
                vec![r("+ 1 | 16 | 160"), f("+ 2 | 20 | 5")],
                Some(30_000_000),
            ),
            (
                vec![
                    r("+ 2 | 31 | 310\n+ 1 | 32 | 320"),
                    f("+ 2 | 40 | 6\n+ 1 | 33 | 7"),
                ],
                Some(31_000_000),
            ),
            (vec![r("+ 1 | 33 | 330")], Some(50_000_000)),
        ]
    }

    #[test]
    fn facts_kept_as_batches_restore_from_their_log() {
        let epochs = append_only_epochs();
        for bounds in [(Some(1), Some(1)), (None, None)] {
            for at in 1..epochs.len() {
                assert_restores_exactly(|t| Box::new(append_only(bounds, t, true)), 2, &epochs, at);
            }
        }
    }

    /// A restart may switch between keeping the facts as batches and in the table (the
    /// store spills or not): the restore moves them, and the output goes on unchanged.
    /// (The state entry counts differ: the table also holds an index of the facts.)
    #[test]
    fn facts_move_between_batches_and_table_on_restore() {
        let epochs = append_only_epochs();
        let run = |op: &mut TemporalJoin, e: usize| {
            let mut out = vec![];
            for (port, b) in &epochs[e].0 {
                op.process(*port, b.clone(), &mut out).unwrap();
            }
            op.on_barrier(e as u64 + 1, epochs[e].1, &mut out).unwrap();
            crate::testing::consolidate(&out)
        };
        let bounds = (Some(1), Some(1));
        for at in 1..epochs.len() {
            for in_memory in [false, true] {
                let mut disk = crate::testing::CheckpointDisk::default();
                let mut live = append_only(bounds, disk.tables(2), in_memory);
                for e in 0..at {
                    run(&mut live, e);
                    disk.checkpoint(&mut live);
                }
                let mut restored = append_only(bounds, disk.tables(2), !in_memory);
                disk.restore(&mut restored);
                // Twice through the other form and back.
                disk.checkpoint(&mut restored);
                let mut back = append_only(bounds, disk.tables(2), in_memory);
                disk.restore(&mut back);
                for e in at..epochs.len() {
                    let want = run(&mut live, e);
                    assert_eq!(run(&mut restored, e), want, "epoch {e} after switching");
                    assert_eq!(run(&mut back, e), want, "epoch {e} after switching back");
                }
            }
        }
    }

    /// Random inserts and deletes on both sides, in random interleavings: after every
    /// step the sum of everything emitted equals the ASOF join recomputed from scratch.
    #[test]
    fn random_changes_equal_recomputation() {
        use rand::{Rng, SeedableRng};
        for seed in 0..40u64 {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let left = seed % 2 == 0;
            let mut op = op(left, (None, None), table());
            let mut facts: Vec<(i64, i64, i64)> = vec![];
            let mut rates: Vec<(i64, i64, i64)> = vec![];
            let mut emitted: Vec<ChangeBatch> = vec![];
            for step in 0..60 {
                let side = rng.gen_range(0..2);
                let mut lines = String::new();
                for _ in 0..rng.gen_range(1..4) {
                    let rows = if side == 0 { &mut facts } else { &mut rates };
                    if !rows.is_empty() && rng.gen_bool(0.3) {
                        let r = rows.swap_remove(rng.gen_range(0..rows.len()));
                        lines.push_str(&format!("- {} | {} | {}\n", r.0, r.1, r.2));
                        lines = lines.replace("-1", "NULL");
                    } else {
                        // -1 stands for NULL.
                        let r = (
                            rng.gen_range(-1..3),
                            rng.gen_range(-1..8),
                            rng.gen_range(0..3),
                        );
                        rows.push(r);
                        lines.push_str(&format!("+ {} | {} | {}\n", r.0, r.1, r.2));
                    }
                }
                let lines = lines
                    .replace(" -1 ", " NULL ")
                    .replace("+ -1 ", "+ NULL ")
                    .replace("- -1 ", "- NULL ");
                let schema = if side == 0 { FACTS } else { RATES };
                op.process(side, changes(schema, &lines), &mut emitted)
                    .unwrap();
                let mut want = String::new();
                for f in &facts {
                    let null = |v: i64| v < 0;
                    let best = rates
                        .iter()
                        .filter(|r| {
                            !null(f.0) && !null(f.1) && !null(r.1) && r.0 == f.0 && r.1 <= f.1
                        })
                        .map(|r| r.1)
                        .max();
                    let matched: Vec<_> = rates
                        .iter()
                        .filter(|r| !null(f.0) && !null(f.1) && r.0 == f.0 && Some(r.1) == best)
                        .collect();
                    for r in &matched {
                        want.push_str(&format!(
                            "+ {} | @{} | {} | {} | @{} | {}\n",
                            f.0, f.1, f.2, r.0, r.1, r.2
                        ));
                    }
                    if matched.is_empty() && left {
                        want.push_str(&format!(
                            "+ {} | @{} | {} | NULL | NULL | NULL\n",
                            f.0, f.1, f.2
                        ));
                    }
                    let _ = null;
                }
                let got = crate::testing::consolidate(&emitted);
                let mut expected = std::collections::BTreeMap::new();
                let want = want.replace("@-1", "NULL").replace("+ -1 ", "+ NULL ");
                for line in at(&want).lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let row = line[1..]
                        .trim()
                        .split('|')
                        .map(str::trim)
                        .collect::<Vec<_>>()
                        .join(" | ");
                    *expected.entry(row).or_insert(0i64) += 1;
                }
                assert_eq!(got, expected, "seed {seed} step {step}");
            }
        }
    }
}

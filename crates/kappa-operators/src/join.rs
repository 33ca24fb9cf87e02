//! Incremental hash join: inner, left/right/full outer, semi and anti, with an optional
//! residual condition and watermark-driven state cleanup (which makes interval joins and
//! window joins run in bounded state).
//!
//! # Semantics
//! A left row `l` and a right row `r` *match* when their keys are equal and the residual
//! condition holds on `l ++ r`. A key with a NULL in any column matches nothing (SQL `=`),
//! unless the plan asked for `null_equals_null` (e.g. `IS NOT DISTINCT FROM`). The output
//! is what [`JoinKind`] says, as a multiset: a pair has weight `w(l) · w(r)`; an unmatched
//! row of a preserved side appears NULL-extended with its own weight; a semi (anti) join
//! emits each row of its side that has at least one (no) match, with its own weight.
//!
//! # Incremental rule
//! Pairs are bilinear: `Δ(L ⋈ R) = ΔL ⋈ R + (L + ΔL) ⋈ ΔR`, so a batch from one side is
//! probed against the other side's state and then added to its own; any interleaving of
//! the two inputs' batches gives the same sum. The rest depends on whether a row has a
//! match, so every stored row of a side that needs it (preserved, semi or anti) carries its
//! *match count*, the weighted number of matching rows on the other side. A change of the
//! other side updates the counts of the rows it matches, and a row whose count moves
//! between zero and non-zero changes its unmatched / semi / anti output. A new row's own
//! count is the probe's result.
//!
//! # State
//! Per side, in memory: join key → (row → count and match count), keys and rows in Arrow's
//! row format, in hash maps, so a probe or an update costs one hash lookup (an ordered
//! byte-keyed map costs a chain of cache-missing key comparisons per row, which made the
//! join ten times slower). Rows whose key cannot match (NULL) are not stored: their output
//! never changes, and a later change to them is computed alone. When the store spills, the
//! same contents live in state tables instead (see `join_state.rs`), which are then the
//! checkpoint: nothing is logged. A side whose input is append-only and whose rows carry
//! no match count keeps its rows as the Arrow batches they came in, with a hash index of
//! their keys (`join_batches.rs`): no per-row encoding or allocation at all.
//!
//! # Checkpoints
//! The state is a function of the inputs and the watermarks, in the order they came, so it
//! is checkpointed as that log ([`ChangeLog`]: Arrow batches written whole, no per-row
//! work): stream 0/1 the rows each side stored, with their weights; a mark for each
//! watermark that advanced. A restart replays it: a join without match counts just stores
//! the rows again (expiring them with the logged watermarks); one with match counts probes
//! as it did the first time (output discarded), since a count changes with the *other*
//! side's rows and an expired row of the other side still counts. When the log is mostly
//! dead rows it starts over from a snapshot: streams 2/3 hold each side's stored rows with
//! their count and match count, after a mark with the watermark then.
//!
//! # Expiry (state freed by the watermark)
//! The planner derives, from the join condition and the watermark-bounded columns of the
//! inputs, for each side a list of [`WatermarkCol`]s over that side's columns: a stored row
//! whose value `v` in such a column has `v + offset <= W` (W the watermark of the join's
//! inputs) can never match a future row of the other side. E.g. for
//! `b.ts BETWEEN a.ts AND a.ts + INTERVAL '1' HOUR` a stored `a` row expires once
//! `a.ts + 1 h < W`, and in a window join a stored row expires once its `window_end <= W`.
//! Expired rows are deleted at the barrier (an index orders them by expiry time);
//! their output stays as it is, final. A change that arrives for a row already expired is
//! still joined with the other side's state (which holds everything it could match), but
//! not stored: nothing could probe it.

use std::sync::Arc;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Int64Array, UInt32Array, new_null_array,
};
use datafusion::arrow::compute::kernels::filter::prep_null_mask_filter;
use datafusion::arrow::compute::{cast, take_arrays};
use datafusion::arrow::datatypes::{
    DataType, Field, Int64Type, Schema, SchemaRef, TimeUnit, TimestampMicrosecondType,
};
use datafusion::arrow::row::{RowConverter, Rows, SortField};
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_plan::{JoinKind, WatermarkCol};
use kappa_state::codec::damaged;

type Bytes = Arc<[u8]>;

use crate::Operator;
use crate::change_log::{ChangeLog, LogEntry};
use crate::join_batches::BatchRows;
use crate::join_state::{Found, MemRows, SideRows, SideTables};

/// One input of the join.
pub struct JoinSide {
    /// The equi-join key expressions over this side's input.
    pub keys: Vec<Arc<dyn PhysicalExpr>>,
    /// This side's input schema.
    pub schema: SchemaRef,
    /// A stored row expires when any of these (timestamp) columns is closed.
    pub expiry: Vec<WatermarkCol>,
    /// The input never retracts (an append-only stream).
    pub append_only: bool,
}

struct Side {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    schema: SchemaRef,
    rows: RowConverter,
    /// The stored rows, indexed by expiry time (smallest `v + offset` over `expiry`).
    store: SideRows,
    expiry: Vec<WatermarkCol>,
    /// Whether stored rows carry their match count.
    tracked: bool,
}

pub struct HashJoin {
    kind: JoinKind,
    sides: [Side; 2],
    key_converter: RowConverter,
    key_types: Vec<DataType>,
    /// Over the left's columns followed by the right's (`pair_schema`).
    residual: Option<Arc<dyn PhysicalExpr>>,
    null_equals_null: bool,
    pair_schema: SchemaRef,
    schema: SchemaRef,
    watermark: Option<i64>,
    durable: Option<Durable>,
}

/// How a join's state is checkpointed.
struct Durable {
    /// The log of the inputs since the last snapshot (for sides in memory), and its table.
    /// With spilled sides nothing is logged; a log a run without spilling left is replayed
    /// into the tables at restore, and then deleted.
    log: ChangeLog,
    log_table: Box<dyn kappa_state::StateTable>,
    /// For sides in memory: the tables spilled sides would use, where a run that spilled
    /// may have left state (moved into memory at restore, and then deleted).
    unused: Option<[SideTables; 2]>,
    /// The log holds none of the rows (they came from the tables): the next checkpoint
    /// starts it over with a snapshot.
    snapshot_due: bool,
}

/// Log streams: the rows side 0/1 stored (with weights), and snapshots of side 0/1's state
/// (with counts and match counts).
const SNAPSHOT: u8 = 2;

/// A candidate pair found by a probe: row `row` of the delta batch and a stored row of
/// the other side (and its count).
struct Candidate {
    row: u32,
    other: Found,
    count: i64,
}

impl HashJoin {
    /// `key_types` are the types both sides' keys are compared in; `residual` is evaluated
    /// over the left's columns followed by the right's; `schema` is the output's.
    pub fn new(
        kind: JoinKind,
        left: JoinSide,
        right: JoinSide,
        key_types: Vec<DataType>,
        residual: Option<Arc<dyn PhysicalExpr>>,
        null_equals_null: bool,
        schema: SchemaRef,
    ) -> Result<Self> {
        if left.keys.len() != key_types.len() || right.keys.len() != key_types.len() {
            return Err(KappaError::internal("join key arity mismatch"));
        }
        let pair_fields: Vec<_> = left
            .schema
            .fields()
            .iter()
            .chain(right.schema.fields().iter())
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect();
        let pair_schema = Arc::new(datafusion::arrow::datatypes::Schema::new(pair_fields));
        let width = match (kind.semi_side(), kind.anti_side()) {
            (Some(s), _) | (_, Some(s)) => [&left, &right][s].schema.fields().len(),
            _ => pair_schema.fields().len(),
        };
        if width != schema.fields().len() {
            return Err(KappaError::internal(
                "join output does not have the columns its kind implies",
            ));
        }
        let side = |s: JoinSide, i: usize| -> Result<Side> {
            let tracked =
                kind.preserves(i) || kind.semi_side() == Some(i) || kind.anti_side() == Some(i);
            let by_key = expires_by_key(&s, &key_types);
            Ok(Side {
                keys: s.keys,
                rows: kappa_state::row_converter(&s.schema)?,
                schema: s.schema,
                store: if s.append_only && !tracked {
                    SideRows::Batches(BatchRows::default())
                } else {
                    SideRows::Memory(MemRows::new(by_key))
                },
                expiry: s.expiry,
                tracked,
            })
        };
        Ok(Self {
            kind,
            // A join without equality conditions (CROSS JOIN, or only a residual) has one
            // key for every row: a constant column.
            key_converter: RowConverter::new(if key_types.is_empty() {
                vec![SortField::new(DataType::Boolean)]
            } else {
                key_types.iter().cloned().map(SortField::new).collect()
            })?,
            sides: [side(left, 0)?, side(right, 1)?],
            key_types,
            residual,
            null_equals_null,
            pair_schema,
            schema,
            watermark: None,
            durable: None,
        })
    }

    /// Checkpoints the state: with `spill`, the sides' rows live in `sides` (state larger
    /// than memory); otherwise in memory, logged into `log_table` (which the join writes
    /// only at checkpoints and reads only when restored). Both kinds of table are given
    /// either way, so a restart can switch between the two.
    pub fn with_checkpoints(
        mut self,
        log_table: Box<dyn kappa_state::StateTable>,
        sides: [SideTables; 2],
        spill: bool,
    ) -> Self {
        let stream = |side: &Side, extra: &[&str]| -> SchemaRef {
            let mut fields: Vec<Field> = side
                .schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect();
            fields.extend(extra.iter().map(|n| Field::new(*n, DataType::Int64, false)));
            Arc::new(Schema::new(fields))
        };
        let [l, r] = &self.sides;
        let streams = vec![
            stream(l, &["weight"]),
            stream(r, &["weight"]),
            stream(l, &["count", "matches"]),
            stream(r, &["count", "matches"]),
        ];
        let unused = if spill {
            let [l, r] = sides;
            self.sides[0].store = SideRows::Tables(l);
            self.sides[1].store = SideRows::Tables(r);
            None
        } else {
            Some(sides)
        };
        self.durable = Some(Durable {
            log: ChangeLog::new(streams, "a join"),
            log_table,
            unused,
            snapshot_due: false,
        });
        self
    }

    /// Whether the inputs are logged (the sides are in memory and checkpointed).
    fn logging(&self) -> bool {
        self.durable.is_some() && !self.sides[0].store.is_spilled()
    }

    /// The batch's join keys in row format, and which rows can match at all.
    fn keys(&self, side: usize, batch: &ChangeBatch) -> Result<(Rows, Option<BooleanArray>)> {
        let n = batch.num_rows();
        let mut cols: Vec<ArrayRef> = Vec::with_capacity(self.key_types.len());
        for (e, t) in self.sides[side].keys.iter().zip(&self.key_types) {
            let a = e.evaluate(batch.data())?.into_array(n)?;
            cols.push(if a.data_type() == t { a } else { cast(&a, t)? });
        }
        if cols.is_empty() {
            cols.push(Arc::new(BooleanArray::from(vec![true; n])));
        }
        let valid = if self.null_equals_null || cols.iter().all(|c| c.null_count() == 0) {
            None
        } else {
            Some(
                (0..n)
                    .map(|i| Some(cols.iter().all(|c| c.is_valid(i))))
                    .collect::<BooleanArray>(),
            )
        };
        Ok((self.key_converter.convert_columns(&cols)?, valid))
    }

    /// When each of `n` rows of `side` (its `columns`) stops being able to match: the
    /// smallest `v + offset` over the side's expiry columns (`None`: never).
    fn expiry_times(
        &self,
        side: usize,
        columns: &[ArrayRef],
        n: usize,
    ) -> Result<Vec<Option<i64>>> {
        let s = &self.sides[side];
        let mut times = vec![None; n];
        for e in &s.expiry {
            let col = cast(
                &columns[e.col],
                &DataType::Timestamp(TimeUnit::Microsecond, None),
            )?;
            let ts = col.as_primitive::<TimestampMicrosecondType>();
            for (i, t) in times.iter_mut().enumerate() {
                if ts.is_valid(i) {
                    let v = ts.value(i).saturating_add(e.offset);
                    *t = Some(t.map_or(v, |x: i64| x.min(v)));
                }
            }
        }
        Ok(times)
    }

    /// Stored rows of `side`, decoded.
    fn decode_rows(&self, side: usize, rows: &[Bytes]) -> Result<Vec<ArrayRef>> {
        kappa_state::decode_rows(&self.sides[side].rows, rows.iter().map(|r| &r[..]))
    }

    /// The columns of stored rows a probe of `side` found, in order.
    fn found_rows<'a>(
        &self,
        side: usize,
        found: impl Iterator<Item = &'a Found>,
    ) -> Result<Vec<ArrayRef>> {
        match &self.sides[side].store {
            SideRows::Batches(b) => {
                let at = found
                    .map(|f| match f {
                        Found::At(at) => Ok(*at),
                        Found::Row(_) => Err(KappaError::internal("a batch store found a row")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                b.gather(&at)
            }
            _ => {
                let rows = found
                    .map(|f| match f {
                        Found::Row(r) => Ok(r.clone()),
                        Found::At(_) => Err(KappaError::internal("a row store found a batch row")),
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.decode_rows(side, &rows)
            }
        }
    }

    /// Left columns then right columns from one side's columns (the other side's are
    /// taken from `other`, or NULL).
    fn pair_columns(
        &self,
        side: usize,
        this: Vec<ArrayRef>,
        other: Option<Vec<ArrayRef>>,
        rows: usize,
    ) -> Vec<ArrayRef> {
        let other = other.unwrap_or_else(|| {
            self.sides[1 - side]
                .schema
                .fields()
                .iter()
                .map(|f| new_null_array(f.data_type(), rows))
                .collect()
        });
        if side == 0 {
            this.into_iter().chain(other).collect()
        } else {
            other.into_iter().chain(this).collect()
        }
    }

    /// Emits rows of one side alone: NULL-extended for outer joins, as they are for semi
    /// and anti joins.
    fn emit_side_rows(
        &self,
        side: usize,
        columns: Vec<ArrayRef>,
        weights: Vec<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if weights.is_empty() {
            return Ok(());
        }
        let n = weights.len();
        let columns = if self.kind.emits_pairs() {
            self.pair_columns(side, columns, None, n)
        } else {
            columns
        };
        let data = crate::batch_with_rows(self.schema.clone(), columns, n)?;
        out.push(ChangeBatch::new(data, Int64Array::from(weights))?);
        Ok(())
    }

    /// The weight with which a row of `side` whose match count is `matches` appears alone
    /// in the output, per unit of its own weight (0 or 1).
    fn alone(&self, side: usize, matches: i64) -> i64 {
        let shown = if matches == 0 {
            self.kind.preserves(side) || self.kind.anti_side() == Some(side)
        } else {
            self.kind.semi_side() == Some(side)
        };
        i64::from(shown)
    }

    /// Starts the log over with a snapshot of the state: the watermark, then each side's
    /// stored rows with their count and match count.
    fn write_snapshot(
        &self,
        log: &mut ChangeLog,
        table: &mut dyn kappa_state::StateTable,
    ) -> Result<()> {
        log.clear(table);
        log.mark(encode_watermark(self.watermark));
        for (i, side) in self.sides.iter().enumerate() {
            let mut write = |cols: Vec<ArrayRef>, n: usize| -> Result<()> {
                log.push(SNAPSHOT + i as u8, cols, n)?;
                log.flush(table)
            };
            match &side.store {
                SideRows::Batches(b) => {
                    // The stored rows not expired, with their weights as counts.
                    for live in b.live_rows(side.schema.fields().len()) {
                        let (mut cols, weights, n) = live?;
                        cols.push(Arc::new(weights));
                        cols.push(Arc::new(Int64Array::from(vec![0; n])));
                        write(cols, n)?;
                    }
                }
                rows => memory_chunks(rows, &side.rows, write)?,
            }
        }
        log.flush(table)
    }

    /// Applies one entry of the log being restored, as the first time.
    fn replay(&mut self, entry: LogEntry) -> Result<()> {
        match entry {
            LogEntry::Mark(m) => match decode_watermark(&m)? {
                Some(w) => {
                    self.expire(w)?;
                }
                None => self.watermark = None,
            },
            LogEntry::Batch(stream, batch) => {
                let side = usize::from(stream % 2);
                let n = batch.num_columns();
                let int_column = |i: usize| {
                    batch
                        .column(i)
                        .as_any()
                        .downcast_ref::<Int64Array>()
                        .cloned()
                        .ok_or_else(|| kappa_state::codec::damaged("a join"))
                };
                let (data_cols, weights, matches) = if stream < SNAPSHOT {
                    (n - 1, int_column(n - 1)?, None)
                } else {
                    (n - 2, int_column(n - 2)?, Some(int_column(n - 1)?))
                };
                let data = crate::batch_with_rows(
                    self.sides[side].schema.clone(),
                    batch.columns()[..data_cols].to_vec(),
                    batch.num_rows(),
                )?;
                let batch = ChangeBatch::new(data, weights)?;
                match matches {
                    // A snapshot: the rows as they were stored.
                    Some(m) => {
                        let (keys, valid) = self.keys(side, &batch)?;
                        self.store(side, &batch, &keys, valid.as_ref(), m.values())?;
                    }
                    // A change: a join with match counts probes again; one without needs
                    // no probe to store it.
                    None if self.sides.iter().any(|s| s.tracked) => {
                        self.process(side, batch, &mut Vec::new())?;
                    }
                    None => {
                        let (keys, valid) = self.keys(side, &batch)?;
                        let matches = vec![0; batch.num_rows()];
                        self.store(side, &batch, &keys, valid.as_ref(), &matches)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Advances the watermark to `w` and frees the rows it has expired; `false` if the
    /// watermark was already there.
    fn expire(&mut self, w: i64) -> Result<bool> {
        if self.watermark.is_some_and(|old| old >= w) {
            return Ok(false);
        }
        self.watermark = Some(w);
        for side in &mut self.sides {
            side.store.expire(w)?;
        }
        Ok(true)
    }

    /// This += ΔThis: stores a batch's rows on `side`, each with its match count. Rows that
    /// cannot match, and rows that already expired, are not stored (nothing could probe
    /// them). Returns which rows were stored, unless all were.
    fn store(
        &mut self,
        side: usize,
        batch: &ChangeBatch,
        keys: &Rows,
        valid: Option<&BooleanArray>,
        matches: &[i64],
    ) -> Result<Option<BooleanArray>> {
        let n = batch.num_rows();
        let expiry = self.expiry_times(side, batch.columns(), n)?;
        let watermark = self.watermark;
        let stored = |i: usize| {
            let expired = matches!((expiry[i], watermark), (Some(t), Some(w)) if t <= w);
            !expired && valid.is_none_or(|v| v.value(i))
        };
        if let SideRows::Batches(b) = &mut self.sides[side].store {
            // The side carries no match counts (`matches` is only meaningful where
            // tracked). The key rows are kept with the batch; a copy is cheap beside the batch.
            let keys = keys.clone();
            b.add(batch.columns(), batch.weights(), keys, stored, &expiry)?;
            return Ok(
                ((0..n).any(|i| !stored(i))).then(|| (0..n).map(|i| Some(stored(i))).collect())
            );
        }
        let rows = self.sides[side].rows.convert_columns(batch.columns())?;
        let weights = batch.weights();
        let s = &mut self.sides[side];
        let mut skipped: Option<Vec<bool>> = None;
        for i in 0..n {
            let expires = expiry[i];
            let expired = matches!((expires, watermark), (Some(t), Some(w)) if t <= w);
            if expired || valid.is_some_and(|v| !v.value(i)) {
                skipped.get_or_insert_with(|| vec![false; n])[i] = true;
                continue;
            }
            s.store.add(
                keys.row(i).as_ref(),
                rows.row(i).as_ref(),
                weights.value(i),
                matches[i],
                expires,
            )?;
        }
        Ok(skipped.map(|skipped| skipped.into_iter().map(|s| Some(!s)).collect()))
    }
}

impl Operator for HashJoin {
    fn process(
        &mut self,
        input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        if input > 1 {
            return Err(KappaError::internal("a join has two inputs"));
        }
        let other = 1 - input;
        let n = batch.num_rows();
        let (keys, valid) = self.keys(input, &batch)?;
        let can_match = |i: usize| valid.as_ref().is_none_or(|v| v.value(i));
        let weights = batch.weights().clone();

        // Probe the other side's state.
        let mut cands: Vec<Candidate> = Vec::new();
        for i in (0..n).filter(|&i| can_match(i)) {
            self.sides[other]
                .store
                .probe(keys.row(i).as_ref(), |other, count| {
                    cands.push(Candidate {
                        row: i as u32,
                        other,
                        count,
                    })
                })?;
        }

        // The candidate pairs as rows, and which of them match (satisfy the residual).
        let mut mask: Option<BooleanArray> = None;
        if !cands.is_empty() && (self.residual.is_some() || self.kind.emits_pairs()) {
            let idx = UInt32Array::from_iter_values(cands.iter().map(|c| c.row));
            let this_cols = take_arrays(batch.columns(), &idx, None)?;
            let other_cols = self.found_rows(other, cands.iter().map(|c| &c.other))?;
            let columns = self.pair_columns(input, this_cols, Some(other_cols), cands.len());
            let pairs = crate::batch_with_rows(self.pair_schema.clone(), columns, cands.len())?;
            if let Some(residual) = &self.residual {
                let m = residual.evaluate(&pairs)?.into_array(cands.len())?;
                let m = m
                    .as_any()
                    .downcast_ref::<BooleanArray>()
                    .ok_or_else(|| KappaError::internal("join condition is not boolean"))?;
                // NULL is not true (the kernel requires a null buffer).
                mask = Some(if m.null_count() > 0 {
                    prep_null_mask_filter(m)
                } else {
                    m.clone()
                });
            }
            if self.kind.emits_pairs() {
                let w = cands
                    .iter()
                    .map(|c| weights.value(c.row as usize).checked_mul(c.count))
                    .collect::<Option<Vec<i64>>>()
                    .ok_or_else(|| KappaError::internal("join weight overflow"))?;
                let data = crate::batch_with_rows(
                    self.schema.clone(),
                    pairs.columns().to_vec(),
                    cands.len(),
                )?;
                let mut joined = ChangeBatch::new(data, Int64Array::from(w))?;
                if let Some(m) = &mask {
                    joined = joined.filter(m)?;
                }
                if !joined.is_empty() {
                    out.push(joined);
                }
            }
        }
        let matched = |j: usize| mask.as_ref().is_none_or(|m| m.value(j));

        // Match counts: this batch's rows', and those of the other side's rows it matches.
        let mut matches = vec![0i64; n];
        let mut flipped: Vec<Bytes> = Vec::new();
        let mut flipped_w: Vec<i64> = Vec::new();
        for (_, c) in cands.iter().enumerate().filter(|(j, _)| matched(*j)) {
            let row = c.row as usize;
            matches[row] += c.count;
            if !self.sides[other].tracked {
                continue;
            }
            let Found::Row(stored) = &c.other else {
                return Err(KappaError::internal(
                    "a tracked join side stored as batches",
                ));
            };
            let before = self.sides[other].store.add_matches(
                keys.row(row).as_ref(),
                stored,
                weights.value(row),
            )?;
            let new = before.matches + weights.value(row);
            let change = self.alone(other, new) - self.alone(other, before.matches);
            if change != 0 {
                flipped.push(stored.clone());
                flipped_w.push(change * before.count);
            }
        }
        if !flipped.is_empty() {
            let cols = self.decode_rows(other, &flipped)?;
            self.emit_side_rows(other, cols, flipped_w, out)?;
        }

        // This batch's rows alone (unmatched rows of a preserved side, semi/anti rows).
        if self.sides[input].tracked {
            let (idx, w): (Vec<u32>, Vec<i64>) = (0..n)
                .filter(|&i| self.alone(input, matches[i]) != 0)
                .map(|i| (i as u32, weights.value(i)))
                .unzip();
            if !idx.is_empty() {
                let idx = UInt32Array::from(idx);
                let cols = take_arrays(batch.columns(), &idx, None)?;
                self.emit_side_rows(input, cols, w, out)?;
            }
        }

        let stored = self.store(input, &batch, &keys, valid.as_ref(), &matches)?;
        // Rows not stored are left out of the log, unless the other side counts matches:
        // a row that came after its expiry still matched (and counted on) rows there,
        // which replaying it must count again.
        let other_tracked = self.sides[other].tracked;
        if self.logging()
            && let Some(Durable { log, .. }) = &mut self.durable
        {
            let batch = match stored {
                Some(mask) if !other_tracked => batch.filter(&mask)?,
                _ => batch,
            };
            let (data, weights) = batch.into_parts();
            let mut cols = data.columns().to_vec();
            cols.push(Arc::new(weights));
            log.push(input as u8, cols, data.num_rows())?;
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        watermark: Option<i64>,
        _out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let Some(w) = watermark else {
            return Ok(());
        };
        if self.expire(w)?
            && self.logging()
            && let Some(Durable { log, .. }) = &mut self.durable
        {
            log.mark(encode_watermark(Some(w)));
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamHashJoin"
    }

    fn state_entries(&self) -> usize {
        self.sides.iter().map(|s| s.store.len()).sum()
    }

    fn checkpointable(&self) -> bool {
        self.durable.is_some()
    }

    /// Sides in memory: writes the log of the inputs since the last checkpoint, or a
    /// snapshot when the log is mostly rows no longer stored (or holds none of the rows).
    /// Spilled sides: their tables are the checkpoint.
    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        let spilled = self.sides[0].store.is_spilled();
        if !spilled && let Some(mut d) = self.durable.take() {
            let written = if d.snapshot_due || d.log.due_for_compaction(self.state_entries()) {
                self.write_snapshot(&mut d.log, d.log_table.as_mut())
            } else {
                d.log.flush(d.log_table.as_mut())
            };
            d.snapshot_due &= written.is_err();
            self.durable = Some(d);
            written?;
        }
        Ok(encode_progress(self.watermark, spilled))
    }

    fn state_tables(&mut self) -> Vec<&mut dyn kappa_state::StateTable> {
        let Some(d) = &mut self.durable else {
            return vec![];
        };
        let mut tables: Vec<&mut dyn kappa_state::StateTable> = vec![d.log_table.as_mut()];
        let sides: Vec<&mut SideTables> = match &mut d.unused {
            Some(sides) => sides.iter_mut().collect(),
            None => self
                .sides
                .iter_mut()
                .filter_map(|s| s.store.tables_mut())
                .collect(),
        };
        for t in sides {
            tables.push(t.rows.as_mut());
            tables.push(t.expiring.as_mut());
        }
        tables
    }

    /// Takes up the state where the checkpoint left it: in the log (replayed) or in the
    /// sides' tables. A restart may switch between spilling and not: the state then moves
    /// from one to the other, and the old form is deleted at the next checkpoint.
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        let (watermark, was_spilled) = decode_progress(saved)?;
        let Some(mut d) = self.durable.take() else {
            return Err(KappaError::internal("restoring a join without checkpoints"));
        };
        let restored = self.restore_from(&mut d, watermark, was_spilled);
        self.durable = Some(d);
        restored
    }
}

impl HashJoin {
    fn restore_from(
        &mut self,
        d: &mut Durable,
        watermark: Option<i64>,
        was_spilled: bool,
    ) -> Result<()> {
        for side in &mut self.sides {
            side.store.clear_memory();
        }
        if was_spilled {
            if let Some(tables) = &mut d.unused {
                for (i, t) in tables.iter_mut().enumerate() {
                    if !matches!(self.sides[i].store, SideRows::Batches(_)) {
                        t.drain_into(&mut self.sides[i].store)?;
                        continue;
                    }
                    // Through the row form into batches, as a snapshot is restored.
                    let mut rows = SideRows::Memory(MemRows::default());
                    t.drain_into(&mut rows)?;
                    let schema = self.sides[i].schema.clone();
                    let conv = kappa_state::row_converter(&schema)?;
                    memory_chunks(&rows, &conv, |mut cols, n| {
                        cols.pop();
                        let counts = cols.pop().ok_or_else(|| damaged("a join"))?;
                        let counts = counts.as_primitive::<Int64Type>().clone();
                        let data = crate::batch_with_rows(schema.clone(), cols, n)?;
                        let batch = ChangeBatch::new(data, counts)?;
                        let (keys, valid) = self.keys(i, &batch)?;
                        self.store(i, &batch, &keys, valid.as_ref(), &vec![0; n])?;
                        Ok(())
                    })?;
                }
                d.snapshot_due = true;
            }
            self.watermark = watermark;
            return Ok(());
        }
        self.watermark = None;
        d.log
            .restore(d.log_table.as_ref(), |entry| self.replay(entry))?;
        if self.watermark != watermark {
            return Err(kappa_state::codec::damaged("a join"));
        }
        if self.sides[0].store.is_spilled() {
            d.log.clear(d.log_table.as_mut());
        }
        Ok(())
    }
}

/// Whether a row's expiry time on `side` is a function of its join key: every expiry
/// column is itself a key column, compared without a cast (a cast could map different
/// times to one key).
fn expires_by_key(side: &JoinSide, key_types: &[DataType]) -> bool {
    !side.expiry.is_empty()
        && side.expiry.iter().all(|e| {
            side.keys.iter().zip(key_types).any(|(k, t)| {
                let any: &dyn std::any::Any = k.as_ref();
                any.downcast_ref::<datafusion::physical_expr::expressions::Column>()
                    .is_some_and(|c| {
                        c.index() == e.col && side.schema.field(e.col).data_type() == t
                    })
            })
        })
}

/// Calls `write` with the stored rows of a side in the row form, decoded in chunks: the
/// side's columns followed by each row's count and match count.
fn memory_chunks(
    rows: &SideRows,
    conv: &RowConverter,
    mut write: impl FnMut(Vec<ArrayRef>, usize) -> Result<()>,
) -> Result<()> {
    let mut entries = rows.mem_entries()?.peekable();
    while entries.peek().is_some() {
        let chunk: Vec<(&Bytes, &crate::join_state::Entry)> = entries
            .by_ref()
            .take(crate::change_log::CHUNK_ROWS)
            .collect();
        let mut cols = kappa_state::decode_rows(conv, chunk.iter().map(|(r, _)| &r[..]))?;
        cols.push(Arc::new(Int64Array::from_iter_values(
            chunk.iter().map(|(_, e)| e.count),
        )));
        cols.push(Arc::new(Int64Array::from_iter_values(
            chunk.iter().map(|(_, e)| e.matches),
        )));
        write(cols, chunk.len())?;
    }
    Ok(())
}

/// The join's small state, as its checkpoint keeps it: the watermark, and whether the
/// sides were spilled (their rows are in their tables, not in the log).
fn encode_progress(w: Option<i64>, spilled: bool) -> Vec<u8> {
    kappa_state::codec::Encoder::new()
        .opt_i64(w)
        .bool(spilled)
        .finish()
}

fn decode_progress(bytes: &[u8]) -> Result<(Option<i64>, bool)> {
    let mut d = kappa_state::codec::Decoder::new(bytes, "a join");
    let w = d.opt_i64()?;
    // Checkpoints from before spilling joins existed end here.
    let spilled = !d.is_empty() && d.bool()?;
    d.end()?;
    Ok((w, spilled))
}

/// The join's watermark as its checkpoint and its log's marks keep it.
fn encode_watermark(w: Option<i64>) -> Vec<u8> {
    kappa_state::codec::Encoder::new().opt_i64(w).finish()
}

fn decode_watermark(bytes: &[u8]) -> Result<Option<i64>> {
    let mut d = kappa_state::codec::Decoder::new(bytes, "a join");
    let w = d.opt_i64()?;
    d.end()?;
    Ok(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{TestEpoch, assert_changes, changes, schema};
    use datafusion::arrow::array::RecordBatch;
    use datafusion::logical_expr::Operator as Op;
    use datafusion::physical_expr::expressions::{BinaryExpr, Column};

    fn col(name: &str, i: usize) -> Arc<dyn PhysicalExpr> {
        Arc::new(Column::new(name, i))
    }

    const L: &str = "k:i64, a:utf8";
    const R: &str = "k2:i64, b:utf8";

    fn side(spec: &str, key: usize, expiry: Vec<WatermarkCol>) -> JoinSide {
        let s = schema(spec);
        JoinSide {
            keys: vec![col(s.field(key).name(), key)],
            schema: s,
            expiry,
            append_only: false,
        }
    }

    fn equi_join() -> HashJoin {
        kind_join(JoinKind::Inner, "k:i64, a:utf8, k2:i64, b:utf8")
    }

    fn kind_join(kind: JoinKind, out: &str) -> HashJoin {
        HashJoin::new(
            kind,
            side(L, 0, vec![]),
            side(R, 0, vec![]),
            vec![DataType::Int64],
            None,
            false,
            schema(out),
        )
        .unwrap()
    }

    #[test]
    fn left_join_turns_matches_into_null_extended_rows_and_back() {
        let mut j = kind_join(JoinKind::Left, "k:i64, a:utf8, k2:i64, b:utf8");
        let mut out = vec![];
        j.process(0, changes(L, "+ 1 | x\n+ NULL | n"), &mut out)
            .unwrap();
        assert_changes(&out, "+ 1 | x | NULL | NULL\n+ NULL | n | NULL | NULL");
        out.clear();
        // The first match retracts the NULL-extended row; a second match adds a pair only.
        j.process(1, changes(R, "+ 1 | p\n+ 1 | q"), &mut out)
            .unwrap();
        assert_changes(
            &out,
            "- 1 | x | NULL | NULL\n+ 1 | x | 1 | p\n+ 1 | x | 1 | q",
        );
        out.clear();
        // Deleting both matches brings it back; deleting the NULL-key row retracts it alone.
        j.process(1, changes(R, "- 1 | p\n- 1 | q"), &mut out)
            .unwrap();
        j.process(0, changes(L, "- NULL | n"), &mut out).unwrap();
        assert_changes(
            &out,
            "- 1 | x | 1 | p\n- 1 | x | 1 | q\n+ 1 | x | NULL | NULL\n- NULL | n | NULL | NULL",
        );
        out.clear();
        // A left row with two copies arriving while the right has a match: pairs only.
        j.process(1, changes(R, "+ 1 | r"), &mut out).unwrap();
        j.process(0, changes(L, "+2 1 | y"), &mut out).unwrap();
        assert_changes(
            &out,
            "- 1 | x | NULL | NULL\n+ 1 | x | 1 | r\n+2 1 | y | 1 | r",
        );
    }

    #[test]
    fn full_join_preserves_both_sides() {
        let mut j = kind_join(JoinKind::Full, "k:i64, a:utf8, k2:i64, b:utf8");
        let mut out = vec![];
        j.process(0, changes(L, "+ 1 | x"), &mut out).unwrap();
        j.process(1, changes(R, "+ 2 | p\n+ 1 | q"), &mut out)
            .unwrap();
        assert_changes(&out, "+ NULL | NULL | 2 | p\n+ 1 | x | 1 | q");
        out.clear();
        j.process(0, changes(L, "- 1 | x\n+ 2 | y"), &mut out)
            .unwrap();
        assert_changes(
            &out,
            "- 1 | x | 1 | q\n+ NULL | NULL | 1 | q\n- NULL | NULL | 2 | p\n+ 2 | y | 2 | p",
        );
    }

    #[test]
    fn semi_and_anti_joins_follow_the_first_and_last_match() {
        let mut semi = kind_join(JoinKind::LeftSemi, L);
        let mut anti = kind_join(JoinKind::LeftAnti, L);
        for (j, first, second) in [
            (&mut semi, "", "+ 1 | x"),
            (&mut anti, "+ 1 | x\n+ NULL | n", "- 1 | x"),
        ] {
            let mut out = vec![];
            j.process(0, changes(L, "+ 1 | x\n+ NULL | n"), &mut out)
                .unwrap();
            assert_changes(&out, first);
            out.clear();
            j.process(1, changes(R, "+ 1 | p\n+2 1 | q"), &mut out)
                .unwrap();
            assert_changes(&out, second);
            out.clear();
            // Only the last match's retraction changes the output back.
            j.process(1, changes(R, "- 1 | p\n-2 1 | q"), &mut out)
                .unwrap();
            let back = if second.starts_with('+') {
                "- 1 | x"
            } else {
                "+ 1 | x"
            };
            assert_changes(&out, back);
        }
    }

    #[test]
    fn joins_deltas_against_the_other_side_and_retracts() {
        let mut j = equi_join();
        let mut out = vec![];
        j.process(
            0,
            changes(L, "+ 1 | x\n+2 1 | y\n+ 2 | z\n+ NULL | n"),
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
        j.process(1, changes(R, "+ 1 | p\n+ 3 | q\n+ NULL | n"), &mut out)
            .unwrap();
        assert_changes(&out, "+ 1 | x | 1 | p\n+2 1 | y | 1 | p");
        out.clear();
        // Deleting a right row retracts every match; a new left row joins the rest.
        j.process(0, changes(L, "+ 3 | w\n- 1 | y"), &mut out)
            .unwrap();
        j.process(1, changes(R, "- 1 | p"), &mut out).unwrap();
        assert_changes(
            &out,
            "+ 3 | w | 3 | q\n- 1 | y | 1 | p\n- 1 | x | 1 | p\n- 1 | y | 1 | p",
        );
        // Left: x, y, z, w, (null); right: q, (null).
        assert_eq!(j.state_entries(), 4 + 1);
    }

    #[test]
    fn cross_join_has_one_key_for_all_rows() {
        let s = |spec: &str| {
            let schema = schema(spec);
            JoinSide {
                keys: vec![],
                schema,
                expiry: vec![],
                append_only: false,
            }
        };
        let mut j = HashJoin::new(
            JoinKind::Inner,
            s(L),
            s(R),
            vec![],
            None,
            false,
            schema("k:i64, a:utf8, k2:i64, b:utf8"),
        )
        .unwrap();
        let mut out = vec![];
        j.process(0, changes(L, "+ 1 | x\n+ 2 | y"), &mut out)
            .unwrap();
        j.process(1, changes(R, "+ 3 | p"), &mut out).unwrap();
        assert_changes(&out, "+ 1 | x | 3 | p\n+ 2 | y | 3 | p");
    }

    #[test]
    fn residual_condition_filters_matches() {
        let s = schema("k:i64, a:i64, k2:i64, b:i64");
        let residual: Arc<dyn PhysicalExpr> =
            Arc::new(BinaryExpr::new(col("a", 1), Op::GtEq, col("b", 3)));
        let mut j = HashJoin::new(
            JoinKind::Inner,
            side("k:i64, a:i64", 0, vec![]),
            side("k2:i64, b:i64", 0, vec![]),
            vec![DataType::Int64],
            Some(residual),
            false,
            s,
        )
        .unwrap();
        let mut out = vec![];
        j.process(0, changes("k:i64, a:i64", "+ 1 | 5\n+ 1 | 10"), &mut out)
            .unwrap();
        // A NULL condition (10 >= NULL) is not a match.
        j.process(
            1,
            changes("k2:i64, b:i64", "+ 1 | 7\n+ 2 | 1\n+ 1 | NULL"),
            &mut out,
        )
        .unwrap();
        assert_changes(&out, "+ 1 | 10 | 1 | 7");
    }

    /// `b.t BETWEEN a.t AND a.t + 10 s` on k: an `a` row expires when a.t + 10 s < W
    /// (offset 10 s + 1 µs), a `b` row when b.t < W (offset 1 µs).
    fn interval_join() -> HashJoin {
        interval_join_of(JoinKind::Inner)
    }

    fn interval_join_of(kind: JoinKind) -> HashJoin {
        interval_join_over(kind, false)
    }

    /// The interval join, over inputs that never retract when `append_only`.
    fn interval_join_over(kind: JoinKind, append_only: bool) -> HashJoin {
        let sec = 1_000_000;
        let ls = "k:i64, t:ts";
        let rs = "k2:i64, t2:ts";
        let residual: Arc<dyn PhysicalExpr> = Arc::new(BinaryExpr::new(
            Arc::new(BinaryExpr::new(col("t2", 3), Op::GtEq, col("t", 1))),
            Op::And,
            Arc::new(BinaryExpr::new(
                col("t2", 3),
                Op::LtEq,
                Arc::new(BinaryExpr::new(
                    col("t", 1),
                    Op::Plus,
                    Arc::new(datafusion::physical_expr::expressions::Literal::new(
                        datafusion::scalar::ScalarValue::new_interval_mdn(0, 0, 10_000_000_000),
                    )),
                )),
            )),
        ));
        let side = |spec, expiry| JoinSide {
            append_only,
            ..side(spec, 0, expiry)
        };
        HashJoin::new(
            kind,
            side(
                ls,
                vec![WatermarkCol {
                    col: 1,
                    offset: 10 * sec + 1,
                }],
            ),
            side(rs, vec![WatermarkCol { col: 1, offset: 1 }]),
            vec![DataType::Int64],
            Some(residual),
            false,
            schema("k:i64, t:ts, k2:i64, t2:ts"),
        )
        .unwrap()
    }

    #[test]
    fn interval_join_frees_rows_that_can_no_longer_match() {
        // b.t BETWEEN a.t AND a.t + 10 s: an `a` row expires when a.t + 10 s < W
        // (offset 10 s + 1 µs), a `b` row when b.t < W (offset 1 µs).
        let sec = 1_000_000;
        let (ls, rs) = ("k:i64, t:ts", "k2:i64, t2:ts");
        let mut j = interval_join();
        let mut out = vec![];
        j.process(0, changes(ls, "+ 1 | 100\n+ 1 | 105"), &mut out)
            .unwrap();
        j.process(1, changes(rs, "+ 1 | 108\n+ 1 | 120"), &mut out)
            .unwrap();
        j.on_barrier(1, Some(110 * sec), &mut out).unwrap();
        let t = |s: u32| format!("1970-01-01T00:01:{s:02}");
        assert_changes(
            &out,
            &format!(
                "+ 1 | {} | 1 | {}\n+ 1 | {} | 1 | {}",
                t(40),
                t(48),
                t(45),
                t(48)
            ),
        );
        // At W = 110 s: b@108 expired (108 < 110); a rows expire after 110 s / 115 s.
        assert_eq!(j.state_entries(), 3);
        out.clear();
        j.on_barrier(2, Some(112 * sec), &mut out).unwrap();
        assert_eq!(j.state_entries(), 2, "a@100 expired at W > 110 s");
        j.process(1, changes(rs, "+ 1 | 113"), &mut out).unwrap();
        assert_changes(&out, &format!("+ 1 | {} | 1 | {}", t(45), t(53)));
        out.clear();
        j.on_barrier(3, Some(200 * sec), &mut out).unwrap();
        assert_eq!(j.state_entries(), 0);
        // A change for an already expired row is joined but not stored.
        j.process(0, changes(ls, "+ 1 | 150"), &mut out).unwrap();
        assert!(out.is_empty());
        assert_eq!(j.state_entries(), 0);
    }

    /// The tables of a checkpointed join: its log, then each side's rows and expiry index.
    const TABLES: usize = 5;

    fn checkpointed(
        j: HashJoin,
        tables: Vec<Box<dyn kappa_state::StateTable>>,
        spill: bool,
    ) -> HashJoin {
        let [log, rows0, exp0, rows1, exp1]: [_; TABLES] = tables.try_into().ok().unwrap();
        let side = |rows, expiring| SideTables { rows, expiring };
        j.with_checkpoints(log, [side(rows0, exp0), side(rows1, exp1)], spill)
    }

    /// A join restored from a checkpoint continues exactly as the one checkpointed, with
    /// its rows in memory or spilled, and across a restart that switches between the two.
    fn assert_restores_in_every_form(join: &dyn Fn() -> HashJoin, epochs: &[TestEpoch]) {
        for before in [false, true] {
            for after in [false, true] {
                let make = |spill: bool| {
                    move |tables: Vec<Box<dyn kappa_state::StateTable>>| -> Box<dyn Operator> {
                        Box::new(checkpointed(join(), tables, spill))
                    }
                };
                crate::testing::assert_restores_across(
                    make(before),
                    make(after),
                    TABLES,
                    epochs,
                    2,
                );
            }
        }
    }

    #[test]
    fn a_restored_join_continues_exactly() {
        let l = |t: &str| (0, changes(L, t));
        let r = |t: &str| (1, changes(R, t));
        let epochs = vec![
            (vec![l("+ 1 | a\n+ 2 | b\n+2 3 | c"), r("+ 1 | x")], None),
            (vec![r("+ 1 | y\n+ 3 | z"), l("- 3 | c")], None),
            // Restored: match counts decide the NULL-extended rows.
            (vec![r("- 1 | x\n- 1 | y"), l("+ 2 | d")], None),
            (vec![r("+ 2 | w\n- 3 | z"), l("- 1 | a")], None),
        ];
        for kind in [JoinKind::Left, JoinKind::Full, JoinKind::Inner] {
            assert_restores_in_every_form(
                &|| kind_join(kind, "k:i64, a:utf8, k2:i64, b:utf8"),
                &epochs,
            );
        }
    }

    #[test]
    fn a_restored_interval_join_expires_the_rows_it_had_stored() {
        let sec = 1_000_000;
        let l = |t: &str| (0, changes("k:i64, t:ts", t));
        let r = |t: &str| (1, changes("k2:i64, t2:ts", t));
        let epochs = vec![
            (
                vec![l("+ 1 | 100\n+ 1 | 105"), r("+ 1 | 108\n+ 1 | 120")],
                Some(110 * sec),
            ),
            (vec![l("+ 1 | 111")], Some(112 * sec)),
            // Restored: a@105 expires at W > 115 s, a@111 at W > 121 s.
            (vec![r("+ 1 | 113")], Some(116 * sec)),
            (vec![r("+ 1 | 116")], Some(130 * sec)),
            (vec![r("+ 1 | 131"), l("+ 1 | 125")], Some(131 * sec)),
        ];
        // With match counts (left, full) the log is replayed through the probe: a right
        // row that expired before the checkpoint still counts as a match.
        for kind in [JoinKind::Inner, JoinKind::Left, JoinKind::Full] {
            assert_restores_in_every_form(&|| interval_join_of(kind), &epochs);
        }
    }

    #[test]
    fn a_log_of_mostly_expired_rows_is_rewritten_as_the_live_rows() {
        let sec = 1_000_000;
        let n = crate::change_log::MIN_COMPACT as i64 + 5;
        let ls = schema("k:i64, t:ts");
        let many = |t: i64| {
            let data = RecordBatch::try_new(
                ls.clone(),
                vec![
                    Arc::new(Int64Array::from_iter_values(0..n)),
                    Arc::new(
                        datafusion::arrow::array::TimestampMicrosecondArray::from_iter_values(
                            (0..n).map(|_| t * sec),
                        ),
                    ),
                ],
            )
            .unwrap();
            ChangeBatch::inserts(data)
        };
        let mut disk = crate::testing::CheckpointDisk::default();
        let make = |disk: &crate::testing::CheckpointDisk| {
            checkpointed(interval_join_of(JoinKind::Left), disk.tables(TABLES), false)
        };
        let mut j = make(&disk);
        let mut out = vec![];
        // Many rows at 100 s and one at 200 s that a right row matches; then a watermark
        // that expires all but those two.
        j.process(0, many(100), &mut out).unwrap();
        j.process(0, changes("k:i64, t:ts", "+ 7 | 200"), &mut out)
            .unwrap();
        j.process(1, changes("k2:i64, t2:ts", "+ 7 | 205"), &mut out)
            .unwrap();
        j.on_barrier(1, Some(150 * sec), &mut out).unwrap();
        assert_eq!(j.state_entries(), 2);
        disk.checkpoint(&mut j);
        // The log starts over: the watermark and each side's live row, not the expired ones.
        assert_eq!(disk.tables(TABLES)[0].len(), 3);

        let mut restored = make(&disk);
        disk.restore(&mut restored);
        assert_eq!(restored.state_entries(), 2);
        // The left row's match count came back: losing its only match shows it alone.
        let retract = changes("k2:i64, t2:ts", "- 7 | 205");
        for op in [&mut restored, &mut j] {
            let mut out = vec![];
            op.process(1, retract.clone(), &mut out).unwrap();
            assert_changes(
                &out,
                "- 7 | 1970-01-01T00:03:20 | 7 | 1970-01-01T00:03:25\n\
                 + 7 | 1970-01-01T00:03:20 | NULL | NULL",
            );
        }
    }

    /// Insert-only epochs of the interval join: rows that match, rows that expire while
    /// others of their batch do not, a NULL key, a late row.
    fn append_only_epochs() -> Vec<TestEpoch> {
        let sec = 1_000_000;
        let l = |t: &str| (0, changes("k:i64, t:ts", t));
        let r = |t: &str| (1, changes("k2:i64, t2:ts", t));
        vec![
            (
                vec![
                    l("+ 1 | 100\n+ 2 | 130\n+ NULL | 100"),
                    r("+ 1 | 108\n+ 1 | 120\n+2 2 | 131"),
                ],
                Some(110 * sec),
            ),
            (
                vec![l("+ 1 | 111\n+2 1 | 105"), r("+ 1 | 109")],
                Some(112 * sec),
            ),
            (vec![r("+ 1 | 113\n+ 2 | 135")], Some(116 * sec)),
            (vec![r("+ 1 | 116"), l("+ 2 | 133")], Some(130 * sec)),
            (
                vec![r("+ 1 | 131\n+ 2 | 140"), l("+ 1 | 125")],
                Some(131 * sec),
            ),
            (vec![l("+ 2 | 139")], Some(200 * sec)),
        ]
    }

    /// Append-only sides kept as batches join, expire and count their state exactly as
    /// the row form does, epoch by epoch.
    #[test]
    fn append_only_sides_kept_as_batches_join_like_rows() {
        for kind in [JoinKind::Inner, JoinKind::Left, JoinKind::Right] {
            let mut batches = interval_join_over(kind, true);
            let mut rows = interval_join_over(kind, false);
            let stored: Vec<bool> = batches
                .sides
                .iter()
                .map(|s| matches!(s.store, SideRows::Batches(_)))
                .collect();
            // Only the sides without match counts are kept as batches.
            assert_eq!(stored, [kind != JoinKind::Left, kind != JoinKind::Right]);
            for (epoch, (inputs, w)) in append_only_epochs().into_iter().enumerate() {
                let (mut a, mut b) = (vec![], vec![]);
                for (input, batch) in inputs {
                    batches.process(input, batch.clone(), &mut a).unwrap();
                    rows.process(input, batch, &mut b).unwrap();
                }
                batches.on_barrier(epoch as u64, w, &mut a).unwrap();
                rows.on_barrier(epoch as u64, w, &mut b).unwrap();
                assert_eq!(
                    crate::testing::consolidate(&a),
                    crate::testing::consolidate(&b),
                    "{kind:?}, epoch {epoch}"
                );
                assert_eq!(batches.state_entries(), rows.state_entries());
            }
        }
    }

    #[test]
    fn append_only_sides_kept_as_batches_restore_in_every_form() {
        for kind in [JoinKind::Inner, JoinKind::Left] {
            assert_restores_in_every_form(
                &|| interval_join_over(kind, true),
                &append_only_epochs(),
            );
        }
    }

    /// A row that comes after its expiry is not stored, but it matches (and counts on) the
    /// rows of a preserved side: a restore counts it again (epoch 1's late right row 109
    /// matches the left rows at 105, which must not turn NULL-extended after a restore).
    #[test]
    fn a_late_row_counted_on_the_preserved_side_survives_a_restore() {
        for kind in [JoinKind::Left, JoinKind::Right, JoinKind::Full] {
            for append_only in [false, true] {
                assert_restores_in_every_form(
                    &|| interval_join_over(kind, append_only),
                    &append_only_epochs(),
                );
            }
        }
    }

    #[test]
    fn a_retraction_reaching_a_side_kept_as_batches_is_an_internal_error() {
        let mut j = interval_join_over(JoinKind::Inner, true);
        let err = j
            .process(0, changes("k:i64, t:ts", "- 1 | 100"), &mut vec![])
            .unwrap_err();
        assert!(err.to_string().contains("retraction"), "{err}");
    }
}

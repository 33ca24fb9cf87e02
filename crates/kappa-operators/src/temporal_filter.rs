//! Temporal filter: rows visible only for a span of processing time, such as
//! `WHERE ts > now() - INTERVAL '1' HOUR` (visible until `ts + 1 h`) or `WHERE ts <= now()`
//! (visible from `ts`).
//!
//! # Semantics
//! `now` is the processing time of the epoch (set by the runtime before the epoch's
//! batches, the same for every view of the epoch, never decreasing). A row is visible while
//! `from <= now < until`, where `from` is the largest of its `From` bounds (none: always)
//! and `until` the smallest of its `Until` bounds (none: forever); a bound that is NULL makes
//! the row invisible (the comparison is not true). The output at every epoch is exactly the
//! input rows visible at that epoch's `now`, with their weights: a change visible on arrival
//! passes at once; one not yet visible waits for `from` and is emitted then; a visible one
//! is retracted when `now` reaches `until`. A change whose span has already passed emits
//! nothing, so an insert and a later delete of the same row stay balanced.
//!
//! # State
//! Changes waiting for `from` and changes to retract at `until`, each ordered by that time;
//! both are freed as time passes. With checkpoints every such entry is also written through
//! to a `StateTable` under a unique id (`w` or `e` ‖ time ‖ id → row, weight, until), from
//! which a restart rebuilds both indexes. When the store spills (state larger than memory)
//! that table is the only copy: a barrier reads the entries now due as a scan of each kind
//! from its earliest time, and a restart reads nothing.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, BooleanArray, Int64Array};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, SchemaRef, TimeUnit, TimestampMicrosecondType};
use datafusion::arrow::row::RowConverter;
use datafusion::physical_expr::PhysicalExpr;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_plan::TemporalEdge;

use crate::Operator;

type Bytes = Arc<[u8]>;

/// A change waiting to become visible: row, weight, `until`, id.
type Waiting = (Bytes, i64, Option<i64>, u64);

/// When a row is visible: `from <= now < until` (`until` `None`: forever).
type Span = (i64, Option<i64>);

pub struct TemporalFilter {
    bounds: Vec<(Arc<dyn PhysicalExpr>, TemporalEdge, i64)>,
    rows: RowConverter,
    schema: SchemaRef,
    now: i64,
    /// `from` → changes not yet visible, with their `until` and id.
    waiting: BTreeMap<i64, Vec<Waiting>>,
    /// `until` → visible changes to retract then, with their id.
    expiring: BTreeMap<i64, Vec<(Bytes, i64, u64)>>,
    entries: usize,
    /// The id of the next entry.
    next_id: u64,
    /// With checkpoints: every entry, written through.
    checkpointed: Option<Box<dyn kappa_state::StateTable>>,
    /// The entries are only in the table (`waiting` and `expiring` stay empty).
    spilled: bool,
}

const WAITING: u8 = b'w';
const EXPIRING: u8 = b'e';

/// An entry's key in the checkpoint table: kind ‖ time (order-preserving) ‖ id.
fn entry_key(kind: u8, time: i64, id: u64) -> [u8; 17] {
    let mut k = [kind; 17];
    k[1..9].copy_from_slice(&kappa_state::codec::ordered_i64(time));
    k[9..].copy_from_slice(&id.to_be_bytes());
    k
}

/// An entry as the table holds it.
struct Entry {
    kind: u8,
    time: i64,
    id: u64,
    row: Bytes,
    weight: i64,
    until: Option<i64>,
}

fn decode_entry(k: &[u8], v: &[u8]) -> Result<Entry> {
    let damaged = || kappa_state::codec::damaged("a temporal filter");
    let (kind, time, id) = match k.split_first() {
        Some((&kind, rest)) if k.len() == 17 => {
            let (time, id) = kappa_state::codec::split_ordered_i64(rest).ok_or_else(damaged)?;
            let id = u64::from_be_bytes(id.try_into().map_err(|_| damaged())?);
            (kind, time, id)
        }
        _ => return Err(damaged()),
    };
    let mut d = kappa_state::codec::Decoder::new(v, "a temporal filter entry");
    let row: Bytes = Arc::from(d.bytes()?);
    let weight = d.i64()?;
    let until = d.opt_i64()?;
    d.end()?;
    Ok(Entry {
        kind,
        time,
        id,
        row,
        weight,
        until,
    })
}

impl TemporalFilter {
    /// `bounds`: (timestamp expression over the input, edge, offset in microseconds).
    pub fn new(
        bounds: Vec<(Arc<dyn PhysicalExpr>, TemporalEdge, i64)>,
        schema: SchemaRef,
    ) -> Result<Self> {
        Ok(Self {
            bounds,
            rows: kappa_state::row_converter(&schema)?,
            schema,
            now: i64::MIN,
            waiting: BTreeMap::new(),
            expiring: BTreeMap::new(),
            entries: 0,
            next_id: 0,
            checkpointed: None,
            spilled: false,
        })
    }

    /// Keeps the state in `table` at checkpoints; with `spill`, only there.
    pub fn with_checkpoints(
        mut self,
        table: Box<dyn kappa_state::StateTable>,
        spill: bool,
    ) -> Self {
        self.checkpointed = Some(table);
        self.spilled = spill;
        self
    }

    /// The spilled entries of `kind` due at `now` (time `<= now`), in order, removed from
    /// the table.
    fn take_due(&mut self, kind: u8) -> Result<Vec<Entry>> {
        let Some(table) = &mut self.checkpointed else {
            return Ok(Vec::new());
        };
        let mut due = Vec::new();
        let mut keys = Vec::new();
        for (k, v) in table.scan_prefix(&[kind]) {
            let e = decode_entry(&k, &v)?;
            if e.time > self.now {
                break;
            }
            keys.push(k);
            due.push(e);
        }
        for k in keys {
            table.delete(&k);
        }
        self.entries -= due.len();
        Ok(due)
    }

    /// Stores an entry (and writes it through); returns its id.
    fn store(&mut self, kind: u8, time: i64, row: &Bytes, w: i64, until: Option<i64>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries += 1;
        if let Some(t) = &mut self.checkpointed {
            let v = kappa_state::codec::Encoder::new()
                .bytes(row)
                .i64(w)
                .opt_i64(until)
                .finish();
            t.put(
                Arc::from(entry_key(kind, time, id).as_slice()),
                Arc::from(v),
            );
        }
        id
    }

    /// Forgets an entry.
    fn forget(&mut self, kind: u8, time: i64, id: u64) {
        self.entries -= 1;
        if let Some(t) = &mut self.checkpointed {
            t.delete(&entry_key(kind, time, id));
        }
    }

    /// Per row, its visibility span `[from, until)`, or `None` if it is never visible.
    fn spans(&self, batch: &ChangeBatch) -> Result<Vec<Option<Span>>> {
        let n = batch.num_rows();
        let mut spans = vec![Some((i64::MIN, None)); n];
        for (expr, edge, offset) in &self.bounds {
            let v = expr.evaluate(batch.data())?.into_array(n)?;
            let v = cast(&v, &DataType::Timestamp(TimeUnit::Microsecond, None))?;
            let v = v.as_primitive::<TimestampMicrosecondType>();
            for (i, span) in spans.iter_mut().enumerate() {
                let Some((from, until)) = span else { continue };
                if v.is_null(i) {
                    *span = None;
                    continue;
                }
                let t = v.value(i).saturating_add(*offset);
                match edge {
                    TemporalEdge::From => *from = (*from).max(t),
                    TemporalEdge::Until => *until = Some(until.map_or(t, |u: i64| u.min(t))),
                }
            }
        }
        Ok(spans)
    }

    fn emit(&self, rows: Vec<(Bytes, i64)>, out: &mut Vec<ChangeBatch>) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let columns = kappa_state::decode_rows(&self.rows, rows.iter().map(|(r, _)| &r[..]))?;
        let data = crate::batch_with_rows(self.schema.clone(), columns, rows.len())?;
        let weights = Int64Array::from_iter_values(rows.iter().map(|(_, w)| *w));
        out.push(ChangeBatch::new(data, weights)?);
        Ok(())
    }

    fn expire_at(&mut self, until: i64, row: Bytes, w: i64) {
        let id = self.store(EXPIRING, until, &row, w, None);
        if !self.spilled {
            self.expiring.entry(until).or_default().push((row, w, id));
        }
    }
}

impl Operator for TemporalFilter {
    fn advance_time(&mut self, now: i64) {
        self.now = self.now.max(now);
    }

    fn process(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let spans = self.spans(&batch)?;
        let needs_row = spans
            .iter()
            .any(|s| matches!(s, Some((f, u)) if *f > self.now || u.is_some()));
        let rows = if needs_row {
            Some(self.rows.convert_columns(batch.columns())?)
        } else {
            None
        };
        let row = |i: usize| -> Result<Bytes> {
            rows.as_ref()
                .map(|r| Bytes::from(r.row(i).data()))
                .ok_or_else(|| KappaError::internal("temporal filter row not converted"))
        };
        let weights = batch.weights();
        let mut visible = Vec::with_capacity(spans.len());
        for (i, span) in spans.iter().enumerate() {
            let show = match *span {
                Some((_, Some(until))) if until <= self.now => false,
                Some((from, until)) if from > self.now => {
                    if until.is_none_or(|u| u > from) {
                        let (r, w) = (row(i)?, weights.value(i));
                        let id = self.store(WAITING, from, &r, w, until);
                        if !self.spilled {
                            self.waiting
                                .entry(from)
                                .or_default()
                                .push((r, w, until, id));
                        }
                    }
                    false
                }
                Some((_, until)) => {
                    if let Some(u) = until {
                        self.expire_at(u, row(i)?, weights.value(i));
                    }
                    true
                }
                None => false,
            };
            visible.push(show);
        }
        let shown = batch.filter(&BooleanArray::from(visible))?;
        if !shown.is_empty() {
            out.push(shown);
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        _watermark: Option<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let mut changes = vec![];
        if self.spilled {
            for e in self.take_due(WAITING)? {
                if e.until.is_none_or(|u| u > self.now) {
                    if let Some(u) = e.until {
                        self.expire_at(u, e.row.clone(), e.weight);
                    }
                    changes.push((e.row, e.weight));
                }
            }
            for e in self.take_due(EXPIRING)? {
                changes.push((e.row, -e.weight));
            }
            return self.emit(changes, out);
        }
        for (from, rows) in crate::take_closed(&mut self.waiting, self.now) {
            for (row, w, until, id) in rows {
                self.forget(WAITING, from, id);
                if until.is_none_or(|u| u > self.now) {
                    if let Some(u) = until {
                        self.expire_at(u, row.clone(), w);
                    }
                    changes.push((row, w));
                }
            }
        }
        for (until, rows) in crate::take_closed(&mut self.expiring, self.now) {
            for (row, w, id) in rows {
                self.forget(EXPIRING, until, id);
                changes.push((row, -w));
            }
        }
        self.emit(changes, out)
    }

    fn name(&self) -> &'static str {
        "StreamTemporalFilter"
    }

    fn checkpointable(&self) -> bool {
        self.checkpointed.is_some()
    }

    fn checkpoint(&mut self) -> Result<Vec<u8>> {
        Ok(kappa_state::codec::Encoder::new()
            .i64(self.now)
            .u64(self.next_id)
            .finish())
    }

    fn state_tables(&mut self) -> Vec<&mut dyn kappa_state::StateTable> {
        match &mut self.checkpointed {
            Some(t) => vec![&mut **t],
            None => Vec::new(),
        }
    }

    /// Rebuilds both indexes from the written-through entries.
    fn restore(&mut self, saved: &[u8]) -> Result<()> {
        let mut d = kappa_state::codec::Decoder::new(saved, "a temporal filter");
        self.now = d.i64()?;
        self.next_id = d.u64()?;
        d.end()?;
        let Some(table) = &self.checkpointed else {
            return Ok(());
        };
        self.waiting.clear();
        self.expiring.clear();
        self.entries = table.len();
        if self.spilled {
            return Ok(());
        }
        for (k, v) in table.scan_prefix(&[]) {
            let e = decode_entry(&k, &v)?;
            match e.kind {
                WAITING => self
                    .waiting
                    .entry(e.time)
                    .or_default()
                    .push((e.row, e.weight, e.until, e.id)),
                _ => self
                    .expiring
                    .entry(e.time)
                    .or_default()
                    .push((e.row, e.weight, e.id)),
            }
        }
        Ok(())
    }

    fn state_entries(&self) -> usize {
        self.entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{assert_changes, changes, schema};
    use datafusion::physical_expr::expressions::col;

    const S: i64 = 1_000_000;

    /// Rows `k | t` visible while `t - 10 s <= now < t + 60 s`
    /// (`t <= now() + 10 s AND t > now() - 60 s`).
    fn op() -> TemporalFilter {
        let s = schema("k:utf8, t:ts");
        let t = col("t", &s).unwrap();
        TemporalFilter::new(
            vec![
                (t.clone(), TemporalEdge::From, -10 * S),
                (t, TemporalEdge::Until, 60 * S),
            ],
            s,
        )
        .unwrap()
    }

    fn epoch(op: &mut TemporalFilter, now: i64, lines: &str) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.advance_time(now * S);
        if !lines.is_empty() {
            op.process(0, changes("k:utf8, t:ts", lines), &mut out)
                .unwrap();
        }
        op.on_barrier(0, None, &mut out).unwrap();
        out
    }

    #[test]
    fn rows_appear_and_expire_as_time_passes() {
        let spilled = op().with_checkpoints(Box::new(kappa_state::MemStateTable::default()), true);
        for op in [op(), spilled] {
            rows_appear_and_expire(op);
        }
    }

    fn rows_appear_and_expire(mut op: TemporalFilter) {
        // now 100: a (t 100) visible until 160; b (t 150) from 140; c (t 30) expired at 90;
        // d has no time: never visible.
        let out = epoch(&mut op, 100, "+ a | 100\n+ b | 150\n+ c | 30\n+ d | NULL");
        assert_changes(&out, "+ a | 1970-01-01T00:01:40");
        assert_eq!(op.state_entries(), 2);
        // now 140: b becomes visible; a deleted meanwhile leaves at once.
        let out = epoch(&mut op, 140, "- a | 100");
        assert_changes(&out, "- a | 1970-01-01T00:01:40\n+ b | 1970-01-01T00:02:30");
        // now 160: a's expiry retracts nothing net (its delete already did).
        assert!(crate::testing::consolidate(&epoch(&mut op, 160, "")).is_empty());
        // now 210: b expires (150 + 60).
        let out = epoch(&mut op, 210, "");
        assert_changes(&out, "- b | 1970-01-01T00:02:30");
        assert_eq!(op.state_entries(), 0);
        // The clock never goes back.
        let out = epoch(&mut op, 0, "+ e | 100");
        assert!(out.is_empty());
    }

    #[test]
    fn a_restored_temporal_filter_shows_and_expires_rows_on_time() {
        let c = |l: &str| (0, changes("k:utf8, t:ts", l));
        let epochs = vec![
            (vec![c("+ a | 100\n+ b | 150\n+2 e | 200")], Some(100 * S)),
            (vec![c("+ f | 120")], Some(120 * S)),
            // Restored: b appears at 140, a expires at 160, f at 180, e appears at 190.
            (vec![c("- a | 100")], Some(140 * S)),
            (vec![], Some(170 * S)),
            (vec![c("- e | 200")], Some(195 * S)),
            (vec![], Some(300 * S)),
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

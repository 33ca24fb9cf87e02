//! Window functions (`OVER`) on a changelog.
//!
//! # Semantics
//! Per partition (the values of the PARTITION BY expressions; NULL is a value of its own),
//! the input's rows — a multiset — are ordered by the ORDER BY keys (direction and NULLS
//! placement as written) and then by the row itself, so ties are always broken the same
//! way: a batch engine orders peers arbitrarily, and ours is one of its orders. A row with
//! multiplicity `c` takes `c` consecutive positions. The output is every input row with one
//! value appended per function, computed over its partition exactly as DataFusion computes
//! it in batch (the functions are DataFusion's own window expressions: `row_number`,
//! `rank`, `lag`, `lead`, `first_value`, `sum`/`avg`/`count`/`min`/`max` with ROWS, RANGE
//! and GROUPS frames, …), so the view always equals the batch query over the input.
//!
//! # Incremental rule
//! Changes are collected over the epoch. At the barrier each touched partition is read
//! before and after applying them and the functions are evaluated over both. Positions
//! before the first changed entry hold the same rows in both, and so do the positions
//! after the last changed entry (counted from the end): those rows are emitted only if a
//! function value changed (a `lead` that now sees the new row, a running total after an
//! insertion in the middle). The rows in between are retracted with their old values and
//! emitted with their new ones. So an append at the end of a partition (event time moving
//! forward) emits the new rows and re-emits only the rows whose frames reach forward to
//! them. Cost per touched partition and epoch: O(partition size) — reading it and
//! evaluating the functions, vectorized — plus the changes.
//!
//! # State
//! Every row of every partition, in one state table (entries as in
//! [`crate::partition_rows`]): the table is the operator's whole state, so it is
//! checkpointed and spilled like any table, and a restart needs nothing else. Partitions
//! are never freed: an unbounded input keeps growing the state, as a regular join does.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, Int64Array, RecordBatch, UInt32Array};
use datafusion::arrow::compute::{concat, take};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::WindowExpr;
use kappa_common::{ChangeBatch, Epoch, KappaError, Result};
use kappa_state::StateTable;

use crate::Operator;
use crate::partition_rows::{PartEntry, RowKeys, entry_key, part_prefix, table_entries};

type Bytes = Arc<[u8]>;
type HashMap<K, V> = hashbrown::HashMap<K, V>;

const WHAT: &str = "a window function (OVER)";

/// What to partition and order by, and the functions to compute.
pub struct OverSpec {
    /// PARTITION BY expressions with their types.
    pub partition: Vec<(Arc<dyn PhysicalExpr>, DataType)>,
    /// ORDER BY keys: expression, type, direction and null placement.
    pub order: Vec<crate::SortKey>,
    /// DataFusion's window expressions over the input; each is evaluated over one
    /// partition's rows in order.
    pub funcs: Vec<Arc<dyn WindowExpr>>,
}

/// Where one touched partition's rows sit in the epoch's before and after batches.
struct Touched {
    old: std::ops::Range<usize>,
    new: std::ops::Range<usize>,
    /// Rows before the first changed entry (the same rows at the same positions in both).
    head: usize,
    /// Rows after the last changed entry (the same rows, aligned at the end).
    tail: usize,
}

pub struct Over {
    spec: OverSpec,
    keys: RowKeys,
    /// Compares function values between before and after.
    values: RowConverter,
    input: SchemaRef,
    schema: SchemaRef,
    table: Box<dyn StateTable>,
    /// This epoch's changes per partition: (sort key, row, weight).
    pending: HashMap<Bytes, Vec<(Bytes, Bytes, i64)>>,
}

impl Over {
    /// `input` is the input's schema; `schema` the output's (the input's columns, then one
    /// per function); `table` holds the partitions.
    pub fn new(
        spec: OverSpec,
        input: SchemaRef,
        schema: SchemaRef,
        table: Box<dyn StateTable>,
    ) -> Result<Self> {
        let keys = RowKeys::new(&spec.partition, &spec.order, &input)?;
        let values = RowConverter::new(
            schema.fields()[input.fields().len()..]
                .iter()
                .map(|f| SortField::new(f.data_type().clone()))
                .collect(),
        )?;
        if schema.fields().len() != input.fields().len() + spec.funcs.len() {
            return Err(KappaError::internal(
                "a window node's schema is not its input's columns and one per function",
            ));
        }
        Ok(Self {
            spec,
            keys,
            values,
            input,
            schema,
            table,
            pending: HashMap::default(),
        })
    }

    /// Applies one partition's changes to the table. Appends its rows before and after
    /// (each entry once per copy) and returns where they are.
    fn apply(
        &mut self,
        key: &[u8],
        changes: Vec<(Bytes, Bytes, i64)>,
        old_rows: &mut Vec<Bytes>,
        new_rows: &mut Vec<Bytes>,
    ) -> Result<Option<Touched>> {
        let mut net: std::collections::BTreeMap<(Bytes, Bytes), i64> = Default::default();
        for (sk, row, w) in changes {
            *net.entry((sk, row)).or_default() += w;
        }
        net.retain(|_, w| *w != 0);
        let (Some((first, _)), Some((last, _))) = (net.first_key_value(), net.last_key_value())
        else {
            return Ok(None);
        };
        let (first, last) = (first.clone(), last.clone());
        let prefix = part_prefix(key);
        let before: Vec<PartEntry> =
            table_entries(self.table.as_ref(), &prefix, WHAT).collect::<Result<_>>()?;
        for ((sk, row), w) in &net {
            kappa_state::add_to_count(
                self.table.as_mut(),
                &entry_key(&prefix, sk, row),
                *w,
                &WHAT,
            )?;
        }
        // The entries are in order: those before the first change and after the last one
        // are unchanged.
        let copies = |e: &PartEntry| e.2 as usize;
        let head = before
            .iter()
            .take_while(|(sk, row, _)| (sk, row) < (&first.0, &first.1))
            .map(copies)
            .sum();
        let tail = before
            .iter()
            .rev()
            .take_while(|(sk, row, _)| (sk, row) > (&last.0, &last.1))
            .map(copies)
            .sum();
        let (o, n) = (old_rows.len(), new_rows.len());
        for (_, row, c) in &before {
            old_rows.extend(std::iter::repeat_n(row.clone(), *c as usize));
        }
        // The after rows: a merge of the stored entries with the net changes (whose counts
        // `add_to_count` has checked never go negative).
        let mut changes = net.into_iter().peekable();
        let mut push =
            |row: &Bytes, c: i64| new_rows.extend(std::iter::repeat_n(row.clone(), c as usize));
        for (sk, row, c) in &before {
            while let Some(((_, crow), w)) = changes.next_if(|((s, r), _)| (s, r) < (sk, row)) {
                push(&crow, w);
            }
            let w = changes
                .next_if(|((s, r), _)| (s, r) == (sk, row))
                .map_or(0, |(_, w)| w);
            push(row, c + w);
        }
        for ((_, crow), w) in changes {
            push(&crow, w);
        }
        Ok(Some(Touched {
            old: o..old_rows.len(),
            new: n..new_rows.len(),
            head,
            tail,
        }))
    }

    /// The rows as a batch of the input's schema.
    fn batch(&self, rows: &[Bytes]) -> Result<RecordBatch> {
        let columns = kappa_state::decode_rows(&self.keys.rows, rows.iter().map(|r| &r[..]))?;
        crate::batch_with_rows(self.input.clone(), columns, rows.len())
    }

    /// The batch with every function's values appended, each evaluated per partition.
    fn evaluate(
        &self,
        batch: RecordBatch,
        ranges: impl Iterator<Item = std::ops::Range<usize>> + Clone,
    ) -> Result<RecordBatch> {
        let mut columns = batch.columns().to_vec();
        for f in &self.spec.funcs {
            let parts = ranges
                .clone()
                .filter(|r| !r.is_empty())
                .map(|r| f.evaluate(&batch.slice(r.start, r.len())))
                .collect::<datafusion::error::Result<Vec<ArrayRef>>>()?;
            let column = match parts.as_slice() {
                [] => datafusion::arrow::array::new_empty_array(
                    self.schema.field(columns.len()).data_type(),
                ),
                [one] => one.clone(),
                _ => concat(&parts.iter().map(|a| a.as_ref()).collect::<Vec<_>>())?,
            };
            columns.push(column);
        }
        crate::batch_with_rows(self.schema.clone(), columns, batch.num_rows())
    }

    /// Of the aligned positions `(before, after)`, those whose function values differ.
    fn changed_values(
        &self,
        before: &RecordBatch,
        after: &RecordBatch,
        pairs: &[(u32, u32)],
    ) -> Result<Vec<(u32, u32)>> {
        if pairs.is_empty() || self.spec.funcs.is_empty() {
            return Ok(Vec::new());
        }
        let n = self.input.fields().len();
        let values = |b: &RecordBatch, idx: UInt32Array| -> Result<_> {
            let cols = b.columns()[n..]
                .iter()
                .map(|c| take(c.as_ref(), &idx, None))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            Ok(self.values.convert_columns(&cols)?)
        };
        let old = values(before, pairs.iter().map(|p| p.0).collect())?;
        let new = values(after, pairs.iter().map(|p| p.1).collect())?;
        Ok(pairs
            .iter()
            .enumerate()
            .filter(|(i, _)| old.row(*i) != new.row(*i))
            .map(|(_, p)| *p)
            .collect())
    }
}

/// `take` of the rows at `idx`, with weight `w` each.
fn signed(b: &RecordBatch, idx: Vec<u32>, w: i64) -> Result<Option<ChangeBatch>> {
    if idx.is_empty() {
        return Ok(None);
    }
    let n = idx.len();
    let idx = UInt32Array::from(idx);
    let cols = b
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &idx, None))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let data = crate::batch_with_rows(b.schema(), cols, n)?;
    Ok(Some(ChangeBatch::new(data, Int64Array::from_value(w, n))?))
}

impl Operator for Over {
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
            part_cols: _,
            part_keys,
            sort_keys,
            rows,
        } = self
            .keys
            .key(&batch, &self.spec.partition, &self.spec.order)?;
        let weights = batch.weights();
        for i in 0..n {
            let w = weights.value(i);
            if w == 0 {
                continue;
            }
            let key = part_keys.get(i);
            let change = (
                Arc::from(sort_keys.get(i)),
                Arc::from(rows.row(i).data()),
                w,
            );
            match self.pending.get_mut(key) {
                Some(c) => c.push(change),
                None => {
                    self.pending.insert(Arc::from(key), vec![change]);
                }
            }
        }
        Ok(())
    }

    fn on_barrier(
        &mut self,
        _epoch: Epoch,
        _watermark: Option<i64>,
        out: &mut Vec<ChangeBatch>,
    ) -> Result<()> {
        let (mut old_rows, mut new_rows) = (Vec::new(), Vec::new());
        let mut touched = Vec::new();
        for (key, changes) in std::mem::take(&mut self.pending) {
            if let Some(t) = self.apply(&key, changes, &mut old_rows, &mut new_rows)? {
                touched.push(t);
            }
        }
        if touched.is_empty() {
            return Ok(());
        }
        let before = self.evaluate(
            self.batch(&old_rows)?,
            touched.iter().map(|t| t.old.clone()),
        )?;
        let after = self.evaluate(
            self.batch(&new_rows)?,
            touched.iter().map(|t| t.new.clone()),
        )?;
        let (mut retract, mut emit, mut aligned) = (Vec::new(), Vec::new(), Vec::new());
        for t in &touched {
            let (o, n) = (t.old.start as u32, t.new.start as u32);
            aligned.extend((0..t.head as u32).map(|i| (o + i, n + i)));
            let (oe, ne) = (t.old.end as u32, t.new.end as u32);
            aligned.extend((1..=t.tail as u32).map(|i| (oe - i, ne - i)));
            retract.extend(o + t.head as u32..oe - t.tail as u32);
            emit.extend(n + t.head as u32..ne - t.tail as u32);
        }
        for (o, n) in self.changed_values(&before, &after, &aligned)? {
            retract.push(o);
            emit.push(n);
        }
        out.extend(signed(&before, retract, -1)?);
        out.extend(signed(&after, emit, 1)?);
        Ok(())
    }

    fn name(&self) -> &'static str {
        "StreamOver"
    }

    fn state_entries(&self) -> usize {
        self.table.len()
    }

    fn state_tables(&mut self) -> Vec<&mut dyn StateTable> {
        vec![self.table.as_mut()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{
        TestEpoch, assert_changes, assert_restores_exactly, changes, df_schema, schema,
    };
    use datafusion::arrow::compute::SortOptions;
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::execution::context::ExecutionProps;
    use datafusion::functions_aggregate::sum::sum_udaf;
    use datafusion::functions_window::expr_fn::{lag, lead};
    use datafusion::logical_expr::expr::{WindowFunction, WindowFunctionDefinition};
    use datafusion::logical_expr::{
        Expr, ExprFunctionExt, WindowFrame, WindowFrameBound, WindowFrameUnits,
    };
    use datafusion::physical_expr::expressions::col as pcol;
    use datafusion::prelude::col;

    const INPUT: &str = "k:i64, t:i64, v:i64";

    /// Over `k, t, v` partitioned by k, ordered by t: `lag(v)`, `lead(v)` and the sum of v
    /// over the row and the one before it.
    fn op(table: Box<dyn StateTable>) -> Over {
        let input = schema(INPUT);
        let logical = df_schema(INPUT);
        let window = |e: Expr| -> Arc<dyn WindowExpr> {
            datafusion::physical_planner::create_window_expr(
                &e,
                &logical,
                &ExecutionProps::new(),
                &Default::default(),
            )
            .unwrap()
        };
        let spec = |e: Expr| {
            e.partition_by(vec![col("k")])
                .order_by(vec![col("t").sort(true, false)])
        };
        let pair = WindowFrame::new_bounds(
            WindowFrameUnits::Rows,
            WindowFrameBound::Preceding(datafusion::scalar::ScalarValue::UInt64(Some(1))),
            WindowFrameBound::CurrentRow,
        );
        let funcs = vec![
            window(spec(lag(col("v"), Some(1), None)).build().unwrap()),
            window(spec(lead(col("v"), Some(1), None)).build().unwrap()),
            window(
                spec(Expr::from(WindowFunction::new(
                    WindowFunctionDefinition::AggregateUDF(sum_udaf()),
                    vec![col("v")],
                )))
                .window_frame(pair)
                .build()
                .unwrap(),
            ),
        ];
        let mut fields: Vec<Field> = input.fields().iter().map(|f| (**f).clone()).collect();
        for name in ["prev", "next", "pair"] {
            fields.push(Field::new(name, DataType::Int64, true));
        }
        let spec = OverSpec {
            partition: vec![(pcol("k", &input).unwrap(), DataType::Int64)],
            order: vec![(
                pcol("t", &input).unwrap(),
                DataType::Int64,
                SortOptions::default(),
            )],
            funcs,
        };
        Over::new(spec, input, Arc::new(Schema::new(fields)), table).unwrap()
    }

    fn table() -> Box<dyn StateTable> {
        Box::new(kappa_state::MemStateTable::default())
    }

    fn epoch(op: &mut Over, lines: &str) -> Vec<ChangeBatch> {
        let mut out = vec![];
        op.process(0, changes(INPUT, lines), &mut out).unwrap();
        op.on_barrier(0, None, &mut out).unwrap();
        out
    }

    fn emitted(out: &[ChangeBatch]) -> usize {
        out.iter().map(|b| b.num_rows()).sum()
    }

    #[test]
    fn an_append_re_emits_only_the_rows_whose_values_it_changes() {
        let mut op = op(table());
        let out = epoch(&mut op, "+ 1 | 1 | 10\n+ 1 | 2 | 20\n+ 2 | 1 | 5");
        assert_changes(
            &out,
            "+ 1 | 1 | 10 | NULL | 20 | 10
             + 1 | 2 | 20 | 10 | NULL | 30
             + 2 | 1 | 5 | NULL | NULL | 5",
        );
        // t = 3 at the end of partition 1: only the row before it (its `next`) changes.
        let out = epoch(&mut op, "+ 1 | 3 | 30");
        assert_changes(
            &out,
            "- 1 | 2 | 20 | 10 | NULL | 30
             + 1 | 2 | 20 | 10 | 30 | 30
             + 1 | 3 | 30 | 20 | NULL | 50",
        );
        assert_eq!(emitted(&out), 3);
        assert_eq!(op.state_entries(), 4);
    }

    #[test]
    fn an_insert_in_the_middle_changes_its_neighbours_only() {
        let mut op = op(table());
        epoch(
            &mut op,
            "+ 1 | 1 | 1\n+ 1 | 2 | 2\n+ 1 | 4 | 4\n+ 1 | 5 | 5\n+ 1 | 6 | 6",
        );
        let out = epoch(&mut op, "+ 1 | 3 | 3");
        assert_changes(
            &out,
            "- 1 | 2 | 2 | 1 | 4 | 3
             + 1 | 2 | 2 | 1 | 3 | 3
             + 1 | 3 | 3 | 2 | 4 | 5
             - 1 | 4 | 4 | 2 | 5 | 6
             + 1 | 4 | 4 | 3 | 5 | 7",
        );
        // Rows 1, 5 and 6 are aligned before and after and unchanged: not emitted.
        assert_eq!(emitted(&out), 5);
    }

    #[test]
    fn duplicates_take_one_position_each_and_deletes_close_the_gap() {
        let mut op = op(table());
        let out = epoch(&mut op, "+2 1 | 1 | 7\n+ 1 | 2 | 8");
        assert_changes(
            &out,
            "+ 1 | 1 | 7 | NULL | 7 | 7
             + 1 | 1 | 7 | 7 | 8 | 14
             + 1 | 2 | 8 | 7 | NULL | 15",
        );
        let out = epoch(&mut op, "- 1 | 1 | 7");
        assert_changes(
            &out,
            "- 1 | 1 | 7 | NULL | 7 | 7
             - 1 | 1 | 7 | 7 | 8 | 14
             + 1 | 1 | 7 | NULL | 8 | 7
             - 1 | 2 | 8 | 7 | NULL | 15
             + 1 | 2 | 8 | 7 | NULL | 15",
        );
        // A retraction and re-insertion of the same row in one epoch changes nothing.
        assert!(epoch(&mut op, "- 1 | 2 | 8\n+ 1 | 2 | 8").is_empty());
        let out = epoch(&mut op, "- 1 | 1 | 7\n- 1 | 2 | 8");
        assert_changes(
            &out,
            "- 1 | 1 | 7 | NULL | 8 | 7
             - 1 | 2 | 8 | 7 | NULL | 15",
        );
        assert_eq!(op.state_entries(), 0);
    }

    #[test]
    fn a_retraction_of_a_row_never_stored_is_an_error() {
        let mut op = op(table());
        let mut out = vec![];
        op.process(0, changes(INPUT, "- 1 | 1 | 1"), &mut out)
            .unwrap();
        assert!(op.on_barrier(0, None, &mut out).is_err());
    }

    #[test]
    fn restores_from_its_table() {
        let epochs: Vec<TestEpoch> = [
            "+ 1 | 1 | 10\n+ 1 | 3 | 30\n+ 2 | 1 | 1",
            "+ 1 | 2 | 20\n- 2 | 1 | 1",
            "+ 1 | 4 | 40\n+ 2 | 5 | 5\n- 1 | 1 | 10",
            "+ 2 | 6 | 6\n+2 1 | 5 | 50",
        ]
        .iter()
        .map(|l| (vec![(0, changes(INPUT, l))], None))
        .collect();
        for at in 1..epochs.len() {
            assert_restores_exactly(|mut t| Box::new(op(t.remove(0))), 1, &epochs, at);
        }
    }
}

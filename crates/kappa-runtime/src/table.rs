//! Engine tables: the changelog that INSERT, UPDATE, DELETE and COPY write.
//!
//! A table keeps two things: its latest contents (what the next statement reads and
//! constraint checks run against) and the changes not yet cut into an epoch. The barrier
//! drains the pending changes and takes a snapshot of the contents at the same instant, so
//! the snapshot readers see is exactly the sum of all drained changes.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, RwLock};

use datafusion::arrow::array::{Array, RecordBatch};
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::row::{RowConverter, SortField};
use kappa_common::{ChangeBatch, KappaError, RelationId, Result, SqlState};
use kappa_state::{MultisetSnapshot, RowMultiset, StateStore, StateTable};

/// One statement's effect on a table: rows removed (each must be present) and rows added.
#[derive(Default)]
pub struct TableWrite {
    pub deletes: Option<RecordBatch>,
    pub inserts: Option<RecordBatch>,
}

struct Inner {
    contents: RowMultiset,
    /// Primary key (row format) → 1, for tables with a primary key.
    pk_index: Option<(RowConverter, Box<dyn StateTable>)>,
    pending: Vec<ChangeBatch>,
}

pub struct Table {
    pub id: RelationId,
    pub name: String,
    pub schema: SchemaRef,
    pub primary_key: Option<Vec<usize>>,
    /// Serializes statements on this table from their read to their write.
    dml: tokio::sync::Mutex<()>,
    inner: Mutex<Inner>,
    gate: Arc<RwLock<()>>,
}

impl Table {
    pub(crate) fn new(
        id: RelationId,
        name: &str,
        schema: SchemaRef,
        primary_key: Option<Vec<usize>>,
        store: &dyn StateStore,
        gate: Arc<RwLock<()>>,
    ) -> Result<Self> {
        let contents =
            RowMultiset::new(schema.clone(), store.create_table(&format!("{name}.rows")))?;
        let pk_index = match &primary_key {
            Some(cols) => {
                let fields = cols
                    .iter()
                    .map(|&c| SortField::new(schema.field(c).data_type().clone()))
                    .collect();
                Some((
                    RowConverter::new(fields)?,
                    store.create_table(&format!("{name}.pk")),
                ))
            }
            None => None,
        };
        Ok(Self {
            id,
            name: name.to_string(),
            schema,
            primary_key,
            dml: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner {
                contents,
                pk_index,
                pending: Vec::new(),
            }),
            gate,
        })
    }

    /// Held by a statement from the moment it reads the table until its write is applied.
    pub async fn lock_dml(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.dml.lock().await
    }

    fn inner(&self) -> Result<std::sync::MutexGuard<'_, Inner>> {
        self.inner
            .lock()
            .map_err(|_| KappaError::internal("table lock poisoned"))
    }

    /// The latest contents, including writes not yet in any epoch.
    pub fn latest(&self) -> Result<MultisetSnapshot> {
        Ok(self.inner()?.contents.snapshot())
    }

    /// Applies one statement's write atomically: either every check passes and all of it is
    /// applied, or nothing is. Returns the number of rows affected (inserted + deleted rows,
    /// an update counting once).
    pub fn apply(&self, write: TableWrite) -> Result<()> {
        let _gate = self
            .gate
            .read()
            .map_err(|_| KappaError::internal("DML gate poisoned"))?;
        let mut inner = self.inner()?;
        if let Some(ins) = &write.inserts {
            self.check_not_null(ins)?;
        }
        let del = write
            .deletes
            .filter(|b| b.num_rows() > 0)
            .map(ChangeBatch::deletes);
        let ins = write
            .inserts
            .filter(|b| b.num_rows() > 0)
            .map(ChangeBatch::inserts);
        // Every deleted row must be present (with multiplicity).
        if let Some(d) = &del {
            let rows = inner.contents.converter().convert_columns(d.columns())?;
            let mut need: std::collections::HashMap<&[u8], i64> = Default::default();
            for r in rows.iter() {
                *need.entry(r.data()).or_default() += 1;
            }
            for (k, n) in need {
                if inner.contents.count_encoded(k) < n {
                    return Err(KappaError::internal(format!(
                        "write to {} deletes a row that is not there",
                        self.name
                    )));
                }
            }
        }
        if let (Some(pk), Some((conv, index))) = (&self.primary_key, &inner.pk_index) {
            let key_rows = |b: &ChangeBatch| -> Result<datafusion::arrow::row::Rows> {
                let cols: Vec<_> = pk.iter().map(|&c| b.columns()[c].clone()).collect();
                Ok(conv.convert_columns(&cols)?)
            };
            let removed = match &del {
                Some(d) => key_rows(d)?.iter().map(|r| r.data().to_vec()).collect(),
                None => HashSet::new(),
            };
            if let Some(i) = &ins {
                let keys = key_rows(i)?;
                let mut seen = HashSet::with_capacity(i.num_rows());
                for (row, k) in keys.iter().enumerate() {
                    let k = k.data();
                    let exists = index.get(k).is_some() && !removed.contains(k);
                    if exists || !seen.insert(k) {
                        return Err(KappaError::user(
                            SqlState::UNIQUE_VIOLATION,
                            format!(
                                "duplicate key value violates primary key of \"{}\": ({}) already exists",
                                self.name,
                                self.describe_key(i.data(), row)
                            ),
                        ));
                    }
                }
            }
        }
        // All checks passed: apply.
        let Inner {
            contents,
            pk_index,
            pending,
        } = &mut *inner;
        for change in [del, ins].into_iter().flatten() {
            contents.apply(&change)?;
            if let (Some(pk), Some((conv, index))) = (&self.primary_key, pk_index.as_mut()) {
                let cols: Vec<_> = pk.iter().map(|&c| change.columns()[c].clone()).collect();
                let insert = change.weights().value(0) > 0;
                for k in conv.convert_columns(&cols)?.iter() {
                    if insert {
                        index.put(Arc::from(k.data()), kappa_state::encode_count(1));
                    } else {
                        index.delete(k.data());
                    }
                }
            }
            pending.push(change);
        }
        Ok(())
    }

    fn check_not_null(&self, batch: &RecordBatch) -> Result<()> {
        for (i, f) in self.schema.fields().iter().enumerate() {
            if !f.is_nullable() && batch.column(i).null_count() > 0 {
                return Err(KappaError::user(
                    SqlState::NOT_NULL_VIOLATION,
                    format!(
                        "null value in column \"{}\" of relation \"{}\" violates not-null constraint",
                        f.name(),
                        self.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn describe_key(&self, batch: &RecordBatch, row: usize) -> String {
        use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
        let opts = FormatOptions::default().with_null("NULL");
        self.primary_key
            .iter()
            .flatten()
            .map(|&c| {
                ArrayFormatter::try_new(batch.column(c).as_ref(), &opts)
                    .map(|f| format!("{}={}", self.schema.field(c).name(), f.value(row)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Takes the changes not yet in an epoch and the contents they lead to.
    pub(crate) fn drain(&self) -> Result<(Vec<ChangeBatch>, MultisetSnapshot)> {
        let mut inner = self.inner()?;
        let pending = std::mem::take(&mut inner.pending);
        Ok((pending, inner.contents.snapshot()))
    }
}

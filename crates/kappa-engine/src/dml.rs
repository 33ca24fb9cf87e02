//! INSERT, UPDATE and DELETE.
//!
//! Each statement holds its table's DML lock from the read to the write, reads the table's
//! latest contents through DataFusion, and applies one [`TableWrite`]: all of it or, if a
//! constraint fails, none of it. UPDATE is a delete of the old rows and an insert of the new
//! ones in the same write, so views see `-old +new` in the same epoch.

use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::compute::{CastOptions, cast_with_options, concat_batches};
use datafusion::arrow::datatypes::{DataType, SchemaRef};
use datafusion::logical_expr::{LogicalPlan, WriteOp};
use datafusion::sql::sqlparser::ast::{
    Assignment, AssignmentTarget, Delete, FromTable, Statement, TableFactor, Update,
};
use kappa_common::{KappaError, Result, SqlState};
use kappa_runtime::{Table, TableWrite};
use kappa_sql::catalog::RelationKind;
use kappa_sql::parse::{normalize_ident, parse_statements};

use crate::context::{TableReads, plan_statement};
use crate::{Engine, Output};

impl Engine {
    pub(crate) async fn dml(&self, stmt: Statement) -> Result<Output> {
        match stmt {
            Statement::Insert(_) => self.insert(stmt).await,
            Statement::Update(u) => self.update(u).await,
            Statement::Delete(d) => self.delete(d).await,
            _ => Err(KappaError::internal("not a DML statement")),
        }
    }

    pub(crate) fn writable_table(&self, name: &str) -> Result<Arc<Table>> {
        let cat = self.catalog();
        let rel = cat.require(name)?;
        if !matches!(rel.kind, RelationKind::Table { .. }) {
            return Err(KappaError::user(
                SqlState::WRONG_OBJECT_TYPE,
                format!(
                    "cannot change {} \"{name}\": only tables accept writes",
                    rel.kind.describe()
                ),
            ));
        }
        self.runtime()
            .table(rel.id)
            .ok_or_else(|| KappaError::internal(format!("table {name} has no storage")))
    }

    async fn insert(&self, stmt: Statement) -> Result<Output> {
        let Statement::Insert(ins) = &stmt else {
            return Err(KappaError::internal("not an insert"));
        };
        if ins.on.is_some() {
            return Err(KappaError::not_supported("INSERT … ON CONFLICT"));
        }
        if ins.returning.is_some() {
            return Err(KappaError::not_supported("INSERT … RETURNING"));
        }
        let name = match &ins.table {
            datafusion::sql::sqlparser::ast::TableObject::TableName(n) => {
                kappa_sql::parse::object_name(n)?
            }
            other => return Err(KappaError::not_supported(format!("INSERT INTO {other}"))),
        };
        let table = self.writable_table(&name)?;
        let _dml = table.lock_dml().await;
        let ctx = self.context(TableReads::Latest);
        let plan = plan_statement(&ctx, stmt).await?;
        let LogicalPlan::Dml(dml) = plan else {
            return Err(KappaError::internal("INSERT did not plan to a DML plan"));
        };
        if !matches!(dml.op, WriteOp::Insert(_)) {
            return Err(KappaError::internal("INSERT planned as another write"));
        }
        let input = Arc::unwrap_or_clone(dml.input);
        let batches = ctx.execute_logical_plan(input).await?.collect().await?;
        // The context pins the published snapshot; held while the write waits for its
        // acknowledgment, it would make every checkpoint keep the state it overwrites.
        drop(ctx);
        let rows = conform(&table.schema, &batches)?;
        let n = rows.num_rows();
        let commit = table.apply(TableWrite {
            deletes: None,
            inserts: Some(rows),
        })?;
        drop(_dml);
        crate::acknowledge(self.runtime(), commit, &table).await?;
        Ok(Output::rows_affected("INSERT 0", n))
    }

    /// Runs `SELECT * [, extra…] FROM <from> [WHERE …]` on the latest contents.
    async fn select_latest(&self, sql: &str) -> Result<Vec<RecordBatch>> {
        let mut stmts = parse_statements(sql)?;
        let stmt = stmts
            .pop()
            .ok_or_else(|| KappaError::internal("empty generated query"))?;
        let ctx = self.context(TableReads::Latest);
        let plan = plan_statement(&ctx, stmt).await?;
        Ok(ctx.execute_logical_plan(plan).await?.collect().await?)
    }

    async fn update(&self, u: Update) -> Result<Output> {
        if u.from.is_some() {
            return Err(KappaError::not_supported("UPDATE … FROM"));
        }
        if u.returning.is_some() {
            return Err(KappaError::not_supported("UPDATE … RETURNING"));
        }
        if !u.table.joins.is_empty() {
            return Err(KappaError::not_supported("UPDATE of a join"));
        }
        let TableFactor::Table { name, .. } = &u.table.relation else {
            return Err(KappaError::not_supported(format!("UPDATE {}", u.table)));
        };
        let tname = kappa_sql::parse::object_name(name)?;
        let table = self.writable_table(&tname)?;
        let schema = table.schema.clone();
        let mut targets: Vec<usize> = vec![];
        let mut values = vec![];
        for Assignment { target, value } in &u.assignments {
            let AssignmentTarget::ColumnName(col) = target else {
                return Err(KappaError::not_supported("UPDATE of a column tuple"));
            };
            let cname = col
                .0
                .last()
                .and_then(|p| p.as_ident())
                .map(normalize_ident)
                .unwrap_or_default();
            let idx = schema.index_of(&cname).map_err(|_| {
                KappaError::user(
                    SqlState::UNDEFINED_COLUMN,
                    format!("column \"{cname}\" of relation \"{tname}\" does not exist"),
                )
            })?;
            if targets.contains(&idx) {
                return Err(KappaError::user(
                    SqlState::SYNTAX_ERROR,
                    format!("multiple assignments to same column \"{cname}\""),
                ));
            }
            targets.push(idx);
            values.push(format!("({value}) AS __kappa_set_{}", values.len()));
        }
        let where_ = u
            .selection
            .map(|s| format!(" WHERE {s}"))
            .unwrap_or_default();
        let sql = format!("SELECT *, {} FROM {}{where_}", values.join(", "), u.table);
        let _dml = table.lock_dml().await;
        let batches = self.select_latest(&sql).await?;
        let n_cols = schema.fields().len();
        let mut old = vec![];
        let mut new = vec![];
        for b in &batches {
            let old_cols: Vec<ArrayRef> = b.columns()[..n_cols].to_vec();
            let mut new_cols = old_cols.clone();
            for (j, &t) in targets.iter().enumerate() {
                let field = schema.field(t);
                new_cols[t] =
                    cast_value(&b.columns()[n_cols + j], field.data_type(), field.name())?;
            }
            old.push(RecordBatch::try_new(unconstrained(&schema), old_cols)?);
            new.push(RecordBatch::try_new(unconstrained(&schema), new_cols)?);
        }
        let old = conform(&schema, &old)?;
        let new = conform(&schema, &new)?;
        let n = old.num_rows();
        let commit = table.apply(TableWrite {
            deletes: Some(old),
            inserts: Some(new),
        })?;
        drop(_dml);
        crate::acknowledge(self.runtime(), commit, &table).await?;
        Ok(Output::rows_affected("UPDATE", n))
    }

    async fn delete(&self, d: Delete) -> Result<Output> {
        if d.using.is_some() {
            return Err(KappaError::not_supported("DELETE … USING"));
        }
        if d.returning.is_some() {
            return Err(KappaError::not_supported("DELETE … RETURNING"));
        }
        let from = match &d.from {
            FromTable::WithFromKeyword(t) | FromTable::WithoutKeyword(t) => t,
        };
        let [twj] = from.as_slice() else {
            return Err(KappaError::not_supported("DELETE from several tables"));
        };
        let TableFactor::Table { name, .. } = &twj.relation else {
            return Err(KappaError::not_supported(format!("DELETE FROM {twj}")));
        };
        if !twj.joins.is_empty() {
            return Err(KappaError::not_supported("DELETE of a join"));
        }
        let tname = kappa_sql::parse::object_name(name)?;
        let table = self.writable_table(&tname)?;
        let where_ = d
            .selection
            .map(|s| format!(" WHERE {s}"))
            .unwrap_or_default();
        let sql = format!("SELECT * FROM {twj}{where_}");
        let _dml = table.lock_dml().await;
        let batches = self.select_latest(&sql).await?;
        let rows = conform(&table.schema, &batches)?;
        let n = rows.num_rows();
        let commit = table.apply(TableWrite {
            deletes: Some(rows),
            inserts: None,
        })?;
        drop(_dml);
        crate::acknowledge(self.runtime(), commit, &table).await?;
        Ok(Output::rows_affected("DELETE", n))
    }
}

/// The parameter types DataFusion infers for a DML statement's placeholders.
pub(crate) async fn parameter_types(
    engine: &Engine,
    stmt: &Statement,
) -> Result<Vec<Option<DataType>>> {
    let ctx = engine.context(TableReads::Latest);
    let plan = plan_statement(&ctx, stmt.clone()).await?;
    let params = plan.get_parameter_types()?;
    Ok((1..=params.len())
        .map(|i| params.get(&format!("${i}")).cloned().flatten())
        .collect())
}

/// The table's schema with every column nullable, for intermediate batches whose
/// nullability is checked later, with a proper error, by the table itself.
pub(crate) fn unconstrained(schema: &SchemaRef) -> SchemaRef {
    Arc::new(datafusion::arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ))
}

pub(crate) fn cast_value(a: &ArrayRef, to: &DataType, column: &str) -> Result<ArrayRef> {
    if a.data_type() == to {
        return Ok(a.clone());
    }
    let opts = CastOptions {
        safe: false,
        ..Default::default()
    };
    cast_with_options(a, to, &opts).map_err(|e| {
        let state = if a.data_type().is_numeric() && to.is_numeric() {
            SqlState::NUMERIC_VALUE_OUT_OF_RANGE
        } else if matches!(
            a.data_type(),
            DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8
        ) {
            SqlState::INVALID_TEXT_REPRESENTATION
        } else {
            SqlState::DATATYPE_MISMATCH
        };
        KappaError::user(
            state,
            format!(
                "invalid value for column \"{column}\" of type {}: {e}",
                crate::types::pg_type_name(to)
            ),
        )
    })
}

/// Concatenates batches into one with exactly the table's column types (casting where
/// DataFusion produced a compatible type). Nullability is checked by the table.
pub(crate) fn conform(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<RecordBatch> {
    let loose = unconstrained(schema);
    let mut fixed = Vec::with_capacity(batches.len());
    for b in batches {
        if b.num_columns() != schema.fields().len() {
            return Err(KappaError::internal("row has the wrong number of columns"));
        }
        let cols = b
            .columns()
            .iter()
            .zip(schema.fields())
            .map(|(c, f)| cast_value(c, f.data_type(), f.name()))
            .collect::<Result<Vec<_>>>()?;
        fixed.push(RecordBatch::try_new(loose.clone(), cols)?);
    }
    Ok(concat_batches(&loose, &fixed)?)
}

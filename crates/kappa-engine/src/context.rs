//! DataFusion sessions over Kappa's relations.
//!
//! A query sees one catalog version and one committed [`Snapshot`]: every table and
//! materialized view at the same epoch. DML statements read tables at their latest contents
//! instead (the write they make applies to exactly what they read), and views in both cases.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::{Schema, SchemaRef};
use datafusion::catalog::CatalogProvider;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{MemoryCatalogProvider, SchemaProvider, Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::context::SessionConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use kappa_common::{KappaError, SqlState};
use kappa_runtime::{Runtime, Snapshot};
use kappa_sql::catalog::{Catalog, RelationKind};

/// Which contents of engine tables a session reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum TableReads {
    /// The committed snapshot, like every view (queries).
    Committed,
    /// The latest contents, including writes not yet committed to an epoch (DML).
    Latest,
}

#[derive(Clone)]
struct Sources {
    catalog: Arc<Catalog>,
    snapshot: Arc<Snapshot>,
    runtime: Arc<Runtime>,
    reads: TableReads,
    /// Plans only; scans are refused (used to plan materialized views).
    planning_only: bool,
}

/// Plans one parsed statement with DataFusion in `ctx`.
pub async fn plan_statement(
    ctx: &SessionContext,
    stmt: datafusion::sql::sqlparser::ast::Statement,
) -> kappa_common::Result<datafusion::logical_expr::LogicalPlan> {
    let stmt = datafusion::sql::parser::Statement::Statement(Box::new(stmt));
    Ok(ctx.state().statement_to_plan(stmt).await?)
}

/// Builds a SessionContext whose `public` schema is Kappa's catalog.
pub fn session_context(
    catalog: Arc<Catalog>,
    snapshot: Arc<Snapshot>,
    runtime: Arc<Runtime>,
    reads: TableReads,
    planning_only: bool,
) -> SessionContext {
    let sources = Sources {
        catalog,
        snapshot,
        runtime,
        reads,
        planning_only,
    };
    make_context(sources)
}

fn make_context(sources: Sources) -> SessionContext {
    let config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("kappa", "public")
        .with_create_default_catalog_and_schema(false)
        .with_target_partitions(2)
        .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false)
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        );
    let ctx = SessionContext::new_with_config(config);
    let cat = Arc::new(MemoryCatalogProvider::new());
    let _ = cat.register_schema("public", Arc::new(KappaSchema { sources }));
    ctx.register_catalog("kappa", cat);
    ctx
}

#[derive(Clone)]
struct KappaSchema {
    sources: Sources,
}

impl std::fmt::Debug for KappaSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KappaSchema")
    }
}

fn df_err(e: KappaError) -> DataFusionError {
    DataFusionError::External(Box::new(e))
}

#[async_trait]
impl SchemaProvider for KappaSchema {
    fn table_names(&self) -> Vec<String> {
        self.sources
            .catalog
            .relations()
            .map(|r| r.name.clone())
            .collect()
    }

    async fn table(&self, name: &str) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let s = &self.sources;
        let Some(rel) = s.catalog.get(name) else {
            return Ok(None);
        };
        match &rel.kind {
            RelationKind::View => {
                let def = rel.definition.clone().unwrap_or_default();
                let ctx = make_context(s.clone());
                let plan = ctx.state().create_logical_plan(&def).await?;
                Ok(Some(Arc::new(ViewTable::new(plan, Some(def)))))
            }
            kind => {
                let data = if s.planning_only {
                    Data::None
                } else if matches!(kind, RelationKind::Table { .. })
                    && s.reads == TableReads::Latest
                {
                    let table = s.runtime.table(rel.id).ok_or_else(|| {
                        df_err(KappaError::internal(format!("table {name} has no storage")))
                    })?;
                    Data::Latest(table)
                } else {
                    let snap = s.snapshot.relations.get(&rel.id).cloned().ok_or_else(|| {
                        df_err(KappaError::internal(format!(
                            "{name} is not in the snapshot"
                        )))
                    })?;
                    Data::Committed(snap)
                };
                // DML checks NOT NULL itself, with PostgreSQL's message and SQLSTATE, on the
                // rows it is about to write; DataFusion must not reject them earlier.
                let schema = if matches!(data, Data::Latest(_)) {
                    crate::dml::unconstrained(&rel.schema)
                } else {
                    rel.schema.clone()
                };
                Ok(Some(Arc::new(RelationTable {
                    schema,
                    data,
                    table_type: if matches!(kind, RelationKind::Table { .. }) {
                        TableType::Base
                    } else {
                        TableType::View
                    },
                })))
            }
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.sources.catalog.get(name).is_some()
    }
}

enum Data {
    None,
    Committed(Arc<kappa_runtime::RelationSnapshot>),
    Latest(Arc<kappa_runtime::Table>),
}

/// A table or materialized view at a fixed version.
struct RelationTable {
    schema: SchemaRef,
    data: Data,
    table_type: TableType,
}

impl std::fmt::Debug for RelationTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RelationTable({})", self.schema)
    }
}

#[async_trait]
impl TableProvider for RelationTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        self.table_type
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = match &self.data {
            Data::None => {
                return Err(df_err(KappaError::internal(
                    "planning-only relation was scanned",
                )));
            }
            Data::Committed(snap) => {
                if let Some(f) = &snap.failure {
                    return Err(df_err(KappaError::user(
                        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
                        f.clone(),
                    )));
                }
                snap.batches().map_err(df_err)?.as_ref().clone()
            }
            Data::Latest(t) => t
                .latest()
                .and_then(|s| s.to_batches(kappa_runtime::READ_BATCH_SIZE))
                .map_err(df_err)?,
        };
        let schema = Arc::new(Schema::new(self.schema.fields().clone()));
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            schema,
            projection.cloned(),
        )?)
    }
}

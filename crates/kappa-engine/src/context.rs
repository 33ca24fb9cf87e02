//! DataFusion sessions over Kappa's relations.
//!
//! A query sees one catalog version and one [`Commit`]: every table and
//! materialized view at the same epoch. DML statements read tables at their latest contents
//! instead (the write they make applies to exactly what they read), and views in both cases.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::array::{ArrayRef, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::CatalogProvider;
use datafusion::catalog::view::ViewTable;
use datafusion::catalog::{MemoryCatalogProvider, SchemaProvider, Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::execution::context::SessionConfig;
use datafusion::logical_expr::{Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use kappa_common::{KappaError, SqlState};
use kappa_runtime::{Commit, Runtime};
use kappa_sql::catalog::{Catalog, RelationKind};
use kappa_sql::tvf::WindowTable;

mod system;
pub use system::{HISTORY, SOURCE_STATS, VIEW_STATS};

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
    snapshot: Arc<Commit>,
    runtime: Arc<Runtime>,
    reads: TableReads,
    /// Plans only; scans are refused (used to plan materialized views).
    planning_only: bool,
}

/// Plans one parsed statement with DataFusion in `ctx`. Window table functions are
/// rewritten first (see [`kappa_sql::tvf`]).
pub async fn plan_statement(
    ctx: &SessionContext,
    mut stmt: datafusion::sql::sqlparser::ast::Statement,
) -> kappa_common::Result<datafusion::logical_expr::LogicalPlan> {
    if let Some(catalog) = ctx.state().config().get_extension::<Catalog>() {
        kappa_sql::tvf::rewrite_window_tvfs(&mut stmt, &catalog)?;
        kappa_sql::as_of::rewrite_temporal_joins(&mut stmt, &catalog)?;
    }
    let stmt = datafusion::sql::parser::Statement::Statement(Box::new(stmt));
    let plan = ctx.state().statement_to_plan(stmt).await?;
    if plans_views(ctx) {
        Ok(plan)
    } else {
        kappa_sql::as_of::to_batch(plan)
    }
}

/// Marks a context that plans materialized views (whose temporal joins the lowering
/// keeps) rather than batch queries (whose temporal joins become plain operators).
#[derive(Debug)]
struct PlansViews;

fn plans_views(ctx: &SessionContext) -> bool {
    ctx.state().config().get_extension::<PlansViews>().is_some()
}

/// Builds a SessionContext whose `public` schema is Kappa's catalog.
pub fn session_context(
    catalog: Arc<Catalog>,
    snapshot: Arc<Commit>,
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
    let mut config = SessionConfig::new()
        .with_information_schema(true)
        .with_default_catalog_and_schema("kappa", "public")
        .with_create_default_catalog_and_schema(false)
        .with_target_partitions(2)
        .set_bool("datafusion.sql_parser.map_string_types_to_utf8view", false)
        .set_bool(
            "datafusion.execution.parquet.schema_force_view_types",
            false,
        )
        .with_extension(sources.catalog.clone());
    let planning_only = sources.planning_only;
    if planning_only {
        config = config.with_extension(Arc::new(PlansViews));
    }
    let ctx = SessionContext::new_with_config(config);
    // The name the SQL world (Spark, Flink, RisingWave) uses for DataFusion's
    // approx_distinct (a HyperLogLog count).
    let approx = datafusion::functions_aggregate::approx_distinct::approx_distinct_udaf();
    ctx.register_udaf(
        datafusion::logical_expr::AggregateUDF::clone(&approx)
            .with_aliases(["approx_count_distinct"]),
    );
    ctx.register_udf(kappa_sql::as_of::AsOf::udf());
    if planning_only {
        // A view's now() is the processing time of each epoch (temporal filters), not a
        // constant folded in at creation.
        ctx.register_udf(kappa_sql::temporal::StreamNow::udf());
    }
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
        if let Some(w) = WindowTable::decode(name) {
            return self.window_table(w);
        }
        let Some(rel) = s.catalog.get(name) else {
            if name == VIEW_STATS {
                return Ok(Some(self.view_stats()?));
            }
            if name == SOURCE_STATS {
                return Ok(Some(self.source_stats()?));
            }
            if name == HISTORY {
                return Ok(Some(self.history()?));
            }
            return Ok(None);
        };
        match &rel.kind {
            RelationKind::View => {
                let def = rel.definition.clone().unwrap_or_default();
                let ctx = make_context(s.clone());
                let mut plan = ctx.state().create_logical_plan(&def).await?;
                if !s.planning_only {
                    plan = kappa_sql::as_of::to_batch(plan).map_err(df_err)?;
                }
                Ok(Some(Arc::new(ViewTable::new(plan, Some(def)))))
            }
            _ => Ok(Some(Arc::new(self.relation_table(rel)?))),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.sources.catalog.get(name).is_some()
            || WindowTable::decode(name).is_some()
            || name == VIEW_STATS
            || name == SOURCE_STATS
            || name == HISTORY
    }
}

impl KappaSchema {
    /// A window table function over a relation (see [`kappa_sql::tvf`]).
    fn window_table(&self, w: WindowTable) -> DfResult<Option<Arc<dyn TableProvider>>> {
        let Some(rel) = self.sources.catalog.get_by_id(w.relation) else {
            return Ok(None);
        };
        let input = self.relation_table(rel)?;
        let mut fields: Vec<Field> = input
            .schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        let t = fields[w.time_col].data_type().clone();
        fields.push(Field::new("window_start", t.clone(), false));
        fields.push(Field::new("window_end", t, false));
        Ok(Some(Arc::new(WindowProvider {
            schema: Arc::new(Schema::new(fields)),
            input,
            window: w,
        })))
    }

    fn relation_table(&self, rel: &kappa_sql::catalog::Relation) -> DfResult<RelationTable> {
        let s = &self.sources;
        let name = &rel.name;
        let kind = &rel.kind;
        let data = if s.planning_only {
            Data::None
        } else if let RelationKind::Source { .. } = kind {
            Data::Unreadable(format!(
                "source \"{name}\" keeps no contents to query; create a materialized view over it"
            ))
        } else if let RelationKind::Sink { .. } = kind {
            Data::Unreadable(format!(
                "sink \"{name}\" keeps no contents to query; query the relation it writes"
            ))
        } else if matches!(kind, RelationKind::Table { .. }) && s.reads == TableReads::Latest {
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
        Ok(RelationTable {
            schema,
            data,
            table_type: if matches!(kind, RelationKind::Table { .. }) {
                TableType::Base
            } else {
                TableType::View
            },
        })
    }
}

enum Data {
    None,
    /// Scanning fails with this message (sources keep no contents).
    Unreadable(String),
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

impl RelationTable {
    fn batches(&self) -> DfResult<Vec<RecordBatch>> {
        Ok(match &self.data {
            Data::None => {
                return Err(df_err(KappaError::internal(
                    "planning-only relation was scanned",
                )));
            }
            Data::Unreadable(msg) => return Err(df_err(KappaError::not_supported(msg.clone()))),
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
        })
    }
}

/// A window table function over a relation, for ad-hoc queries: the relation's rows
/// expanded by the same window assignment the streaming operator uses.
struct WindowProvider {
    schema: SchemaRef,
    input: RelationTable,
    window: WindowTable,
}

impl std::fmt::Debug for WindowProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WindowProvider({})", self.window.window)
    }
}

#[async_trait]
impl TableProvider for WindowProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let batches = self
            .window
            .window
            .expand_all(
                &self.input.batches()?,
                self.window.time_col,
                self.schema.clone(),
            )
            .map_err(df_err)?;
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            self.schema.clone(),
            projection.cloned(),
        )?)
    }
}

/// Whether equal values of this type always have equal row-format encodings, so that a
/// lookup by encoded prefix finds exactly the SQL-equal rows. Not floats: -0.0 = 0.0 and
/// NaN compare differently bytewise.
fn bytewise_equality(t: &DataType) -> bool {
    use DataType as D;
    matches!(
        t,
        D::Int8
            | D::Int16
            | D::Int32
            | D::Int64
            | D::UInt8
            | D::UInt16
            | D::UInt32
            | D::UInt64
            | D::Utf8
            | D::LargeUtf8
            | D::Boolean
            | D::Date32
            | D::Date64
            | D::Timestamp(..)
            | D::Decimal128(..)
    )
}

impl RelationTable {
    /// `column = literal` (either way round) on a column that can be looked up: the
    /// column's index and the literal as a value of the column's type. A literal that does
    /// not survive the conversion unchanged is not used.
    fn equality(&self, e: &Expr) -> Option<(usize, ScalarValue)> {
        let Expr::BinaryExpr(b) = e else {
            return None;
        };
        if b.op != Operator::Eq {
            return None;
        }
        let (col, value) = match (b.left.as_ref(), b.right.as_ref()) {
            (Expr::Column(c), Expr::Literal(v, _)) | (Expr::Literal(v, _), Expr::Column(c)) => {
                (c, v)
            }
            _ => return None,
        };
        let i = self.schema.index_of(&col.name).ok()?;
        let t = self.schema.field(i).data_type();
        if !bytewise_equality(t) || value.is_null() {
            return None;
        }
        let cast = value.cast_to(t).ok()?;
        (cast.cast_to(&value.data_type()).ok()? == *value).then_some((i, cast))
    }

    /// The values the filters fix for the relation's leading columns (first, second, … up
    /// to the first column they leave free), as one-row arrays.
    fn leading_values(&self, filters: &[Expr]) -> Vec<ArrayRef> {
        let mut fixed: std::collections::HashMap<usize, ScalarValue> = Default::default();
        for f in filters {
            for e in datafusion::logical_expr::utils::split_conjunction(f) {
                if let Some((i, v)) = self.equality(e) {
                    fixed.entry(i).or_insert(v);
                }
            }
        }
        let mut out = vec![];
        for i in 0..self.schema.fields().len() {
            match fixed.get(&i).map(|v| v.to_array_of_size(1)) {
                Some(Ok(a)) => out.push(a),
                _ => break,
            }
        }
        out
    }

    /// The rows whose leading columns hold `leading`, by a range scan of the contents'
    /// ordered rows; `None` when the contents can only be scanned whole.
    fn lookup(&self, leading: &[ArrayRef]) -> DfResult<Option<Vec<RecordBatch>>> {
        let size = kappa_runtime::READ_BATCH_SIZE;
        match &self.data {
            Data::Committed(snap) if snap.failure.is_none() => {
                snap.data.lookup(leading, size).transpose().map_err(df_err)
            }
            Data::Latest(t) => t
                .latest()
                .and_then(|s| s.lookup(leading, size))
                .map(Some)
                .map_err(df_err),
            _ => Ok(None),
        }
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

    /// Equality on a column is used to look rows up (see [`RelationTable::scan`]);
    /// DataFusion still applies every filter to what the scan returns. Not when planning a
    /// materialized view: its plan's scans are streams, which filters belong above.
    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        let planning = matches!(self.data, Data::None);
        Ok(filters
            .iter()
            .map(|f| match self.equality(f) {
                Some(_) if !planning => TableProviderFilterPushDown::Inexact,
                _ => TableProviderFilterPushDown::Unsupported,
            })
            .collect())
    }

    /// Reads the relation at its version. When the filters fix its leading columns (a
    /// view's group keys, a table's first columns), only the rows with those values are
    /// read, found by a range scan of the ordered contents: a point lookup does not scan.
    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let leading = self.leading_values(filters);
        let found = if leading.is_empty() {
            None
        } else {
            self.lookup(&leading)?
        };
        let batches = match found {
            Some(b) => b,
            None => self.batches()?,
        };
        let schema = Arc::new(Schema::new(self.schema.fields().clone()));
        Ok(MemorySourceConfig::try_new_exec(
            &[batches],
            schema,
            projection.cloned(),
        )?)
    }
}

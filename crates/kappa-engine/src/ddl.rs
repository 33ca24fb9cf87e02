//! CREATE TABLE, CREATE [MATERIALIZED] VIEW, DROP.

use std::sync::Arc;

use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::sql::sqlparser::ast::{
    ColumnOption, CreateTable, CreateTableOptions, CreateView, ObjectType, Statement,
    TableConstraint,
};
use kappa_common::{KappaError, RelationId, Result, SqlState};
use kappa_sql::catalog::{Relation, RelationKind, WatermarkDef};
use kappa_sql::parse::{normalize_ident, object_name};

use kappa_sql::ScanSource;
use kappa_sql::tvf::WindowTable;

use crate::context::{TableReads, plan_statement, session_context};
use crate::{Engine, Output, types};

/// Executes a DDL statement; `sql` is its text, recorded in the history when it changes
/// the engine.
pub(crate) async fn execute(engine: &Engine, stmt: Statement, sql: &str) -> Result<Output> {
    match stmt {
        Statement::CreateTable(ct) => create_table(engine, ct, sql).await,
        Statement::CreateView(cv) => create_view(engine, cv, sql).await,
        Statement::Drop {
            object_type,
            if_exists,
            names,
            cascade,
            ..
        } => drop(engine, object_type, if_exists, names, cascade, sql).await,
        _ => Err(KappaError::internal("not a DDL statement")),
    }
}

async fn create_table(engine: &Engine, ct: CreateTable, sql: &str) -> Result<Output> {
    let name = object_name(&ct.name)?;
    if engine.catalog().get(&name).is_some() {
        if ct.if_not_exists {
            return Ok(Output::command("CREATE TABLE"));
        }
        return Err(KappaError::user(
            SqlState::DUPLICATE_TABLE,
            format!("relation \"{name}\" already exists"),
        ));
    }
    if ct.query.is_some() {
        return Err(KappaError::not_supported("CREATE TABLE … AS SELECT"));
    }
    if ct.columns.is_empty() {
        return Err(KappaError::user(
            SqlState::INVALID_TABLE_DEFINITION,
            "a table needs at least one column",
        ));
    }
    let mut fields = Vec::with_capacity(ct.columns.len());
    let mut names: Vec<String> = Vec::new();
    let mut pk: Option<Vec<usize>> = None;
    let set_pk = |pk: &mut Option<Vec<usize>>, cols: Vec<usize>| -> Result<()> {
        if pk.is_some() {
            return Err(KappaError::user(
                SqlState::INVALID_TABLE_DEFINITION,
                "multiple primary keys are not allowed",
            ));
        }
        *pk = Some(cols);
        Ok(())
    };
    for (i, col) in ct.columns.iter().enumerate() {
        let cname = normalize_ident(&col.name);
        if names.contains(&cname) {
            return Err(KappaError::user(
                SqlState::DUPLICATE_COLUMN,
                format!("column \"{cname}\" specified more than once"),
            ));
        }
        let ty = types::arrow_type(&col.data_type)?;
        let mut nullable = true;
        for opt in &col.options {
            match &opt.option {
                ColumnOption::Null => {}
                ColumnOption::NotNull => nullable = false,
                ColumnOption::PrimaryKey(_) => {
                    nullable = false;
                    set_pk(&mut pk, vec![i])?;
                }
                other => {
                    return Err(KappaError::not_supported(format!(
                        "the column option {other}"
                    )));
                }
            }
        }
        names.push(cname.clone());
        fields.push((cname, ty, nullable));
    }
    for c in &ct.constraints {
        match c {
            TableConstraint::PrimaryKey(p) => {
                let mut cols = vec![];
                for ic in &p.columns {
                    let cname = ic.column.expr.to_string();
                    let cname = crate::fold(&cname);
                    let idx = names.iter().position(|n| *n == cname).ok_or_else(|| {
                        KappaError::user(
                            SqlState::UNDEFINED_COLUMN,
                            format!("column \"{cname}\" named in key does not exist"),
                        )
                    })?;
                    fields[idx].2 = false;
                    cols.push(idx);
                }
                set_pk(&mut pk, cols)?;
            }
            other => {
                return Err(KappaError::not_supported(format!(
                    "the table constraint {other}"
                )));
            }
        }
    }
    let schema = Arc::new(Schema::new(
        fields
            .into_iter()
            .map(|(n, t, nullable)| Field::new(n, t, nullable))
            .collect::<Vec<_>>(),
    ));
    let opts = TableOptions::from_sql(&ct.table_options)?;
    let watermark = match &opts.watermark {
        Some((col, expr)) => Some(watermark_def(&schema, col, expr)?),
        None => None,
    };
    let mut catalog = engine.catalog().as_ref().clone();
    let id = catalog.next_id();
    let (kind, tag) = if opts.source {
        if pk.is_some() {
            return Err(KappaError::not_supported(
                "a PRIMARY KEY on a source (sources are append-only streams)",
            ));
        }
        let (connector, envelope) =
            crate::source::start_source(engine, sql, id, &schema, &opts, watermark.as_ref())?;
        (
            RelationKind::Source {
                connector,
                envelope,
            },
            "CREATE SOURCE",
        )
    } else {
        if let Some(k) = opts.with.keys().next() {
            return Err(KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                format!(
                    "unknown table option \"{k}\" (tables take idle_timeout; connectors are for CREATE SOURCE)"
                ),
            ));
        }
        let wm = watermark
            .as_ref()
            .map(|w| (w.0.column, w.1.clone(), opts.idle_timeout));
        engine
            .runtime()
            .create_table(sql, id, &name, schema.clone(), pk.clone(), wm)?;
        (RelationKind::Table { primary_key: pk }, "CREATE TABLE")
    };
    engine.barrier().await?;
    catalog.insert(Relation {
        id,
        name,
        kind,
        schema,
        definition: None,
        depends_on: vec![],
        plan_text: None,
        watermark: watermark.map(|w| w.0),
    })?;
    engine.set_catalog(catalog);
    Ok(Output::command(tag))
}

/// The options of CREATE TABLE / CREATE SOURCE: Kappa's own (watermark, source marker,
/// idle timeout) taken out, the connector's left in `with`.
pub(crate) struct TableOptions {
    pub source: bool,
    pub watermark: Option<(String, datafusion::sql::sqlparser::ast::Expr)>,
    pub idle_timeout: Option<std::time::Duration>,
    /// Remaining `key = value` options, keys lower-cased, values as text.
    pub with: std::collections::BTreeMap<String, String>,
}

impl TableOptions {
    fn from_sql(opts: &CreateTableOptions) -> Result<Self> {
        use datafusion::sql::sqlparser::ast::{Expr, SqlOption, Value};
        let mut out = TableOptions {
            source: false,
            watermark: None,
            idle_timeout: Some(std::time::Duration::from_secs(10)),
            with: Default::default(),
        };
        let list = match opts {
            CreateTableOptions::None => return Ok(out),
            CreateTableOptions::With(v) => v,
            other => return Err(KappaError::not_supported(format!("table options {other}"))),
        };
        for o in list {
            let SqlOption::KeyValue { key, value } = o else {
                return Err(KappaError::not_supported(format!("the table option {o}")));
            };
            let k = key.value.to_lowercase();
            match k.as_str() {
                kappa_sql::parse::SOURCE_OPTION => out.source = true,
                kappa_sql::parse::WATERMARK_OPTION => {
                    if let Expr::Tuple(parts) = value
                        && let [Expr::Identifier(col), expr] = parts.as_slice()
                    {
                        out.watermark = Some((normalize_ident(col), expr.clone()));
                    }
                }
                _ => {
                    let text = match value {
                        Expr::Value(v) => match &v.value {
                            Value::SingleQuotedString(s) => s.clone(),
                            Value::Number(n, _) => n.clone(),
                            Value::Boolean(b) => b.to_string(),
                            other => other.to_string(),
                        },
                        Expr::Identifier(i) => i.value.clone(),
                        other => other.to_string(),
                    };
                    if k == "idle_timeout" {
                        let iv = datafusion::arrow::compute::kernels::cast_utils::parse_interval_month_day_nano(&text)
                            .map_err(|e| KappaError::user(SqlState::INVALID_PARAMETER_VALUE, format!("invalid idle_timeout '{text}': {e}")))?;
                        let micros = iv.days as i64 * 86_400_000_000 + iv.nanoseconds / 1000;
                        if iv.months != 0 || micros < 0 {
                            return Err(KappaError::user(
                                SqlState::INVALID_PARAMETER_VALUE,
                                format!("invalid idle_timeout '{text}'"),
                            ));
                        }
                        out.idle_timeout =
                            (micros > 0).then(|| std::time::Duration::from_micros(micros as u64));
                    } else {
                        out.with.insert(k, text);
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Checks a `WATERMARK FOR col AS expr` against the table's schema and plans `expr`.
fn watermark_def(
    schema: &datafusion::arrow::datatypes::SchemaRef,
    col: &str,
    expr: &datafusion::sql::sqlparser::ast::Expr,
) -> Result<(WatermarkDef, datafusion::logical_expr::Expr)> {
    use datafusion::arrow::datatypes::{DataType, TimeUnit};
    let column = schema.index_of(col).map_err(|_| {
        KappaError::user(
            SqlState::UNDEFINED_COLUMN,
            format!("column \"{col}\" named in WATERMARK FOR does not exist"),
        )
    })?;
    if !matches!(
        schema.field(column).data_type(),
        DataType::Timestamp(TimeUnit::Microsecond, _)
    ) {
        return Err(KappaError::user(
            SqlState::DATATYPE_MISMATCH,
            format!(
                "the WATERMARK column \"{col}\" must be a TIMESTAMP, not {}",
                schema.field(column).data_type()
            ),
        ));
    }
    let df = datafusion::common::DFSchema::try_from(schema.as_ref().clone())?;
    let ctx = datafusion::prelude::SessionContext::new();
    let text = expr.to_string();
    let logical = ctx.parse_sql_expr(&text, &df)?;
    let coerced = ctx.create_physical_expr(logical.clone(), &df)?;
    let t = coerced.data_type(schema.as_ref())?;
    if !matches!(t, DataType::Timestamp(..)) {
        return Err(KappaError::user(
            SqlState::DATATYPE_MISMATCH,
            format!("the WATERMARK expression {text} must be a timestamp, not {t}"),
        ));
    }
    if logical.is_volatile() {
        return Err(KappaError::user(
            SqlState::INVALID_PARAMETER_VALUE,
            format!("the WATERMARK expression {text} must not be volatile"),
        ));
    }
    Ok((WatermarkDef { column, expr: text }, logical))
}

/// Relations a query names directly (views are not expanded), by id.
fn direct_dependencies(
    engine: &Engine,
    query: &datafusion::sql::sqlparser::ast::Query,
) -> Result<Vec<RelationId>> {
    let stmt = datafusion::sql::parser::Statement::Statement(Box::new(Statement::Query(Box::new(
        query.clone(),
    ))));
    let (tables, _ctes) = datafusion::sql::resolve::resolve_table_references(&stmt, true)?;
    let cat = engine.catalog();
    let mut out = vec![];
    for t in tables {
        let r = match WindowTable::decode(t.table()) {
            Some(w) => cat.get_by_id(w.relation),
            None => cat.get(t.table()),
        };
        if let Some(r) = r
            && !out.contains(&r.id)
        {
            out.push(r.id);
        }
    }
    Ok(out)
}

/// A planning context over one commit, and that commit's catalog: the names a plan
/// resolves and the relations it reads come from the same epoch.
fn planning_context(
    engine: &Engine,
) -> (
    Arc<kappa_sql::catalog::Catalog>,
    datafusion::prelude::SessionContext,
) {
    let commit = engine.runtime().committed();
    let catalog = commit.catalog.clone();
    let ctx = session_context(
        catalog.clone(),
        commit,
        engine.runtime().clone(),
        TableReads::Committed,
        true,
    );
    (catalog, ctx)
}

/// `EXPLAIN CREATE MATERIALIZED VIEW …`: the streaming plan, without creating anything.
pub(crate) async fn explain_create(engine: &Engine, cv: CreateView) -> Result<Output> {
    if !cv.materialized {
        return Err(KappaError::not_supported("EXPLAIN CREATE VIEW"));
    }
    let name = object_name(&cv.name)?;
    let (catalog, ctx) = planning_context(engine);
    let eowc = view_options(&cv.options)?.emit_on_window_close;
    let plan = plan_statement(&ctx, Statement::Query(cv.query)).await?;
    let graph = lower(&ctx, &catalog, &plan, 0, &name, eowc)?;
    Ok(crate::plan_rows(&graph.to_string()))
}

fn lower(
    ctx: &datafusion::prelude::SessionContext,
    catalog: &kappa_sql::catalog::Catalog,
    plan: &datafusion::logical_expr::LogicalPlan,
    id: RelationId,
    name: &str,
    emit_on_window_close: bool,
) -> Result<kappa_plan::StreamGraph> {
    let optimized = ctx.state().optimize(plan)?;
    let resolve = |t: &datafusion::common::TableReference| -> Result<ScanSource> {
        let window = WindowTable::decode(t.table());
        let rel = match &window {
            Some(w) => catalog.get_by_id(w.relation),
            None => catalog.get(t.table()),
        };
        rel.filter(|r| !matches!(r.kind, RelationKind::View))
            .map(|r| ScanSource {
                relation: r.id,
                name: r.name.clone(),
                watermark_col: r.watermark.as_ref().map(|w| w.column),
                window,
                append_only: r.envelope().is_append_only(),
            })
            .ok_or_else(|| KappaError::internal(format!("unresolved relation {t}")))
    };
    kappa_sql::lower_to_stream_graph(&optimized, &resolve, (id, name), emit_on_window_close)
}

/// A query (SQL text) planned as a streaming graph with sink `id` named `name`, over the
/// current catalog, and its result schema: what `SUBSCRIBE (query)` runs.
pub(crate) async fn plan_query_graph(
    engine: &Engine,
    sql: &str,
    id: RelationId,
    name: &str,
) -> Result<(
    datafusion::arrow::datatypes::SchemaRef,
    kappa_plan::StreamGraph,
)> {
    let mut stmts = kappa_sql::parse::parse_statements(sql)?;
    let mut query = match (stmts.pop(), stmts.is_empty()) {
        (Some(Statement::Query(q)), true) => q,
        _ => {
            return Err(KappaError::user(
                SqlState::SYNTAX_ERROR,
                "SUBSCRIBE ( … ) takes one SELECT query",
            ));
        }
    };
    let (catalog, ctx) = planning_context(engine);
    kappa_sql::tvf::rewrite_window_tvfs(&mut query, &catalog)?;
    kappa_sql::as_of::rewrite_temporal_joins(&mut query, &catalog)?;
    let plan = plan_statement(&ctx, Statement::Query(query)).await?;
    let schema = Arc::new(plan.schema().as_arrow().clone());
    let graph = lower(&ctx, &catalog, &plan, id, name, false)?;
    Ok((schema, graph))
}

/// The options of CREATE MATERIALIZED VIEW: whether it emits on window close.
/// A view's options: `EMIT ON WINDOW CLOSE` (parsed into an option) and
/// `parallelism = n`.
struct ViewOptions {
    emit_on_window_close: bool,
    parallelism: Option<usize>,
}

/// Most shards a view may ask for.
const MAX_PARALLELISM: usize = 256;

fn view_options(opts: &CreateTableOptions) -> Result<ViewOptions> {
    use datafusion::sql::sqlparser::ast::{Expr as SqlExpr, SqlOption, Value};
    let mut out = ViewOptions {
        emit_on_window_close: false,
        parallelism: None,
    };
    let list = match opts {
        CreateTableOptions::None => return Ok(out),
        CreateTableOptions::With(v) => v,
        other => return Err(KappaError::not_supported(format!("view options {other}"))),
    };
    for o in list {
        match o {
            SqlOption::KeyValue { key, .. } if key.value == kappa_sql::parse::EMIT_OPTION => {
                out.emit_on_window_close = true
            }
            SqlOption::KeyValue { key, value } if key.value.eq_ignore_ascii_case("parallelism") => {
                let n = match value {
                    SqlExpr::Value(v) => match &v.value {
                        Value::Number(n, _) => n.parse::<usize>().ok(),
                        Value::SingleQuotedString(n) => n.parse::<usize>().ok(),
                        _ => None,
                    },
                    _ => None,
                };
                match n {
                    Some(n @ 1..=MAX_PARALLELISM) => out.parallelism = Some(n),
                    _ => {
                        return Err(KappaError::user(
                            SqlState::INVALID_PARAMETER_VALUE,
                            format!(
                                "parallelism must be an integer from 1 to {MAX_PARALLELISM}, not {value}"
                            ),
                        ));
                    }
                }
            }
            other => {
                return Err(KappaError::user(
                    SqlState::INVALID_PARAMETER_VALUE,
                    format!("unknown view option {other}"),
                ));
            }
        }
    }
    Ok(out)
}

async fn create_view(engine: &Engine, cv: CreateView, sql: &str) -> Result<Output> {
    let name = object_name(&cv.name)?;
    let tag = if cv.materialized {
        "CREATE MATERIALIZED VIEW"
    } else {
        "CREATE VIEW"
    };
    if let Some(existing) = engine.catalog().get(&name) {
        if cv.if_not_exists {
            return Ok(Output::command(tag));
        }
        let _ = existing;
        if cv.or_replace {
            return Err(KappaError::not_supported("CREATE OR REPLACE of a view"));
        }
        return Err(KappaError::user(
            SqlState::DUPLICATE_TABLE,
            format!("relation \"{name}\" already exists"),
        ));
    }
    if !cv.columns.is_empty() {
        return Err(KappaError::not_supported("a column list in CREATE VIEW"));
    }
    let options = view_options(&cv.options)?;
    let eowc = options.emit_on_window_close;
    if eowc && !cv.materialized {
        return Err(KappaError::user(
            SqlState::SYNTAX_ERROR,
            "EMIT ON WINDOW CLOSE is for materialized views",
        ));
    }
    let mut query = cv.query;
    kappa_sql::tvf::rewrite_window_tvfs(&mut query, &engine.catalog())?;
    kappa_sql::as_of::rewrite_temporal_joins(&mut query, &engine.catalog())?;
    let depends_on = direct_dependencies(engine, &query)?;
    let definition = query.to_string();
    let (catalog, ctx) = planning_context(engine);
    let plan = plan_statement(&ctx, Statement::Query(query)).await?;
    let fields = plan.schema().as_arrow().fields().clone();
    let mut seen = std::collections::HashSet::new();
    for f in fields.iter() {
        if !seen.insert(f.name().clone()) {
            return Err(KappaError::user(
                SqlState::DUPLICATE_COLUMN,
                format!(
                    "column \"{}\" specified more than once; give the columns distinct names with AS",
                    f.name()
                ),
            ));
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let mut new_catalog = catalog.as_ref().clone();
    let id = new_catalog.next_id();
    let plan_text = if cv.materialized {
        let graph = lower(&ctx, &catalog, &plan, id, &name, eowc)?;
        let text = graph.to_string();
        let sql = sql.to_string();
        let parallelism = options.parallelism.unwrap_or(engine.parallelism());
        engine
            .blocking(move |rt| rt.create_view(&sql, id, graph, parallelism))
            .await?;
        Some(text)
    } else {
        engine.runtime().record_ddl(sql)?;
        None
    };
    new_catalog.insert(Relation {
        id,
        name,
        kind: if cv.materialized {
            RelationKind::MaterializedView
        } else {
            RelationKind::View
        },
        // The sink keeps DataFusion's nullability; readers see the same schema.
        schema,
        definition: Some(definition),
        depends_on,
        plan_text,
        watermark: None,
    })?;
    engine.set_catalog(new_catalog);
    Ok(Output::command(tag))
}

async fn drop(
    engine: &Engine,
    object_type: ObjectType,
    if_exists: bool,
    names: Vec<datafusion::sql::sqlparser::ast::ObjectName>,
    cascade: bool,
    sql: &str,
) -> Result<Output> {
    // The statement is recorded once, with the first change it makes to the engine.
    let mut unrecorded = Some(sql.to_string());
    let (want, tag) = match object_type {
        ObjectType::Table => ("table", "DROP TABLE"),
        ObjectType::View => ("view", "DROP VIEW"),
        ObjectType::MaterializedView => ("materialized view", "DROP MATERIALIZED VIEW"),
        other => return Err(KappaError::not_supported(format!("DROP {other}"))),
    };
    for n in names {
        let name = object_name(&n)?;
        let catalog = engine.catalog();
        let Some(rel) = catalog.get(&name) else {
            if if_exists {
                continue;
            }
            return Err(KappaError::user(
                SqlState::UNDEFINED_TABLE,
                format!("{want} \"{name}\" does not exist"),
            ));
        };
        let is_source_drop = want == "table" && matches!(rel.kind, RelationKind::Source { .. });
        if rel.kind.describe() != want && !is_source_drop {
            return Err(KappaError::user(
                SqlState::WRONG_OBJECT_TYPE,
                format!(
                    "\"{name}\" is a {}, not a {want}; use DROP {}",
                    rel.kind.describe(),
                    rel.kind.describe().to_uppercase()
                ),
            ));
        }
        let order = catalog.drop_order(&name, cascade)?;
        let mut new_catalog = catalog.as_ref().clone();
        for r in &order {
            new_catalog.remove(&r.name);
        }
        // The catalog goes first: no new statement can name a relation that is going away.
        engine.set_catalog(new_catalog);
        for r in order {
            if !matches!(r.kind, RelationKind::View) {
                let id = r.id;
                let ddl = unrecorded.take();
                engine
                    .blocking(move |rt| rt.drop_relation(ddl.as_deref(), id))
                    .await?;
            }
        }
    }
    // Only plain views (or nothing, with IF EXISTS) were dropped.
    if let Some(sql) = unrecorded {
        engine.runtime().record_ddl(&sql)?;
    }
    Ok(Output::command(tag))
}

//! Statement execution: the catalog, DDL, DML, COPY, ad-hoc queries, FLUSH and session
//! settings. The wire protocol calls in here with parsed statements and gets [`Output`]s
//! back; everything below is protocol-agnostic.
//!
//! # Consistency
//! - Each statement commits on its own; a write is applied atomically (all rows or none).
//! - A query reads one committed epoch of every relation (a consistent cut).
//! - Read-your-writes: a session's query after its own write first commits an epoch, so it
//!   sees the write in tables and in every view.

mod context;
mod copy;
mod ddl;
mod dml;
mod session;
mod sink;
mod source;
mod subscribe;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::sql::sqlparser::ast::Statement;
use kappa_common::{KappaError, Result, SqlState};
use kappa_runtime::Runtime;
use kappa_sql::catalog::Catalog;
use kappa_state::{MemStateStore, StateStore};

pub use context::TableReads;
pub use copy::{CopyFormat, CopyIn};
pub use kappa_sql::subscribe::CopyFormat as StreamCopyFormat;
pub use session::Session;
pub use subscribe::Subscription;

/// What a statement returns to the client.
pub enum Output {
    Rows {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// A command tag such as `INSERT 0 3` or `CREATE TABLE`.
    Command {
        tag: String,
        rows: Option<usize>,
    },
    /// The statement is `COPY … FROM STDIN`: the client sends data next.
    CopyIn(CopyIn),
    /// `FETCH` from a cursor: rows, with the command tag `FETCH n`.
    Fetched {
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    },
    /// `SUBSCRIBE`: rows streamed until the client goes away or the stream ends.
    Subscribe(Box<Subscription>),
    /// `COPY (SUBSCRIBE …) TO STDOUT`: the same rows as COPY data.
    CopyOut {
        subscription: Box<Subscription>,
        format: StreamCopyFormat,
    },
    TransactionStart,
    TransactionEnd(&'static str),
}

impl Output {
    fn command(tag: &str) -> Self {
        Output::Command {
            tag: tag.to_string(),
            rows: None,
        }
    }

    fn rows_affected(tag: &str, n: usize) -> Self {
        Output::Command {
            tag: tag.to_string(),
            rows: Some(n),
        }
    }
}

pub struct EngineConfig {
    /// How often the runtime commits an epoch on its own.
    pub barrier_interval: Duration,
    /// Where the history is kept; `None`: in memory only, nothing survives a restart.
    pub data_dir: Option<std::path::PathBuf>,
    /// `fsync` the history before a write is acknowledged (else a write survives the
    /// process being killed but not the machine losing power).
    pub fsync: bool,
    /// With a data directory: how often all state is checkpointed (default: every second;
    /// `None`: never, recovery then replays the whole history).
    pub checkpoint_interval: Option<Duration>,
    /// With a data directory: keep state tables on disk and use about this much memory for
    /// them (RocksDB's cache and write buffers get half, the changes not yet checkpointed
    /// the other half). `None`: state tables are kept in memory whole.
    pub state_memory: Option<u64>,
    /// How many shards a materialized view's keyed operators (aggregates, joins, top-N,
    /// windows) run in unless its `WITH (parallelism = n)` says otherwise (default: the
    /// machine's cores).
    pub parallelism: usize,
}

/// The machine's cores, as the default parallelism of views.
pub fn default_parallelism() -> usize {
    kappa_runtime::cores()
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            barrier_interval: Duration::from_millis(100),
            data_dir: None,
            fsync: true,
            checkpoint_interval: Some(Duration::from_secs(1)),
            state_memory: None,
            parallelism: default_parallelism(),
        }
    }
}

pub struct Engine {
    runtime: Arc<Runtime>,
    /// Serializes DDL so catalog changes and runtime changes happen in one order.
    ddl: tokio::sync::Mutex<()>,
    /// Shards of a view that does not choose (see [`EngineConfig::parallelism`]).
    parallelism: usize,
}

impl Engine {
    /// Starts an engine with in-memory state and its background barrier loop.
    pub fn start(config: EngineConfig) -> Arc<Self> {
        let engine = Self::new(None, &config);
        engine.spawn_barriers(config.barrier_interval);
        engine
    }

    /// Starts an engine on `config.data_dir` (in memory without one): recovers everything
    /// its history holds, then starts the barrier loop. Fails, saying why, on a data
    /// directory it cannot use.
    pub async fn open(config: EngineConfig) -> Result<Arc<Self>> {
        let Some(dir) = config.data_dir.clone() else {
            return Ok(Self::start(config));
        };
        let options = kappa_state::HistoryOptions {
            fsync: config.fsync,
            cache_bytes: config.state_memory.map(|m| m / 2),
        };
        let history =
            tokio::task::spawn_blocking(move || kappa_state::History::open(&dir, options))
                .await
                .map_err(|e| {
                    KappaError::internal(format!("opening the data directory failed: {e}"))
                })??;
        let engine = Self::new(Some(Arc::new(history)), &config);
        engine.recover().await?;
        engine.spawn_barriers(config.barrier_interval);
        Ok(engine)
    }

    fn new(history: Option<Arc<kappa_state::History>>, config: &EngineConfig) -> Arc<Self> {
        let mut checkpoints = config.checkpoint_interval;
        let store: Arc<dyn StateStore> = match (&history, config.state_memory) {
            (Some(h), Some(memory)) => {
                // Changes stay in memory until a checkpoint writes them: spilled state
                // needs checkpoints. Half the budget is RocksDB's (`cache_bytes`); a
                // quarter is for unwritten changes, as writing them briefly takes as much
                // again (RocksDB's write batch and memtable hold a copy).
                checkpoints.get_or_insert(Duration::from_secs(1));
                Arc::new(kappa_state::SpillStore::new(h.clone(), memory / 4))
            }
            (Some(h), None) => Arc::new(kappa_state::CheckpointedStore::new(h.clone())),
            (None, _) => Arc::new(MemStateStore),
        };
        let mut runtime = Runtime::new(store, history);
        if let Some(interval) = checkpoints {
            runtime = runtime.with_checkpoints(interval);
        }
        Arc::new(Self {
            runtime: Arc::new(runtime),
            ddl: tokio::sync::Mutex::new(()),
            parallelism: config.parallelism.max(1),
        })
    }

    /// Replays the history: DDL statements run again through the same code, writes and
    /// epochs are fed to the runtime by [`Runtime::recover_step`].
    async fn recover(&self) -> Result<()> {
        self.runtime.begin_recovery()?;
        loop {
            let rt = self.runtime.clone();
            let step = tokio::task::spawn_blocking(move || rt.recover_step())
                .await
                .map_err(|e| KappaError::internal(format!("recovery task failed: {e}")))??;
            let Some(sql) = step else { break };
            if let Some(cmd) = kappa_sql::sink::parse_sink_command(&sql) {
                let _ddl = self.ddl.lock().await;
                sink::execute(self, cmd?, &sql).await.map_err(|e| {
                    KappaError::user(
                        e.sqlstate(),
                        format!("recovery failed replaying `{sql}`: {e}"),
                    )
                })?;
                continue;
            }
            let mut stmts = kappa_sql::parse::parse_recorded(&sql)?;
            let stmt = match (stmts.pop(), stmts.is_empty()) {
                (Some(s), true) => s,
                _ => {
                    return Err(KappaError::user(
                        SqlState::DATA_CORRUPTED,
                        format!("the history holds a DDL record that is not one statement: {sql}"),
                    ));
                }
            };
            let _ddl = self.ddl.lock().await;
            ddl::execute(self, stmt, &sql).await.map_err(|e| {
                KappaError::user(
                    e.sqlstate(),
                    format!("recovery failed replaying `{sql}`: {e}"),
                )
            })?;
        }
        let stats = self.runtime.finish_recovery()?;
        // Writes after the last recorded epoch become visible now.
        self.barrier().await?;
        tracing::info!(
            ddl = stats.ddl,
            writes = stats.writes,
            epochs = stats.epochs,
            seconds = stats.seconds,
            "recovered from the history"
        );
        Ok(())
    }

    /// The background barrier loop. It holds the engine weakly: it ends with the engine.
    fn spawn_barriers(self: &Arc<Self>, interval: Duration) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let Some(engine) = weak.upgrade() else { break };
                // While a source has more rows ready, the next epoch starts at once: a
                // source's throughput is not capped at one poll per interval.
                if !engine.runtime.sources_have_more() {
                    drop(engine);
                    tick.tick().await;
                    let Some(e) = weak.upgrade() else { break };
                    if let Err(e) = e.barrier().await {
                        tracing::error!(error = %e, "barrier failed");
                    }
                    continue;
                }
                if let Err(e) = engine.barrier().await {
                    tracing::error!(error = %e, "barrier failed");
                }
            }
        });
    }

    /// The catalog of the last commit.
    pub fn catalog(&self) -> Arc<Catalog> {
        self.runtime.committed().catalog.clone()
    }

    /// Publishes `c` as the catalog (in the current commit; DDL holds its lock).
    fn set_catalog(&self, c: Catalog) {
        self.runtime.set_catalog(c);
    }

    /// Shards of a view that does not choose.
    pub fn parallelism(&self) -> usize {
        self.parallelism
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Commits an epoch and returns when every view has caught up with every write that
    /// finished before the call.
    pub async fn barrier(&self) -> Result<u64> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || rt.barrier())
            .await
            .map_err(|e| KappaError::internal(format!("barrier task failed: {e}")))?
    }

    /// Runs blocking runtime work (backfills, drops) off the async worker threads.
    pub(crate) async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Runtime) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let rt = self.runtime.clone();
        tokio::task::spawn_blocking(move || f(&rt))
            .await
            .map_err(|e| KappaError::internal(format!("runtime task failed: {e}")))?
    }

    /// A DataFusion context over the current catalog.
    pub fn context(&self, reads: TableReads) -> datafusion::prelude::SessionContext {
        // One commit: its catalog names exactly the relations its snapshots hold.
        let commit = self.runtime.committed();
        context::session_context(
            commit.catalog.clone(),
            commit,
            self.runtime.clone(),
            reads,
            false,
        )
    }

    /// Executes one statement. `sql` is Kappa's own command syntax when it is one of the
    /// extensions (FLUSH, SHOW MATERIALIZED VIEWS, …), else the parsed statement is used.
    pub async fn execute(&self, session: &Session, stmt: Statement) -> Result<Output> {
        use Statement as S;
        let out = match stmt {
            S::Explain { statement, .. } if matches!(*statement, S::CreateView(_)) => {
                let S::CreateView(cv) = *statement else {
                    return Err(KappaError::internal("not a CREATE VIEW"));
                };
                ddl::explain_create(self, cv).await
            }
            S::Query(_) | S::Explain { .. } => self.query(session, stmt).await,
            S::Insert(_) | S::Update(_) | S::Delete(_) => {
                let out = self.dml(stmt).await;
                if out.is_ok() {
                    session.wrote();
                }
                out
            }
            S::Copy { .. } => copy::start(self, stmt),
            S::CreateTable(_) | S::CreateView(_) | S::Drop { .. } => {
                let _ddl = self.ddl.lock().await;
                let sql = stmt.to_string();
                ddl::execute(self, stmt, &sql).await
            }
            S::StartTransaction { .. } => {
                session.begin();
                Ok(Output::TransactionStart)
            }
            S::Commit { .. } => {
                session.end();
                Ok(Output::TransactionEnd("COMMIT"))
            }
            S::Rollback { .. } => session
                .rollback()
                .map(|_| Output::TransactionEnd("ROLLBACK")),
            S::Set(set) => session.set(set),
            // Connection poolers reset sessions with DISCARD ALL; Kappa sessions hold only
            // settings, which it clears.
            S::Discard { .. } => {
                session.reset();
                Ok(Output::command("DISCARD ALL"))
            }
            S::ShowVariable { variable } => session.show(&variable),
            S::ShowTables { .. } => self.show_relations(&["table"]),
            S::ShowViews { materialized, .. } => {
                if materialized {
                    self.show_relations(&["materialized view"])
                } else {
                    self.show_relations(&["view"])
                }
            }
            S::ExplainTable { table_name, .. } => {
                self.describe(&kappa_sql::parse::object_name(&table_name)?)
            }
            other => Err(KappaError::not_supported(format!(
                "the statement {}",
                statement_keyword(&other)
            ))),
        }?;
        Ok(out)
    }

    /// Runs a Kappa command that is not standard SQL, if `sql` is one. Returns `None` for
    /// anything else.
    pub async fn execute_extension(&self, session: &Session, sql: &str) -> Option<Result<Output>> {
        if let Some(cmd) = kappa_sql::sink::parse_sink_command(sql) {
            // The snapshot a new sink starts with holds the session's own writes.
            if session.take_unflushed_writes()
                && let Err(e) = self.barrier().await
            {
                return Some(Err(e));
            }
            let _ddl = self.ddl.lock().await;
            return Some(match cmd {
                Ok(cmd) => sink::execute(self, cmd, sql).await,
                Err(e) => Err(e),
            });
        }
        if let Some(cmd) = kappa_sql::subscribe::parse_stream_command(sql) {
            return Some(match cmd {
                Ok(cmd) => self.stream_command(session, cmd).await,
                Err(e) => Err(e),
            });
        }
        let words: Vec<String> = sql
            .trim()
            .trim_end_matches(';')
            .split_whitespace()
            .map(|w| w.to_string())
            .collect();
        let upper: Vec<String> = words.iter().map(|w| w.to_uppercase()).collect();
        let u: Vec<&str> = upper.iter().map(|s| s.as_str()).collect();
        Some(match u.as_slice() {
            ["FLUSH"] => self.barrier().await.map(|_| Output::command("FLUSH")),
            ["SHOW", "MATERIALIZED", "VIEWS"] => self.show_relations(&["materialized view"]),
            ["SHOW", "VIEWS"] => self.show_relations(&["view"]),
            ["SHOW", "TABLES"] => self.show_relations(&["table"]),
            ["SHOW", "RELATIONS"] => self.show_relations(&["table", "materialized view", "view"]),
            ["EXPLAIN", "MATERIALIZED", "VIEW", _] => self.explain_view(&words[3]),
            ["DESCRIBE", _] | ["DESC", _] => self.describe(&fold(&words[1])),
            ["SHOW", "COLUMNS", "FROM", _] => self.describe(&fold(&words[3])),
            _ => {
                let _ = session;
                return None;
            }
        })
    }

    async fn stream_command(
        &self,
        session: &Session,
        cmd: kappa_sql::subscribe::StreamCommand,
    ) -> Result<Output> {
        use kappa_sql::subscribe::StreamCommand as C;
        match cmd {
            C::Subscribe(s) => Ok(Output::Subscribe(Box::new(
                self.subscribe(session, &s).await?,
            ))),
            C::CopyOut { subscribe, format } => Ok(Output::CopyOut {
                subscription: Box::new(self.subscribe(session, &subscribe).await?),
                format,
            }),
            C::Declare { cursor, subscribe } => {
                // Checked before subscribing too: a duplicate name must not start a stream.
                if session.cursor(&cursor).is_ok() {
                    return Err(KappaError::user(
                        SqlState::DUPLICATE_CURSOR,
                        format!("cursor \"{cursor}\" already exists"),
                    ));
                }
                let sub = self.subscribe(session, &subscribe).await?;
                session.declare(&cursor, sub)?;
                Ok(Output::command("DECLARE CURSOR"))
            }
            C::Fetch(f) => {
                let cursor = session.cursor(&f.cursor)?;
                let batches = cursor
                    .subscription
                    .lock()
                    .await
                    .fetch(f.count, f.timeout)
                    .await?;
                Ok(Output::Fetched {
                    schema: cursor.schema,
                    batches,
                })
            }
            C::Close(name) => session
                .close(name.as_deref())
                .map(|()| Output::command("CLOSE CURSOR")),
        }
    }

    /// The result columns of a change-stream command (`Some(None)`: it returns none), without
    /// running it; `None` if `sql` is not one.
    pub async fn describe_extension(
        &self,
        session: &Session,
        sql: &str,
    ) -> Option<Result<Option<SchemaRef>>> {
        use kappa_sql::subscribe::StreamCommand as C;
        let cmd = match kappa_sql::subscribe::parse_stream_command(sql)? {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        Some(match cmd {
            C::Subscribe(s) => self.subscribe_schema(&s).await.map(Some),
            C::Fetch(f) => session.cursor(&f.cursor).map(|c| Some(c.schema)),
            C::Declare { .. } | C::Close(_) | C::CopyOut { .. } => Ok(None),
        })
    }

    async fn query(&self, session: &Session, stmt: Statement) -> Result<Output> {
        if session.take_unflushed_writes() {
            self.barrier().await?;
        }
        let ctx = self.context(TableReads::Committed);
        let plan = context::plan_statement(&ctx, stmt).await?;
        if matches!(
            plan,
            datafusion::logical_expr::LogicalPlan::Ddl(_)
                | datafusion::logical_expr::LogicalPlan::Dml(_)
                | datafusion::logical_expr::LogicalPlan::Statement(_)
        ) {
            return Err(KappaError::not_supported(format!("{}", plan.display())));
        }
        let df = ctx.execute_logical_plan(plan).await?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let batches = df.collect().await?;
        Ok(Output::Rows { schema, batches })
    }

    /// The result columns a statement would return, without running it (for Describe in
    /// the extended protocol). `None` for statements that return no rows.
    pub async fn describe_statement(
        &self,
        stmt: &Statement,
    ) -> Result<(
        Option<SchemaRef>,
        Vec<Option<datafusion::arrow::datatypes::DataType>>,
    )> {
        match stmt {
            Statement::Query(_) | Statement::Explain { .. } => {
                let ctx = self.context(TableReads::Committed);
                let plan = context::plan_statement(&ctx, stmt.clone()).await?;
                let params = plan.get_parameter_types()?;
                let mut types = vec![];
                for i in 1..=params.len() {
                    types.push(params.get(&format!("${i}")).cloned().flatten());
                }
                Ok((Some(Arc::new(plan.schema().as_arrow().clone())), types))
            }
            Statement::ShowTables { .. }
            | Statement::ShowViews { .. }
            | Statement::ExplainTable { .. }
            | Statement::ShowVariable { .. } => Ok((None, vec![])),
            Statement::Insert(_) | Statement::Update(_) | Statement::Delete(_) => Ok((
                None,
                dml::parameter_types(self, stmt).await.unwrap_or_default(),
            )),
            _ => Ok((None, vec![])),
        }
    }

    fn show_relations(&self, kinds: &[&str]) -> Result<Output> {
        use datafusion::arrow::array::StringArray;
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let cat = self.catalog();
        let rels: Vec<_> = cat
            .relations()
            .filter(|r| kinds.contains(&r.kind.describe()))
            .collect();
        let schema = Arc::new(Schema::new(vec![
            Field::new("name", DataType::Utf8, false),
            Field::new("kind", DataType::Utf8, false),
        ]));
        let names: StringArray = rels.iter().map(|r| Some(r.name.clone())).collect();
        let kinds: StringArray = rels.iter().map(|r| Some(r.kind.describe())).collect();
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(names), Arc::new(kinds)])?;
        Ok(Output::Rows {
            schema,
            batches: vec![batch],
        })
    }

    fn describe(&self, name: &str) -> Result<Output> {
        use datafusion::arrow::array::StringArray;
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let cat = self.catalog();
        let rel = cat.require(name)?;
        let pk = match &rel.kind {
            kappa_sql::catalog::RelationKind::Table { primary_key } => primary_key.clone(),
            _ => None,
        };
        let schema = Arc::new(Schema::new(vec![
            Field::new("column_name", DataType::Utf8, false),
            Field::new("data_type", DataType::Utf8, false),
            Field::new("is_nullable", DataType::Utf8, false),
            Field::new("primary_key", DataType::Utf8, false),
        ]));
        let f = rel.schema.fields();
        let names: StringArray = f.iter().map(|f| Some(f.name().clone())).collect();
        let types: StringArray = f
            .iter()
            .map(|f| Some(types::pg_type_name(f.data_type())))
            .collect();
        let nulls: StringArray = f
            .iter()
            .map(|f| Some(if f.is_nullable() { "YES" } else { "NO" }))
            .collect();
        let pks: StringArray = (0..f.len())
            .map(|i| {
                Some(if pk.as_ref().is_some_and(|p| p.contains(&i)) {
                    "YES"
                } else {
                    "NO"
                })
            })
            .collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(names),
                Arc::new(types),
                Arc::new(nulls),
                Arc::new(pks),
            ],
        )?;
        Ok(Output::Rows {
            schema,
            batches: vec![batch],
        })
    }

    fn explain_view(&self, name: &str) -> Result<Output> {
        let cat = self.catalog();
        let name = fold(name);
        let rel = cat.require(&name)?;
        let text = rel.plan_text.clone().ok_or_else(|| {
            KappaError::user(
                SqlState::WRONG_OBJECT_TYPE,
                format!(
                    "\"{name}\" is a {}, not a materialized view",
                    rel.kind.describe()
                ),
            )
        })?;
        Ok(plan_rows(&text))
    }
}

/// Waits until a write is durable, until the views have caught up with a large backlog on
/// its table, and until checkpoints have written enough spilled state to disk
/// (back-pressure): it is acknowledged to the client only then.
pub(crate) async fn acknowledge(
    runtime: &Runtime,
    commit: kappa_runtime::WriteAck,
    table: &kappa_runtime::Table,
) -> Result<()> {
    if commit.waits() {
        tokio::task::spawn_blocking(move || commit.durable())
            .await
            .map_err(|e| KappaError::internal(format!("waiting for the disk failed: {e}")))??;
    }
    table.settled().await?;
    runtime.state_settled().await
}

/// A plan as rows of one text column, as EXPLAIN returns it.
pub(crate) fn plan_rows(text: &str) -> Output {
    use datafusion::arrow::array::StringArray;
    use datafusion::arrow::datatypes::{DataType, Field, Schema};
    let schema = Arc::new(Schema::new(vec![Field::new(
        "QUERY PLAN",
        DataType::Utf8,
        false,
    )]));
    let lines: StringArray = text.lines().map(Some).collect();
    match RecordBatch::try_new(schema.clone(), vec![Arc::new(lines)]) {
        Ok(b) => Output::Rows {
            schema,
            batches: vec![b],
        },
        Err(_) => Output::command("EXPLAIN"),
    }
}

/// PostgreSQL's identifier folding for a bare word: quoted keeps case, unquoted lowers.
fn fold(word: &str) -> String {
    if let Some(inner) = word.strip_prefix('"').and_then(|w| w.strip_suffix('"')) {
        inner.to_string()
    } else {
        word.to_lowercase()
    }
}

fn statement_keyword(stmt: &Statement) -> String {
    let s = stmt.to_string();
    s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
}

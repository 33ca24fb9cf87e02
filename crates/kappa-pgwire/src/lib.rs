//! The PostgreSQL wire protocol front end (simple and extended query protocol, COPY FROM
//! STDIN). Each connection gets its own [`Session`]; every error becomes an ErrorResponse
//! with the error's SQLSTATE and the connection stays usable.

mod changes;
mod encode;
mod params;
mod split;

use std::fmt::Debug;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use futures::{Sink, SinkExt, stream};
use kappa_common::{KappaError, Result};
use kappa_engine::{CopyIn, Engine, Output, Session};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::copy::CopyHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{
    CopyResponse, DescribePortalResponse, DescribeStatementResponse, FieldInfo, QueryResponse,
    Response, Tag,
};
use pgwire::api::stmt::{QueryParser, StoredStatement};
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone};
use tokio::net::TcpListener;

use datafusion::sql::sqlparser::ast::Statement;

/// A prepared statement: the SQL text and, unless it is one of Kappa's own commands, its
/// parsed form.
#[derive(Clone, Debug)]
pub struct Prepared {
    sql: String,
    stmt: Option<Statement>,
}

fn pg_error(e: KappaError) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(&e)))
}

fn error_info(e: &KappaError) -> ErrorInfo {
    let severity = "ERROR".to_string();
    ErrorInfo::new(severity, e.sqlstate().0.to_string(), e.to_string())
}

/// COPY FROM STDIN in progress on a connection: the target and the data received so far.
#[derive(Default)]
struct CopyState(Mutex<Option<(CopyIn, Vec<u8>)>>);

pub struct Handler {
    engine: Arc<Engine>,
    parser: Arc<KappaParser>,
}

impl Handler {
    pub fn new(engine: Arc<Engine>) -> Self {
        Self {
            engine,
            parser: Arc::new(KappaParser),
        }
    }

    fn session<C: ClientInfo>(client: &C) -> Arc<Session> {
        client.session_extensions().get_or_insert_with(Session::new)
    }

    async fn run(&self, session: &Session, sql: &str, stmt: Option<Statement>) -> Result<Output> {
        if let Some(out) = self.engine.execute_extension(session, sql).await {
            return out;
        }
        let stmt = match stmt {
            Some(s) => s,
            None => {
                let mut stmts = kappa_sql::parse::parse_statements(sql)?;
                if stmts.len() != 1 {
                    return Err(KappaError::user(
                        kappa_common::SqlState::SYNTAX_ERROR,
                        "expected exactly one statement",
                    ));
                }
                stmts.remove(0)
            }
        };
        self.engine.execute(session, stmt).await
    }

    fn response<C: ClientInfo>(client: &C, out: Output, format: &Format) -> PgWireResult<Response> {
        Ok(match out {
            Output::Rows { schema, batches } => {
                let fields = Arc::new(encode::fields(&schema, format));
                let rows = encode::encode_rows(fields.clone(), &batches)?;
                Response::Query(QueryResponse::new(
                    fields,
                    stream::iter(rows.into_iter().map(Ok)),
                ))
            }
            Output::Fetched { schema, batches } => {
                let fields = Arc::new(encode::fields(&schema, format));
                let rows = encode::encode_rows(fields.clone(), &batches)?;
                let mut r = QueryResponse::new(fields, stream::iter(rows.into_iter().map(Ok)));
                r.set_command_tag("FETCH");
                Response::Query(r)
            }
            // Streamed by the caller, which holds the connection (see `changes.rs`).
            Output::Subscribe(_) | Output::CopyOut { .. } => {
                return Err(pg_error(KappaError::internal(
                    "a subscription reached the one-shot response path",
                )));
            }
            Output::Command { tag, rows } => {
                let t = Tag::new(&tag);
                Response::Execution(match rows {
                    Some(n) => t.with_rows(n),
                    None => t,
                })
            }
            Output::TransactionStart => Response::TransactionStart(Tag::new("BEGIN")),
            Output::TransactionEnd(tag) => Response::TransactionEnd(Tag::new(tag)),
            Output::CopyIn(copy) => {
                let columns = copy.num_columns();
                let format = 0;
                client
                    .session_extensions()
                    .get_or_insert_with(CopyState::default)
                    .0
                    .lock()
                    .map_err(|_| pg_error(KappaError::internal("copy state poisoned")))?
                    .replace((copy, Vec::new()));
                Response::CopyIn(CopyResponse::new(format, columns, stream::empty()))
            }
        })
    }
}

#[async_trait]
impl NoopStartupHandler for Handler {}

#[async_trait]
impl SimpleQueryHandler for Handler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = Self::session(client);
        let mut responses = vec![];
        for sql in split::split_statements(query) {
            match self.run(&session, &sql, None).await {
                Ok(out @ (Output::Subscribe(_) | Output::CopyOut { .. })) => {
                    // The responses so far go first; the stream is sent as it comes.
                    changes::send_responses(client, std::mem::take(&mut responses)).await?;
                    let ended = changes::stream(client, out, true).await?;
                    responses.push(Response::Error(Box::new(error_info(&ended))));
                    break;
                }
                Ok(out) => {
                    let copy = matches!(out, Output::CopyIn(_));
                    responses.push(Self::response(client, out, &Format::UnifiedText)?);
                    if copy {
                        break;
                    }
                }
                Err(e) => {
                    responses.push(Response::Error(Box::new(error_info(&e))));
                    break;
                }
            }
        }
        if responses.is_empty() {
            responses.push(Response::EmptyQuery);
        }
        Ok(responses)
    }
}

pub struct KappaParser;

#[async_trait]
impl QueryParser for KappaParser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let parts = split::split_statements(sql);
        if parts.is_empty() {
            return Ok(None);
        }
        if parts.len() > 1 {
            return Err(pg_error(KappaError::user(
                kappa_common::SqlState::SYNTAX_ERROR,
                "cannot insert multiple commands into a prepared statement",
            )));
        }
        let sql = parts[0].clone();
        // Kappa's own commands are not standard SQL; they are recognised again at execution.
        let stmt = match kappa_sql::parse::parse_statements(&sql) {
            Ok(mut s) if s.len() == 1 => Some(s.remove(0)),
            Ok(_) => None,
            Err(e) => {
                if split::is_extension(&sql) {
                    None
                } else {
                    return Err(pg_error(e));
                }
            }
        };
        Ok(Some(Prepared { sql, stmt }))
    }

    fn get_parameter_types(&self, _stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(vec![])
    }

    fn get_result_schema(
        &self,
        _stmt: &Prepared,
        _format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        Ok(vec![])
    }
}

/// The type of parameter `i`: what the client declared, unless it left it unspecified, else
/// what the server inferred.
fn param_type(declared: &[Option<Type>], inferred: &[Type], i: usize) -> Option<Type> {
    declared
        .get(i)
        .cloned()
        .flatten()
        .filter(|t| *t != Type::UNKNOWN)
        .or_else(|| inferred.get(i).cloned())
}

impl Handler {
    /// The statement with the portal's parameters bound.
    fn bound(&self, portal: &Portal<Prepared>, inferred: &[Type]) -> Result<Option<Statement>> {
        let Some(stmt) = &portal.statement.statement.stmt else {
            return Ok(None);
        };
        let mut stmt = stmt.clone();
        let declared = &portal.statement.parameter_types;
        let mut values = Vec::with_capacity(portal.parameters.len());
        for (i, raw) in portal.parameters.iter().enumerate() {
            let ty = param_type(declared, inferred, i);
            values.push(params::literal(
                raw.as_deref(),
                portal.parameter_format.is_binary(i),
                ty.as_ref(),
            )?);
        }
        params::bind(&mut stmt, &values)?;
        Ok(Some(stmt))
    }

    async fn parameter_types(&self, stmt: &Prepared) -> Vec<Type> {
        let Some(s) = &stmt.stmt else { return vec![] };
        let n = params::count_placeholders(s);
        if n == 0 {
            return vec![];
        }
        let inferred = self
            .engine
            .describe_statement(s)
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        (0..n)
            .map(|i| params::inferred_pg_type(inferred.get(i).and_then(|t| t.as_ref())))
            .collect()
    }
}

#[async_trait]
impl ExtendedQueryHandler for Handler {
    type Statement = Prepared;
    type QueryParser = KappaParser;

    fn query_parser(&self) -> Arc<KappaParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = Self::session(client);
        let inferred = self.portal_parameter_types(portal).await;
        let stmt = self.bound(portal, &inferred).map_err(pg_error)?;
        let out = self
            .run(&session, &portal.statement.statement.sql, stmt)
            .await
            .map_err(pg_error)?;
        if matches!(out, Output::Subscribe(_) | Output::CopyOut { .. }) {
            // Sent as it comes; the row description went with Describe.
            let ended = changes::stream(client, out, false).await?;
            return Err(pg_error(ended));
        }
        Self::response(client, out, &portal.result_column_format)
    }

    async fn do_describe_statement<C>(
        &self,
        client: &mut C,
        target: &StoredStatement<Prepared>,
    ) -> PgWireResult<DescribeStatementResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let inferred = self.parameter_types(&target.statement).await;
        let n = inferred.len().max(target.parameter_types.len());
        let params = (0..n)
            .map(|i| param_type(&target.parameter_types, &inferred, i).unwrap_or(Type::UNKNOWN))
            .collect();
        let stmt = &target.statement;
        let fields = self
            .result_fields(
                &Self::session(client),
                stmt.stmt.as_ref(),
                &stmt.sql,
                &Format::UnifiedText,
            )
            .await?;
        Ok(DescribeStatementResponse::new(params, fields))
    }

    async fn do_describe_portal<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
    ) -> PgWireResult<DescribePortalResponse>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore<Statement = Self::Statement>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let inferred = self.portal_parameter_types(portal).await;
        let stmt = self.bound(portal, &inferred).map_err(pg_error)?;
        let fields = self
            .result_fields(
                &Self::session(client),
                stmt.as_ref(),
                &portal.statement.statement.sql,
                &portal.result_column_format,
            )
            .await?;
        Ok(DescribePortalResponse::new(fields))
    }
}

impl Handler {
    /// Inferred parameter types of a portal's statement (none to infer without parameters).
    async fn portal_parameter_types(&self, portal: &Portal<Prepared>) -> Vec<Type> {
        if portal.parameters.is_empty() {
            vec![]
        } else {
            self.parameter_types(&portal.statement.statement).await
        }
    }

    /// The columns a statement returns, for Describe.
    async fn result_fields(
        &self,
        session: &Session,
        stmt: Option<&Statement>,
        sql: &str,
        format: &Format,
    ) -> PgWireResult<Vec<FieldInfo>> {
        if let Some(d) = self.engine.describe_extension(session, sql).await {
            return Ok(match d.map_err(pg_error)? {
                Some(schema) => encode::fields(&schema, format),
                None => vec![],
            });
        }
        Ok(match stmt {
            Some(s) => match self.engine.describe_statement(s).await.map_err(pg_error)? {
                (Some(schema), _) => encode::fields(&schema, format),
                (None, _) => vec![],
            },
            None => self.extension_fields(sql).await,
        })
    }

    /// Result columns of Kappa's own commands, found by running the read-only ones.
    async fn extension_fields(&self, sql: &str) -> Vec<FieldInfo> {
        if sql.trim().to_uppercase().starts_with("FLUSH") {
            return vec![];
        }
        let session = Session::new();
        match self.engine.execute_extension(&session, sql).await {
            Some(Ok(Output::Rows { schema, .. })) => encode::fields(&schema, &Format::UnifiedText),
            _ => vec![],
        }
    }
}

#[async_trait]
impl CopyHandler for Handler {
    async fn on_copy_data<C>(&self, client: &mut C, copy_data: CopyData) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let state = client
            .session_extensions()
            .get_or_insert_with(CopyState::default);
        let mut guard = state
            .0
            .lock()
            .map_err(|_| pg_error(KappaError::internal("copy state poisoned")))?;
        match guard.as_mut() {
            Some((_, buf)) => buf.extend_from_slice(&copy_data.data),
            None => {
                return Err(pg_error(KappaError::user(
                    kappa_common::SqlState::PROTOCOL_VIOLATION,
                    "COPY data without COPY FROM STDIN",
                )));
            }
        }
        Ok(())
    }

    async fn on_copy_done<C>(&self, client: &mut C, _done: CopyDone) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let state = client
            .session_extensions()
            .get_or_insert_with(CopyState::default);
        let taken = state
            .0
            .lock()
            .map_err(|_| pg_error(KappaError::internal("copy state poisoned")))?
            .take();
        let Some((copy, data)) = taken else {
            return Err(pg_error(KappaError::user(
                kappa_common::SqlState::PROTOCOL_VIOLATION,
                "COPY done without COPY FROM STDIN",
            )));
        };
        let n = copy.finish(&data).await.map_err(pg_error)?;
        Self::session(client).wrote();
        let tag = Tag::new("COPY").with_rows(n);
        client
            .send(PgWireBackendMessage::CommandComplete(tag.into()))
            .await?;
        Ok(())
    }

    async fn on_copy_fail<C>(
        &self,
        client: &mut C,
        fail: pgwire::messages::copy::CopyFail,
    ) -> PgWireError
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let state = client
            .session_extensions()
            .get_or_insert_with(CopyState::default);
        if let Ok(mut g) = state.0.lock() {
            g.take();
        }
        pg_error(KappaError::user(
            kappa_common::SqlState::QUERY_CANCELED,
            format!("COPY from stdin failed: {}", fail.message),
        ))
    }
}

pub struct Factory {
    handler: Arc<Handler>,
}

impl PgWireServerHandlers for Factory {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.handler.clone()
    }

    fn copy_handler(&self) -> Arc<impl CopyHandler> {
        self.handler.clone()
    }
}

/// Accepts connections on `listener` forever, one task per connection. A connection that
/// fails (garbage bytes, a dropped socket) ends alone; the others are not affected.
pub async fn serve(listener: TcpListener, engine: Arc<Engine>) -> std::io::Result<()> {
    let factory = Arc::new(Factory {
        handler: Arc::new(Handler::new(engine)),
    });
    loop {
        let (socket, peer) = listener.accept().await?;
        let factory = factory.clone();
        tokio::spawn(async move {
            if let Err(e) = pgwire::tokio::process_socket(socket, None, factory).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
}

//! CREATE SINK / DROP SINK: a relation's changes written out, exactly once (see
//! `kappa_connectors::sink` for the protocol and `kappa-runtime` for the checkpointing).

use kappa_common::{KappaError, Result, SqlState};
use kappa_sql::catalog::{Relation, RelationKind};
use kappa_sql::sink::SinkCommand;

use crate::{Engine, Output};

/// Runs a sink command; `sql` is its text, for the history. The caller holds the DDL lock.
pub(crate) async fn execute(engine: &Engine, cmd: SinkCommand, sql: &str) -> Result<Output> {
    match cmd {
        SinkCommand::Create {
            name,
            if_not_exists,
            from,
            options,
        } => create(engine, name, if_not_exists, from, options, sql).await,
        SinkCommand::Drop { name, if_exists } => drop(engine, name, if_exists, sql).await,
    }
}

async fn create(
    engine: &Engine,
    name: String,
    if_not_exists: bool,
    from: String,
    options: std::collections::BTreeMap<String, String>,
    sql: &str,
) -> Result<Output> {
    let catalog = engine.catalog();
    if catalog.get(&name).is_some() {
        if if_not_exists {
            return Ok(Output::command("CREATE SINK"));
        }
        return Err(KappaError::user(
            SqlState::DUPLICATE_TABLE,
            format!("relation \"{name}\" already exists"),
        ));
    }
    let rel = catalog.require(&from)?;
    if !matches!(rel.kind, RelationKind::MaterializedView) {
        return Err(KappaError::user(
            SqlState::WRONG_OBJECT_TYPE,
            format!(
                "a sink writes a materialized view's changes; \"{from}\" is a {}",
                rel.kind.describe()
            ),
        ));
    }
    let snapshot = match options.get("snapshot").map(|v| v.to_lowercase()).as_deref() {
        None | Some("true") | Some("on") => true,
        Some("false") | Some("off") => false,
        Some(v) => {
            return Err(KappaError::user(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("option snapshot takes true or false, not '{v}'"),
            ));
        }
    };
    let sink = kappa_connectors::create_sink(&options, &rel.schema)?;
    // A new sink starts its output empty: it must not overwrite a file it did not write.
    // (In recovery the file is the sink's own.)
    if !engine.runtime().recovering()
        && let Some(path) = options.get("path")
        && std::fs::metadata(path).is_ok_and(|m| m.len() > 0)
    {
        return Err(KappaError::user(
            SqlState("58P02"),
            format!(
                "the file sink's path {path} exists and is not empty; remove it or choose another"
            ),
        ));
    }
    let mut new_catalog = catalog.as_ref().clone();
    let id = new_catalog.next_id();
    let from_id = rel.id;
    let connector = options.get("connector").cloned().unwrap_or_default();
    let schema = rel.schema.clone();
    let ddl = sql.to_string();
    engine
        .blocking(move |rt| rt.create_sink(&ddl, id, from_id, sink, snapshot))
        .await?;
    new_catalog.insert(Relation {
        id,
        name,
        kind: RelationKind::Sink { connector },
        schema,
        definition: None,
        depends_on: vec![from_id],
        plan_text: None,
        watermark: None,
    })?;
    engine.set_catalog(new_catalog);
    Ok(Output::command("CREATE SINK"))
}

async fn drop(engine: &Engine, name: String, if_exists: bool, sql: &str) -> Result<Output> {
    let catalog = engine.catalog();
    let Some(rel) = catalog.get(&name) else {
        if if_exists {
            engine.runtime().record_ddl(sql)?;
            return Ok(Output::command("DROP SINK"));
        }
        return Err(KappaError::user(
            SqlState::UNDEFINED_TABLE,
            format!("sink \"{name}\" does not exist"),
        ));
    };
    if !matches!(rel.kind, RelationKind::Sink { .. }) {
        return Err(KappaError::user(
            SqlState::WRONG_OBJECT_TYPE,
            format!(
                "\"{name}\" is a {}, not a sink; use DROP {}",
                rel.kind.describe(),
                rel.kind.describe().to_uppercase()
            ),
        ));
    }
    let id = rel.id;
    let mut new_catalog = catalog.as_ref().clone();
    new_catalog.remove(&name);
    engine.set_catalog(new_catalog);
    let ddl = sql.to_string();
    engine
        .blocking(move |rt| rt.drop_relation(Some(&ddl), id))
        .await?;
    Ok(Output::command("DROP SINK"))
}

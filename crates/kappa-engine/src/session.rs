//! Per-connection state: settings, the transaction flag, unflushed writes and cursors.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use datafusion::sql::sqlparser::ast::{Ident, Set};
use kappa_common::{KappaError, Result, SqlState};

use crate::Output;

/// Kappa runs every statement in its own transaction. `BEGIN`/`COMMIT` are accepted so that
/// drivers that wrap statements in them work; `ROLLBACK` after a write is refused, because
/// the write is already committed and pretending otherwise would lose the user's intent.
#[derive(Default)]
pub struct Session {
    settings: Mutex<BTreeMap<String, String>>,
    in_block: AtomicBool,
    wrote_in_block: AtomicBool,
    unflushed: AtomicBool,
    cursors: Mutex<BTreeMap<String, Cursor>>,
}

/// A cursor over a subscription (`DECLARE c CURSOR FOR SUBSCRIBE …`). One declared inside
/// a transaction block is closed when the block ends, as PostgreSQL closes a cursor
/// without HOLD; one declared outside lives until `CLOSE` or the end of the session.
#[derive(Clone)]
pub(crate) struct Cursor {
    pub schema: datafusion::arrow::datatypes::SchemaRef,
    pub subscription: Arc<tokio::sync::Mutex<crate::subscribe::Subscription>>,
    in_block: bool,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that this session wrote: its next query first commits an epoch.
    pub fn wrote(&self) {
        self.unflushed.store(true, Ordering::SeqCst);
        if self.in_block.load(Ordering::SeqCst) {
            self.wrote_in_block.store(true, Ordering::SeqCst);
        }
    }

    /// True once after a write: the next read must first commit an epoch.
    pub(crate) fn take_unflushed_writes(&self) -> bool {
        self.unflushed.swap(false, Ordering::SeqCst)
    }

    pub(crate) fn reset(&self) {
        if let Ok(mut s) = self.settings.lock() {
            s.clear();
        }
        if let Ok(mut c) = self.cursors.lock() {
            c.clear();
        }
    }

    pub(crate) fn begin(&self) {
        self.in_block.store(true, Ordering::SeqCst);
        self.wrote_in_block.store(false, Ordering::SeqCst);
    }

    pub(crate) fn end(&self) {
        self.in_block.store(false, Ordering::SeqCst);
        self.close_block_cursors();
    }

    pub(crate) fn rollback(&self) -> Result<()> {
        self.in_block.store(false, Ordering::SeqCst);
        self.close_block_cursors();
        if self.wrote_in_block.swap(false, Ordering::SeqCst) {
            return Err(KappaError::user(
                SqlState::INVALID_TRANSACTION_STATE,
                "cannot roll back: Kappa commits every statement on its own and the writes since BEGIN are already committed",
            ));
        }
        Ok(())
    }

    fn close_block_cursors(&self) {
        if let Ok(mut c) = self.cursors.lock() {
            c.retain(|_, c| !c.in_block);
        }
    }

    pub(crate) fn declare(
        &self,
        name: &str,
        subscription: crate::subscribe::Subscription,
    ) -> Result<()> {
        let mut cursors = self
            .cursors
            .lock()
            .map_err(|_| KappaError::internal("cursor registry poisoned"))?;
        if cursors.contains_key(name) {
            return Err(KappaError::user(
                SqlState::DUPLICATE_CURSOR,
                format!("cursor \"{name}\" already exists"),
            ));
        }
        cursors.insert(
            name.to_string(),
            Cursor {
                schema: subscription.schema(),
                subscription: Arc::new(tokio::sync::Mutex::new(subscription)),
                in_block: self.in_block.load(Ordering::SeqCst),
            },
        );
        Ok(())
    }

    pub(crate) fn cursor(&self, name: &str) -> Result<Cursor> {
        self.cursors
            .lock()
            .map_err(|_| KappaError::internal("cursor registry poisoned"))?
            .get(name)
            .cloned()
            .ok_or_else(|| {
                KappaError::user(
                    SqlState::INVALID_CURSOR_NAME,
                    format!("cursor \"{name}\" does not exist"),
                )
            })
    }

    /// Closes cursor `name` (`None`: every cursor).
    pub(crate) fn close(&self, name: Option<&str>) -> Result<()> {
        let mut cursors = self
            .cursors
            .lock()
            .map_err(|_| KappaError::internal("cursor registry poisoned"))?;
        match name {
            None => cursors.clear(),
            Some(n) => {
                if cursors.remove(n).is_none() {
                    return Err(KappaError::user(
                        SqlState::INVALID_CURSOR_NAME,
                        format!("cursor \"{n}\" does not exist"),
                    ));
                }
            }
        }
        Ok(())
    }

    pub(crate) fn set(&self, set: Set) -> Result<Output> {
        match set {
            Set::SingleAssignment {
                variable, values, ..
            } => {
                let name = variable.to_string().to_lowercase();
                let value = values
                    .iter()
                    .map(|v| v.to_string().trim_matches('\'').to_string())
                    .collect::<Vec<_>>()
                    .join(", ");
                if let Ok(mut s) = self.settings.lock() {
                    s.insert(name, value);
                }
                Ok(Output::command("SET"))
            }
            // SET TIME ZONE, SET NAMES, SET SESSION CHARACTERISTICS …: accepted, no effect.
            _ => Ok(Output::command("SET")),
        }
    }

    pub(crate) fn show(&self, variable: &[Ident]) -> Result<Output> {
        use std::sync::Arc;

        use datafusion::arrow::array::{RecordBatch, StringArray};
        use datafusion::arrow::datatypes::{DataType, Field, Schema};
        let name = variable
            .iter()
            .map(|i| i.value.to_lowercase())
            .collect::<Vec<_>>()
            .join(" ");
        let set = self
            .settings
            .lock()
            .ok()
            .and_then(|s| s.get(&name).cloned());
        let value = match set {
            Some(v) => v,
            None => match name.as_str() {
                "server_version" => "15.0 (Kappa)".into(),
                "server_version_num" => "150000".into(),
                "standard_conforming_strings" => "on".into(),
                "client_encoding" | "server_encoding" => "UTF8".into(),
                "datestyle" => "ISO, MDY".into(),
                "timezone" | "time zone" => "UTC".into(),
                "transaction isolation level" | "transaction_isolation" => "serializable".into(),
                "search_path" => "public".into(),
                "integer_datetimes" => "on".into(),
                "max_identifier_length" => "63".into(),
                _ => {
                    return Err(KappaError::user(
                        SqlState("42704"),
                        format!("unrecognized configuration parameter \"{name}\""),
                    ));
                }
            },
        };
        let schema = Arc::new(Schema::new(vec![Field::new(&name, DataType::Utf8, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(vec![value]))],
        )?;
        Ok(Output::Rows {
            schema,
            batches: vec![batch],
        })
    }
}

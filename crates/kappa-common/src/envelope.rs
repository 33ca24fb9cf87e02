//! What a relation's incoming changes mean.

/// How the changes a relation receives are to be read. The planner asks a relation's
/// envelope (not its kind) whether what it reads can ever be retracted: an operator over an
/// append-only input keeps less state (running extremes instead of value multisets, rows as
/// arrived instead of counted).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Envelope {
    /// Every change is an insert; nothing is ever retracted.
    AppendOnly,
    /// Each row replaces the row with the same key (columns `key`); a delete is a key
    /// without a row. The runtime turns these into retractions and inserts.
    Upsert { key: Vec<usize> },
    /// Inserts and retractions with weights, as they are (an engine table's changes, a
    /// CDC stream).
    Changelog,
}

impl Envelope {
    pub fn is_append_only(&self) -> bool {
        matches!(self, Envelope::AppendOnly)
    }

    /// As `EXPLAIN` and the system tables print it.
    pub fn describe(&self) -> &'static str {
        match self {
            Envelope::AppendOnly => "append-only",
            Envelope::Upsert { .. } => "upsert",
            Envelope::Changelog => "changelog",
        }
    }
}

//! Shared vocabulary of Kappa: the change representation every operator speaks, epochs, and
//! the error type that carries a Postgres SQLSTATE from wherever it is raised to the client.

mod change;
mod envelope;
mod error;

pub use change::{ChangeBatch, Weight};
pub use envelope::Envelope;
pub use error::{KappaError, Result, SqlState};

/// An epoch is the unit of atomic visibility: every change that entered the dataflow before
/// barrier `e` is visible in every materialized view once epoch `e` is committed, and nothing
/// after it is. Epochs start at 1; 0 means "nothing committed yet".
pub type Epoch = u64;

/// Identifies a relation (engine table or materialized view) for its whole life, also across
/// DROP and re-CREATE of the same name: a new relation always gets a new id.
pub type RelationId = u64;

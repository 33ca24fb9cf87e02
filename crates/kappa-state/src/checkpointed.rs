//! State restored from, and checkpointed to, the history's database.

use std::sync::Arc;

use crate::{History, MemStateTable, StateStore, StateTable};

/// Hands out in-memory tables that start from their last checkpointed contents and track
/// their changes for the next checkpoint.
pub struct CheckpointedStore {
    history: Arc<History>,
}

impl CheckpointedStore {
    pub fn new(history: Arc<History>) -> Self {
        Self { history }
    }
}

impl StateStore for CheckpointedStore {
    fn create_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        let entries = self.history.load_state(name)?;
        Ok(Box::new(MemStateTable::tracked(name, entries)))
    }

    fn checkpointed(&self) -> bool {
        true
    }
}

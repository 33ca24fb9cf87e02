//! State restored from, and checkpointed to, the history's database.

use std::sync::Arc;

use crate::{History, MemStateTable, SpillStore, StateStore, StateTable};

/// Hands out in-memory tables that start from their last checkpointed contents and track
/// their changes for the next checkpoint. Cold tables (read only when restoring) are kept
/// on disk, as [`SpillStore`] keeps every table.
pub struct CheckpointedStore {
    history: Arc<History>,
    cold: SpillStore,
}

impl CheckpointedStore {
    pub fn new(history: Arc<History>) -> Self {
        Self {
            cold: SpillStore::new(history.clone(), u64::MAX),
            history,
        }
    }
}

impl StateStore for CheckpointedStore {
    fn create_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        let entries = self.history.load_state(name)?;
        Ok(Box::new(MemStateTable::tracked(name, entries)))
    }

    fn create_keyed_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        let entries = self.history.load_state(name)?;
        Ok(Box::new(MemStateTable::tracked_keyed(name, entries)))
    }

    fn create_cold_table(&self, name: &str) -> kappa_common::Result<Box<dyn StateTable>> {
        self.cold.create_table(name)
    }

    fn checkpointed(&self) -> bool {
        true
    }

    fn take_error(&self) -> Option<kappa_common::KappaError> {
        self.cold.take_error()
    }
}

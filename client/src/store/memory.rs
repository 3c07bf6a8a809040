//! The store's rows in memory, for tests: nothing is ever durable, and nothing outlives
//! the last clone of the backend.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Backend, Durability, RawChange, StoreError, Table, Visit};

type Rows = BTreeMap<Vec<u8>, Vec<u8>>;

/// Every table's rows. Clones share the rows, so a test can open a second store over the
/// same data (with another key, say), as it would reopen a file.
#[derive(Clone, Default)]
pub(crate) struct MemoryBackend {
    // One lock over all tables, not one per table: a commit spans tables (a session and
    // the message it decrypted) and must become visible at once, as one redb transaction
    // does.
    tables: Arc<Mutex<[Rows; Table::ALL.len()]>>,
}

impl MemoryBackend {
    fn lock(&self) -> Result<MutexGuard<'_, [Rows; Table::ALL.len()]>, StoreError> {
        // A panic while the lock was held may have left a commit half applied.
        self.tables
            .lock()
            .map_err(|_| StoreError::Database("the in-memory store was poisoned".to_owned()))
    }
}

impl Backend for MemoryBackend {
    fn get(&self, table: Table, row: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.lock()?[table as usize].get(row).cloned())
    }

    fn scan(&self, table: Table, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        // A snapshot, as a redb read transaction is: `visit` runs without the lock held.
        let rows = self.lock()?[table as usize].clone();
        for (row, sealed) in &rows {
            visit(row, sealed)?;
        }
        Ok(())
    }

    /// Memory is never durable, so both durabilities behave alike: applied and visible at
    /// once, gone with the backend.
    fn apply(&self, changes: Vec<RawChange>, _durability: Durability) -> Result<(), StoreError> {
        let mut tables = self.lock()?;
        for change in changes {
            match change {
                RawChange::Put { table, row, sealed } => {
                    tables[table as usize].insert(row, sealed);
                }
                RawChange::Delete { table, row } => {
                    tables[table as usize].remove(&row);
                }
            }
        }
        Ok(())
    }
}

//! The store's rows in one redb file, a table per [`Table`].

use std::path::Path;

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::{Backend, Durability, RawChange, StoreError, Table, Visit};

fn definition(table: Table) -> TableDefinition<'static, &'static [u8], &'static [u8]> {
    TableDefinition::new(table.name())
}

fn db_error(error: impl std::fmt::Display) -> StoreError {
    StoreError::Database(error.to_string())
}

/// The redb file of a local store.
pub(crate) struct RedbBackend {
    db: Database,
}

impl RedbBackend {
    /// Opens (or creates) the file at `path`, with every table present, so that a read
    /// of a table nothing was written to yet finds it empty rather than missing.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path).map_err(db_error)?;
        let txn = db.begin_write().map_err(db_error)?;
        for table in Table::ALL {
            txn.open_table(definition(table)).map_err(db_error)?;
        }
        txn.commit().map_err(db_error)?;
        Ok(RedbBackend { db })
    }
}

impl Backend for RedbBackend {
    fn get(&self, table: Table, row: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(definition(table)).map_err(db_error)?;
        Ok(t.get(row)
            .map_err(db_error)?
            .map(|value| value.value().to_vec()))
    }

    fn scan(&self, table: Table, visit: &mut Visit<'_>) -> Result<(), StoreError> {
        let txn = self.db.begin_read().map_err(db_error)?;
        let t = txn.open_table(definition(table)).map_err(db_error)?;
        for entry in t.iter().map_err(db_error)? {
            let (row, value) = entry.map_err(db_error)?;
            visit(row.value(), value.value())?;
        }
        Ok(())
    }

    /// One write transaction. `Immediate` is redb's `Durability::Immediate`: the commit
    /// returns after the fsync. `Deferred` is redb's `Durability::None`: the commit is
    /// visible to every read transaction begun after it, but its pages stay in redb's
    /// write buffer and no header on disk names it. It becomes durable with the next
    /// `Immediate` commit, which persists it together with every deferred commit before
    /// it, or with a clean close (redb 4.6's `Database` drop runs a durable commit of
    /// pending non-durable ones). A crash or power loss before either loses every
    /// `Deferred` commit since the last `Immediate` one, all of them and nothing else:
    /// the file reopens at that last durable commit, never at a part of a batch.
    fn apply(&self, changes: Vec<RawChange>, durability: Durability) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().map_err(db_error)?;
        if durability == Durability::Deferred {
            txn.set_durability(::redb::Durability::None)
                .map_err(db_error)?;
        }
        for change in changes {
            match change {
                RawChange::Put { table, row, sealed } => {
                    let mut t = txn.open_table(definition(table)).map_err(db_error)?;
                    t.insert(row.as_slice(), sealed.as_slice())
                        .map_err(db_error)?;
                }
                RawChange::Delete { table, row } => {
                    let mut t = txn.open_table(definition(table)).map_err(db_error)?;
                    t.remove(row.as_slice()).map_err(db_error)?;
                }
            }
        }
        txn.commit().map_err(db_error)
    }
}

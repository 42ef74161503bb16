//! The durable side of accounts, keys and the ledger: SQLite for one node
//! (WAL lets the server's writer, its refresher and the CLI work side by
//! side), or PostgreSQL shared by several.

pub mod admin;
pub mod books;
pub mod copy;
pub mod db;
pub mod jobs;
pub mod leases;
pub mod ledger;
pub mod limits;
pub mod lock;
pub mod nodes;
pub mod payments;
pub mod pool;
pub mod postgres;
mod schema;
pub mod sessions;
pub mod snapshot;
pub mod sql;
pub mod synced_prices;
pub mod writer;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::config::StoreConfig;
use crate::error::Error;
pub use schema::TABLES;
use sql::Conn;

/// Opens the store `config` names, migrating it if needed: PostgreSQL at
/// `url`, else SQLite at `path`.
pub fn open(config: &StoreConfig) -> Result<Conn, Error> {
    let mut conn = connect(config)?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// A connection to a store already migrated (by this process's `open`).
pub fn connect(config: &StoreConfig) -> Result<Conn, Error> {
    Ok(match &config.url {
        Some(url) => Conn::Postgres(Box::new(postgres::Pg::open(postgres::Target::parse(
            url,
            config.ca_file.as_deref(),
        )?)?)),
        None => Conn::Sqlite(open_sqlite(&config.path, config.fsync)?),
    })
}

/// Opens (creating if needed) the SQLite database at `path`, unmigrated;
/// with `fsync`, each commit waits for the disk (power loss, not only a kill).
fn open_sqlite(path: &Path, fsync: bool) -> Result<Connection, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    create_private(path)?;
    let conn = Connection::open(path)?;
    // The CLI may write while the server's threads hold the database: wait, don't fail.
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", if fsync { "FULL" } else { "NORMAL" })?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

/// Creates the database file, empty, readable by the operator only (keys'
/// hashes, every account's money); SQLite gives its WAL and shared-memory
/// files the same mode. An existing file is not opened here: closing any
/// descriptor of a database drops the POSIX locks the process's SQLite
/// connections hold on it.
fn create_private(path: &Path) -> Result<(), Error> {
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => Err(e.into()),
        _ => Ok(()),
    }
}

pub fn now_secs() -> i64 {
    now_ms() / 1000
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

//! SQLite: the durable side of accounts, keys and (later) the ledger.
//! WAL lets the server's writer, its refresher and the CLI work side by side.

pub mod admin;
pub mod db;
pub mod jobs;
pub mod ledger;
pub mod lock;
pub mod payments;
mod schema;
pub mod sessions;
pub mod snapshot;
pub mod writer;

use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::error::Error;

/// Opens (creating and migrating if needed) the database at `path`.
pub fn open(path: &Path) -> Result<Connection, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    create_private(path)?;
    let mut conn = Connection::open(path)?;
    // The CLI may write while the server's threads hold the database: wait, don't fail.
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    schema::migrate(&mut conn)?;
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

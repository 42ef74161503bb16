//! `abhiapi store migrate`: a single node's SQLite database copied, row for
//! row, into an empty PostgreSQL, in one transaction: all of it or nothing.

use std::path::Path;

use super::sql::{Conn, Mode, Param, Sql, StoreError, Value};
use super::TABLES;
use crate::config::StoreConfig;
use crate::error::Error;

/// Columns PostgreSQL numbers itself (identities): after the copy, each
/// goes on from the largest id copied.
const IDENTITIES: &[(&str, &str)] = &[
    ("accounts", "id"),
    ("api_keys", "id"),
    ("changes", "seq"),
    ("ledger_rejects", "seq"),
    ("reconcile_runs", "seq"),
];

/// Copies `from` (SQLite) into `to` (PostgreSQL); the rows copied per table.
pub fn sqlite_to_postgres(from: &Path, to: &str) -> Result<Vec<(&'static str, u64)>, Error> {
    if !from.exists() {
        return Err(Error::Usage(format!("no database at {}", from.display())));
    }
    // No server may run on the source meanwhile, and none may have left
    // holds in its journal: those are settled by starting it once.
    let _serving = super::lock::acquire(from)?;
    let source_config = StoreConfig::at(from);
    let journal = source_config.journal_dir();
    if std::fs::read_dir(&journal).is_ok_and(|mut d| d.next().is_some()) {
        return Err(Error::Usage(format!(
            "{} holds a stopped server's unsettled requests: start and stop `abhiapi serve` on it once, then migrate",
            journal.display()
        )));
    }
    let mut source = super::open(&source_config)?;
    let mut target = super::open(&StoreConfig {
        url: Some(to.to_owned()),
        ..StoreConfig::default()
    })?;
    if !matches!(target, Conn::Postgres(_)) {
        return Err(Error::Usage("--to must be a postgres:// URL".into()));
    }
    // No server on the target meanwhile: it would read the copy half-made.
    let _target_serving =
        super::postgres::ServeLock::alone(super::postgres::Target::parse(to, None)?)?;
    // One view of the source, which the CLI cannot edit until the copy is done.
    let mut source = source.transaction(Mode::Serial)?;
    let mut tx = target.transaction(Mode::Serial)?;
    for table in TABLES {
        let rows: i64 =
            (&mut tx as &mut dyn Sql).value(&format!("SELECT COUNT(*) FROM {table}"), &[])?;
        if rows > 0 {
            return Err(Error::Usage(format!(
                "the PostgreSQL database is not empty ({table} has {rows} rows): migrate into a new one"
            )));
        }
    }
    let mut copied = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let columns = columns(&mut source, table)?;
        let list = columns.join(", ");
        let slots: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
        let insert = format!("INSERT INTO {table} ({list}) VALUES ({})", slots.join(", "));
        let rows = source.rows(&format!("SELECT {list} FROM {table}"), &[])?;
        for row in &rows {
            let args: Vec<Param<'_>> = row.0.iter().map(Value::param).collect();
            tx.exec(&insert, &args)?;
        }
        copied.push((*table, rows.len() as u64));
    }
    for (table, column) in IDENTITIES {
        tx.exec(
            &format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'),
                     COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
            ),
            &[],
        )?;
    }
    tx.commit()?;
    Ok(copied)
}

/// A table's columns, in SQLite's order.
fn columns(conn: &mut dyn Sql, table: &str) -> Result<Vec<String>, StoreError> {
    conn.rows(
        "SELECT name FROM pragma_table_info(?1) ORDER BY cid",
        crate::args![table],
    )?
    .iter()
    .map(|r| r.get(0))
    .collect()
}

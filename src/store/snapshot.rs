//! What the server reads: the whole state at start, then only what changed.

use super::sql::{Conn, Mode, Row, Sql, StoreError};
use crate::args;
use crate::keys::secret::KeyHash;

pub struct AccountRow {
    pub id: i64,
    pub name: String,
    pub plan: String,
    pub balance: i64,
    pub suspended: bool,
}

pub struct KeyRow {
    pub id: i64,
    pub account_id: i64,
    pub hash: KeyHash,
    pub disabled: bool,
}

/// Everything, as of change `seq`: later changes are read with [`changes_since`].
pub struct Snapshot {
    pub seq: i64,
    pub accounts: Vec<AccountRow>,
    pub keys: Vec<KeyRow>,
}

/// One edit made outside the server, with the rows it touched as they are now.
pub struct Change {
    pub account: Option<AccountRow>,
    pub key: Option<KeyRow>,
    pub balance_delta: i64,
    /// The synced prices changed (`prices sync --apply`).
    pub prices: bool,
}

/// The PostgreSQL channel an edit notifies, so that every node reads the
/// change feed at once rather than at its next poll.
pub const CHANGES: &str = "abhiapi_changes";

pub(super) const ACCOUNT_COLS: &str = "id, name, plan, balance, suspended";
const KEY_COLS: &str = "id, account_id, hash, disabled";

pub(super) fn account_row(r: &Row) -> Result<AccountRow, StoreError> {
    Ok(AccountRow {
        id: r.get(0)?,
        name: r.get(1)?,
        plan: r.get(2)?,
        balance: r.get(3)?,
        suspended: r.get(4)?,
    })
}

fn key_row(r: &Row) -> Result<KeyRow, StoreError> {
    Ok(KeyRow {
        id: r.get(0)?,
        account_id: r.get(1)?,
        hash: r.get(2)?,
        disabled: r.get(3)?,
    })
}

/// One key as stored now, by its id.
pub fn key_by_id(conn: &mut dyn Sql, id: i64) -> Result<Option<KeyRow>, StoreError> {
    conn.row(
        &format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"),
        args![id],
    )?
    .map(|r| key_row(&r))
    .transpose()
}

fn account_by_id(conn: &mut dyn Sql, id: i64) -> Result<Option<AccountRow>, StoreError> {
    conn.row(
        &format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ?1"),
        args![id],
    )?
    .map(|r| account_row(&r))
    .transpose()
}

/// Reads everything in one transaction, so the rows and `seq` agree.
pub fn load(conn: &mut Conn) -> Result<Snapshot, StoreError> {
    let mut tx = conn.transaction(Mode::Snapshot)?;
    let seq = latest_change(&mut tx)?;
    let accounts = tx
        .rows(&format!("SELECT {ACCOUNT_COLS} FROM accounts"), &[])?
        .iter()
        .map(account_row)
        .collect::<Result<_, _>>()?;
    let keys = tx
        .rows(&format!("SELECT {KEY_COLS} FROM api_keys"), &[])?
        .iter()
        .map(key_row)
        .collect::<Result<_, _>>()?;
    tx.commit()?;
    Ok(Snapshot {
        seq,
        accounts,
        keys,
    })
}

/// The newest change in the feed (0 if none).
pub fn latest_change(conn: &mut dyn Sql) -> Result<i64, StoreError> {
    conn.value("SELECT COALESCE(MAX(seq), 0) FROM changes", &[])
}

/// Changes after `seq`, oldest first, with the new high-water mark.
pub fn changes_since(conn: &mut Conn, seq: i64) -> Result<(i64, Vec<Change>), StoreError> {
    let mut tx = conn.transaction(Mode::Snapshot)?;
    let rows = tx.rows(
        "SELECT seq, account_id, key_id, balance_delta, prices FROM changes WHERE seq > ?1 ORDER BY seq",
        args![seq],
    )?;
    let mut last = seq;
    let mut changes = Vec::with_capacity(rows.len());
    for row in rows {
        last = row.get(0)?;
        let account = match row.get::<Option<i64>>(1)? {
            Some(id) => account_by_id(&mut tx, id)?,
            None => None,
        };
        let key = match row.get::<Option<i64>>(2)? {
            Some(id) => key_by_id(&mut tx, id)?,
            None => None,
        };
        changes.push(Change {
            account,
            key,
            balance_delta: row.get(3)?,
            prices: row.get::<i64>(4)? != 0,
        });
    }
    tx.commit()?;
    Ok((last, changes))
}

//! What the server reads: the whole state at start, then only what changed.

use rusqlite::{Connection, OptionalExtension, Row};

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
}

pub(super) const ACCOUNT_COLS: &str = "id, name, plan, balance, suspended";
const KEY_COLS: &str = "id, account_id, hash, disabled";

pub(super) fn account_row(r: &Row) -> rusqlite::Result<AccountRow> {
    Ok(AccountRow {
        id: r.get(0)?,
        name: r.get(1)?,
        plan: r.get(2)?,
        balance: r.get(3)?,
        suspended: r.get(4)?,
    })
}

fn key_row(r: &Row) -> rusqlite::Result<KeyRow> {
    Ok(KeyRow {
        id: r.get(0)?,
        account_id: r.get(1)?,
        hash: r.get(2)?,
        disabled: r.get(3)?,
    })
}

/// One key as stored now, by its id.
pub fn key_by_id(conn: &Connection, id: i64) -> rusqlite::Result<Option<KeyRow>> {
    conn.query_row(
        &format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"),
        [id],
        key_row,
    )
    .optional()
}

/// Reads everything in one transaction, so the rows and `seq` agree.
pub fn load(conn: &mut Connection) -> rusqlite::Result<Snapshot> {
    let tx = conn.transaction()?;
    let seq = tx.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
        r.get(0)
    })?;
    let accounts = tx
        .prepare(&format!("SELECT {ACCOUNT_COLS} FROM accounts"))?
        .query_map([], account_row)?
        .collect::<Result<_, _>>()?;
    let keys = tx
        .prepare(&format!("SELECT {KEY_COLS} FROM api_keys"))?
        .query_map([], key_row)?
        .collect::<Result<_, _>>()?;
    tx.commit()?;
    Ok(Snapshot {
        seq,
        accounts,
        keys,
    })
}

/// Changes after `seq`, oldest first, with the new high-water mark.
/// The newest change in the feed (0 if none).
pub fn latest_change(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM changes", [], |r| {
        r.get(0)
    })
}

pub fn changes_since(conn: &mut Connection, seq: i64) -> rusqlite::Result<(i64, Vec<Change>)> {
    let tx = conn.transaction()?;
    let rows: Vec<(i64, Option<i64>, Option<i64>, i64)> = tx
        .prepare_cached(
            "SELECT seq, account_id, key_id, balance_delta FROM changes WHERE seq > ?1 ORDER BY seq",
        )?
        .query_map([seq], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))?
        .collect::<Result<_, _>>()?;
    let mut last = seq;
    let mut changes = Vec::with_capacity(rows.len());
    for (s, account_id, key_id, balance_delta) in rows {
        last = s;
        let account = match account_id {
            Some(id) => tx
                .prepare_cached(&format!(
                    "SELECT {ACCOUNT_COLS} FROM accounts WHERE id = ?1"
                ))?
                .query_row([id], account_row)
                .optional()?,
            None => None,
        };
        let key = match key_id {
            Some(id) => tx
                .prepare_cached(&format!("SELECT {KEY_COLS} FROM api_keys WHERE id = ?1"))?
                .query_row([id], key_row)
                .optional()?,
            None => None,
        };
        changes.push(Change {
            account,
            key,
            balance_delta,
        });
    }
    tx.commit()?;
    Ok((last, changes))
}

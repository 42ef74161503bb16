//! The operator's edits (the CLI's commands). Each runs in one transaction
//! and records a `changes` row, which is how a running server learns of it.

use super::now_secs;
use super::snapshot::{account_row, AccountRow, ACCOUNT_COLS};
use super::sql::{Conn, Dialect, Mode, Sql, Tx};
use crate::args;
use crate::error::Error;
use crate::keys::secret;

/// A key as the operator may see it: never the secret.
#[derive(serde::Serialize)]
pub struct KeyListing {
    pub id: i64,
    pub display_prefix: String,
    pub account: String,
    pub disabled: bool,
    pub last_used_at: Option<i64>,
}

pub struct CreatedKey {
    pub id: i64,
    pub secret: String,
    pub display_prefix: String,
    pub account: AccountRow,
    /// Whether this call also created the account.
    pub new_account: bool,
}

/// The most credits an account may hold: 10^15 (a trillion dollars at the
/// default $0.001 a credit), far below where sums of balances, holds and
/// top-ups could overflow an i64.
pub const MAX_BALANCE: i64 = 1_000_000_000_000_000;

/// An opening balance: zero or more, and within [`MAX_BALANCE`].
fn check_opening(credits: i64) -> Result<(), Error> {
    if credits < 0 {
        return Err(Error::Usage("credits cannot be negative".into()));
    }
    if credits > MAX_BALANCE {
        return Err(Error::Usage(format!(
            "an opening balance may not exceed {MAX_BALANCE} credits"
        )));
    }
    Ok(())
}

/// A top-up: positive, and leaving `account` within [`MAX_BALANCE`].
pub(super) fn check_topup(account: &AccountRow, credits: i64) -> Result<(), Error> {
    if credits <= 0 {
        return Err(Error::Usage(
            "a top-up must be a positive number of credits".into(),
        ));
    }
    let room = MAX_BALANCE.saturating_sub(account.balance).max(0);
    if credits > room {
        return Err(Error::Usage(format!(
            "a balance may not exceed {MAX_BALANCE} credits: account {:?} has {}, so it takes a top-up of at most {room}",
            account.name, account.balance
        )));
    }
    Ok(())
}

pub(super) fn write_tx(conn: &mut Conn) -> Result<Tx<'_>, Error> {
    Ok(conn.transaction(Mode::Serial)?)
}

/// Adds to the change feed. Only in a [`Mode::Serial`] transaction: the
/// feed is read by `seq`, so rows must become visible in `seq` order, which
/// PostgreSQL promises only to writers that take turns.
pub(super) fn record_change(
    tx: &mut dyn Sql,
    account_id: Option<i64>,
    key_id: Option<i64>,
    delta: i64,
) -> Result<(), Error> {
    tx.exec(
        "INSERT INTO changes (account_id, key_id, balance_delta, at) VALUES (?1, ?2, ?3, ?4)",
        args![account_id, key_id, delta, now_secs()],
    )?;
    notify_nodes(tx)
}

/// Every node reads the change feed when `tx` commits, not at its next poll.
pub(super) fn notify_nodes(tx: &mut dyn Sql) -> Result<(), Error> {
    if tx.dialect() == Dialect::Postgres {
        // Delivered when the transaction commits, once however many rows it added.
        tx.exec("SELECT pg_notify(?1, '')", args![super::snapshot::CHANGES])?;
    }
    Ok(())
}

/// Inserts a row and returns its new `id`.
pub(super) fn insert_returning_id(
    tx: &mut dyn Sql,
    sql: &str,
    args: &[super::sql::Param<'_>],
) -> Result<i64, Error> {
    Ok(tx.value(&format!("{sql} RETURNING id"), args)?)
}

pub(super) fn find_account(tx: &mut dyn Sql, name: &str) -> Result<Option<AccountRow>, Error> {
    let sql = format!("SELECT {ACCOUNT_COLS} FROM accounts WHERE name = ?1");
    Ok(tx
        .row(&sql, args![name])?
        .map(|r| account_row(&r))
        .transpose()?)
}

pub(super) fn require_account(tx: &mut dyn Sql, name: &str) -> Result<AccountRow, Error> {
    find_account(tx, name)?.ok_or_else(|| Error::Usage(format!("no account named {name:?}")))
}

/// Creates an account; an existing name is refused.
pub fn create_account(
    conn: &mut Conn,
    name: &str,
    credits: i64,
    plan: &str,
) -> Result<AccountRow, Error> {
    if name.trim().is_empty() {
        return Err(Error::Usage("an account needs a name".into()));
    }
    check_opening(credits)?;
    let mut tx = write_tx(conn)?;
    if find_account(&mut tx, name)?.is_some() {
        return Err(Error::Usage(format!("account {name:?} exists")));
    }
    let id = insert_returning_id(
        &mut tx,
        "INSERT INTO accounts (name, plan, balance, created_at) VALUES (?1, ?2, ?3, ?4)",
        args![name, plan, credits, now_secs()],
    )?;
    record_change(&mut tx, Some(id), None, credits)?;
    let row = require_account(&mut tx, name)?;
    tx.commit()?;
    Ok(row)
}

/// Who asks for a key, and how many live keys its account may have.
#[derive(Clone, Copy)]
pub struct KeyOrigin {
    /// The key it is created with (the dashboard's); `None` for the operator's.
    pub created_by: Option<i64>,
    /// `[limits] max_keys_per_account`.
    pub max_keys: u64,
}

impl KeyOrigin {
    /// The operator's: the CLI and the admin API.
    pub fn operator(config: &crate::config::Config) -> Self {
        Self {
            created_by: None,
            max_keys: config.limits.max_keys_per_account,
        }
    }
}

/// Creates a key for `account`, creating the account first if it is new
/// (with `credits` and `plan`). For an existing account those two are left
/// as they are. Refused when the account already has `origin.max_keys` live keys.
pub fn create_key(
    conn: &mut Conn,
    account: &str,
    credits: i64,
    plan: &str,
    origin: KeyOrigin,
) -> Result<CreatedKey, Error> {
    if account.trim().is_empty() {
        return Err(Error::Usage("an account name cannot be empty".into()));
    }
    check_opening(credits)?;
    let new = secret::generate().map_err(|e| Error::Usage(format!("no OS randomness: {e}")))?;
    let mut tx = write_tx(conn)?;
    let (account, new_account) = match find_account(&mut tx, account)? {
        Some(a) => (a, false),
        None => {
            let id = insert_returning_id(
                &mut tx,
                "INSERT INTO accounts (name, plan, balance, created_at) VALUES (?1, ?2, ?3, ?4)",
                args![account, plan, credits, now_secs()],
            )?;
            // A running server meets a new account at balance 0 and adds this
            // delta, as for any top-up, so the opening balance counts once.
            record_change(&mut tx, Some(id), None, credits)?;
            (require_account(&mut tx, account)?, true)
        }
    };
    // Counted in the same write transaction as the insert: concurrent
    // creations cannot together pass the cap.
    let live: u64 = (&mut tx as &mut dyn Sql).value(
        "SELECT COUNT(*) FROM api_keys WHERE account_id = ?1 AND disabled = 0",
        args![account.id],
    )?;
    if live >= origin.max_keys {
        return Err(Error::KeyLimit {
            account: account.name,
            max: origin.max_keys,
        });
    }
    let id = insert_returning_id(
        &mut tx,
        "INSERT INTO api_keys (account_id, hash, display_prefix, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        args![
            account.id,
            &new.hash[..],
            new.display_prefix,
            now_secs(),
            origin.created_by
        ],
    )?;
    record_change(&mut tx, Some(account.id), Some(id), 0)?;
    tx.commit()?;
    Ok(CreatedKey {
        id,
        secret: new.secret,
        display_prefix: new.display_prefix,
        account,
        new_account,
    })
}

pub fn list_keys(conn: &mut dyn Sql, account: Option<&str>) -> Result<Vec<KeyListing>, Error> {
    let rows = conn.rows(
        "SELECT k.id, k.display_prefix, a.name, k.disabled, k.last_used_at
         FROM api_keys k JOIN accounts a ON a.id = k.account_id
         WHERE CAST(?1 AS TEXT) IS NULL OR a.name = ?1 ORDER BY k.id",
        args![account],
    )?;
    rows.iter()
        .map(|r| {
            Ok(KeyListing {
                id: r.get(0)?,
                display_prefix: r.get(1)?,
                account: r.get(2)?,
                disabled: r.get(3)?,
                last_used_at: r.get(4)?,
            })
        })
        .collect()
}

/// The account a key belongs to, if the key exists.
pub fn key_account(conn: &mut dyn Sql, id: i64) -> Result<Option<i64>, Error> {
    Ok(conn
        .row("SELECT account_id FROM api_keys WHERE id = ?1", args![id])?
        .map(|r| r.get(0))
        .transpose()?)
}

pub fn set_key_disabled(conn: &mut Conn, id: i64, disabled: bool) -> Result<(), Error> {
    let mut tx = write_tx(conn)?;
    let account_id =
        key_account(&mut tx, id)?.ok_or_else(|| Error::Usage(format!("no key with id {id}")))?;
    tx.exec(
        "UPDATE api_keys SET disabled = ?1 WHERE id = ?2",
        args![disabled, id],
    )?;
    record_change(&mut tx, Some(account_id), Some(id), 0)?;
    Ok(tx.commit()?)
}

/// Disables key `id` of account `account_id` and every key created with it,
/// and with those, down the line: a leaked key's offspring go with it.
/// Returns the ids disabled (`id` first), or none when `id` is not the account's.
pub fn revoke_key(conn: &mut Conn, id: i64, account_id: i64) -> Result<Vec<i64>, Error> {
    let mut tx = write_tx(conn)?;
    let ids = tx
        .rows(
            "WITH RECURSIVE tree(id) AS (
                 SELECT id FROM api_keys WHERE id = ?1 AND account_id = ?2
                 UNION SELECT k.id FROM api_keys k JOIN tree t ON k.created_by = t.id
                 WHERE k.account_id = ?2
             )
             SELECT id FROM tree ORDER BY id",
            args![id, account_id],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect::<Result<Vec<i64>, _>>()?;
    for &key in &ids {
        tx.exec("UPDATE api_keys SET disabled = 1 WHERE id = ?1", args![key])?;
        record_change(&mut tx, Some(account_id), Some(key), 0)?;
    }
    tx.commit()?;
    Ok(ids)
}

/// Adds `credits` to the balance; returns the account as it is afterwards.
pub fn topup(conn: &mut Conn, name: &str, credits: i64) -> Result<AccountRow, Error> {
    let mut tx = write_tx(conn)?;
    let account = require_account(&mut tx, name)?;
    // Against the stored balance, which is never below the server's (its
    // charges reach SQLite after they are made): never too lenient.
    check_topup(&account, credits)?;
    tx.exec(
        "UPDATE accounts SET balance = balance + ?1 WHERE id = ?2",
        args![credits, account.id],
    )?;
    record_change(&mut tx, Some(account.id), None, credits)?;
    let after = require_account(&mut tx, name)?;
    tx.commit()?;
    Ok(after)
}

pub fn set_suspended(conn: &mut Conn, name: &str, suspended: bool) -> Result<(), Error> {
    let mut tx = write_tx(conn)?;
    let account = require_account(&mut tx, name)?;
    tx.exec(
        "UPDATE accounts SET suspended = ?1 WHERE id = ?2",
        args![suspended, account.id],
    )?;
    record_change(&mut tx, Some(account.id), None, 0)?;
    Ok(tx.commit()?)
}

/// Moves an account to another plan; a running server applies it within a refresh.
pub fn set_plan(conn: &mut Conn, name: &str, plan: &str) -> Result<(), Error> {
    let mut tx = write_tx(conn)?;
    let account = require_account(&mut tx, name)?;
    tx.exec(
        "UPDATE accounts SET plan = ?1 WHERE id = ?2",
        args![plan, account.id],
    )?;
    record_change(&mut tx, Some(account.id), None, 0)?;
    Ok(tx.commit()?)
}

pub fn account(conn: &mut dyn Sql, name: &str) -> Result<AccountRow, Error> {
    require_account(conn, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(dir: &tempfile::TempDir) -> crate::config::StoreConfig {
        crate::config::StoreConfig::at(dir.path().join("a.db"))
    }

    fn origin(created_by: Option<i64>) -> KeyOrigin {
        KeyOrigin {
            created_by,
            max_keys: 4,
        }
    }

    /// Revoking follows `created_by` down, within the account, and nowhere else.
    #[test]
    fn revoking_takes_the_keys_made_with_a_key_and_no_others() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open(&sqlite(&dir)).unwrap();
        let mut key = |by| create_key(&mut conn, "acme", 0, "free", origin(by)).unwrap();
        let owner = key(None);
        let leaked = key(Some(owner.id));
        let child = key(Some(leaked.id));
        let sibling = key(Some(owner.id));
        let account = owner.account.id;

        assert!(revoke_key(&mut conn, leaked.id, account + 1)
            .unwrap()
            .is_empty());
        assert_eq!(
            revoke_key(&mut conn, leaked.id, account).unwrap(),
            [leaked.id, child.id]
        );
        let live: Vec<i64> = list_keys(&mut conn, Some("acme"))
            .unwrap()
            .iter()
            .filter(|k| !k.disabled)
            .map(|k| k.id)
            .collect();
        assert_eq!(live, [owner.id, sibling.id]);
    }

    /// Live keys count against the cap; disabled ones do not.
    #[test]
    fn the_cap_counts_live_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = crate::store::open(&sqlite(&dir)).unwrap();
        let ids: Vec<i64> = (0..4)
            .map(|_| {
                create_key(&mut conn, "acme", 0, "free", origin(None))
                    .unwrap()
                    .id
            })
            .collect();
        let refused = create_key(&mut conn, "acme", 0, "free", origin(None));
        assert!(matches!(refused, Err(Error::KeyLimit { max: 4, .. })));
        set_key_disabled(&mut conn, ids[0], true).unwrap();
        create_key(&mut conn, "acme", 0, "free", origin(None)).unwrap();
    }
}

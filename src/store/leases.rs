//! Credit leases, on a PostgreSQL that several nodes share: an account's
//! free credit is its balance less every node's lease, and a node spends
//! only what it leased, so the nodes together never spend more than the
//! account has. A node's lease shrinks as its charges are written
//! ([`super::ledger::Writes::debit`]) and as it gives unused credit back.

use super::sql::{Conn, Mode, Sql, StoreError};
use crate::args;

/// What a lease request got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// Credits added to the node's lease: `need`, `need + extra`, or 0
    /// when the account's free credit is below `need`.
    pub credits: i64,
    /// The account's balance, as written so far.
    pub balance: i64,
}

/// Leases `need` credits of the account to `node`, and `extra` more while
/// the account has plenty (free credit for `need + extra` and as much again
/// for every node that leases too); else exactly `need`, so that the last
/// credits are never stranded in an idle node's lease. One lease request
/// per account at a time: the account's row is locked for it.
/// Refused when `node` is no longer in `epoch` (a peer took it over).
pub fn grant(
    conn: &mut Conn,
    account_id: i64,
    node: &str,
    epoch: i64,
    need: i64,
    extra: i64,
) -> Result<Grant, StoreError> {
    let mut tx = conn.transaction(Mode::Plain)?;
    // The lock first, alone: a statement that waited for it reads what the
    // holder committed only if it starts after the wait (READ COMMITTED
    // takes each statement's view when it starts).
    tx.exec(
        "SELECT id FROM accounts WHERE id = ?1 FOR UPDATE",
        args![account_id],
    )?;
    // A takeover claims the node's row FOR UPDATE: with its key locked
    // shared here, the epoch cannot move until this lease is committed,
    // while the node's own heartbeat (an update of no key) goes on.
    let current: Option<i64> = tx
        .row(
            "SELECT epoch FROM nodes WHERE name = ?1 FOR KEY SHARE",
            args![node],
        )?
        .map(|r| r.get(0))
        .transpose()?;
    if current != Some(epoch) {
        return Err(StoreError::Value(format!(
            "node {node:?} was taken over: it leases nothing until it has seen so"
        )));
    }
    let row = tx
        .row(
            "SELECT balance,
                 (SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM leases WHERE account_id = ?1),
                 (SELECT COUNT(DISTINCT node) FROM leases)
             FROM accounts WHERE id = ?1",
            args![account_id],
        )?
        .ok_or_else(StoreError::no_row)?;
    let (balance, leased, nodes): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
    let free = balance - leased;
    let plenty = need.saturating_add(extra.saturating_mul(nodes.saturating_add(2)));
    let credits = match free {
        f if f < need => 0,
        f if f >= plenty => need + extra,
        _ => need,
    };
    if credits > 0 {
        tx.exec(
            "INSERT INTO leases (account_id, node, credits) VALUES (?1, ?2, ?3)
             ON CONFLICT (account_id, node) DO UPDATE SET credits = leases.credits + ?3",
            args![account_id, node, credits],
        )?;
    }
    tx.commit()?;
    Ok(Grant { credits, balance })
}

/// Gives `credits` of the node's lease back to the account's free credit,
/// unless a peer took the node over since `epoch` (and freed the lease).
pub fn give_back(
    conn: &mut dyn Sql,
    account_id: i64,
    node: &str,
    epoch: i64,
    credits: i64,
) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE leases SET credits = credits - ?1
         WHERE account_id = ?2 AND node = ?3
           AND EXISTS (SELECT 1 FROM nodes WHERE name = ?3 AND epoch = ?4)",
        args![credits, account_id, node, epoch],
    )?;
    Ok(())
}

/// An account's credits as the database has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Standing {
    /// Put in, less every charge written.
    pub balance: i64,
    /// Leased to nodes (0 on a single node).
    pub leased: i64,
    /// Held by requests in flight, as last written.
    pub held: i64,
    /// Free to spend: a node's holds are spent from its lease, so the
    /// balance less the larger of the two.
    pub available: i64,
}

pub fn standing(conn: &mut dyn Sql, account_id: i64) -> Result<Standing, StoreError> {
    let row = conn
        .row(
            "SELECT balance,
                 (SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM leases WHERE account_id = ?1),
                 (SELECT CAST(COALESCE(SUM(credits), 0) AS BIGINT) FROM holds WHERE account_id = ?1)
             FROM accounts WHERE id = ?1",
            args![account_id],
        )?
        .ok_or_else(StoreError::no_row)?;
    let (balance, leased, held): (i64, i64, i64) = (row.get(0)?, row.get(1)?, row.get(2)?);
    Ok(Standing {
        balance,
        leased,
        held,
        available: balance - held.max(leased),
    })
}

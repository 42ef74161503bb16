//! fal's prices as `prices sync --apply` (or the server's own periodic
//! sync) stored them: one row per endpoint, read into the price table at
//! start-up and whenever the change feed says they moved.

use super::admin::notify_nodes;
use super::sql::{Conn, Mode, Sql, StoreError};
use crate::args;
use crate::billing::pricing::SyncedPrice;
use crate::config::Unit;
use crate::error::Error;

pub fn load(conn: &mut dyn Sql) -> Result<Vec<SyncedPrice>, StoreError> {
    conn.rows(
        "SELECT endpoint, unit, nano_usd FROM synced_prices ORDER BY endpoint",
        &[],
    )?
    .iter()
    .map(|r| {
        let unit: String = r.get(1)?;
        Ok(SyncedPrice {
            endpoint: r.get(0)?,
            unit: Unit::from_name(&unit)
                .ok_or_else(|| StoreError::Value(format!("unknown unit {unit:?}")))?,
            nano_usd: r.get(2)?,
        })
    })
    .collect()
}

/// Stores `prices` (each replacing its endpoint's) and tells every running
/// server, in one transaction.
pub fn store(conn: &mut Conn, prices: &[SyncedPrice], at_ms: i64) -> Result<u64, Error> {
    change(conn, at_ms, |tx| {
        for p in prices {
            tx.exec(
                "INSERT INTO synced_prices (endpoint, unit, nano_usd, synced_at_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (endpoint) DO UPDATE SET unit = excluded.unit,
                     nano_usd = excluded.nano_usd, synced_at_ms = excluded.synced_at_ms",
                args![p.endpoint, p.unit.name(), p.nano_usd, at_ms],
            )?;
        }
        Ok(prices.len() as u64)
    })
}

/// Drops the synced prices of `endpoints` (of every endpoint, if none is
/// named): the table's rules price them again. Returns how many were dropped.
pub fn forget(conn: &mut Conn, endpoints: &[String], at_ms: i64) -> Result<u64, Error> {
    change(conn, at_ms, |tx| {
        if endpoints.is_empty() {
            return Ok(tx.exec("DELETE FROM synced_prices", &[])?);
        }
        let mut dropped = 0;
        for e in endpoints {
            dropped += tx.exec("DELETE FROM synced_prices WHERE endpoint = ?1", args![e])?;
        }
        Ok(dropped)
    })
}

/// `edit` and a change in the feed saying the prices moved, in one transaction.
fn change(
    conn: &mut Conn,
    at_ms: i64,
    edit: impl FnOnce(&mut dyn Sql) -> Result<u64, Error>,
) -> Result<u64, Error> {
    let mut tx = conn.transaction(Mode::Serial)?;
    let n = edit(&mut tx)?;
    tx.exec(
        "INSERT INTO changes (balance_delta, at, prices) VALUES (0, ?1, 1)",
        args![at_ms / 1000],
    )?;
    notify_nodes(&mut tx)?;
    tx.commit()?;
    Ok(n)
}

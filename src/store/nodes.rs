//! The nodes of a shared PostgreSQL and their liveness: each is heard from
//! every second (by the database's clock); one silent for longer than the
//! lease TTL is taken over by a peer, which charges its unsettled holds at
//! their held amount and frees its leases (`ledger::recover` for that
//! node), and moves its epoch so that, should it come back, it knows to
//! drop what it had leased.

use super::sql::{Conn, Sql, StoreError};
use crate::args;

/// The database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// Registers `name` as alive (after its own recovery at start); its epoch.
pub fn join(conn: &mut dyn Sql, name: &str) -> Result<i64, StoreError> {
    conn.value(
        &format!(
            "INSERT INTO nodes (name, seen_at_ms) VALUES (?1, {NOW_MS})
             ON CONFLICT (name) DO UPDATE SET seen_at_ms = excluded.seen_at_ms
             RETURNING epoch"
        ),
        args![name],
    )
}

/// `name` is alive; its epoch, which a peer moved if it took it over.
pub fn heartbeat(conn: &mut dyn Sql, name: &str) -> Result<i64, StoreError> {
    join(conn, name)
}

/// Claims the nodes silent for longer than `ttl_ms`, each by one peer only
/// (the claim moves its epoch and its last sign of life), and takes each
/// over; their names.
pub fn take_over_silent(
    conn: &mut Conn,
    me: &str,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let claimed: Vec<String> = conn
        .rows(
            &format!(
                "UPDATE nodes SET epoch = epoch + 1, seen_at_ms = {NOW_MS}
                 WHERE name <> ?1 AND seen_at_ms < {NOW_MS} - ?2
                 RETURNING name"
            ),
            args![me, ttl_ms],
        )?
        .iter()
        .map(|r| r.get(0))
        .collect::<Result<_, _>>()?;
    for name in &claimed {
        let done = super::ledger::recover(conn, &[], now_ms, Some(name))?;
        tracing::warn!(
            node = %name,
            holds = done.holds,
            credits = done.credits,
            "took over a silent node: its unsettled holds charged at their held amount, its leases freed"
        );
    }
    Ok(claimed)
}

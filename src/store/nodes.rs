//! The nodes of a shared PostgreSQL and their liveness: each is heard from
//! every second (by the database's clock); one silent for longer than the
//! lease TTL is taken over by a peer, which charges its unsettled holds at
//! their held amount, its pending jobs' too (ending them), and frees its
//! leases (`ledger::recover` for that node), and moves its epoch so that,
//! should it come back, it knows to drop what it had leased.

use super::postgres::{bind, numbered};
use super::sql::{Conn, Mode, Param, Sql, StoreError};
use crate::args;

/// The database's clock, in milliseconds since the epoch.
const NOW_MS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)";

/// Registers `name` as alive (after its own recovery at start), in a new
/// epoch; its epoch.
pub fn join(conn: &mut dyn Sql, name: &str) -> Result<i64, StoreError> {
    conn.value(
        &format!(
            "INSERT INTO nodes (name, seen_at_ms) VALUES (?1, {NOW_MS})
             ON CONFLICT (name) DO UPDATE
             SET seen_at_ms = excluded.seen_at_ms, epoch = nodes.epoch + 1
             RETURNING epoch"
        ),
        args![name],
    )
}

/// What a heartbeat learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Beat {
    /// The node's epoch, which a peer (or a new process under the same
    /// name) moved if it took it over.
    pub epoch: i64,
    /// Nodes heard within `ttl_ms`, this one included.
    pub live: i64,
}

/// `name` is alive. On an async connection of its own, so that the
/// caller's deadline can drop it (see `postgres::AsyncConn`).
pub async fn heartbeat(
    client: &tokio_postgres::Client,
    name: &str,
    ttl_ms: i64,
) -> Result<Beat, StoreError> {
    let sql = numbered(&format!(
        "UPDATE nodes SET seen_at_ms = {NOW_MS} WHERE name = ?1
         RETURNING epoch,
             (SELECT COUNT(*) FROM nodes
              WHERE name = ?1 OR seen_at_ms >= {NOW_MS} - ?2)"
    ));
    let args = [Param::Text(name), Param::Int(ttl_ms)];
    let row = client.query_one(&sql, &bind(&args)).await?;
    Ok(Beat {
        epoch: row.try_get(0)?,
        live: row.try_get(1)?,
    })
}

/// Takes over the nodes silent for longer than `ttl_ms`, one at a time,
/// each in one transaction with its claim (which moves its epoch and its
/// last sign of life, so one peer only takes each); their names.
pub fn take_over_silent(
    conn: &mut Conn,
    me: &str,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<Vec<String>, StoreError> {
    let mut taken = Vec::new();
    loop {
        let mut tx = conn.transaction(Mode::Plain)?;
        let claimed = tx.row(
            &format!(
                "UPDATE nodes SET epoch = epoch + 1, seen_at_ms = {NOW_MS}
                 WHERE name = (SELECT name FROM nodes
                               WHERE name <> ?1 AND seen_at_ms < {NOW_MS} - ?2
                               LIMIT 1 FOR UPDATE SKIP LOCKED)
                 RETURNING name"
            ),
            args![me, ttl_ms],
        )?;
        let Some(row) = claimed else {
            return Ok(taken);
        };
        let name: String = row.get(0)?;
        let done = super::ledger::recover_in(
            &mut tx,
            &[],
            now_ms,
            Some(&name),
            super::ledger::Keep::Nothing,
        )?;
        tx.commit()?;
        tracing::warn!(
            node = %name,
            holds = done.holds,
            credits = done.credits,
            "took over a silent node: its unsettled holds charged at their held amount, its leases freed"
        );
        taken.push(name);
    }
}

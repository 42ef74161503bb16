//! Rate limits that hold across the nodes of one PostgreSQL: GCRA (see
//! `ratelimit`) on a row per key or account instead of an atomic, by the
//! database's clock, so that every node decides against the same state.

use super::sql::{Sql, StoreError};
use crate::args;

/// The database's clock, in nanoseconds since the epoch.
const NOW_NS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)";

/// One request against `subject`'s limit: `Ok(lead)` when allowed, with
/// the lead of its new theoretical arrival time over now; `Err(lead)` when
/// refused, with the current lead. Allowing moves the state; refusing
/// leaves it.
pub fn take(
    conn: &mut dyn Sql,
    subject: &str,
    interval_ns: i64,
    tolerance_ns: i64,
) -> Result<Result<i64, i64>, StoreError> {
    // `excluded.tat_ns - interval` is the statement's now, read once.
    let taken = conn.row(
        &format!(
            "INSERT INTO rate_limits (subject, tat_ns) VALUES (?1, {NOW_NS} + ?2)
             ON CONFLICT (subject) DO UPDATE
             SET tat_ns = GREATEST(rate_limits.tat_ns, excluded.tat_ns - ?2) + ?2
             WHERE GREATEST(rate_limits.tat_ns, excluded.tat_ns - ?2) - (excluded.tat_ns - ?2) <= ?3
             RETURNING tat_ns - {NOW_NS}"
        ),
        args![subject, interval_ns, tolerance_ns],
    )?;
    if let Some(row) = taken {
        return Ok(Ok(row.get(0)?));
    }
    let lead: i64 = conn.value(
        &format!("SELECT tat_ns - {NOW_NS} FROM rate_limits WHERE subject = ?1"),
        args![subject],
    )?;
    Ok(Err(lead.max(0)))
}

/// Gives back one allowed request (refused by another limit after all, or
/// one that never reached fal).
pub fn refund(conn: &mut dyn Sql, subject: &str, interval_ns: i64) -> Result<(), StoreError> {
    conn.exec(
        "UPDATE rate_limits SET tat_ns = tat_ns - ?2 WHERE subject = ?1",
        args![subject, interval_ns],
    )?;
    Ok(())
}

//! Our side of fal's books: the charges of a period with fal's request ids,
//! and the unbilled total of the last reconciliation (for the metric,
//! whichever process ran it).

use super::sql::{Param, Row, Sql, StoreError, ToParam};
use crate::args;

/// One charge, as reconciliation reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OurCharge {
    pub id: String,
    pub model: String,
    pub units_milli: u64,
    pub credits: u64,
    pub outcome: String,
    pub fal_request_id: Option<String>,
    pub fal_units_milli: Option<u64>,
    pub started_at_ms: i64,
    pub settled_at_ms: i64,
}

const COLUMNS: &str = "id, model, units_milli, credits, outcome, fal_request_id, fal_units_milli,
    started_at_ms, settled_at_ms";

fn our_charge(r: &Row) -> Result<OurCharge, StoreError> {
    Ok(OurCharge {
        id: r.get(0)?,
        model: r.get(1)?,
        units_milli: r.get(2)?,
        credits: r.get(3)?,
        outcome: r.get(4)?,
        fal_request_id: r.get(5)?,
        fal_units_milli: r.get(6)?,
        started_at_ms: r.get(7)?,
        settled_at_ms: r.get(8)?,
    })
}

/// Charges settled from `since_ms` to `until_ms` (exclusive).
pub fn charges_between(
    conn: &mut dyn Sql,
    since_ms: i64,
    until_ms: i64,
) -> Result<Vec<OurCharge>, StoreError> {
    conn.rows(
        &format!(
            "SELECT {COLUMNS} FROM charges WHERE settled_at_ms >= ?1 AND settled_at_ms < ?2
             ORDER BY settled_at_ms, id"
        ),
        args![since_ms, until_ms],
    )?
    .iter()
    .map(our_charge)
    .collect()
}

/// The charges with these fal request ids, settled whenever: a few
/// hundred ids a statement.
pub fn charges_of(
    conn: &mut dyn Sql,
    fal_request_ids: &[String],
) -> Result<Vec<OurCharge>, StoreError> {
    let mut found = Vec::new();
    for ids in fal_request_ids.chunks(500) {
        let marks: Vec<String> = (1..=ids.len()).map(|i| format!("?{i}")).collect();
        let params: Vec<Param<'_>> = ids.iter().map(|id| id.param()).collect();
        let rows = conn.rows(
            &format!(
                "SELECT {COLUMNS} FROM charges WHERE fal_request_id IN ({})",
                marks.join(", ")
            ),
            &params,
        )?;
        for r in &rows {
            found.push(our_charge(r)?);
        }
    }
    Ok(found)
}

pub fn record_run(
    conn: &mut dyn Sql,
    at_ms: i64,
    since_ms: i64,
    until_ms: i64,
    unbilled_nano_usd: u64,
) -> Result<(), StoreError> {
    conn.exec(
        "INSERT INTO reconcile_runs (at_ms, since_ms, until_ms, unbilled_nano_usd)
         VALUES (?1, ?2, ?3, ?4)",
        args![at_ms, since_ms, until_ms, unbilled_nano_usd],
    )?;
    Ok(())
}

/// The unbilled total of the latest reconciliation, if there was one.
pub fn last_unbilled(conn: &mut dyn Sql) -> Result<Option<u64>, StoreError> {
    conn.row(
        "SELECT unbilled_nano_usd FROM reconcile_runs ORDER BY seq DESC LIMIT 1",
        &[],
    )?
    .map(|r| r.get(0))
    .transpose()
}

//! Queued jobs in SQLite: who owns each one, the hold it carries, and how it
//! ended, so that ownership and pending holds survive a restart.

use rusqlite::{params, Connection, Transaction};

use super::ledger;
use crate::billing::facts::RequestFacts;
use crate::billing::journal::HoldRecord;
use crate::billing::pricing::Tariff;

/// A job as submitted.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// fal's request id.
    pub request_id: String,
    /// `{owner}/{alias}`: what fal's queue URLs for the job use.
    pub app: String,
    /// The hold: its id is our request id of the submission, and of the charge.
    pub hold: HoldRecord,
    pub estimate_units: u64,
    pub facts: RequestFacts,
    /// What prices it; `None` in rows written before jobs kept it.
    pub tariff: Option<Tariff>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Charged,
    Released,
}

impl JobEnd {
    fn as_str(self) -> &'static str {
        match self {
            JobEnd::Charged => "charged",
            JobEnd::Released => "released",
        }
    }
}

/// A job as loaded at start-up.
pub struct StoredJob {
    pub record: JobRecord,
    /// fal reported it COMPLETED.
    pub completed: bool,
    /// `None` while pending; else how it ended, what it cost and the balance left.
    pub ended: Option<(JobEnd, u64, i64)>,
}

pub fn insert(tx: &Transaction, job: &JobRecord) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO jobs (request_id, hold_id, account_id, key_id, app, model, held,
            estimate_units, facts, state, created_at_ms, tariff)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11)",
    )?
    .execute(params![
        job.request_id,
        job.hold.id,
        job.hold.account_id,
        job.hold.key_id,
        job.app,
        job.hold.model,
        job.hold.credits,
        job.estimate_units,
        job.facts.encode(),
        job.hold.created_at_ms,
        job.tariff.as_ref().map(Tariff::encode)
    ])?;
    Ok(())
}

pub fn settle(
    tx: &Transaction,
    request_id: &str,
    end: JobEnd,
    credits_used: u64,
    balance_remaining: i64,
    at_ms: i64,
) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "UPDATE jobs SET state = ?2, credits_used = ?3, balance_remaining = ?4, settled_at_ms = ?5
         WHERE request_id = ?1 AND state = 'pending'",
    )?
    .execute(params![
        request_id,
        end.as_str(),
        credits_used,
        balance_remaining,
        at_ms
    ])?;
    Ok(())
}

/// Notes that fal reported the job COMPLETED.
pub fn completed(tx: &Transaction, request_id: &str) -> rusqlite::Result<()> {
    tx.prepare_cached("UPDATE jobs SET completed = 1 WHERE request_id = ?1")?
        .execute([request_id])?;
    Ok(())
}

/// Every pending job, and the ended ones created since `since_ms`. A pending
/// job whose charge was written but whose end was not (a crash between the
/// two) comes back ended, from its charge.
pub fn load(conn: &Connection, since_ms: i64) -> rusqlite::Result<Vec<StoredJob>> {
    let mut stmt = conn.prepare(
        "SELECT j.request_id, j.app, j.hold_id, j.account_id, j.key_id, j.held, j.created_at_ms,
                j.model, j.estimate_units, j.facts, j.state, j.credits_used, j.balance_remaining,
                c.outcome, c.credits, a.balance, j.tariff, j.completed
         FROM jobs j
         JOIN accounts a ON a.id = j.account_id
         LEFT JOIN charges c ON c.id = j.hold_id
         WHERE j.state = 'pending' OR j.created_at_ms >= ?1",
    )?;
    let rows = stmt.query_map([since_ms], |r| {
        let record = JobRecord {
            request_id: r.get(0)?,
            app: r.get(1)?,
            hold: ledger::hold_row(r, 2)?,
            estimate_units: r.get(8)?,
            facts: RequestFacts::decode(&r.get::<_, String>(9)?),
            tariff: r
                .get::<_, Option<String>>(16)?
                .and_then(|t| Tariff::decode(&t)),
        };
        let state: String = r.get(10)?;
        let charge: Option<(String, u64)> = match r.get::<_, Option<String>>(13)? {
            Some(outcome) => Some((outcome, r.get(14)?)),
            None => None,
        };
        let end = |outcome: &str| {
            if outcome == "charged" || outcome == "recovered" {
                JobEnd::Charged
            } else {
                JobEnd::Released
            }
        };
        let ended = match (state.as_str(), charge) {
            ("pending", None) => None,
            ("pending", Some((outcome, credits))) => Some((end(&outcome), credits, r.get(15)?)),
            (state, _) => Some((end(state), r.get(11)?, r.get(12)?)),
        };
        Ok(StoredJob {
            record,
            completed: r.get(17)?,
            ended,
        })
    })?;
    rows.collect()
}

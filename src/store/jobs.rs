//! Queued jobs in the store: who owns each one, the hold it carries, and how it
//! ended, so that ownership and pending holds survive a restart.

use super::ledger;
use super::sql::{Row, Sql, StoreError};
use crate::args;
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

/// A job as read back: at start-up, or when its owner asks for one no
/// longer in memory.
pub struct StoredJob {
    pub record: JobRecord,
    /// fal reported it COMPLETED.
    pub completed: bool,
    /// `None` while pending.
    pub ended: Option<StoredEnd>,
}

/// How a stored job ended, what it cost and the balance it left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredEnd {
    pub end: JobEnd,
    pub credits_used: u64,
    pub balance_remaining: i64,
    /// When it ended (its submission, for one whose end a crash cut off).
    pub at_ms: i64,
}

pub fn insert(tx: &mut dyn Sql, job: &JobRecord) -> Result<(), StoreError> {
    tx.exec(
        "INSERT INTO jobs (request_id, hold_id, account_id, key_id, app, model, held,
            estimate_units, facts, state, created_at_ms, tariff)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'pending', ?10, ?11)
         ON CONFLICT DO NOTHING",
        args![
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
        ],
    )?;
    Ok(())
}

pub fn settle(
    tx: &mut dyn Sql,
    request_id: &str,
    end: JobEnd,
    credits_used: u64,
    balance_remaining: i64,
    at_ms: i64,
) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE jobs SET state = ?2, credits_used = ?3, balance_remaining = ?4, settled_at_ms = ?5
         WHERE request_id = ?1 AND state = 'pending'",
        args![
            request_id,
            end.as_str(),
            credits_used,
            balance_remaining,
            at_ms
        ],
    )?;
    Ok(())
}

/// Notes that fal reported the job COMPLETED.
pub fn completed(tx: &mut dyn Sql, request_id: &str) -> Result<(), StoreError> {
    tx.exec(
        "UPDATE jobs SET completed = 1 WHERE request_id = ?1",
        args![request_id],
    )?;
    Ok(())
}

/// What a job is read back from. A pending job whose charge was written
/// but whose end was not (a crash between the two) comes back ended, from
/// its charge.
const SELECT: &str =
    "SELECT j.request_id, j.app, j.hold_id, j.account_id, j.key_id, j.held, j.created_at_ms,
        j.model, j.estimate_units, j.facts, j.state, j.credits_used, j.balance_remaining,
        c.outcome, c.credits, a.balance, j.tariff, j.completed, j.settled_at_ms
     FROM jobs j
     JOIN accounts a ON a.id = j.account_id
     LEFT JOIN charges c ON c.id = j.hold_id";

/// Every pending job, and the `ended_limit` most recent ended ones created
/// since `since_ms`.
/// On a database several nodes share, the pending jobs are `node`'s only:
/// another node's hold is that node's to settle.
pub fn load(
    conn: &mut dyn Sql,
    since_ms: i64,
    ended_limit: usize,
    node: Option<&str>,
) -> Result<Vec<StoredJob>, StoreError> {
    let limit = i64::try_from(ended_limit).unwrap_or(i64::MAX);
    let mut rows = match node {
        None => conn.rows(&format!("{SELECT} WHERE j.state = 'pending'"), &[])?,
        Some(node) => conn.rows(
            &format!(
                "{SELECT} WHERE j.state = 'pending'
                   AND EXISTS (SELECT 1 FROM holds h WHERE h.id = j.hold_id AND h.node = ?1)"
            ),
            args![node],
        )?,
    };
    rows.extend(conn.rows(
        &format!(
            "{SELECT} WHERE j.created_at_ms >= ?1 AND j.state <> 'pending'
             ORDER BY j.created_at_ms DESC LIMIT ?2"
        ),
        args![since_ms, limit],
    )?);
    rows.iter().map(stored).collect()
}

/// The job `request_id` if `account_id` owns it and it is pending or was
/// created since `since_ms`.
pub fn find(
    conn: &mut dyn Sql,
    request_id: &str,
    account_id: i64,
    since_ms: i64,
) -> Result<Option<StoredJob>, StoreError> {
    conn.row(
        &format!(
            "{SELECT} WHERE j.request_id = ?1 AND j.account_id = ?2
               AND (j.state = 'pending' OR j.created_at_ms >= ?3)"
        ),
        args![request_id, account_id, since_ms],
    )?
    .map(|r| stored(&r))
    .transpose()
}

fn stored(r: &Row) -> Result<StoredJob, StoreError> {
    let record = JobRecord {
        request_id: r.get(0)?,
        app: r.get(1)?,
        hold: ledger::hold_row(r, 2)?,
        estimate_units: r.get(8)?,
        facts: RequestFacts::decode(&r.get::<String>(9)?),
        tariff: r
            .get::<Option<String>>(16)?
            .and_then(|t| Tariff::decode(&t)),
    };
    let state: String = r.get(10)?;
    let charge: Option<(String, u64)> = match r.get::<Option<String>>(13)? {
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
        ("pending", Some((outcome, credits))) => Some(StoredEnd {
            end: end(&outcome),
            credits_used: credits,
            balance_remaining: r.get(15)?,
            at_ms: record.hold.created_at_ms,
        }),
        (state, _) => Some(StoredEnd {
            end: end(state),
            credits_used: r.get(11)?,
            balance_remaining: r.get(12)?,
            at_ms: r
                .get::<Option<i64>>(18)?
                .unwrap_or(record.hold.created_at_ms),
        }),
    };
    Ok(StoredJob {
        record,
        completed: r.get(17)?,
        ended,
    })
}

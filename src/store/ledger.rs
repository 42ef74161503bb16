//! The ledger in the store: holds and charges written in the writer's
//! batches, recovery of holds a killed process left behind, and usage reports.

use serde::Serialize;

use super::sql::{Conn, Dialect, Mode, Param, Row, Sql, StoreError};
use crate::args;
use crate::billing::journal::{Entry, HoldRecord};
use crate::billing::receipt::FalReceipt;

/// How a hold ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// fal succeeded: the actual cost was charged.
    Charged,
    /// fal failed, timed out, or the client left first: nothing charged.
    Released,
    /// Found unsettled after a crash: charged at most its hold.
    Recovered,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Charged => "charged",
            Outcome::Released => "released",
            Outcome::Recovered => "recovered",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "charged" => Outcome::Charged,
            "released" => Outcome::Released,
            "recovered" => Outcome::Recovered,
            _ => return None,
        })
    }
}

impl ChargeRecord {
    /// What of the charge its hold covered: what a node's lease paid.
    pub fn from_lease(&self) -> u64 {
        self.credits.min(self.held)
    }
}

/// One settled request, as written to `charges`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChargeRecord {
    pub id: String,
    pub account_id: i64,
    pub key_id: i64,
    pub model: String,
    pub units_milli: u64,
    pub credits: u64,
    pub held: u64,
    /// What the actual cost exceeded the hold by and the balance could not cover.
    pub shortfall: u64,
    pub fal_status: Option<u16>,
    pub outcome: Outcome,
    pub started_at_ms: i64,
    pub settled_at_ms: i64,
    /// fal's request id and billed units, where fal gave them.
    pub fal: FalReceipt,
}

/// The ledger's row writes, within the writer's transaction, for `node`:
/// the node whose holds these are and whose lease a charge spends (`None`
/// on a single node, which leases nothing).
pub struct Writes<'t, 'c> {
    tx: &'t mut super::sql::Tx<'c>,
    node: Option<&'t str>,
}

impl<'t, 'c> Writes<'t, 'c> {
    pub fn new(tx: &'t mut super::sql::Tx<'c>, node: Option<&'t str>) -> Self {
        Self { tx, node }
    }

    /// A hold, unless its id was settled before.
    pub fn hold(&mut self, h: &HoldRecord) -> Result<(), StoreError> {
        self.tx.exec(
            "INSERT INTO holds (id, account_id, key_id, model, credits, created_at_ms, node)
             SELECT ?1, CAST(?2 AS BIGINT), CAST(?3 AS BIGINT), CAST(?4 AS TEXT),
                 CAST(?5 AS BIGINT), CAST(?6 AS BIGINT), CAST(?7 AS TEXT)
             WHERE NOT EXISTS (SELECT 1 FROM charges WHERE id = ?1)
             ON CONFLICT DO NOTHING",
            args![
                h.id,
                h.account_id,
                h.key_id,
                h.model,
                h.credits,
                h.created_at_ms,
                self.node.unwrap_or("")
            ],
        )?;
        Ok(())
    }

    /// Records a settlement once: a replay of the same id changes nothing, so
    /// the balance moves by each charge exactly once.
    pub fn settle(&mut self, c: &ChargeRecord) -> Result<bool, StoreError> {
        let inserted = self.charge(c)?;
        if inserted {
            self.debit(c.account_id, c.credits, c.from_lease(), None)?;
        } else {
            self.correct(c)?;
        }
        self.unhold(&c.id)?;
        Ok(inserted)
    }

    /// The real outcome of a hold that a peer's takeover charged at its
    /// held amount while this node was cut off from the database: the
    /// charge becomes what happened, and the balance moves by the
    /// difference (back, for work fal did not do). Once: the charge is no
    /// longer `recovered` after. Leases are not touched: the takeover
    /// freed the one the hold came from.
    pub fn correct(&mut self, c: &ChargeRecord) -> Result<(), StoreError> {
        if c.outcome == Outcome::Recovered {
            return Ok(());
        }
        let Some(row) = self.tx.row(
            "SELECT credits FROM charges WHERE id = ?1 AND outcome = 'recovered'",
            args![c.id],
        )?
        else {
            return Ok(());
        };
        let recovered: i64 = row.get(0)?;
        let corrected = self.tx.exec(
            "UPDATE charges SET units_milli = ?2, credits = ?3, shortfall = ?4,
                 fal_status = ?5, outcome = ?6, settled_at_ms = ?7,
                 fal_request_id = ?8, fal_units_milli = ?9
             WHERE id = ?1 AND outcome = 'recovered'",
            args![
                c.id,
                c.units_milli,
                c.credits,
                c.shortfall,
                c.fal_status,
                c.outcome.as_str(),
                c.settled_at_ms,
                c.fal.request_id,
                c.fal.units_milli
            ],
        )?;
        if corrected == 0 {
            return Ok(());
        }
        let delta = Param::int(c.credits)? - recovered;
        if delta != 0 {
            self.tx.exec(
                "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2",
                args![delta, c.account_id],
            )?;
        }
        // A job the takeover ended with its hold reports what happened.
        self.tx.exec(
            "UPDATE jobs SET
                 state = CASE ?2 WHEN 'released' THEN 'released' ELSE 'charged' END,
                 credits_used = ?3,
                 balance_remaining = (SELECT balance FROM accounts WHERE id = jobs.account_id)
             WHERE hold_id = ?1",
            args![c.id, c.outcome.as_str(), c.credits],
        )?;
        Ok(())
    }

    /// The `charges` row alone; false when the id was recorded before (then
    /// nothing may be debited for it).
    pub fn charge(&mut self, c: &ChargeRecord) -> Result<bool, StoreError> {
        let inserted = self.tx.exec(
            "INSERT INTO charges (id, account_id, key_id, model, units_milli, credits,
                held, shortfall, fal_status, outcome, started_at_ms, settled_at_ms,
                fal_request_id, fal_units_milli)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
             ON CONFLICT DO NOTHING",
            args![
                c.id,
                c.account_id,
                c.key_id,
                c.model,
                c.units_milli,
                c.credits,
                c.held,
                c.shortfall,
                c.fal_status,
                c.outcome.as_str(),
                c.started_at_ms,
                c.settled_at_ms,
                c.fal.request_id,
                c.fal.units_milli
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Moves a balance down by `credits` (a delta: never a write of the
    /// whole balance), and the node's lease by `leased`, the part of them
    /// its holds covered: a cost beyond its hold comes out of the account's
    /// free credit, not out of a lease that never had it. With `epoch`, the
    /// lease pays only if the node is still in that epoch: a hold taken
    /// before a peer took the node over came from a lease the peer freed.
    pub fn debit(
        &mut self,
        account_id: i64,
        credits: u64,
        leased: u64,
        epoch: Option<i64>,
    ) -> Result<(), StoreError> {
        if credits > 0 {
            self.tx.exec(
                "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2",
                args![credits, account_id],
            )?;
        }
        if let (Some(node), true) = (self.node, leased > 0) {
            self.tx.exec(
                "UPDATE leases SET credits = credits - ?1 WHERE account_id = ?2 AND node = ?3
                   AND (CAST(?4 AS BIGINT) IS NULL
                        OR EXISTS (SELECT 1 FROM nodes WHERE name = ?3 AND epoch = ?4))",
                args![leased, account_id, node, epoch],
            )?;
        }
        Ok(())
    }

    pub fn unhold(&mut self, id: &str) -> Result<(), StoreError> {
        self.tx.exec("DELETE FROM holds WHERE id = ?1", args![id])?;
        Ok(())
    }
}

/// What start-up recovery did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Settlements found only in the journal, now recorded as they happened.
    pub settled: u64,
    /// Holds whose outcome was never recorded, charged their held amount.
    pub holds: u64,
    pub credits: u64,
}

/// Settles what a process that did not stop cleanly left behind. The
/// journal's jobs are recorded, and its settlements as they happened (each
/// once: an id already in `charges` is left alone). A hold with no recorded outcome,
/// in `holds` or only in the journal, may have been served by fal, so it is
/// charged its held amount, which the balance covered when it was taken; a
/// pending queued job keeps its hold (the job settles it).
pub fn recover(
    conn: &mut Conn,
    journal: &[Entry],
    now_ms: i64,
    node: Option<&str>,
) -> Result<Recovered, StoreError> {
    let mut tx = conn.transaction(Mode::Plain)?;
    let done = recover_in(&mut tx, journal, now_ms, node, Keep::PendingJobs)?;
    tx.commit()?;
    Ok(done)
}

/// Which holds recovery leaves alone.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    /// A node's own recovery: its pending jobs keep their holds, and it
    /// settles them as they end.
    PendingJobs,
    /// A peer's takeover of a node that is gone: no one is left to settle
    /// its pending jobs, so they are charged their hold like any other.
    Nothing,
}

/// [`recover`], within `tx`.
pub fn recover_in(
    tx: &mut super::sql::Tx<'_>,
    journal: &[Entry],
    now_ms: i64,
    node: Option<&str>,
    keep: Keep,
) -> Result<Recovered, StoreError> {
    let mut done = Recovered::default();
    for entry in journal {
        match entry {
            Entry::Hold(h) => Writes::new(tx, node).hold(h)?,
            Entry::Settle(c) => done.settled += u64::from(Writes::new(tx, node).settle(c)?),
            // Pending again, with its hold: the job settles it, not recovery.
            Entry::Job(j) => super::jobs::insert(tx, j)?,
            Entry::Completed(id) => super::jobs::completed(tx, id)?,
        }
    }
    let orphans: Vec<HoldRecord> = tx
        .rows(
            "SELECT id, account_id, key_id, credits, created_at_ms, model FROM holds
             WHERE node = ?1
               AND (?2 = 0 OR id NOT IN (SELECT hold_id FROM jobs WHERE state = 'pending'))
             ORDER BY created_at_ms",
            args![node.unwrap_or(""), keep == Keep::PendingJobs],
        )?
        .iter()
        .map(|r| hold_row(r, 0))
        .collect::<Result<_, _>>()?;
    for h in orphans {
        let charge = ChargeRecord {
            id: h.id,
            account_id: h.account_id,
            key_id: h.key_id,
            model: h.model,
            units_milli: 0,
            credits: h.credits,
            held: h.credits,
            shortfall: 0,
            fal_status: None,
            outcome: Outcome::Recovered,
            started_at_ms: h.created_at_ms,
            settled_at_ms: now_ms,
            fal: FalReceipt::default(),
        };
        if Writes::new(tx, node).settle(&charge)? {
            done.holds += 1;
            done.credits += charge.credits;
        }
    }
    // A job whose charge was recorded but whose end was not (a kill between
    // the two) is ended now, from its charge, so that it is not pending for ever.
    tx.exec(
        "UPDATE jobs SET
            state = CASE c.outcome WHEN 'released' THEN 'released' ELSE 'charged' END,
            credits_used = c.credits,
            balance_remaining = (SELECT balance FROM accounts WHERE id = jobs.account_id),
            settled_at_ms = c.settled_at_ms
         FROM charges c WHERE c.id = jobs.hold_id AND jobs.state = 'pending'",
        &[],
    )?;
    if let Some(node) = node {
        // What the node leased before is free again, but for the holds of
        // its pending jobs, which it takes up again.
        tx.exec("DELETE FROM leases WHERE node = ?1", args![node])?;
        tx.exec(
            "INSERT INTO leases (account_id, node, credits)
             SELECT account_id, ?1, CAST(SUM(credits) AS BIGINT) FROM holds WHERE node = ?1
             GROUP BY account_id",
            args![node],
        )?;
    }
    Ok(done)
}

#[derive(Debug, Serialize)]
pub struct ModelUsage {
    pub model: String,
    pub requests: u64,
    pub credits: u64,
    /// Of `credits`, what was charged beyond the balance (the account went into debt).
    pub shortfall: u64,
}

/// Reads a hold's `id, account_id, key_id, credits, created_at_ms, model`
/// from column `first` on.
pub(super) fn hold_row(r: &Row, first: usize) -> Result<HoldRecord, StoreError> {
    Ok(HoldRecord {
        id: r.get(first)?,
        account_id: r.get(first + 1)?,
        key_id: r.get(first + 2)?,
        credits: r.get(first + 3)?,
        created_at_ms: r.get(first + 4)?,
        model: r.get(first + 5)?,
    })
}

/// Reads `id, model, credits, outcome, fal_status, settled_at_ms, shortfall`.
fn charge_row(r: &Row) -> Result<ChargeRow, StoreError> {
    Ok(ChargeRow {
        id: r.get(0)?,
        model: r.get(1)?,
        credits: r.get(2)?,
        outcome: r.get(3)?,
        fal_status: r.get(4)?,
        settled_at_ms: r.get(5)?,
        shortfall: r.get(6)?,
    })
}

#[derive(Debug, Serialize)]
pub struct ChargeRow {
    pub id: String,
    pub model: String,
    pub credits: u64,
    pub outcome: String,
    pub fal_status: Option<u16>,
    pub settled_at_ms: i64,
    /// Of `credits`, what was charged beyond the balance.
    pub shortfall: u64,
}

/// Charges since `since_ms`, newest first, and totals per model.
pub fn usage(
    conn: &mut dyn Sql,
    account_id: i64,
    since_ms: i64,
) -> Result<(Vec<ModelUsage>, Vec<ChargeRow>), StoreError> {
    let totals = conn
        .rows(
            "SELECT model, COUNT(*), CAST(SUM(credits) AS BIGINT), CAST(SUM(shortfall) AS BIGINT)
             FROM charges
             WHERE account_id = ?1 AND settled_at_ms >= ?2 AND outcome != 'released'
             GROUP BY model ORDER BY SUM(credits) DESC, model",
            args![account_id, since_ms],
        )?
        .iter()
        .map(|r| {
            Ok(ModelUsage {
                model: r.get(0)?,
                requests: r.get(1)?,
                credits: r.get(2)?,
                shortfall: r.get(3)?,
            })
        })
        .collect::<Result<_, StoreError>>()?;
    let charges = conn
        .rows(
            "SELECT id, model, credits, outcome, fal_status, settled_at_ms, shortfall FROM charges
             WHERE account_id = ?1 AND settled_at_ms >= ?2 ORDER BY settled_at_ms DESC, id",
            args![account_id, since_ms],
        )?
        .iter()
        .map(charge_row)
        .collect::<Result<_, _>>()?;
    Ok((totals, charges))
}

/// Credits charged per UTC day and model since `since_ms`, oldest day first.
#[derive(Debug, Serialize)]
pub struct DailyUsage {
    pub day: String,
    pub model: String,
    pub credits: u64,
}

pub fn daily(
    conn: &mut dyn Sql,
    account_id: i64,
    since_ms: i64,
) -> Result<Vec<DailyUsage>, StoreError> {
    let day = match conn.dialect() {
        Dialect::Sqlite => "date(settled_at_ms / 1000, 'unixepoch')",
        Dialect::Postgres => {
            "to_char(to_timestamp(settled_at_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
        }
    };
    conn.rows(
        &format!(
            "SELECT {day} AS day, model, CAST(SUM(credits) AS BIGINT) FROM charges
             WHERE account_id = ?1 AND settled_at_ms >= ?2 AND credits > 0
             GROUP BY day, model ORDER BY day, model"
        ),
        args![account_id, since_ms],
    )?
    .iter()
    .map(|r| {
        Ok(DailyUsage {
            day: r.get(0)?,
            model: r.get(1)?,
            credits: r.get(2)?,
        })
    })
    .collect()
}

/// The account's latest `limit` charges, newest first.
pub fn recent(
    conn: &mut dyn Sql,
    account_id: i64,
    limit: u32,
) -> Result<Vec<ChargeRow>, StoreError> {
    conn.rows(
        "SELECT id, model, credits, outcome, fal_status, settled_at_ms, shortfall FROM charges
         WHERE account_id = ?1 ORDER BY settled_at_ms DESC, id LIMIT ?2",
        args![account_id, limit],
    )?
    .iter()
    .map(charge_row)
    .collect()
}

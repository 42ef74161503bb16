//! Card payments in the store: a paid Checkout Session credits its account
//! once, a refund takes back what Stripe reports refunded beyond what was
//! taken back before. Both move the balance by a delta through the change
//! feed, as a top-up does, so a running server applies each exactly once.

use serde::Serialize;

use super::admin::{check_topup, find_account, record_change, write_tx};
use super::now_ms;
use super::sql::{Conn, Sql};
use crate::args;
use crate::error::Error;

/// A paid Checkout Session, as its signed event reports it.
#[derive(Debug)]
pub struct Paid<'a> {
    /// The Checkout Session id: the payment's key.
    pub session: &'a str,
    /// The account's name (`client_reference_id`).
    pub account: &'a str,
    pub payment_intent: Option<&'a str>,
    pub currency: &'a str,
    /// What was charged, in the currency's smallest unit.
    pub amount: i64,
    pub credits: i64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    /// New: the account was credited, less `taken_back` for a refund of
    /// this payment whose event arrived before the payment's.
    Credited {
        account_id: i64,
        taken_back: i64,
    },
    /// This session was recorded before: nothing changed.
    Replayed,
    NoSuchAccount,
}

pub fn record_paid(conn: &mut Conn, p: &Paid) -> Result<Recorded, Error> {
    let mut tx = write_tx(conn)?;
    let Some(account) = find_account(&mut tx, p.account)? else {
        return Ok(Recorded::NoSuchAccount);
    };
    let inserted = tx.exec(
        "INSERT INTO payments (id, account_id, payment_intent, currency, amount, credits, created_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
        args![p.session, account.id, p.payment_intent, p.currency, p.amount, p.credits, now_ms()],
    )?;
    if inserted == 0 {
        return Ok(Recorded::Replayed);
    }
    // Positive, and within the most a balance may hold (no overflow); else
    // the transaction, payment row and all, is dropped.
    check_topup(&account, p.credits)?;
    tx.exec(
        "UPDATE accounts SET balance = balance + ?1 WHERE id = ?2",
        args![p.credits, account.id],
    )?;
    record_change(&mut tx, Some(account.id), None, p.credits)?;
    let mut taken_back = 0;
    if let Some(intent) = p.payment_intent {
        let early = tx.row(
            "DELETE FROM early_refunds WHERE payment_intent = ?1 RETURNING currency, amount_refunded",
            args![intent],
        )?;
        if let Some(early) = early {
            let (currency, amount_refunded): (String, i64) = (early.get(0)?, early.get(1)?);
            if let Refunded::Debited { credits, .. } =
                take_back(&mut tx, intent, &currency, amount_refunded)?
            {
                taken_back = credits;
            }
        }
    }
    tx.commit()?;
    Ok(Recorded::Credited {
        account_id: account.id,
        taken_back,
    })
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refunded {
    /// `credits` taken back now (the balance may go below zero).
    Debited { account_id: i64, credits: i64 },
    /// Stripe reported no more refunded than before: a replay.
    Unchanged,
    /// No payment of ours has this payment intent (yet: the refund is kept,
    /// and taken back if its payment arrives).
    UnknownPayment,
}

/// Stripe's `amount_refunded` is the payment's refunded total so far; the
/// credits taken back are that share of the payment's credits (all of them
/// once it is refunded in full), less what earlier refunds took.
pub fn record_refund(
    conn: &mut Conn,
    payment_intent: &str,
    currency: &str,
    amount_refunded: i64,
) -> Result<Refunded, Error> {
    let mut tx = write_tx(conn)?;
    let refunded = take_back(&mut tx, payment_intent, currency, amount_refunded)?;
    if refunded == Refunded::UnknownPayment {
        tx.exec(
            "INSERT INTO early_refunds (payment_intent, currency, amount_refunded) VALUES (?1, ?2, ?3)
             ON CONFLICT (payment_intent) DO UPDATE
             SET amount_refunded = CASE
                 WHEN excluded.amount_refunded > early_refunds.amount_refunded
                 THEN excluded.amount_refunded ELSE early_refunds.amount_refunded END",
            args![payment_intent, currency, amount_refunded],
        )?;
    }
    tx.commit()?;
    Ok(refunded)
}

/// [`record_refund`] within `tx`.
fn take_back(
    tx: &mut dyn Sql,
    payment_intent: &str,
    currency: &str,
    amount_refunded: i64,
) -> Result<Refunded, Error> {
    let row = tx.row(
        "SELECT id, account_id, currency, amount, credits, refunded_amount, refunded_credits
         FROM payments WHERE payment_intent = ?1",
        args![payment_intent],
    )?;
    let Some(r) = row else {
        return Ok(Refunded::UnknownPayment);
    };
    let (id, account_id, paid_in): (String, i64, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
    let (amount, credits, before_amount, before_credits): (i64, i64, i64, i64) =
        (r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
    if !paid_in.eq_ignore_ascii_case(currency) {
        return Err(Error::Usage(format!(
            "a refund in {currency} of a payment in {paid_in}"
        )));
    }
    let total = amount_refunded.clamp(0, amount);
    if total <= before_amount {
        return Ok(Refunded::Unchanged);
    }
    let taken_total = if amount == 0 {
        credits
    } else {
        i64::try_from(i128::from(total) * i128::from(credits) / i128::from(amount))
            .unwrap_or(credits)
    };
    let taken = taken_total - before_credits;
    tx.exec(
        "UPDATE payments SET refunded_amount = ?1, refunded_credits = ?2 WHERE id = ?3",
        args![total, taken_total, id],
    )?;
    tx.exec(
        "UPDATE accounts SET balance = balance - ?1 WHERE id = ?2",
        args![taken, account_id],
    )?;
    record_change(tx, Some(account_id), None, -taken)?;
    Ok(Refunded::Debited {
        account_id,
        credits: taken,
    })
}

#[derive(Debug, Serialize)]
pub struct PaymentRow {
    pub id: String,
    pub payment_intent: Option<String>,
    pub currency: String,
    pub amount: i64,
    pub credits: i64,
    pub refunded_amount: i64,
    pub refunded_credits: i64,
    pub created_at_ms: i64,
    /// Stripe's receipt for the card charge, once Stripe has sent it.
    pub receipt_url: Option<String>,
}

/// Keeps the receipt of a card charge (the latest Stripe sent), by its
/// payment intent.
pub fn record_receipt(conn: &mut dyn Sql, payment_intent: &str, url: &str) -> Result<(), Error> {
    conn.exec(
        "INSERT INTO receipts (payment_intent, url) VALUES (?1, ?2)
         ON CONFLICT (payment_intent) DO UPDATE SET url = excluded.url",
        args![payment_intent, url],
    )?;
    Ok(())
}

/// An account's payments, newest first.
pub fn list(conn: &mut dyn Sql, account_id: i64) -> Result<Vec<PaymentRow>, Error> {
    conn.rows(
        "SELECT p.id, p.payment_intent, p.currency, p.amount, p.credits, p.refunded_amount,
            p.refunded_credits, p.created_at_ms, r.url
         FROM payments p LEFT JOIN receipts r ON r.payment_intent = p.payment_intent
         WHERE p.account_id = ?1 ORDER BY p.created_at_ms DESC, p.id",
        args![account_id],
    )?
    .iter()
    .map(|r| {
        Ok(PaymentRow {
            id: r.get(0)?,
            payment_intent: r.get(1)?,
            currency: r.get(2)?,
            amount: r.get(3)?,
            credits: r.get(4)?,
            refunded_amount: r.get(5)?,
            refunded_credits: r.get(6)?,
            created_at_ms: r.get(7)?,
            receipt_url: r.get(8)?,
        })
    })
    .collect()
}

//! An account's usage report: charges and totals per model, and top-ups by
//! card, for the CLI's `usage` and the admin API.

use serde::Serialize;

use crate::billing::pricing::PriceTable;
use crate::dates;
use crate::error::Error;
use crate::store::admin;
use crate::store::ledger::{self, ChargeRow, ModelUsage};
use crate::store::payments::{self, PaymentRow};

#[derive(Serialize)]
pub struct UsageReport {
    pub account: String,
    pub since: Option<String>,
    pub total_credits: u64,
    pub total_usd: String,
    pub models: Vec<ModelUsage>,
    pub charges: Vec<ChargeRow>,
    /// Of `total_credits`, what was charged beyond the balance: credits the account owes.
    pub total_shortfall: u64,
    /// Credits put in by card in the period, each payment by its id (the
    /// Checkout Session's), with what refunds took back.
    pub topups: Vec<PaymentRow>,
}

/// `since` is a UTC date (`YYYY-MM-DD`); `None` means everything.
pub fn report(
    conn: &mut crate::store::sql::Conn,
    prices: &PriceTable,
    name: &str,
    since: Option<String>,
) -> Result<UsageReport, Error> {
    let since_ms = match &since {
        None => 0,
        Some(d) => {
            dates::parse_date(d)
                .ok_or_else(|| Error::Usage(format!("since {d:?}: expected YYYY-MM-DD")))?
                * 1000
        }
    };
    let account = admin::account(conn, name)?;
    let (models, charges) = ledger::usage(conn, account.id, since_ms)?;
    let topups = payments::list(conn, account.id)?
        .into_iter()
        .filter(|p| p.created_at_ms >= since_ms)
        .collect();
    let total_credits = models.iter().map(|m| m.credits).sum();
    let total_shortfall = models.iter().map(|m| m.shortfall).sum();
    Ok(UsageReport {
        account: name.to_owned(),
        since,
        total_credits,
        total_usd: prices.cost_usd(total_credits),
        models,
        charges,
        total_shortfall,
        topups,
    })
}

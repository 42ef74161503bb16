//! One Stripe event, applied to the books. Only events whose signature
//! checked reach here. Each is idempotent: a paid session is keyed by its
//! id, a refund by the cumulative amount Stripe reports.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::Webhook;
use crate::error::ApiError;
use crate::store::payments::{self, Paid, Recorded, Refunded};

/// What every event has: read first, so that an event of a type we do not
/// use is answered 200 whatever its object looks like (a 400 would have
/// Stripe retry it for days, then disable the endpoint).
#[derive(Deserialize)]
struct Head {
    id: String,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct Event {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    data: Data,
}

#[derive(Deserialize)]
struct Data {
    object: Object,
}

/// The fields we read of a Checkout Session or a Charge.
#[derive(Deserialize, Default)]
#[serde(default)]
struct Object {
    id: String,
    mode: Option<String>,
    payment_status: Option<String>,
    client_reference_id: Option<String>,
    currency: Option<String>,
    amount_total: Option<i64>,
    amount_subtotal: Option<i64>,
    payment_intent: Option<String>,
    /// Documented as nullable.
    metadata: Option<HashMap<String, String>>,
    amount_refunded: Option<i64>,
    receipt_url: Option<String>,
}

/// The answer to Stripe: 200 for every event applied, replayed or ignored.
#[derive(Serialize, Debug)]
pub struct Applied {
    pub event: String,
    /// `credited`, `refunded`, `receipt`, `replayed` or `ignored`.
    pub outcome: &'static str,
    /// Credits added (credited, net of a refund whose event came first) or
    /// taken back (refunded).
    pub credits: i64,
    #[serde(skip)]
    pub account_changed: bool,
}

impl Webhook {
    /// Checks the signature of the raw `body`; `Ok` only for one Stripe made.
    pub fn verify(&self, header: Option<&str>, body: &[u8], now_secs: i64) -> Result<(), ApiError> {
        let header = header.ok_or(ApiError::WebhookSignature("missing"))?;
        super::signature::verify(header, body, &self.secret, now_secs)
            .map_err(ApiError::WebhookSignature)
    }

    /// Applies a verified event.
    pub fn apply(
        &self,
        conn: &mut crate::store::sql::Conn,
        body: &mut [u8],
    ) -> Result<Applied, ApiError> {
        // simd-json parses in place: the head is read from a copy.
        let head: Head = simd_json::serde::from_slice(&mut body.to_vec())
            .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        if !matches!(
            head.kind.as_str(),
            "checkout.session.completed"
                | "checkout.session.async_payment_succeeded"
                | "charge.refunded"
                | "charge.succeeded"
        ) {
            return Ok(Applied {
                event: head.id,
                outcome: "ignored",
                credits: 0,
                account_changed: false,
            });
        }
        let event: Event = simd_json::serde::from_slice(body)
            .map_err(|e| ApiError::MalformedJson(e.to_string()))?;
        let applied = |outcome, credits| Applied {
            event: event.id.clone(),
            outcome,
            credits,
            account_changed: credits != 0,
        };
        let object = &event.data.object;
        match event.kind.as_str() {
            "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
                if object.payment_status.as_deref() != Some("paid") {
                    // Paid later (a bank debit): `async_payment_succeeded` credits it.
                    return Ok(applied("ignored", 0));
                }
                // Ours are one-off payments sold as credits (`POST /v1/topups`);
                // the Stripe account may sell other things through Checkout.
                let sold_as_credits = object
                    .metadata
                    .as_ref()
                    .is_some_and(|m| m.contains_key("credits"));
                if !sold_as_credits || object.mode.as_deref().is_some_and(|m| m != "payment") {
                    return Ok(applied("ignored", 0));
                }
                let paid = self.paid(object)?;
                match payments::record_paid(conn, &paid) {
                    Ok(Recorded::Credited { taken_back, .. }) => {
                        if taken_back != 0 {
                            tracing::info!(session = %object.id, taken_back, "a refund that arrived before its payment was taken back");
                        }
                        Ok(applied("credited", paid.credits - taken_back))
                    }
                    Ok(Recorded::Replayed) => Ok(applied("replayed", 0)),
                    Ok(Recorded::NoSuchAccount) => Err(ApiError::WebhookEvent(format!(
                        "Checkout Session {} names no account of ours ({:?})",
                        object.id, paid.account
                    ))),
                    // The balance cannot hold it: the event's, not ours.
                    Err(crate::error::Error::Usage(why)) => Err(ApiError::WebhookEvent(why)),
                    Err(e) => Err(internal(e)),
                }
            }
            "charge.refunded" => {
                // A refund finds our payment by its payment intent; a charge
                // without one (the older Charges API) can be none of ours.
                let Some(intent) = object.payment_intent.as_deref() else {
                    return Ok(applied("ignored", 0));
                };
                let Some(refunded) = object.amount_refunded else {
                    return Err(ApiError::WebhookEvent(
                        "a refunded charge without amount_refunded".into(),
                    ));
                };
                // Checked against the payment's own, if it is one of ours: a
                // charge of something else may be in any currency.
                let currency = object.currency.as_deref().unwrap_or_default();
                match payments::record_refund(conn, intent, currency, refunded) {
                    Ok(Refunded::Debited { credits, .. }) => Ok(applied("refunded", credits)),
                    Ok(Refunded::Unchanged) => Ok(applied("replayed", 0)),
                    // A charge not made through our checkout (the Stripe
                    // account may sell other things): nothing of ours.
                    Ok(Refunded::UnknownPayment) => Ok(applied("ignored", 0)),
                    Err(crate::error::Error::Usage(why)) => Err(ApiError::WebhookEvent(why)),
                    Err(e) => Err(internal(e)),
                }
            }
            // The receipt a customer is shown beside a payment. Only a web
            // address is kept: the dashboard links to it.
            "charge.succeeded" => {
                let receipt = object
                    .receipt_url
                    .as_deref()
                    .filter(|u| u.starts_with("https://") || u.starts_with("http://"));
                match (object.payment_intent.as_deref(), receipt) {
                    (Some(intent), Some(url)) => {
                        payments::record_receipt(conn, intent, url).map_err(internal)?;
                        Ok(applied("receipt", 0))
                    }
                    _ => Ok(applied("ignored", 0)),
                }
            }
            _ => Ok(applied("ignored", 0)),
        }
    }

    /// The payment a paid session makes: credits for its amount before tax
    /// and discounts, which must agree with the credits we sold it for.
    fn paid<'a>(&self, o: &'a Object) -> Result<Paid<'a>, ApiError> {
        if o.id.is_empty() {
            return Err(ApiError::WebhookEvent(
                "a Checkout Session without an id".into(),
            ));
        }
        let currency = self.currency_of(o)?;
        let account = o
            .client_reference_id
            .as_deref()
            .filter(|a| !a.is_empty())
            .ok_or_else(|| {
                ApiError::WebhookEvent(format!(
                    "Checkout Session {} has no client_reference_id",
                    o.id
                ))
            })?;
        let (Some(subtotal), Some(total)) = (o.amount_subtotal, o.amount_total) else {
            return Err(ApiError::WebhookEvent(format!(
                "Checkout Session {} has no amounts",
                o.id
            )));
        };
        let credits = subtotal
            .checked_mul(self.credits_per_minor)
            .filter(|c| *c > 0 && total >= 0)
            .ok_or_else(|| {
                ApiError::WebhookEvent(format!("Checkout Session {} has no valid amount", o.id))
            })?;
        if let Some(sold) = o.metadata.as_ref().and_then(|m| m.get("credits")) {
            if sold.parse::<i64>().ok() != Some(credits) {
                return Err(ApiError::WebhookEvent(format!(
                    "Checkout Session {} was sold as {sold} credits but paid for {credits}",
                    o.id
                )));
            }
        }
        Ok(Paid {
            session: &o.id,
            account,
            payment_intent: o.payment_intent.as_deref(),
            currency,
            amount: total,
            credits,
        })
    }

    fn currency_of<'a>(&self, o: &'a Object) -> Result<&'a str, ApiError> {
        match o.currency.as_deref() {
            Some(c) if c.eq_ignore_ascii_case(&self.currency) => Ok(c),
            other => Err(ApiError::WebhookEvent(format!(
                "{} is in {:?}, payments here are in {}",
                o.id,
                other.unwrap_or("no currency"),
                self.currency
            ))),
        }
    }
}

fn internal(e: crate::error::Error) -> ApiError {
    tracing::error!(error = %e, "a Stripe event could not be recorded");
    ApiError::Internal
}

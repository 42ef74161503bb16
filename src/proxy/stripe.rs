//! `POST /v1/stripe/webhook`: Stripe's events, read whole (bounded, within
//! the body deadline), checked against their signature over the raw bytes,
//! then applied to the books. Anything unsigned changes nothing.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use super::body::Body;
use super::small_body;
use super::{json, Proxy};
use crate::error::ApiError;
use crate::payments::MAX_EVENT_BYTES;
use crate::store::{now_secs, snapshot};

/// The longest an event's answer waits for the balance in memory.
const CAUGHT_UP: std::time::Duration = std::time::Duration::from_secs(2);

impl Proxy {
    pub(super) async fn stripe_webhook(
        &self,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, ApiError> {
        let Some(webhook) = self.webhook.clone() else {
            return Err(ApiError::NotFound);
        };
        if req.method() != Method::POST {
            return Err(ApiError::NotFound);
        }
        let header = req
            .headers()
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body =
            small_body::read(req.into_body(), MAX_EVENT_BYTES, self.body_pace.timeout).await?;
        webhook.verify(header.as_deref(), &body, now_secs())?;
        let (applied, change) = self
            .db
            .run(move |conn| {
                let applied = webhook.apply(conn, &mut body.to_vec());
                let change = snapshot::latest_change(conn)?;
                Ok((applied, change))
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "a Stripe event could not be recorded");
                ApiError::Internal
            })?;
        let applied = applied?;
        tracing::info!(event = %applied.event, outcome = applied.outcome, credits = applied.credits, "stripe event");
        // Answered once the balance in memory has the change: a dashboard
        // the buyer returns to shows it.
        if applied.account_changed && !self.refresh.applied(change, CAUGHT_UP).await {
            tracing::warn!(
                "the change feed is behind: a payment reaches balances at the next refresh"
            );
        }
        json(StatusCode::OK, &applied)
    }
}

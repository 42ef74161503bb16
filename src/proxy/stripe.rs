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
use crate::store::now_secs;

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
        let body = small_body::read(req.into_body(), MAX_EVENT_BYTES, webhook.body_timeout).await?;
        webhook.verify(header.as_deref(), &body, now_secs())?;
        let applied = self
            .db
            .run(move |conn| Ok(webhook.apply(conn, &mut body.to_vec())))
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "a Stripe event could not be recorded");
                ApiError::Internal
            })??;
        tracing::info!(event = %applied.event, outcome = applied.outcome, credits = applied.credits, "stripe event");
        if applied.account_changed {
            self.refresh.wake();
        }
        json(StatusCode::OK, &applied)
    }
}

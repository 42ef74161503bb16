//! Top-ups by Stripe Checkout: `POST {api_base}/v1/checkout/sessions`,
//! form-encoded as Stripe's API takes it, for one line item of credits
//! priced in `[payments] currency`. Nothing is credited here: credits
//! arrive only when Stripe's signed webhook says the session was paid.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};

use super::credits_per_minor;
use crate::config::Config;
use crate::error::{ApiError, Error};
use crate::proxy::body::Body;
use crate::tls;
use crate::upstream::{Client, Target, Timeouts};

/// Stripe's answers are small; this bounds a misbehaving one.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

pub struct Checkout {
    client: Client,
    api: Target,
    currency: String,
    min_usd: u64,
    max_usd: u64,
    credits_per_minor: i64,
}

/// What the dashboard needs to offer a top-up.
#[derive(Debug, Serialize)]
pub struct Offer {
    pub currency: String,
    pub min_usd: u64,
    pub max_usd: u64,
}

/// A Checkout Session made for a top-up: the dashboard sends the user to `url`.
#[derive(Debug, Serialize)]
pub struct Created {
    pub id: String,
    pub url: String,
    pub usd: u64,
    pub credits: i64,
}

#[derive(Deserialize)]
struct Session {
    id: String,
    url: String,
}

impl Checkout {
    /// `None` (top-ups answer 404) while the secret key's variable is unset.
    pub fn from_config(config: &Config) -> Result<Option<Self>, Error> {
        let p = &config.payments;
        let key = match p.secret(&p.secret_key_env, |d| &d.secret_key) {
            Some(k) => k,
            None => {
                tracing::info!(
                    "top-ups off: set {} to Stripe's secret key to turn them on",
                    p.secret_key_env
                );
                return Ok(None);
            }
        };
        if p.min_usd == 0 || p.min_usd > p.max_usd {
            return Err(Error::Config(
                "[payments] needs 0 < min_usd <= max_usd".into(),
            ));
        }
        let u = &config.upstream;
        let timeouts = Timeouts {
            answer: Duration::from_secs(u.timeout_secs),
            connect: Duration::from_secs(u.connect_timeout_secs),
            idle: Duration::from_secs(u.idle_timeout_secs),
        };
        let tls = Arc::unwrap_or_clone(tls::client_config(None)?);
        Ok(Some(Self {
            client: Client::new(tls, &format!("Bearer {key}"), timeouts)?,
            api: Target::parse(&p.api_base)
                .map_err(|e| Error::Config(format!("[payments] api_base: {e}")))?,
            currency: p.currency.to_ascii_lowercase(),
            min_usd: p.min_usd,
            max_usd: p.max_usd,
            credits_per_minor: credits_per_minor(config.billing.usd_per_credit)?,
        }))
    }

    pub fn offer(&self) -> Offer {
        Offer {
            currency: self.currency.clone(),
            min_usd: self.min_usd,
            max_usd: self.max_usd,
        }
    }

    /// A Checkout Session for `usd` of credits on `account`, returning the
    /// user to `dashboard` afterwards. `idempotency_key` makes Stripe answer
    /// a retried call with the same session.
    pub async fn create(
        &self,
        account: &str,
        usd: u64,
        dashboard: &str,
        idempotency_key: &str,
    ) -> Result<Created, ApiError> {
        if !(self.min_usd..=self.max_usd).contains(&usd) {
            return Err(ApiError::InvalidInput(format!(
                "a top-up is from {} to {} {}",
                self.min_usd, self.max_usd, self.currency
            )));
        }
        let minor = usd * 100;
        let credits = i64::try_from(minor).unwrap_or(i64::MAX) * self.credits_per_minor;
        let form = form_urlencoded::Serializer::new(String::new())
            .append_pair("mode", "payment")
            .append_pair("client_reference_id", account)
            .append_pair("line_items[0][quantity]", "1")
            .append_pair("line_items[0][price_data][currency]", &self.currency)
            .append_pair("line_items[0][price_data][unit_amount]", &minor.to_string())
            .append_pair(
                "line_items[0][price_data][product_data][name]",
                &format!("{credits} credits"),
            )
            .append_pair("metadata[credits]", &credits.to_string())
            .append_pair("success_url", &format!("{dashboard}?topup=paid"))
            .append_pair("cancel_url", &format!("{dashboard}?topup=cancelled"))
            .finish();
        let mut req = Request::new(Body::full(Bytes::from(form)));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.api.uri("/v1/checkout/sessions")?;
        let headers = req.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(
            "idempotency-key",
            HeaderValue::from_str(idempotency_key).map_err(|_| ApiError::Internal)?,
        );
        let resp = self.client.send(req).await.map_err(|e| {
            tracing::warn!(error = ?e, "Stripe could not be reached");
            ApiError::PaymentProvider
        })?;
        let status = resp.status();
        let read = Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect();
        let body = tokio::time::timeout(self.client.timeout(), read)
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(ApiError::PaymentProvider)?
            .to_bytes();
        if !status.is_success() {
            tracing::error!(status = status.as_u16(), answer = %String::from_utf8_lossy(&body), "Stripe refused a Checkout Session");
            return Err(ApiError::PaymentProvider);
        }
        let session: Session = simd_json::serde::from_slice(&mut body.to_vec()).map_err(|e| {
            tracing::error!(error = %e, "Stripe's Checkout Session was not understood");
            ApiError::PaymentProvider
        })?;
        Ok(Created {
            id: session.id,
            url: session.url,
            usd,
            credits,
        })
    }
}

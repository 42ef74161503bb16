//! The two kinds of failure: `Error` stops a command or the server's start;
//! `ApiError` answers one request, and is turned into a response only here.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::proxy::body::Body;

/// Start-up, CLI and infrastructure failures, reported to the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("config: {0}")]
    Config(String),
    #[error("database: {0}")]
    Store(#[from] crate::store::sql::StoreError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(String),
    #[error("{0}")]
    Usage(String),
    /// fal's Platform API gave no answer we can use.
    #[error("{0}")]
    Platform(String),
    /// The account has as many live keys as `[limits] max_keys_per_account` allows.
    #[error("account {account:?} has {max} live keys, the most it may have: disable one first")]
    KeyLimit { account: String, max: u64 },
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.into())
    }
}

/// Everything a single request can fail with. Each variant knows its status
/// and its stable `error_type`; the JSON body is shaped like fal's own
/// (`detail`, `error_type`) so that fal's SDKs surface it unchanged.
#[derive(Debug)]
pub enum ApiError {
    MissingKey,
    MalformedKey,
    UnknownKey,
    KeyDisabled,
    AccountSuspended,
    MalformedJson(String),
    /// A cost-driving field fal's validation would not read as a sane
    /// number: the hold could not be an upper bound of fal's charge.
    InvalidInput(String),
    BodyTooLarge {
        limit: usize,
    },
    /// The client's request body broke off before it was read.
    ClientBody,
    /// The client's request body stalled, or came slower than the minimum rate.
    BodyTimeout,
    /// The account already has as many body bytes in memory as it may.
    BodyBufferFull {
        limit: usize,
    },
    InvalidPath,
    /// A queued job that does not exist or is not the caller's: the same answer for both.
    JobNotFound,
    /// A key, or an API route, that does not exist (or is not the caller's).
    NotFound,
    /// Our own fault (a database error); the details go to the log, not the client.
    Internal,
    /// The admin API's bearer token is missing or wrong.
    AdminUnauthorized,
    /// A request the admin API cannot carry out as asked.
    Invalid(String),
    /// It exists already.
    Conflict(String),
    /// A `Host` we could not put into the URLs we hand back.
    InvalidHost,
    /// A method fal's APIs do not use (`CONNECT`, `TRACE`, …).
    MethodNotAllowed,
    /// A protocol upgrade (a WebSocket handshake): fal's APIs are plain HTTP.
    UpgradeRefused,
    /// An `x-fal-target-url` that is missing or not one of fal's hosts.
    InvalidTarget,
    /// No `[[pricing]]` rule covers this model: the gateway does not offer it.
    UnpricedModel(String),
    /// Over the key's limit (or the account's cap); `retry_after` in whole seconds.
    RateLimited {
        retry_after: u64,
        by_account: bool,
    },
    /// The account has as many live keys as it may have.
    KeyLimit {
        max: u64,
    },
    /// The account created keys faster than `[limits] key_creations_per_minute`.
    KeyCreationLimited {
        retry_after: u64,
    },
    InsufficientCredits {
        needed: u64,
        available: i64,
    },
    /// The hold journal cannot be written: no request may reach fal unrecorded.
    LedgerUnavailable,
    UpstreamUnreachable,
    /// No answer in time; `reached` unless it was the connection that timed out.
    UpstreamTimeout {
        reached: bool,
    },
    /// fal answered 5xx; `reached` when the answer came from fal's app (it
    /// carries `x-fal-request-id`), not from its ingress.
    UpstreamFailed {
        status: StatusCode,
        reached: bool,
    },
    /// fal refused the operator's key: an operator problem, never shown as the client's.
    UpstreamAuth,
    /// A Stripe webhook whose `Stripe-Signature` is missing, wrong or stale.
    WebhookSignature(&'static str),
    /// Too many sign-in links asked for, by this client or for this address.
    SignInLimited {
        retry_after: u64,
    },
    /// A state-changing call signed in by session without the same-origin
    /// `Origin` and the session's CSRF token.
    CsrfRejected,
    /// The mail server refused a sign-in link, or did not answer in time.
    MailFailed,
    /// Card payments are not configured on this gateway.
    PaymentsOff,
    /// Stripe could not be reached, or refused to make a Checkout Session.
    PaymentProvider,
    /// fal's Platform API gave no answer reconciliation could use.
    PlatformFailed(String),
    /// A signed Stripe event that cannot be applied as it stands (an
    /// unknown account, another currency, amounts that disagree).
    WebhookEvent(String),
}

impl ApiError {
    /// fal got the request and did not say how it went: it may have done
    /// the work (a 5xx after taking it, an answer that never came in time).
    pub fn may_have_been_served(&self) -> bool {
        matches!(
            self,
            ApiError::UpstreamFailed { reached: true, .. }
                | ApiError::UpstreamTimeout { reached: true }
        )
    }

    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            MissingKey | MalformedKey | UnknownKey => StatusCode::UNAUTHORIZED,
            KeyDisabled | AccountSuspended => StatusCode::FORBIDDEN,
            MalformedJson(_) | InvalidInput(_) | ClientBody | InvalidPath | InvalidHost
            | InvalidTarget | UpgradeRefused | WebhookSignature(_) | WebhookEvent(_) => {
                StatusCode::BAD_REQUEST
            }
            MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            JobNotFound | NotFound | PaymentsOff => StatusCode::NOT_FOUND,
            AdminUnauthorized => StatusCode::UNAUTHORIZED,
            Invalid(_) => StatusCode::BAD_REQUEST,
            Conflict(_) | KeyLimit { .. } => StatusCode::CONFLICT,
            Internal => StatusCode::INTERNAL_SERVER_ERROR,
            BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            BodyBufferFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            UnpricedModel(_) => StatusCode::NOT_FOUND,
            InsufficientCredits { .. } => StatusCode::PAYMENT_REQUIRED,
            RateLimited { .. } | KeyCreationLimited { .. } | SignInLimited { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            CsrfRejected => StatusCode::FORBIDDEN,
            LedgerUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamUnreachable
            | UpstreamFailed { .. }
            | UpstreamAuth
            | PaymentProvider
            | PlatformFailed(_)
            | MailFailed => StatusCode::BAD_GATEWAY,
            UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn error_type(&self) -> &'static str {
        use ApiError::*;
        match self {
            MissingKey => "missing_api_key",
            MalformedKey => "malformed_api_key",
            UnknownKey => "invalid_api_key",
            KeyDisabled => "key_disabled",
            AccountSuspended => "account_suspended",
            MalformedJson(_) => "malformed_json",
            InvalidInput(_) => "invalid_input",
            BodyTooLarge { .. } => "body_too_large",
            ClientBody => "request_body_incomplete",
            BodyTimeout => "request_body_timeout",
            BodyBufferFull { .. } => "account_body_buffer_full",
            InvalidPath => "invalid_path",
            InvalidHost => "invalid_host",
            MethodNotAllowed => "method_not_allowed",
            UpgradeRefused => "upgrade_not_supported",
            InvalidTarget => "invalid_target_url",
            JobNotFound => "job_not_found",
            NotFound => "not_found",
            AdminUnauthorized => "admin_unauthorized",
            Invalid(_) => "invalid_request",
            Conflict(_) => "conflict",
            Internal => "internal_error",
            UnpricedModel(_) => "model_not_priced",
            InsufficientCredits { .. } => "insufficient_credits",
            RateLimited {
                by_account: false, ..
            } => "rate_limited",
            RateLimited {
                by_account: true, ..
            } => "account_rate_limited",
            KeyLimit { .. } => "key_limit_reached",
            KeyCreationLimited { .. } => "key_creation_rate_limited",
            LedgerUnavailable => "ledger_unavailable",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamTimeout { .. } => "upstream_timeout",
            UpstreamFailed { .. } => "upstream_error",
            UpstreamAuth => "upstream_auth_failed",
            SignInLimited { .. } => "sign_in_rate_limited",
            CsrfRejected => "csrf_rejected",
            MailFailed => "mail_failed",
            PaymentsOff => "payments_not_enabled",
            PaymentProvider => "payment_provider_error",
            PlatformFailed(_) => "fal_platform_failed",
            WebhookSignature(_) => "invalid_signature",
            WebhookEvent(_) => "invalid_event",
        }
    }

    pub fn detail(&self) -> String {
        use ApiError::*;
        match self {
            MissingKey => "Missing API key: send it as `x-api-key: sk-fal-…` or `authorization: Key sk-fal-…`.".into(),
            MalformedKey => "Malformed API key: keys look like `sk-fal-` followed by 32 letters and digits.".into(),
            UnknownKey => "Invalid API key.".into(),
            KeyDisabled => "This API key is disabled.".into(),
            AccountSuspended => "This account is suspended.".into(),
            MalformedJson(why) => format!("Malformed JSON body: {why}."),
            InvalidInput(why) => format!("Invalid input: {why}."),
            BodyTooLarge { limit } => format!("Request body larger than the {limit}-byte limit."),
            ClientBody => "The request body ended before it was complete.".into(),
            BodyTimeout => "The request body stalled or arrived too slowly.".into(),
            BodyBufferFull { limit } => format!(
                "This account already has {limit} bytes of request bodies in flight, the most allowed; retry once some have finished."
            ),
            InvalidPath => "Invalid path.".into(),
            InvalidHost => "Invalid Host header.".into(),
            MethodNotAllowed => "Method not allowed: fal's APIs take GET, HEAD, POST, PUT, PATCH, DELETE and OPTIONS.".into(),
            UpgradeRefused => "Protocol upgrades (WebSocket) are not supported.".into(),
            InvalidTarget => "x-fal-target-url must name fal.run, queue.fal.run or fal's storage upload endpoint.".into(),
            JobNotFound => "Request not found.".into(),
            NotFound => "Not found.".into(),
            AdminUnauthorized => "Missing or wrong admin token: send `authorization: Bearer <token>`.".into(),
            Invalid(why) | Conflict(why) => format!("{why}."),
            Internal => "Internal error; nothing was charged.".into(),
            UnpricedModel(model) => format!("{model} is not offered by this gateway: no price is configured for it."),
            InsufficientCredits { needed, available } => format!(
                "Insufficient credits: this request needs {needed} credits and {available} are available."
            ),
            LedgerUnavailable => "Billing is temporarily unavailable; nothing was charged.".into(),
            RateLimited { retry_after, by_account } => format!(
                "Rate limit exceeded for this {}; retry in {retry_after} s.",
                if *by_account { "account" } else { "key" }
            ),
            KeyLimit { max } => format!(
                "This account has {max} live keys, the most it may have; revoke one first."
            ),
            KeyCreationLimited { retry_after } => format!(
                "Keys are being created too fast for this account; retry in {retry_after} s."
            ),
            UpstreamUnreachable => "fal could not be reached.".into(),
            UpstreamTimeout { .. } => "fal did not answer in time.".into(),
            UpstreamFailed { status, .. } => {
                format!("fal answered with an error ({}).", status.as_u16())
            }
            UpstreamAuth => "The gateway's fal credentials were refused; the operator has been alerted.".into(),
            SignInLimited { retry_after } => format!(
                "Too many sign-in links asked for; retry in {retry_after} s."
            ),
            CsrfRejected => "A signed-in change needs this site's Origin and the session's x-csrf-token.".into(),
            MailFailed => "The sign-in link could not be mailed; try again later.".into(),
            PaymentsOff => "Card payments are not enabled on this gateway.".into(),
            PaymentProvider => "The payment provider could not start the checkout; nothing was charged.".into(),
            PlatformFailed(why) => format!("fal's Platform API: {why}"),
            WebhookSignature(why) => format!("Stripe-Signature: {why}; nothing was changed."),
            WebhookEvent(why) => format!("{why}; nothing was changed."),
        }
    }

    /// The one place a request error becomes a response.
    pub fn into_response(self) -> Response<Body> {
        let body = json_error(&self.detail(), self.error_type());
        let mut resp = Response::new(Body::full(body));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            "x-fal-error-type",
            HeaderValue::from_static(self.error_type()),
        );
        match self {
            ApiError::RateLimited { retry_after, .. }
            | ApiError::KeyCreationLimited { retry_after }
            | ApiError::SignInLimited { retry_after } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            ApiError::MethodNotAllowed => {
                h.insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            _ => {}
        }
        resp
    }
}

fn json_error(detail: &str, error_type: &str) -> Bytes {
    let mut out = String::with_capacity(detail.len() + error_type.len() + 32);
    out.push_str("{\"detail\":");
    push_json_string(&mut out, detail);
    out.push_str(",\"error_type\":");
    push_json_string(&mut out, error_type);
    out.push('}');
    Bytes::from(out)
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        if let Error::KeyLimit { max, .. } = e {
            return ApiError::KeyLimit { max };
        }
        tracing::error!(error = %e, "request failed on our side");
        ApiError::Internal
    }
}

/// Appends `s` as a JSON string literal.
pub fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_valid_json() {
        let body = json_error("a \"quoted\" \\ line\n", "x");
        let mut copy = body.to_vec();
        let v = simd_json::to_owned_value(&mut copy).unwrap();
        use simd_json::prelude::*;
        assert_eq!(v.get_str("detail"), Some("a \"quoted\" \\ line\n"));
        assert_eq!(v.get_str("error_type"), Some("x"));
    }
}

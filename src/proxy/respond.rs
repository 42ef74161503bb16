//! The answer to a billed request: settle the reservation, then give the
//! client fal's answer with the figures. A JSON object is buffered (bounded)
//! to splice `_billing` in; a larger one is priced as it streams past; anything
//! else streams with billing headers.

use crate::upstream::FalBody;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;

use std::sync::Arc;
use std::time::Duration;

use super::body::Body;
use super::detached::Detached;
use super::headers::{self, is_json};
use super::meter;
use crate::billing::facts::{RequestFacts, ResponseFacts};
use crate::billing::json;
use crate::billing::ledger::{Reservation, Settled};
use crate::billing::pricing::{Tariff, Terms};
use crate::billing::splice::{splice, Billing};
use crate::error::ApiError;

/// Everything the settlement needs besides fal's answer.
pub struct Billed<'a> {
    /// What prices the request, as it was when the request was admitted.
    pub tariff: &'a Tariff,
    pub model: &'a str,
    pub request: RequestFacts,
    pub max_json_bytes: usize,
    /// Where an answer too large to buffer is read on, and how long fal may
    /// pause within it.
    pub detached: &'a Arc<Detached>,
    pub idle: Duration,
}

/// A body read up to a bound.
pub(crate) enum Collected {
    Whole(Bytes),
    /// Past the bound: what was read, and the rest still to stream.
    Overflow(Bytes, FalBody),
}

/// Why fal's answer was not read to its end.
#[derive(Debug)]
pub(crate) enum BrokeOff {
    Failed(hyper::Error),
    /// fal went silent mid-answer: without a deadline the call (and its
    /// hold, and the reconciler's pass) would wait on it for ever.
    Stalled(Duration),
}

impl std::fmt::Display for BrokeOff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BrokeOff::Failed(e) => write!(f, "{e}"),
            BrokeOff::Stalled(idle) => write!(f, "nothing from fal for {idle:?}"),
        }
    }
}

/// Reads `body` up to `limit` bytes, waiting at most `idle` for each part of it.
pub(crate) async fn collect_bounded(
    mut body: FalBody,
    limit: usize,
    idle: Duration,
) -> Result<Collected, BrokeOff> {
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(idle, body.frame()).await {
            Ok(Some(frame)) => frame.map_err(BrokeOff::Failed)?,
            Ok(None) => return Ok(Collected::Whole(buf.freeze())),
            Err(_) => return Err(BrokeOff::Stalled(idle)),
        };
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
            if buf.len() > limit {
                return Ok(Collected::Overflow(buf.freeze(), body));
            }
        }
    }
}

/// A body we can read: JSON, not compressed.
fn readable(headers: &HeaderMap) -> bool {
    let identity = headers
        .get(header::CONTENT_ENCODING)
        .is_none_or(|v| v.as_bytes().eq_ignore_ascii_case(b"identity"));
    is_json(headers) && identity
}

/// The length fal declares, if it does.
fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
}

/// A body we can splice into: JSON, not compressed, not declared too large.
pub(super) fn spliceable(headers: &HeaderMap, limit: usize) -> bool {
    readable(headers) && declared_length(headers).is_none_or(|n| n <= limit as u64)
}

/// fal's answer, as far as billing reads it.
pub(super) enum Answer {
    /// JSON read whole within the limit: priced from what it says.
    Read(Bytes),
    /// JSON over the limit: what was read of it (perhaps nothing), and the
    /// rest, to be priced from what it says as it streams past ([`meter`]).
    TooLarge(Bytes, FalBody),
    /// Not JSON, or compressed: priced at its hold and passed on untouched.
    Unread(Body),
}

/// Reads fal's answer when billing can use it, never more than `limit`
/// bytes of it, nor waiting more than `idle` for each part.
pub(super) async fn read_answer(
    headers: &HeaderMap,
    incoming: FalBody,
    limit: usize,
    idle: Duration,
) -> Result<Answer, BrokeOff> {
    if !readable(headers) {
        return Ok(Answer::Unread(Body::Answer(incoming)));
    }
    if declared_length(headers).is_some_and(|n| n > limit as u64) {
        return Ok(Answer::TooLarge(Bytes::new(), incoming));
    }
    Ok(match collect_bounded(incoming, limit, idle).await? {
        Collected::Whole(bytes) => Answer::Read(bytes),
        Collected::Overflow(prefix, rest) => Answer::TooLarge(prefix, rest),
    })
}

/// What fal's JSON answer says, if it is a JSON object.
pub(super) fn read_object(bytes: &[u8]) -> Option<ResponseFacts> {
    json::read(bytes, |v| v.is_object().then(|| ResponseFacts::read(v))).ok()?
}

impl Billed<'_> {
    /// Settles against fal's answer (a success or a 4xx passed through) and
    /// builds the response. `reservation` must already know if fal succeeded.
    pub async fn respond(
        &self,
        resp: Response<FalBody>,
        reservation: Reservation,
    ) -> Result<Response<Body>, ApiError> {
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let status = parts.status;

        let bytes = match read_answer(&parts.headers, incoming, self.max_json_bytes, self.idle)
            .await
        {
            Ok(Answer::Read(bytes)) => bytes,
            Ok(Answer::TooLarge(prefix, rest)) if status.is_success() => {
                // Priced when it has passed: no figures in its headers.
                let (tariff, request) = (self.tariff.clone(), self.request);
                let body = meter::metered(self.detached, prefix, rest, self.idle, move |facts| {
                    let quote = facts.and_then(|f| tariff.actual(&request, &f));
                    reservation.charge(quote, status.as_u16());
                });
                return Ok(Response::from_parts(parts, body));
            }
            Ok(Answer::TooLarge(prefix, rest)) => {
                let settled = self.settle(reservation, status, None);
                return Ok(billed_stream(
                    parts,
                    settled,
                    Body::Chained(Some(prefix), rest),
                ));
            }
            Ok(Answer::Unread(body)) => {
                let settled = self.settle(reservation, status, None);
                return Ok(billed_stream(parts, settled, body));
            }
            Err(e) => {
                // fal's answer broke off: the client gets nothing usable, so nothing is charged.
                tracing::warn!(error = %e, "fal's response body broke off");
                reservation.release(Some(status.as_u16()));
                return Err(ApiError::UpstreamUnreachable);
            }
        };
        let answer = read_object(&bytes);
        let settled = self.settle(reservation, status, answer.as_ref());
        Ok(billed_json(
            parts,
            bytes,
            answer.is_some(),
            &billing(&self.tariff.terms, self.model, settled),
        ))
    }

    /// A success is charged its actual cost (from the answer where there is
    /// one, else the hold); anything else is released.
    fn settle(
        &self,
        reservation: Reservation,
        status: StatusCode,
        answer: Option<&ResponseFacts>,
    ) -> Settled {
        if !status.is_success() {
            return reservation.release(Some(status.as_u16()));
        }
        let quote = answer.and_then(|facts| self.tariff.actual(&self.request, facts));
        reservation.charge(quote, status.as_u16())
    }
}

/// The `_billing` figures for `settled` work on `model`.
pub(super) fn billing<'a>(terms: &Terms, model: &'a str, settled: Settled) -> Billing<'a> {
    Billing {
        model,
        credits_used: settled.credits_used,
        cost_usd: terms.cost_usd(settled.credits_used),
        balance_remaining: settled.balance_remaining,
    }
}

/// The figures as headers, on every billed answer.
pub(super) fn billing_headers(headers: &mut HeaderMap, settled: Settled) {
    headers.insert(
        headers::X_BILLING_CREDITS_USED,
        HeaderValue::from(settled.credits_used),
    );
    headers.insert(
        headers::X_BILLING_BALANCE_REMAINING,
        HeaderValue::from(settled.balance_remaining),
    );
}

/// fal's answer passed on untouched, with the figures in headers.
pub(super) fn billed_stream(
    mut parts: http::response::Parts,
    settled: Settled,
    body: Body,
) -> Response<Body> {
    billing_headers(&mut parts.headers, settled);
    Response::from_parts(parts, body)
}

/// fal's buffered JSON answer with the figures: spliced in when it is an
/// object, and in headers always; `content-length` fixed.
pub(super) fn billed_json(
    mut parts: http::response::Parts,
    bytes: Bytes,
    is_object: bool,
    billing: &Billing,
) -> Response<Body> {
    let settled = Settled {
        credits_used: billing.credits_used,
        balance_remaining: billing.balance_remaining,
    };
    billing_headers(&mut parts.headers, settled);
    let body = match is_object {
        true => splice(&bytes, billing).unwrap_or(bytes),
        false => bytes,
    };
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, Body::full(body))
}

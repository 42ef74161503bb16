//! fal's queue through the proxy. A submission holds its estimate and
//! becomes a job owned by the submitting account; status, result and cancel
//! are polls on that job, refused with 404 to anyone else. The job is charged
//! when its result is first obtained (by its owner, or by the reconciler),
//! released when fal reports that it ended without one (failed, or
//! cancelled: a cancel is only a request, and a running job may complete
//! anyway). fal's queue URLs in its answers are rewritten to point at this proxy.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use simd_json::prelude::*;

use super::body::Body;
use super::headers;
use super::path::{self, Canonical};
use super::respond::{
    billed_json, billed_stream, billing, collect_bounded, read_answer, read_object, spliceable,
    Answer, Collected,
};
use super::{meter, Conn, Proxy, Trace, Unanswered};
use crate::billing::json;
use crate::billing::ledger::Reservation;
use crate::billing::pricing::Tariff;
use crate::billing::receipt::FalReceipt;
use crate::error::ApiError;
use crate::jobs::Job;
use crate::keys::ApiKey;
use crate::store::{self, now_ms};
use crate::upstream::FalBody;

/// A request on the queue's routes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Route {
    /// `POST /queue/{model path}`, at its canonical path.
    Submit(Canonical),
    /// `/queue/{app}/requests/{id}[/…]`, or the short `GET /fal-ai/queue/requests/{id}`
    /// (`app` `None`: the proxy knows the job's app); `query` goes to fal as sent.
    Job {
        app: Option<String>,
        id: String,
        action: Action,
        query: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Action {
    Result,
    Status,
    StatusStream,
    Cancel,
}

impl Action {
    /// The path after `requests/{id}` on fal's queue host.
    fn suffix(self) -> &'static str {
        match self {
            Action::Result => "",
            Action::Status => "/status",
            Action::StatusStream => "/status/stream",
            Action::Cancel => "/cancel",
        }
    }
}

impl Route {
    pub(super) fn parse(target: &Canonical) -> Option<Self> {
        let (path, query) = (target.path(), target.query().map(str::to_owned));
        if let Some(id) = path.strip_prefix("/fal-ai/queue/requests/") {
            return (!id.contains('/')).then(|| Route::Job {
                app: None,
                id: id.to_owned(),
                action: Action::Status,
                query,
            });
        }
        let rest = path.strip_prefix("/queue/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        let Some(at) = segments.iter().position(|s| *s == "requests") else {
            return Some(Route::Submit(target.clone()));
        };
        let action = match &segments[at + 1..] {
            [_id] => Action::Result,
            [_id, "status"] => Action::Status,
            [_id, "status", "stream"] => Action::StatusStream,
            [_id, "cancel"] => Action::Cancel,
            _ => return None,
        };
        Some(Route::Job {
            app: Some(segments[..at].join("/")),
            id: segments[at + 1].to_owned(),
            action,
            query,
        })
    }
}

/// The statuses after which a job will never have a result to charge for.
fn failed(status: &str) -> bool {
    matches!(status, "FAILED" | "ERROR" | "CANCELLED")
}

impl Proxy {
    pub(super) async fn queue(
        &self,
        req: Request<Incoming>,
        route: Route,
        conn: Conn,
        key: &ApiKey,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let base = self.public_base(&req, conn)?;
        match route {
            Route::Submit(target) if req.method() == Method::POST => {
                self.submit(req, &target, &base, key, request_id, trace)
                    .await
            }
            Route::Submit(_) => Err(ApiError::JobNotFound),
            Route::Job {
                app,
                id,
                action,
                query,
            } => {
                // Before the lookup, which may read the store: a poll of an
                // unknown id costs its allowance like any other.
                self.check_poll(key, trace)?;
                // Another account's job, or one named under another app, is as unknown as none.
                let job = self
                    .owned_job(&id, key.account.id)
                    .await?
                    .filter(|j| app.as_deref().is_none_or(|a| a == j.app || a == j.model))
                    .ok_or(ApiError::JobNotFound)?;
                self.poll(req, &job, action, query.as_deref(), &base, trace)
                    .await
            }
        }
    }

    /// The job `id` if `account_id` owns it: from memory, else (an ended
    /// job memory no longer keeps) from the store, off the worker.
    async fn owned_job(&self, id: &str, account_id: i64) -> Result<Option<Arc<Job>>, ApiError> {
        if let Some(job) = self.jobs.owned(id, account_id) {
            return Ok(Some(job));
        }
        let since = self.jobs.retention().readable_since(now_ms());
        let id = id.to_owned();
        self.db
            .run(move |conn| Ok(store::jobs::find(conn, &id, account_id, since)?))
            .await?
            .map(|stored| self.jobs.from_store(stored))
            .transpose()
    }

    /// Where the client reached us, for the URLs we hand back.
    pub(super) fn public_base(
        &self,
        req: &Request<Incoming>,
        conn: Conn,
    ) -> Result<String, ApiError> {
        let forwarded = |name: &str| {
            self.trust_forwarded
                .then(|| req.headers().get(name)?.to_str().ok())
                .flatten()
                .map(|v| v.split(',').next().unwrap_or("").trim())
        };
        let scheme = match forwarded("x-forwarded-proto") {
            Some(p) if p == "http" || p == "https" => p,
            _ if conn.tls => "https",
            _ => "http",
        };
        let host = forwarded("x-forwarded-host")
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
            .unwrap_or("");
        // It goes into JSON strings and URLs: only what a host and port are made of.
        let valid = !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
        if !valid {
            return Err(ApiError::InvalidHost);
        }
        Ok(format!("{scheme}://{host}"))
    }

    async fn submit(
        &self,
        req: Request<Incoming>,
        target: &Canonical,
        base: &str,
        key: &ApiKey,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let model = &target.path()["/queue/".len()..];
        let app: Vec<&str> = model.split('/').take(2).collect();
        if app.len() < 2 {
            return Err(ApiError::InvalidPath);
        }
        let app = app.join("/");
        let uri = self.upstream.queue.uri(&target.forwarded("/queue"))?;
        let jobs = Arc::clone(&self.jobs);
        let (fal_base, base) = (self.upstream.queue_base().to_owned(), base.to_owned());
        let idle = self.upstream.timeout();
        // With the client's own webhook, fal delivers the output to the
        // client directly: a submission fal may have queued is paid for even
        // when its answer did not come through.
        let unanswered = if has_webhook(target.query()) {
            Unanswered::ChargeHold
        } else {
            Unanswered::Release
        };
        self.forward_billed(
            req,
            model,
            uri,
            key,
            request_id,
            trace,
            unanswered,
            move |sent| async move {
                let (reservation, request, tariff, limit) = (
                    sent.reservation,
                    sent.request,
                    sent.tariff,
                    sent.tunables.max_json_response_bytes,
                );
                let status = sent.resp.status();
                let (mut parts, incoming) = sent.resp.into_parts();
                headers::strip_hop_by_hop(&mut parts.headers);
                if !status.is_success() {
                    reservation.release(Some(status.as_u16()));
                    return Ok(Response::from_parts(parts, Body::Answer(incoming)));
                }
                // fal took the job but its answer cannot be read: no job to track.
                let untracked = move |reservation: Reservation| match unanswered {
                    Unanswered::ChargeHold => reservation.charge(None, status.as_u16()),
                    Unanswered::Release => reservation.release(Some(status.as_u16())),
                };
                let bytes = match collect_bounded(incoming, limit, idle).await {
                    Ok(Collected::Whole(bytes)) => bytes,
                    Ok(Collected::Overflow(..)) | Err(_) => {
                        untracked(reservation);
                        return Err(ApiError::UpstreamUnreachable);
                    }
                };
                let Some(fal_id) = string_field(&bytes, "request_id") else {
                    tracing::error!("fal's queue accepted a job without a request_id");
                    untracked(reservation);
                    return Err(ApiError::UpstreamFailed {
                        status: StatusCode::BAD_GATEWAY,
                        reached: true,
                    });
                };
                jobs.submitted(&fal_id, &app, request, tariff, reservation.detach());
                Ok(rewritten(parts, &bytes, &fal_base, &base))
            },
        )
        .await
    }

    async fn poll(
        &self,
        req: Request<Incoming>,
        job: &Arc<Job>,
        action: Action,
        query: Option<&str>,
        base: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let query = query.map(|q| format!("?{q}")).unwrap_or_default();
        let target = format!(
            "/{}/requests/{}{}{query}",
            job.app,
            job.request_id,
            action.suffix()
        );
        let uri = self.upstream.queue.uri(&target)?;
        let (mut parts, incoming) = req.into_parts();
        // Only a GET's answer carries the result a job is priced from: a
        // HEAD's (empty) must not settle it at its hold.
        let fetched = parts.method == Method::GET;
        // The short route is a GET whatever the client's intent; fal's routes keep the method.
        if action == Action::Status {
            parts.method = Method::GET;
        }
        let resp = self.send(parts, Body::Stream(incoming), uri, trace).await?;
        let status = resp.status();
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        let limit = self.tunables.load().max_json_response_bytes;
        // Another node's job: its node prices and settles it (its reconciler
        // reads the result from fal), so here fal's answer only passes through.
        let foreign = job.is_foreign();
        match action {
            // Server-sent events go through as they come, never buffered.
            Action::StatusStream => Ok(Response::from_parts(parts, Body::Answer(incoming))),
            // fal's 202 asks a runner to stop; the job stays held until its
            // status says how it ended (a running job may still complete).
            Action::Cancel => Ok(Response::from_parts(parts, Body::Answer(incoming))),
            Action::Status => {
                if !spliceable(&parts.headers, limit) {
                    return Ok(Response::from_parts(parts, Body::Answer(incoming)));
                }
                let bytes = whole(incoming, limit, self.upstream.timeout()).await?;
                if !foreign {
                    self.observe_status(job, status, &bytes);
                }
                Ok(rewritten(parts, &bytes, self.upstream.queue_base(), base))
            }
            Action::Result if !fetched || foreign => {
                Ok(Response::from_parts(parts, Body::Answer(incoming)))
            }
            Action::Result if !status.is_success() => {
                // No result: not ready yet, or the job ended without one
                // (cancelled, failed). Only fal's status tells which.
                if job.is_pending() {
                    if let Err(e) = self.check_status(job).await {
                        tracing::debug!(request_id = %job.request_id, error = ?e, "status after a refused result");
                    }
                }
                Ok(Response::from_parts(parts, Body::Answer(incoming)))
            }
            Action::Result => self.result(job, parts, incoming, status).await,
        }
    }

    /// fal's result: the job is charged on the first one, and every fetch
    /// carries the same figures. A result too large to buffer is passed on
    /// untouched and priced as it streams past; one that is not JSON is
    /// charged its hold.
    async fn result(
        &self,
        job: &Arc<Job>,
        parts: http::response::Parts,
        incoming: FalBody,
        status: StatusCode,
    ) -> Result<Response<Body>, ApiError> {
        let tunables = self.tunables.load_full();
        let limit = tunables.max_json_response_bytes;
        let idle = self.upstream.timeout();
        let units = FalReceipt::from_headers(&parts.headers).units_milli;
        let bytes = match read_answer(&parts.headers, incoming, limit, idle).await {
            Ok(Answer::Read(bytes)) => bytes,
            Ok(Answer::TooLarge(prefix, rest)) => {
                // Priced when it has passed: no figures in its headers.
                let (jobs, job) = (Arc::clone(&self.jobs), Arc::clone(job));
                let tariff = self.tariff_of(&job);
                let body = meter::metered(&self.detached, prefix, rest, idle, move |facts| {
                    let quote = tariff
                        .zip(facts)
                        .and_then(|(tariff, facts)| tariff.actual(&job.request, &facts));
                    jobs.charge(&job, quote, status.as_u16(), units);
                });
                return Ok(Response::from_parts(parts, body));
            }
            Ok(Answer::Unread(body)) => {
                let settled = self.charge_job(job, None, status, units);
                return Ok(billed_stream(parts, settled, body));
            }
            // Broke off: not a result the client has; a later fetch (or the reconciler) charges it.
            Err(_) => return Err(ApiError::UpstreamUnreachable),
        };
        let answer = read_object(&bytes);
        let settled = self.charge_job(job, answer.as_ref(), status, units);
        let terms = self
            .tariff_of(job)
            .map_or_else(|| tunables.prices.terms(), |t| t.terms);
        let figures = billing(&terms, &job.model, settled);
        Ok(billed_json(parts, bytes, answer.is_some(), &figures))
    }

    /// The actual cost from the answer where there is one, priced as the
    /// job was admitted; else the hold.
    fn charge_job(
        &self,
        job: &Job,
        answer: Option<&crate::billing::facts::ResponseFacts>,
        status: StatusCode,
        fal_units: Option<u64>,
    ) -> crate::billing::ledger::Settled {
        let quote = self
            .tariff_of(job)
            .zip(answer)
            .and_then(|(tariff, facts)| tariff.actual(&job.request, facts));
        self.jobs.charge(job, quote, status.as_u16(), fal_units)
    }

    /// What prices the job: the tariff it was admitted under; for a job
    /// stored before jobs kept theirs, the table in force.
    fn tariff_of(&self, job: &Job) -> Option<Tariff> {
        job.tariff
            .clone()
            .or_else(|| self.tunables.load().prices.tariff(&job.model))
    }

    /// Settles the jobs nobody fetched: asks fal about each pending one,
    /// charges those with a result, releases those that failed, and gives up
    /// on those fal no longer knows after `give_up_after_ms`.
    /// Drops from memory the ended jobs a restart would not load: a long
    /// run keeps no more than a short one.
    pub fn forget_ended_jobs(&self, now_ms: i64) {
        self.jobs.forget_ended(now_ms);
    }

    pub async fn reconcile(&self, give_up_after_ms: i64) {
        for job in self.jobs.pending() {
            if let Err(e) = self.reconcile_job(&job, give_up_after_ms).await {
                tracing::debug!(request_id = %job.request_id, error = ?e, "reconcile: will retry");
            }
        }
    }

    /// Asks fal how the job stands, and releases it if it ended without a
    /// result. fal's status code and the job's state.
    async fn check_status(&self, job: &Job) -> Result<(StatusCode, String), ApiError> {
        let status_uri = self
            .upstream
            .queue
            .uri(&format!("/{}/requests/{}/status", job.app, job.request_id))?;
        let resp = self.upstream.get(status_uri).await?;
        let code = resp.status();
        let limit = self.tunables.load().max_json_response_bytes;
        let bytes = whole(resp.into_body(), limit, self.upstream.timeout()).await?;
        let state = self.observe_status(job, code, &bytes);
        Ok((code, state))
    }

    /// What fal's status answer says of the job, acted on: a job that ended
    /// without a result is released; one that completed is noted as such.
    fn observe_status(&self, job: &Job, code: StatusCode, bytes: &[u8]) -> String {
        if !code.is_success() {
            return String::new();
        }
        let state = string_field(bytes, "status").unwrap_or_default();
        if failed(&state) {
            self.jobs.release(job, Some(code.as_u16()));
        } else if state == "COMPLETED" {
            self.jobs.completed(job);
        }
        state
    }

    /// A job fal no longer knows, past `give_up_after_secs`: one it reported
    /// COMPLETED is charged its hold (fal did the work, and billed it);
    /// any other is released.
    fn give_up(&self, job: &Job) {
        if job.was_completed() {
            tracing::warn!(request_id = %job.request_id, "fal no longer knows this completed job: charged its hold");
            self.jobs.charge(job, None, 200, None);
        } else {
            tracing::warn!(request_id = %job.request_id, "fal no longer knows this job: released");
            self.jobs.release(job, Some(404));
        }
    }

    async fn reconcile_job(&self, job: &Job, give_up_after_ms: i64) -> Result<(), ApiError> {
        let (code, state) = self.check_status(job).await?;
        if code == StatusCode::NOT_FOUND {
            if crate::store::now_ms() - job.created_at_ms > give_up_after_ms {
                self.give_up(job);
            }
            return Ok(());
        }
        if state != "COMPLETED" {
            return Ok(());
        }
        let result_uri = self
            .upstream
            .queue
            .uri(&format!("/{}/requests/{}", job.app, job.request_id))?;
        let resp = self.upstream.get(result_uri).await?;
        let code = resp.status();
        if code.is_server_error() {
            return Err(ApiError::UpstreamFailed {
                status: code,
                reached: true,
            });
        }
        if code == StatusCode::UNPROCESSABLE_ENTITY {
            // Completed with the model's error instead of a result: fal bills nothing.
            self.jobs.release(job, Some(code.as_u16()));
            return Ok(());
        }
        if !code.is_success() {
            // COMPLETED, yet no result now (not there yet, gone, or fal
            // refusing us for a while): fal did the work. Asked again next
            // round; if fal forgets the job, its hold is charged.
            return Ok(());
        }
        let (parts, incoming) = resp.into_parts();
        let limit = self.tunables.load().max_json_response_bytes;
        let idle = self.upstream.timeout();
        let units = FalReceipt::from_headers(&parts.headers).units_milli;
        let answer = match read_answer(&parts.headers, incoming, limit, idle).await {
            Ok(Answer::Read(bytes)) => read_object(&bytes),
            Ok(Answer::TooLarge(prefix, rest)) => meter::read_through(prefix, rest, idle).await,
            // Not JSON: its hold, without downloading it.
            Ok(Answer::Unread(_)) => None,
            Err(_) => return Err(ApiError::UpstreamUnreachable),
        };
        self.charge_job(job, answer.as_ref(), code, units);
        Ok(())
    }
}

/// Whether a submission's query names a `fal_webhook` (its name as fal
/// reads it, percent-escapes decoded).
fn has_webhook(query: Option<&str>) -> bool {
    query.is_some_and(|q| {
        q.split('&').any(|pair| {
            let name = pair.split('=').next().unwrap_or("");
            path::percent_decoded(name) == "fal_webhook"
        })
    })
}

/// fal's JSON with its queue URLs (on `fal_base`) pointing at us (`our_base`) instead.
fn rewritten(
    mut parts: http::response::Parts,
    bytes: &[u8],
    fal_base: &str,
    our_base: &str,
) -> Response<Body> {
    let body = rewrite_urls(bytes, fal_base, our_base);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    Response::from_parts(parts, Body::full(body))
}

/// A whole (bounded) JSON body from fal; a body that breaks off, stalls or
/// is too big is fal's fault.
async fn whole(incoming: FalBody, limit: usize, idle: Duration) -> Result<Bytes, ApiError> {
    match collect_bounded(incoming, limit, idle).await {
        Ok(Collected::Whole(bytes)) => Ok(bytes),
        _ => Err(ApiError::UpstreamUnreachable),
    }
}

/// The top-level string `field` of a JSON answer.
fn string_field(bytes: &[u8], field: &str) -> Option<String> {
    json::read(bytes, |v| Some(json::field(v, field)?.as_str()?.to_owned())).ok()?
}

/// Every `"{fal_base}/…` string start becomes `"{our_base}/queue/…`: the
/// bytes are edited in place, never re-serialized.
fn rewrite_urls(body: &[u8], fal_base: &str, our_base: &str) -> Bytes {
    let from = format!("\"{fal_base}/");
    let to = format!("\"{our_base}/queue/");
    let mut out = BytesMut::with_capacity(body.len() + 256);
    let mut rest = body;
    while let Some(at) = find(rest, from.as_bytes()) {
        out.extend_from_slice(&rest[..at]);
        out.extend_from_slice(to.as_bytes());
        rest = &rest[at + from.len()..];
    }
    out.extend_from_slice(rest);
    out.freeze()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_queue_routes() {
        let parse = |p: &str, q: Option<&str>| Route::parse(&Canonical::new(p, q).unwrap());
        let job = |app: Option<&str>, action, query: Option<&str>| Route::Job {
            app: app.map(str::to_owned),
            id: "abc".into(),
            action,
            query: query.map(str::to_owned),
        };
        let submit = Canonical::new("/queue/fal-ai/flux/dev", Some("fal_webhook=x")).unwrap();
        assert_eq!(
            parse("/queue/fal-ai/flux/dev", Some("fal_webhook=x")),
            Some(Route::Submit(submit))
        );
        assert_eq!(
            parse("/queue/fal-ai/flux/requests/abc", None),
            Some(job(Some("fal-ai/flux"), Action::Result, None))
        );
        assert_eq!(
            parse("/queue/fal-ai/flux/requests/abc/status", Some("logs=1")),
            Some(job(Some("fal-ai/flux"), Action::Status, Some("logs=1")))
        );
        assert_eq!(
            parse("/queue/fal-ai/flux/requests/abc/status/stream", None),
            Some(job(Some("fal-ai/flux"), Action::StatusStream, None))
        );
        assert_eq!(
            parse("/queue/fal-ai/flux/requests/abc/cancel", None),
            Some(job(Some("fal-ai/flux"), Action::Cancel, None))
        );
        assert_eq!(
            parse("/fal-ai/queue/requests/abc", None),
            Some(job(None, Action::Status, None))
        );
        assert_eq!(parse("/queue/fal-ai/flux/requests/abc/other", None), None);
        assert_eq!(parse("/fal-ai/flux/dev", None), None);
    }

    #[test]
    fn rewrites_only_fal_queue_urls() {
        let fal = br#"{"request_id":"r1","response_url":"https://queue.fal.run/fal-ai/flux/requests/r1","status_url":"https://queue.fal.run/fal-ai/flux/requests/r1/status","note":"see https://queue.fal.run/x"}"#;
        let out = rewrite_urls(fal, "https://queue.fal.run", "http://127.0.0.1:8080");
        let text = std::str::from_utf8(&out).unwrap();
        assert!(text
            .contains(r#""response_url":"http://127.0.0.1:8080/queue/fal-ai/flux/requests/r1""#));
        assert!(text.contains(
            r#""status_url":"http://127.0.0.1:8080/queue/fal-ai/flux/requests/r1/status""#
        ));
        // Only string values that are such URLs change, not text that mentions one.
        assert!(text.contains(r#""note":"see https://queue.fal.run/x""#));
    }
}

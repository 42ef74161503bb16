//! fal's queue host, as `shared/fal-api.md` describes it: submit, status
//! (and its event stream), result, cancel. Each status poll reports the job
//! and moves it one step: IN_QUEUE, IN_PROGRESS, then COMPLETED, or FAILED
//! when its input has `"mock_fail": true`. The URLs it hands out use only `{owner}/{alias}`, as fal's do.
//!
//! A cancel is fal's 202 `CANCELLATION_REQUESTED` whenever the job has not
//! completed, and what it leads to depends on when it arrives, as at fal:
//! a job still IN_QUEUE is removed (CANCELLED from then on, its result an
//! error), while a job already IN_PROGRESS always loses the race and
//! completes, its result served as if nobody had asked. A completed job
//! answers 400 `ALREADY_COMPLETED`.
//!
//! fal's races and refusals, on request: `"mock_result_404_once": true`
//! makes the first result fetch after COMPLETED a 404 (fal's result store
//! lagging its status), `"mock_result_status_once": 429` answers it with
//! that status instead (fal's concurrency limit, say), and
//! `"mock_submit_status": 502` queues the job but answers the submission
//! with that status, from fal's app (with its `x-fal-request-id`). Every
//! answer about a job carries the job's id as `x-fal-request-id`, and a job
//! that completes is billed in fal's books then, its result carrying the
//! units billed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use parking_lot::Mutex;
use simd_json::prelude::*;
use tokio::sync::mpsc;

use super::{
    json_response, model_output, receipt, status_json, stream_from, Input, MockBody, State,
};

/// The path prefix that stands for `queue.fal.run` on the mock.
pub const PREFIX: &str = "_queue";

#[derive(Clone)]
struct Job {
    /// `{owner}/{alias}`.
    app: String,
    /// The full path submitted to, which decides the output's shape.
    model: String,
    /// The input as submitted: the result is made from it as a sync call's would be.
    input: Bytes,
    /// Status polls seen: 0 in queue, 1 in progress, 2 and on done.
    step: u8,
    fails: bool,
    cancelled: bool,
    /// The next result fetch after COMPLETED is a 404.
    result_404_once: bool,
    /// The next result fetch after COMPLETED answers this status.
    result_status_once: Option<StatusCode>,
    /// Units fal billed when the job completed.
    billed_units: Option<u64>,
}

impl Job {
    fn done(&self) -> bool {
        self.step >= 2
    }

    fn status(&self) -> &'static str {
        match (self.cancelled, self.done(), self.fails, self.step) {
            (true, _, _, _) => "CANCELLED",
            (_, true, true, _) => "FAILED",
            (_, true, false, _) => "COMPLETED",
            (_, _, _, 0) => "IN_QUEUE",
            _ => "IN_PROGRESS",
        }
    }
}

#[derive(Default)]
pub struct Queue {
    jobs: Mutex<HashMap<String, Job>>,
    next: AtomicU64,
}

pub async fn answer(
    state: &Arc<State>,
    method: &Method,
    rest: Vec<&str>,
    query: &str,
    body: Bytes,
) -> Response<MockBody> {
    match rest.iter().position(|s| *s == "requests") {
        None if method == Method::POST => submit(state, &rest, body),
        Some(at) if at >= 1 && rest.len() > at + 1 => {
            let app = rest[..at].join("/");
            let id = rest[at + 1];
            // HEAD is a GET without the content (RFC 9110 §9.3.2), as
            // general-purpose servers answer it: hyper leaves the body out.
            let get = method == Method::GET || method == Method::HEAD;
            match (method, &rest[at + 2..]) {
                (_, []) if get => result(state, &app, id),
                (_, ["status"]) if get => status(state, &app, id),
                (_, ["status", "stream"]) if get => stream(state, &app, id, query),
                (&Method::PUT, ["cancel"]) => cancel(state, &app, id),
                _ => status_json(StatusCode::METHOD_NOT_ALLOWED, "no such queue route"),
            }
        }
        _ => status_json(StatusCode::NOT_FOUND, "no such queue route"),
    }
}

fn urls(state: &State, app: &str, id: &str) -> String {
    let base = format!("{}/{PREFIX}/{app}/requests/{id}", state.base);
    format!(r#""response_url":"{base}","status_url":"{base}/status","cancel_url":"{base}/cancel""#)
}

fn submit(state: &State, path: &[&str], body: Bytes) -> Response<MockBody> {
    if path.len() < 2 {
        return status_json(StatusCode::NOT_FOUND, "no such app");
    }
    // fal validates the input when the job is submitted.
    if let Err(why) = Input::read(&body) {
        return status_json(StatusCode::UNPROCESSABLE_ENTITY, &why);
    }
    let input = body.clone();
    let n = state.queue.next.fetch_add(1, Ordering::Relaxed);
    let id = format!("mock-{n:08x}-0000-4000-8000-000000000000");
    let app = path[..2].join("/");
    let flags = {
        let mut copy = body.to_vec();
        simd_json::to_owned_value(&mut copy).ok()
    };
    let flag = |name: &str| flags.as_ref().and_then(|v| v.get_bool(name)) == Some(true);
    let (fails, result_404_once) = (flag("mock_fail"), flag("mock_result_404_once"));
    let status_flag = |name: &str| {
        flags
            .as_ref()
            .and_then(|v| v.get_u64(name))
            .and_then(|c| StatusCode::from_u16(u16::try_from(c).ok()?).ok())
    };
    let submit_status = status_flag("mock_submit_status");
    let result_status_once = status_flag("mock_result_status_once");
    let body = format!(
        r#"{{"request_id":"{id}",{},"queue_position":0}}"#,
        urls(state, &app, &id)
    );
    state.queue.jobs.lock().insert(
        id.clone(),
        Job {
            app,
            model: format!("/{}", path.join("/")),
            input,
            step: 0,
            fails,
            cancelled: false,
            result_404_once,
            result_status_once,
            billed_units: None,
        },
    );
    if let Some(code) = submit_status {
        // From fal's app (it carries fal's request id), after queueing.
        let mut resp = status_json(code, "error after the job was queued");
        if let Ok(id) = http::HeaderValue::from_str(&id) {
            resp.headers_mut().insert("x-fal-request-id", id);
        }
        return resp;
    }
    let mut resp = json_response(StatusCode::OK, Bytes::from(body));
    receipt(&mut resp, &id, None);
    resp
}

/// One step on. A job that completes is billed then, once: fal bills the
/// work it did, whether or not anyone fetches the result.
fn advance(state: &State, id: &str, job: &mut Job) {
    job.step = job.step.saturating_add(1).min(2);
    if job.status() == "COMPLETED" && job.billed_units.is_none() {
        if let Ok(input) = Input::read(&job.input) {
            job.billed_units = Some(state.books.bill(id, &job.model, &input));
        }
    }
}

/// The job named by `app` and `id`; a job under another app is as unknown as a missing one.
fn job(state: &State, app: &str, id: &str) -> Option<Job> {
    state
        .queue
        .jobs
        .lock()
        .get(id)
        .filter(|j| j.app == app)
        .cloned()
}

fn not_found() -> Response<MockBody> {
    status_json(StatusCode::NOT_FOUND, "Request not found")
}

fn status_body(state: &State, job: &Job, id: &str) -> String {
    let position = if job.step == 0 {
        r#","queue_position":0"#
    } else {
        ""
    };
    format!(
        r#"{{"status":"{}"{position},{},"logs":[],"metrics":{{"inference_time":0.42}}}}"#,
        job.status(),
        urls(state, &job.app, id)
    )
}

fn status(state: &State, app: &str, id: &str) -> Response<MockBody> {
    let job = {
        let mut jobs = state.queue.jobs.lock();
        match jobs.get_mut(id).filter(|j| j.app == app) {
            Some(j) => {
                let seen = j.clone();
                advance(state, id, j);
                seen
            }
            None => return not_found(),
        }
    };
    let code = if job.done() || job.cancelled {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let mut resp = json_response(code, Bytes::from(status_body(state, &job, id)));
    receipt(&mut resp, id, None);
    resp
}

/// Server-sent events, one per step until the job is done. With
/// `mock_gate=1` in the query, it waits for the test's gate after the first.
fn stream(state: &Arc<State>, app: &str, id: &str, query: &str) -> Response<MockBody> {
    if job(state, app, id).is_none() {
        return not_found();
    }
    let gated = query.split('&').any(|p| p == "mock_gate=1");
    let (tx, rx) = mpsc::channel(4);
    let (state, app, id) = (Arc::clone(state), app.to_owned(), id.to_owned());
    tokio::spawn(async move {
        for n in 0.. {
            let Some(job) = job(&state, &app, &id) else {
                return;
            };
            let event = format!("data: {}\n\n", status_body(&state, &job, &id));
            if tx.send(Bytes::from(event)).await.is_err() || job.done() || job.cancelled {
                return;
            }
            if gated && n == 0 {
                state.gate.notified().await;
            } else {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if let Some(j) = state.queue.jobs.lock().get_mut(&id) {
                advance(&state, &id, j);
            }
        }
    });
    stream_from(rx, "text/event-stream")
}

fn result(state: &State, app: &str, id: &str) -> Response<MockBody> {
    let Some(job) = job(state, app, id) else {
        return not_found();
    };
    if job.status() == "COMPLETED" && job.result_404_once {
        if let Some(j) = state.queue.jobs.lock().get_mut(id) {
            j.result_404_once = false;
        }
        return not_found();
    }
    if let (Some(code), "COMPLETED") = (job.result_status_once, job.status()) {
        if let Some(j) = state.queue.jobs.lock().get_mut(id) {
            j.result_status_once = None;
        }
        return status_json(code, "not now");
    }
    match job.status() {
        "COMPLETED" => {
            let mut resp = model_output(&job.model, &job.input);
            receipt(&mut resp, id, job.billed_units);
            resp
        }
        "FAILED" => status_json(StatusCode::UNPROCESSABLE_ENTITY, "mock job failed"),
        "CANCELLED" => status_json(StatusCode::BAD_REQUEST, "Request was cancelled"),
        _ => status_json(StatusCode::BAD_REQUEST, "Request is still in progress"),
    }
}

fn cancel(state: &State, app: &str, id: &str) -> Response<MockBody> {
    let mut jobs = state.queue.jobs.lock();
    let Some(job) = jobs.get_mut(id).filter(|j| j.app == app) else {
        return not_found();
    };
    if job.done() || job.cancelled {
        return json_response(
            StatusCode::BAD_REQUEST,
            Bytes::from_static(br#"{"status":"ALREADY_COMPLETED"}"#),
        );
    }
    // Only a job no runner has picked up yet can still be stopped.
    job.cancelled = job.step == 0;
    json_response(
        StatusCode::ACCEPTED,
        Bytes::from_static(br#"{"status":"CANCELLATION_REQUESTED"}"#),
    )
}

//! The per-request service: authenticate, route, forward, respond. Every
//! failure becomes a response in [`Proxy::handle`], nowhere else.

mod account;
mod admission;
mod auth;
pub mod body;
mod credentials;
mod dashboard;
mod detached;
pub(crate) mod fal_proxy;
pub mod headers;
pub mod json_body;
mod meter;
pub mod pace;
pub(crate) mod path;
mod queue;
mod request_id;
pub(crate) mod respond;
pub mod small_body;
mod stripe;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use self::body::Body;
use self::request_id::RequestIds;
use self::respond::Billed;
use crate::billing::facts::RequestFacts;
use crate::billing::ledger::{Ledger, Reservation};
use crate::billing::pricing::{PriceTable, SyncedPrice, Tariff};
use crate::billing::receipt::{self, FalReceipt};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::{ApiError, Error};
use crate::jobs::Jobs;
use crate::keys::refresh::RefreshWaker;
use crate::keys::{Account, ApiKey, Registry};
use crate::metrics::{Denial, Metrics};
use crate::payments::checkout::Checkout;
use crate::payments::{self, Webhook};
use crate::ratelimit::{ceil_secs, Allowance, Decision, RateLimits, Taken, Verdict};
use crate::shared_limits::SharedLimits;
use crate::signin::SignIn;
use crate::store::{db::Db, now_secs, writer::StoreWriter};
use crate::upstream::{FalBody, Upstream};
use arc_swap::ArcSwap;

pub struct Proxy {
    registry: Arc<Registry>,
    /// Shared with the tasks that finish billed calls after a client left.
    upstream: Arc<Upstream>,
    writer: StoreWriter,
    ledger: Arc<Ledger>,
    /// Prices, plans and limits: replaced whole by a reload.
    tunables: ArcSwap<Tunables>,
    clock: Arc<dyn Clock>,
    ids: RequestIds,
    jobs: Arc<Jobs>,
    /// For the dashboard's endpoints; never on the proxying path.
    db: Db,
    metrics: Arc<Metrics>,
    /// Billed calls running on their own tasks, for shutdown to wait for.
    detached: Arc<detached::Detached>,
    /// Believe `x-forwarded-proto`/`-host` (behind a trusted load balancer).
    trust_forwarded: bool,
    /// How slowly a billable body may arrive.
    body_pace: pace::BodyPace,
    /// Stripe's webhook, when its secret is configured.
    webhook: Option<Arc<Webhook>>,
    /// Top-ups by Stripe Checkout, when Stripe's secret key is configured.
    checkout: Option<Checkout>,
    /// Tells the refresher that this server changed a balance in SQLite.
    refresh: RefreshWaker,
    /// People's sign-in by email link, and their sessions.
    signin: SignIn,
    shared_limits: Option<Arc<SharedLimits>>,
}

/// What the request's connection says about how the client reached us.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub tls: bool,
    /// The client's address (the peer's; behind a trusted load balancer,
    /// see [`Proxy::client_ip`]).
    pub peer: std::net::IpAddr,
}

/// What the request log line, the metrics and the rate-limit headers report.
#[derive(Default)]
struct Trace {
    route: &'static str,
    /// The price rule that matched, for the metrics' `model` label.
    model: Option<Arc<str>>,
    key_id: Option<i64>,
    upstream: Option<Duration>,
    rate: Option<Verdict>,
}

/// A duration in milliseconds to the microsecond (`1.234`), written with
/// integer formatting: a float's shortest form cost more than the rest of
/// the log line's fields.
struct Millis(Duration);

impl std::fmt::Display for Millis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // As u64 (good for 584,000 years): u128's formatting is the slow kind.
        let us = u64::try_from(self.0.as_micros()).unwrap_or(u64::MAX);
        write!(f, "{}.{:03}", us / 1000, us % 1000)
    }
}

/// The settings a reload replaces, together: a request works with one
/// snapshot of them from start to end.
pub struct Tunables {
    pub prices: PriceTable,
    pub limits: RateLimits,
    pub max_json_body_bytes: usize,
    pub max_buffered_body_bytes_per_account: usize,
    pub max_json_response_bytes: usize,
    pub max_keys_per_account: u64,
}

impl Tunables {
    /// `synced`: fal's prices as last synced, over the table's rules.
    pub fn new(config: &Config, synced: &[SyncedPrice]) -> Result<Self, Error> {
        Ok(Self {
            prices: PriceTable::new(&config.billing, &config.pricing, synced)?,
            limits: RateLimits::new(config),
            max_json_body_bytes: config.limits.max_json_body_bytes,
            max_buffered_body_bytes_per_account: config.limits.buffered_body_bytes_per_account(),
            max_json_response_bytes: config.billing.max_json_response_bytes,
            max_keys_per_account: config.limits.max_keys_per_account,
        })
    }
}

/// The server's shared state that the proxy works with, built by `app`.
pub struct Wiring {
    pub registry: Arc<Registry>,
    /// fal's prices as last synced, read from the store at start-up.
    pub synced_prices: Vec<SyncedPrice>,
    pub upstream: Upstream,
    pub writer: StoreWriter,
    pub ledger: Arc<Ledger>,
    pub clock: Arc<dyn Clock>,
    pub jobs: Arc<Jobs>,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    pub refresh: RefreshWaker,
    /// The base of the links we email: `[signup] public_url`, or the listener's.
    pub public_url: String,
    /// On a database several nodes share: the generation allowance is decided there.
    pub shared_limits: Option<Arc<SharedLimits>>,
}

impl Proxy {
    pub fn new(config: &Config, w: Wiring) -> Result<Self, Error> {
        let ids = RequestIds::new().map_err(|e| Error::Usage(format!("no OS randomness: {e}")))?;
        Ok(Self {
            registry: w.registry,
            upstream: Arc::new(w.upstream),
            writer: w.writer,
            ledger: w.ledger,
            tunables: ArcSwap::from_pointee(Tunables::new(config, &w.synced_prices)?),
            clock: w.clock,
            ids,
            jobs: w.jobs,
            db: w.db.clone(),
            metrics: w.metrics,
            detached: Arc::default(),
            trust_forwarded: config.server.trust_forwarded_headers,
            body_pace: (&config.server).into(),
            webhook: Webhook::from_config(config)?.map(Arc::new),
            checkout: Checkout::from_config(config)?,
            refresh: w.refresh,
            signin: SignIn::new(config, w.db.clone(), w.public_url)?,
            shared_limits: w.shared_limits,
        })
    }

    /// Puts new prices, plans and limits in force for the requests that start from now on.
    pub fn retune(&self, tunables: Tunables) {
        self.tunables.store(Arc::new(tunables));
    }

    /// The settings new requests are admitted under.
    pub fn tunables(&self) -> Arc<Tunables> {
        self.tunables.load_full()
    }

    /// Answers one request; never fails (an `Err` would drop the connection).
    pub async fn handle(&self, req: Request<Incoming>, conn: Conn) -> Response<Body> {
        let started = Instant::now();
        let request_id = self.ids.next();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let mut trace = Trace::default();
        let mut resp = match self.route(req, conn, &request_id, &mut trace).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        if let Ok(id) = HeaderValue::from_str(&request_id) {
            resp.headers_mut().insert(headers::X_REQUEST_ID, id);
        }
        if let Some(verdict) = trace.rate {
            rate_headers(resp.headers_mut(), verdict);
        }
        let total = started.elapsed();
        let status = resp.status().as_u16();
        self.metrics
            .request(trace.route, trace.model.as_ref(), status);
        if let Some(upstream) = trace.upstream {
            self.metrics.upstream_latency.observe(upstream);
        }
        self.metrics
            .added_latency
            .observe(total.saturating_sub(trace.upstream.unwrap_or_default()));
        tracing::info!(
            %method,
            %path,
            status = resp.status().as_u16(),
            key_id = trace.key_id,
            upstream_ms = trace.upstream.map(|d| tracing::field::display(Millis(d))),
            total_ms = %Millis(started.elapsed()),
            %request_id,
            "request"
        );
        resp
    }

    async fn route(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        admission::check(req.method(), req.headers())?;
        let path = req.uri().path().to_owned();
        trace.route = "healthz";
        if path == "/healthz" && req.method() == Method::GET {
            return Ok(static_json(StatusCode::OK, r#"{"status":"ok"}"#));
        }
        trace.route = "dashboard";
        if (path == "/dashboard" || path == "/dashboard/") && req.method() == Method::GET {
            return Ok(dashboard::page());
        }
        if path.starts_with(auth::PREFIX) {
            trace.route = "auth";
            return self.auth(req, conn).await;
        }
        if path == payments::WEBHOOK_ROUTE {
            trace.route = "stripe_webhook";
            return self.stripe_webhook(req).await;
        }
        let target = path::Canonical::of(req.uri());
        let queue_route = target.as_ref().ok().and_then(queue::Route::parse);
        trace.route = if path.starts_with(account::PREFIX) {
            "account"
        } else if path == fal_proxy::ROUTE {
            "fal_proxy"
        } else if queue_route.is_some() {
            "queue"
        } else {
            "sync"
        };
        if trace.route == "account" {
            let caller = self.caller(&req).await?;
            trace.key_id = caller.key.as_ref().map(|k| k.id);
            return self
                .account_api(req, conn, &caller, request_id, trace)
                .await;
        }
        let key = self.authenticate(&req)?;
        trace.key_id = Some(key.id);
        match (trace.route, queue_route) {
            ("fal_proxy", _) => self.fal_proxy(req, conn, &key, request_id, trace).await,
            (_, Some(route)) => self.queue(req, route, conn, &key, request_id, trace).await,
            _ => {
                self.forward_sync(req, &target?, &key, request_id, trace)
                    .await
            }
        }
    }

    fn authenticate(&self, req: &Request<Incoming>) -> Result<Arc<ApiKey>, ApiError> {
        let key = self
            .registry
            .authenticate(credentials::presented_key(req.headers())?)?;
        let now = now_secs();
        if key.touch(now) {
            self.writer.key_used(key.id, now);
        }
        Ok(key)
    }

    /// A synchronous call: the same method, query and body to fal's run
    /// host, at the canonical `target` path it is priced by, with its
    /// estimated cost held until fal has answered.
    async fn forward_sync(
        &self,
        req: Request<Incoming>,
        target: &path::Canonical,
        key: &ApiKey,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let uri = self.upstream.run.uri(&target.forwarded(""))?;
        let model = &target.path()[1..];
        let unanswered = Unanswered::Release;
        let (detached, idle) = (Arc::clone(&self.detached), self.upstream.timeout());
        self.forward_billed(
            req,
            model,
            uri,
            key,
            request_id,
            trace,
            unanswered,
            move |sent| async move {
                let billed = Billed {
                    tariff: &sent.tariff,
                    model: &sent.model,
                    request: sent.request,
                    max_json_bytes: sent.tunables.max_json_response_bytes,
                    detached: &detached,
                    idle,
                };
                billed.respond(sent.resp, sent.reservation).await
            },
        )
        .await
    }

    /// Work that costs, refused as early as it can be: a price rule for
    /// `model`, the generation allowance, and available credits for the
    /// cheapest request the rule could price, all from the headers; only
    /// then the body, read within the account's buffer allowance, and its
    /// cost fields validated; then the hold, fal at `uri`, and `finish`
    /// with fal's answer. Whatever keeps fal from doing the work releases
    /// the hold (and gives the allowance back if it was refused before
    /// fal); a success marks the reservation answered. From the hold on,
    /// the work runs on a task of its own: a client that leaves does not
    /// cancel fal's call, which runs to its answer and is settled as if
    /// the client were still there.
    #[allow(clippy::too_many_arguments)]
    async fn forward_billed<F, Fut>(
        &self,
        req: Request<Incoming>,
        model: &str,
        uri: http::Uri,
        key: &ApiKey,
        request_id: &str,
        trace: &mut Trace,
        unanswered: Unanswered,
        finish: F,
    ) -> Result<Response<Body>, ApiError>
    where
        F: FnOnce(Sent) -> Fut + Send + 'static,
        Fut: Future<Output = Result<Response<Body>, ApiError>> + Send,
    {
        let tunables = self.tunables.load_full();
        let tariff = tunables
            .prices
            .tariff(model)
            .ok_or_else(|| ApiError::UnpricedModel(model.to_owned()))?;
        trace.model = Some(Arc::clone(&tariff.rule.pattern));
        let allowance = self.allow_generation(&tunables, key, trace).await?;
        let cheapest = tariff.cheapest();
        let available = key.account.available();
        // A node of several knows only its own lease: the hold asks for more.
        if !self.registry.is_leasing() && available < i64::try_from(cheapest).unwrap_or(i64::MAX) {
            return Err(ApiError::InsufficientCredits {
                needed: cheapest,
                available,
            });
        }
        let (parts, incoming) = req.into_parts();
        let limits = json_body::BodyLimits {
            max_bytes: tunables.max_json_body_bytes,
            account_bytes: tunables.max_buffered_body_bytes_per_account,
            pace: self.body_pace,
        };
        let mut buffered = json_body::Buffered::new(&key.account, limits.account_bytes);
        let (bytes, request) =
            json_body::read(incoming, &parts.headers, limits, &mut buffered).await?;
        let estimate = tariff.estimate(&request)?;
        let mut reservation = self
            .ledger
            .reserve(key, model, request_id, estimate)
            .await?;
        allowance.spent();
        let (upstream, ledger) = (Arc::clone(&self.upstream), Arc::clone(&self.ledger));
        let model = model.to_owned();
        // Boxed where it is made: the future holds the whole answer's
        // handling, and is moved into its task without being copied.
        let work = Box::pin(async move {
            let started = Instant::now();
            let sent = send(&upstream, parts, Body::full(bytes), uri).await;
            // fal has the body (or will never get it): its bytes are freed.
            drop(buffered);
            let took = started.elapsed();
            let answer = match sent {
                Ok(resp) => {
                    reservation.heard(resp.headers());
                    if resp.status().is_success() {
                        reservation.answered();
                    }
                    let sent = Sent {
                        resp,
                        reservation,
                        request,
                        tariff,
                        tunables,
                        model,
                    };
                    finish(sent).await
                }
                Err(Failed { error, status, fal }) => {
                    // A fal request id on a failure goes with the charge too:
                    // fal may still run (and bill) a job it queued.
                    reservation.heard_of(fal);
                    if unanswered == Unanswered::ChargeHold && error.may_have_been_served() {
                        reservation.charge(None, status.unwrap_or(504));
                    } else {
                        reservation.release(status);
                    }
                    Err(error)
                }
            };
            // Settled (or, for a queued job, journalled as the job's): on
            // disk before the client hears of it.
            ledger.on_disk().await;
            (answer, took)
        });
        let (answer, took) = self.detached.run(work).await;
        trace.upstream = Some(took);
        answer
    }

    /// Waits, at most `within`, for billed calls that run on after their
    /// clients left; true once none does.
    pub async fn detached_settled(&self, within: Duration) -> bool {
        self.detached.settled(within).await
    }

    /// The generation allowance, taken once per request; 429 when spent.
    async fn allow_generation<'a>(
        &self,
        tunables: &'a Tunables,
        key: &'a ApiKey,
        trace: &mut Trace,
    ) -> Result<Allowance<'a>, ApiError> {
        let now = self.clock.now_ns();
        let (verdict, taken) = match &self.shared_limits {
            Some(shared) => shared.generation(&tunables.limits, key, now).await,
            None => (
                tunables.limits.generation(key, now, 1),
                Taken::Here { nodes: 1 },
            ),
        };
        trace.rate = Some(verdict);
        if let Decision::Deny { retry_after_ns, .. } = verdict.decision {
            let by = if verdict.by_account {
                Denial::Account
            } else {
                Denial::Key
            };
            self.metrics.denied(by);
            return Err(ApiError::RateLimited {
                retry_after: ceil_secs(retry_after_ns),
                by_account: verdict.by_account,
            });
        }
        Ok(Allowance::new(&tunables.limits, key, taken))
    }

    /// The poll allowance: status, result, cancel, and storage calls.
    fn check_poll(&self, key: &ApiKey, trace: &mut Trace) -> Result<(), ApiError> {
        let verdict = self.tunables.load().limits.poll(key, self.clock.now_ns());
        self.poll_verdict(verdict, trace)
    }

    fn check_account_poll(&self, account: &Account, trace: &mut Trace) -> Result<(), ApiError> {
        let verdict = self
            .tunables
            .load()
            .limits
            .session_poll(account, self.clock.now_ns());
        self.poll_verdict(verdict, trace)
    }

    fn poll_verdict(&self, verdict: Verdict, trace: &mut Trace) -> Result<(), ApiError> {
        trace.rate = Some(verdict);
        match verdict.decision {
            Decision::Deny { retry_after_ns, .. } => {
                self.metrics.denied(Denial::Poll);
                Err(ApiError::RateLimited {
                    retry_after: ceil_secs(retry_after_ns),
                    by_account: verdict.by_account,
                })
            }
            Decision::Allow { .. } => Ok(()),
        }
    }

    /// Forwards an unbilled call (a poll, an upload) to fal, timed for the log line.
    async fn send(
        &self,
        parts: http::request::Parts,
        body: Body,
        uri: http::Uri,
        trace: &mut Trace,
    ) -> Result<Response<FalBody>, ApiError> {
        let started = Instant::now();
        let result = send(&self.upstream, parts, body, uri).await;
        trace.upstream = Some(started.elapsed());
        result.map_err(|unanswered| unanswered.error)
    }
}

/// A call fal did not answer with a response we pass on.
struct Failed {
    error: ApiError,
    /// fal's status, if it answered.
    status: Option<u16>,
    /// What fal's answer said of the call, if it answered.
    fal: FalReceipt,
}

/// Forwards to fal with the operator's key. fal refusing that key, and
/// fal's 5xx, become our errors.
async fn send(
    upstream: &Upstream,
    mut parts: http::request::Parts,
    body: Body,
    uri: http::Uri,
) -> Result<Response<FalBody>, Failed> {
    headers::to_upstream(&mut parts.headers);
    // `_billing` is spliced into fal's bytes: they must not arrive compressed.
    parts.headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    parts.uri = uri;
    let resp = upstream
        .send(Request::from_parts(parts, body))
        .await
        .map_err(|error| Failed {
            error,
            status: None,
            fal: FalReceipt::default(),
        })?;
    let status = resp.status();
    let failed = |error| Failed {
        error,
        status: Some(status.as_u16()),
        fal: FalReceipt::from_headers(resp.headers()),
    };
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        tracing::error!(status = status.as_u16(), "fal refused the operator's key");
        return Err(failed(ApiError::UpstreamAuth));
    }
    if status.is_server_error() {
        // Only fal's app gives a request id: a 5xx without one is its
        // ingress, which never handed the request on.
        let reached = resp.headers().contains_key(receipt::REQUEST_ID);
        return Err(failed(ApiError::UpstreamFailed { status, reached }));
    }
    Ok(resp)
}

/// What a billed call that fal did not answer (a 5xx, a timeout) costs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unanswered {
    /// Nothing: fal bills only outputs it delivers, and it delivered none.
    Release,
    /// Its hold: fal may have taken the work and deliver it elsewhere (a
    /// queue submission with the client's own `fal_webhook`).
    ChargeHold,
}

/// Work fal has answered, still holding its estimated cost.
struct Sent {
    resp: Response<FalBody>,
    reservation: Reservation,
    request: RequestFacts,
    /// What prices the request: a queued job keeps it until it is settled.
    tariff: Tariff,
    /// The settings the request was admitted under; it is settled under them too.
    tunables: Arc<Tunables>,
    /// The model path that was priced.
    model: String,
}

/// `x-ratelimit-limit`, `-remaining` (requests that would pass now) and
/// `-reset` (seconds until the allowance is full again).
fn rate_headers(map: &mut http::HeaderMap, verdict: Verdict) {
    let (remaining, reset_ns) = match verdict.decision {
        Decision::Allow {
            remaining,
            reset_ns,
        } => (remaining, reset_ns),
        Decision::Deny { reset_ns, .. } => (0, reset_ns),
    };
    map.insert(headers::X_RATELIMIT_LIMIT, HeaderValue::from(verdict.limit));
    map.insert(headers::X_RATELIMIT_REMAINING, HeaderValue::from(remaining));
    map.insert(
        headers::X_RATELIMIT_RESET,
        HeaderValue::from(ceil_secs(reset_ns)),
    );
}

/// `value` as a JSON answer (the admin API's and the dashboard's endpoints).
pub(crate) fn json<T: serde::Serialize>(
    status: StatusCode,
    value: &T,
) -> Result<Response<Body>, ApiError> {
    let text = simd_json::to_string(value).map_err(|e| Error::Usage(e.to_string()))?;
    let mut resp = Response::new(Body::full(bytes::Bytes::from(text)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Ok(resp)
}

fn static_json(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

//! A stand-in for Stripe, on loopback, for the tests and `serve --demo`: the
//! Checkout Sessions API as Stripe documents it (form-encoded parameters,
//! `Authorization: Bearer sk_…`, `Idempotency-Key` replays, Stripe-shaped
//! errors), and a hosted checkout page whose "Pay" button does what Stripe
//! does once a card is paid: it sends a signed `charge.succeeded` (with its
//! receipt, which the stand-in also serves) and `checkout.session.completed`
//! to the webhook endpoint, then returns the buyer to the `success_url`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};

use crate::payments::signature;

/// One call to the API, as the stand-in received it.
#[derive(Debug, Clone)]
pub struct Call {
    pub authorization: Option<String>,
    pub idempotency_key: Option<String>,
    pub form: Vec<(String, String)>,
}

impl Call {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Where the "Pay" button delivers its event, and the secret it signs with.
#[derive(Clone)]
pub struct WebhookTarget {
    pub url: String,
    pub secret: String,
}

/// A form's parameters, in the order sent.
type Form = Vec<(String, String)>;

#[derive(Clone)]
struct Session {
    id: String,
    form: Form,
    paid: bool,
}

struct State {
    base: String,
    secret_key: String,
    webhook: Mutex<Option<WebhookTarget>>,
    calls: Mutex<Vec<Call>>,
    sessions: Mutex<HashMap<String, Session>>,
    /// Idempotency key → (the parameters it was first sent with, the session made).
    idempotent: Mutex<HashMap<String, (Form, String)>>,
    next: AtomicU64,
}

pub struct MockStripe {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl MockStripe {
    /// Starts on 127.0.0.1 port 0, accepting `secret_key` as its API key.
    pub async fn start(secret_key: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            base: format!("http://{addr}"),
            secret_key: secret_key.to_owned(),
            webhook: Mutex::default(),
            calls: Mutex::default(),
            sessions: Mutex::default(),
            idempotent: Mutex::default(),
            next: AtomicU64::new(1),
        });
        let serving = Arc::clone(&state);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&serving);
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(answer(&state, req).await) }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Self { addr, state })
    }

    /// The API base, for `[payments] api_base`.
    pub fn url(&self) -> String {
        self.state.base.clone()
    }

    /// Where the checkout page's "Pay" button sends its signed event.
    pub fn deliver_to(&self, target: WebhookTarget) {
        *self.state.webhook.lock() = Some(target);
    }

    /// Every call made to the API, in order.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().clone()
    }
}

async fn answer(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::POST, "/v1/checkout/sessions") => create_session(state, req).await,
        (Method::GET, p) if p.starts_with("/c/pay/") => page(state, &p["/c/pay/".len()..]),
        (Method::GET, p) if p.starts_with("/receipts/") => receipt(&p["/receipts/".len()..]),
        (Method::POST, p) if p.starts_with("/c/pay/") && p.ends_with("/pay") => {
            let id = &p["/c/pay/".len()..p.len() - "/pay".len()];
            pay(state, id).await
        }
        _ => stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "Unrecognized request URL.",
        ),
    }
}

async fn create_session(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let header_text = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let authorization = header_text("authorization");
    let idempotency_key = header_text("idempotency-key");
    let body = match Limited::new(req.into_body(), 64 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return stripe_error(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "Unreadable body.",
            )
        }
    };
    let form: Form = form_urlencoded::parse(&body).into_owned().collect();
    state.calls.lock().push(Call {
        authorization: authorization.clone(),
        idempotency_key: idempotency_key.clone(),
        form: form.clone(),
    });
    if authorization.as_deref() != Some(&format!("Bearer {}", state.secret_key)) {
        return stripe_error(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Invalid API Key provided.",
        );
    }
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    if let Some(missing) = [
        "mode",
        "success_url",
        "line_items[0][price_data][currency]",
        "line_items[0][quantity]",
    ]
    .into_iter()
    .find(|p| param(p).is_none())
    {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("Missing required param: {missing}."),
        );
    }
    if param("line_items[0][price_data][unit_amount]")
        .and_then(|a| a.parse::<u64>().ok())
        .is_none()
    {
        return stripe_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "Invalid integer: unit_amount.",
        );
    }
    if let Some(key) = &idempotency_key {
        if let Some((sent, id)) = state.idempotent.lock().get(key).cloned() {
            if sent != form {
                return stripe_error(StatusCode::BAD_REQUEST, "idempotency_error", "Keys for idempotent requests can only be used with the same parameters they were first used with.");
            }
            let session = state.sessions.lock().get(&id).cloned();
            return json(
                StatusCode::OK,
                &session_json(state, &session.expect("made")),
            );
        }
    }
    let id = format!("cs_test_{:024}", state.next.fetch_add(1, Ordering::Relaxed));
    let session = Session {
        id: id.clone(),
        form: form.clone(),
        paid: false,
    };
    state.sessions.lock().insert(id.clone(), session.clone());
    if let Some(key) = idempotency_key {
        state.idempotent.lock().insert(key, (form, id));
    }
    json(StatusCode::OK, &session_json(state, &session))
}

/// A Checkout Session's fields as Stripe's API shows them (those we set and read).
#[derive(serde::Serialize)]
struct SessionView<'a> {
    id: &'a str,
    object: &'static str,
    mode: String,
    status: &'static str,
    payment_status: &'static str,
    client_reference_id: String,
    currency: String,
    amount_subtotal: i64,
    amount_total: i64,
    payment_intent: Option<String>,
    metadata: HashMap<String, String>,
    success_url: String,
    cancel_url: String,
    url: Option<String>,
}

/// The session as Stripe's API and its events show it.
fn session_json(state: &State, s: &Session) -> String {
    let param = |name: &str| {
        s.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let quantity: i64 = param("line_items[0][quantity]").parse().unwrap_or(1);
    let amount = param("line_items[0][price_data][unit_amount]")
        .parse::<i64>()
        .unwrap_or(0)
        * quantity;
    let metadata: HashMap<String, String> = s
        .form
        .iter()
        .filter_map(|(k, v)| {
            Some((
                k.strip_prefix("metadata[")?.strip_suffix(']')?.to_owned(),
                v.clone(),
            ))
        })
        .collect();
    let intent = s.paid.then(|| format!("pi_{}", &s.id["cs_test_".len()..]));
    let session = SessionView {
        id: &s.id,
        object: "checkout.session",
        mode: param("mode"),
        status: if s.paid { "complete" } else { "open" },
        payment_status: if s.paid { "paid" } else { "unpaid" },
        client_reference_id: param("client_reference_id"),
        currency: param("line_items[0][price_data][currency]"),
        amount_subtotal: amount,
        amount_total: amount,
        payment_intent: intent,
        metadata,
        success_url: param("success_url"),
        cancel_url: param("cancel_url"),
        url: (!s.paid).then(|| format!("{}/c/pay/{}", state.base, s.id)),
    };
    simd_json::to_string(&session).expect("serializable")
}

/// The hosted checkout page: what is being bought, and a "Pay" button.
fn page(state: &State, id: &str) -> Response<Full<Bytes>> {
    let Some(session) = state.sessions.lock().get(id).cloned() else {
        return stripe_error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "No such checkout session.",
        );
    };
    let param = |name: &str| {
        session
            .form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| html_escape(v))
            .unwrap_or_default()
    };
    let cents: u64 = param("line_items[0][price_data][unit_amount]")
        .parse()
        .unwrap_or(0);
    let html = format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>Checkout (Stripe stand-in)</title></head>
<body style="font-family: sans-serif; max-width: 32em; margin: 3em auto">
<p><small>A stand-in for Stripe's hosted checkout: no card is charged.</small></p>
<h1>{name}</h1>
<p id="amount">{dollars}.{cents:02} {currency}</p>
<form method="post" action="/c/pay/{id}/pay"><button id="pay" type="submit">Pay</button></form>
<p><a id="cancel" href="{cancel}">Cancel</a></p>
</body></html>"#,
        name = param("line_items[0][price_data][product_data][name]"),
        dollars = cents / 100,
        cents = cents % 100,
        currency = param("line_items[0][price_data][currency]").to_uppercase(),
        cancel = param("cancel_url"),
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/html; charset=utf-8".parse().unwrap(),
    );
    resp
}

/// The receipt Stripe shows for a charge.
fn receipt(intent: &str) -> Response<Full<Bytes>> {
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Receipt</title></head><body><h1>Receipt</h1><p id=\"intent\">{}</p><p>Paid (Stripe stand-in: no card was charged).</p></body></html>",
        html_escape(intent)
    );
    let mut resp = Response::new(Full::new(Bytes::from(html)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        "text/html; charset=utf-8".parse().unwrap(),
    );
    resp
}

/// What Stripe does once the card is paid: the signed event to the
/// webhook, then the buyer back to `success_url`.
async fn pay(state: &State, id: &str) -> Response<Full<Bytes>> {
    let session = {
        let mut sessions = state.sessions.lock();
        let Some(s) = sessions.get_mut(id) else {
            return stripe_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "No such checkout session.",
            );
        };
        s.paid = true;
        s.clone()
    };
    let number = &id["cs_test_".len()..];
    // Stripe sends the charge's event and the session's, in no set order.
    let charge = format!(
        r#"{{"id":"evt_ch_{number}","object":"event","type":"charge.succeeded","data":{{"object":{{"id":"ch_{number}","object":"charge","payment_intent":"pi_{number}","paid":true,"receipt_url":"{}/receipts/pi_{number}"}}}}}}"#,
        state.base
    );
    let completed = format!(
        r#"{{"id":"evt_{number}","object":"event","type":"checkout.session.completed","data":{{"object":{}}}}}"#,
        session_json(state, &session)
    );
    let target = state.webhook.lock().clone();
    if let Some(target) = target {
        for event in [charge, completed] {
            if let Err(e) = deliver(&target, &event).await {
                tracing::warn!(error = %e, "the Stripe stand-in could not deliver its event");
            }
        }
    }
    let success = session
        .form
        .iter()
        .find(|(k, _)| k == "success_url")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(location) = success.parse() {
        resp.headers_mut().insert(header::LOCATION, location);
    }
    resp
}

/// POSTs the event, signed as Stripe signs, to the webhook (on loopback).
async fn deliver(target: &WebhookTarget, event: &str) -> Result<(), String> {
    let uri: http::Uri = target.url.parse().map_err(|e| format!("{e}"))?;
    let authority = uri.authority().ok_or("no host")?.clone();
    let stream = tokio::time::timeout(
        Duration::from_secs(5),
        TcpStream::connect(authority.as_str()),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let t = crate::store::now_secs();
    let v1: String = signature::sign(target.secret.as_bytes(), t, event.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let req = Request::post(uri.path())
        .header(header::HOST, authority.as_str())
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header("stripe-signature", format!("t={t},v1={v1}"))
        .body(Full::new(Bytes::from(event.to_owned())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .map_err(|_| "no answer in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(format!("the webhook answered {}", resp.status()))
    }
}

fn stripe_error(status: StatusCode, kind: &str, message: &str) -> Response<Full<Bytes>> {
    json(
        status,
        &format!(
            r#"{{"error":{{"type":"{kind}","message":{}}}}}"#,
            simd_json::to_string(message).expect("a string")
        ),
    )
}

fn json(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
    resp
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

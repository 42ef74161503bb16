//! fal's Platform API (`api.fal.ai/v1`), as its OpenAPI document describes
//! it, and fal's books behind it: every call the mock's models serve, sync
//! or queued, is billed here once, at the price this list gives its
//! endpoint, in the endpoint's unit, as fal bills the operator.
//!
//! - `GET /v1/models/pricing?endpoint_id=a,b` (1 to 50 ids): the prices of
//!   those it knows, [`PAGE`] to a page, with `next_cursor` and `has_more`.
//! - `GET /v1/models`: every endpoint it prices, paginated alike.
//! - `GET /v1/models/billing-events?start&end[&request_id][&limit&cursor]`:
//!   one record per billed call, `end` exclusive, at most 90 days; it needs
//!   an admin key, and answers 403 after [`Books::refuse_events`].
//! - `GET /v1/models/usage?start&end&expand=summary`: totals per endpoint.
//!
//! Errors are the Platform API's `{"error": {"type", "message"}}`, never a
//! model's `detail`. Tests change prices ([`Books::set_price`]) and make a
//! call bill other units than it meters (`"mock_billed_units": N` in its
//! input) to make fal's books and ours disagree on purpose.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use parking_lot::Mutex;
use simd_json::prelude::*;

use super::{json_response, Input, MockBody};
use crate::billing::decimal::format_scaled;
use crate::dates;
use crate::proxy::path::percent_decoded;

/// Entries per page of the listings: small, so that tests page through.
const PAGE: usize = 2;
/// Billing events per page at most, whatever `limit` asks.
const MAX_EVENTS_PAGE: usize = 4;
const NINETY_DAYS_MS: i64 = 90 * 86_400_000;
/// Billing events kept: the latest, a demo month's worth.
const EVENTS_KEPT: usize = 100_000;

/// fal's price for one endpoint.
#[derive(Debug, Clone)]
pub struct Price {
    /// fal's name for the unit: `megapixels`, `images`, `seconds`, ….
    pub unit: String,
    pub nano_usd: u64,
}

/// One call fal billed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingEvent {
    pub request_id: String,
    pub endpoint_id: String,
    pub at_ms: i64,
    pub units_milli: u64,
    pub unit: String,
    pub unit_nano_usd: u64,
    pub cost_nano_usd: u64,
}

pub struct Books {
    prices: Mutex<BTreeMap<String, Price>>,
    events: Mutex<VecDeque<BillingEvent>>,
    next_id: AtomicU64,
    events_refused: AtomicBool,
}

/// fal's published prices for the models the demo and the tests call.
const PRICES: &[(&str, &str, u64)] = &[
    ("fal-ai/flux/dev", "megapixels", 25_000_000),
    ("fal-ai/flux/schnell", "megapixels", 3_000_000),
    ("fal-ai/flux-pro/v1.1", "megapixels", 40_000_000),
    ("fal-ai/fast-sdxl", "megapixels", 3_000_000),
    (
        "fal-ai/stable-diffusion-v35-large",
        "megapixels",
        35_000_000,
    ),
    ("fal-ai/veo3", "seconds", 400_000_000),
    ("fal-ai/veo3/fast", "seconds", 250_000_000),
    ("fal-ai/sora-2/text-to-video/pro", "seconds", 300_000_000),
    (
        "fal-ai/kling-video/v2/master/text-to-video",
        "seconds",
        112_000_000,
    ),
    ("fal-ai/creative-upscaler", "requests", 50_000_000),
    ("fal-ai/any-llm", "compute seconds", 500_000),
];

/// The video's length, in thousandths of a second, when a request gives
/// none: each model's own default, as fal's model pages state it.
fn default_seconds_milli(endpoint: &str) -> u64 {
    if endpoint.starts_with("fal-ai/veo3") {
        8000
    } else if endpoint.starts_with("fal-ai/sora-2") {
        4000
    } else {
        5000
    }
}

/// What fal bills an endpoint it lists no price for: a tenth of a cent a call.
const UNLISTED: (&str, u64) = ("requests", 1_000_000);

impl Default for Books {
    fn default() -> Self {
        let prices = PRICES
            .iter()
            .map(|(e, unit, nano_usd)| {
                let price = Price {
                    unit: (*unit).to_owned(),
                    nano_usd: *nano_usd,
                };
                ((*e).to_owned(), price)
            })
            .collect();
        Self {
            prices: Mutex::new(prices),
            events: Mutex::default(),
            next_id: AtomicU64::new(1),
            events_refused: AtomicBool::new(false),
        }
    }
}

impl Books {
    pub fn set_price(&self, endpoint: &str, unit: &str, nano_usd: u64) {
        let price = Price {
            unit: unit.to_owned(),
            nano_usd,
        };
        self.prices.lock().insert(endpoint.to_owned(), price);
    }

    pub fn events(&self) -> Vec<BillingEvent> {
        self.events.lock().iter().cloned().collect()
    }

    /// From now on billing events answer 403, as to a key that is not an admin's.
    pub fn refuse_events(&self) {
        self.events_refused.store(true, Ordering::Relaxed);
    }

    /// A new id for a request fal's app received.
    pub fn request_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!(
            "{n:08x}-fa1b-4000-8000-{:012x}",
            n.wrapping_mul(0x9e37_79b9)
        )
    }

    /// Bills a call fal served: once, at the endpoint's price. Returns the
    /// units billed, in thousandths, for the `x-fal-billable-units` header.
    pub fn bill(&self, request_id: &str, endpoint: &str, input: &Input) -> u64 {
        let endpoint = endpoint.trim_start_matches('/');
        let (unit, unit_nano_usd) = match self.prices.lock().get(endpoint) {
            Some(p) => (p.unit.clone(), p.nano_usd),
            None => (UNLISTED.0.to_owned(), UNLISTED.1),
        };
        let units_milli = input
            .billed_units_milli
            .unwrap_or_else(|| metered(&unit, endpoint, input));
        let cost = u128::from(unit_nano_usd) * u128::from(units_milli) / 1000;
        let mut events = self.events.lock();
        // The demo and the benches run for long: the latest are kept.
        if events.len() == EVENTS_KEPT {
            events.pop_front();
        }
        events.push_back(BillingEvent {
            request_id: request_id.to_owned(),
            endpoint_id: endpoint.to_owned(),
            at_ms: crate::store::now_ms(),
            units_milli,
            unit,
            unit_nano_usd,
            cost_nano_usd: u64::try_from(cost).unwrap_or(u64::MAX),
        });
        units_milli
    }

    pub fn answer(
        &self,
        method: &Method,
        rest: &[&str],
        query: &str,
        headers: &HeaderMap,
    ) -> Response<MockBody> {
        let keyed = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Key ") && v.len() > 4);
        if !keyed {
            return error(
                StatusCode::UNAUTHORIZED,
                "authorization_error",
                "No key given",
            );
        }
        let q = Query::parse(query);
        match (method, rest) {
            (&Method::GET, ["v1", "models", "pricing"]) => self.pricing(&q),
            (&Method::GET, ["v1", "models"]) => self.models(&q),
            (&Method::GET, ["v1", "models", "billing-events"]) => self.billing_events(&q),
            (&Method::GET, ["v1", "models", "usage"]) => self.usage(&q),
            _ => error(StatusCode::NOT_FOUND, "not_found", "No such route"),
        }
    }

    fn pricing(&self, q: &Query) -> Response<MockBody> {
        let ids = q.all("endpoint_id");
        if ids.is_empty() || ids.len() > 50 {
            return error(
                StatusCode::BAD_REQUEST,
                "validation_error",
                "endpoint_id: between 1 and 50 ids",
            );
        }
        let prices = self.prices.lock();
        let found: Vec<String> = ids
            .iter()
            .filter_map(|id| {
                let p = prices.get(id)?;
                Some(format!(
                    r#"{{"endpoint_id":{},"unit_price":{},"unit":{},"currency":"USD"}}"#,
                    quoted(id),
                    format_scaled(u128::from(p.nano_usd), 9),
                    quoted(&p.unit)
                ))
            })
            .collect();
        page("prices", &found, q, PAGE)
    }

    fn models(&self, q: &Query) -> Response<MockBody> {
        let all: Vec<String> = self
            .prices
            .lock()
            .keys()
            .map(|e| {
                format!(
                    r#"{{"endpoint_id":{},"metadata":{{"display_name":{},"status":"active"}}}}"#,
                    quoted(e),
                    quoted(e)
                )
            })
            .collect();
        page("models", &all, q, PAGE)
    }

    fn billing_events(&self, q: &Query) -> Response<MockBody> {
        if self.events_refused.load(Ordering::Relaxed) {
            return error(
                StatusCode::FORBIDDEN,
                "authorization_error",
                "Billing events need an admin key",
            );
        }
        let (start, end) = match range(q) {
            Ok(r) => r,
            Err(why) => return error(StatusCode::BAD_REQUEST, "validation_error", &why),
        };
        let ids = q.all("request_id");
        let rows: Vec<String> = self
            .events
            .lock()
            .iter()
            .filter(|e| (start..end).contains(&e.at_ms))
            .filter(|e| ids.is_empty() || ids.contains(&e.request_id))
            .map(event_json)
            .collect();
        let size = q
            .one("limit")
            .and_then(|l| l.parse().ok())
            .unwrap_or(MAX_EVENTS_PAGE)
            .clamp(1, MAX_EVENTS_PAGE);
        page("billing_events", &rows, q, size)
    }

    fn usage(&self, q: &Query) -> Response<MockBody> {
        let (start, end) = match range(q) {
            Ok(r) => r,
            Err(why) => return error(StatusCode::BAD_REQUEST, "validation_error", &why),
        };
        let mut totals: BTreeMap<(String, String, u64), (u64, u64)> = BTreeMap::new();
        for e in self.events.lock().iter() {
            if (start..end).contains(&e.at_ms) {
                let key = (e.endpoint_id.clone(), e.unit.clone(), e.unit_nano_usd);
                let t = totals.entry(key).or_default();
                t.0 += e.units_milli;
                t.1 += e.cost_nano_usd;
            }
        }
        let rows: Vec<String> = totals
            .iter()
            .map(|((endpoint, unit, price), (units, cost))| {
                let cost = format_scaled(u128::from(*cost), 9);
                format!(
                    r#"{{"endpoint_id":{},"unit":{},"quantity":{},"unit_price":{},"percent_discount":null,"cost_subtotal":{cost},"cost_discount":0,"cost_total":{cost},"cost":{cost},"currency":"USD"}}"#,
                    quoted(endpoint),
                    quoted(unit),
                    format_scaled(u128::from(*units), 3),
                    format_scaled(u128::from(*price), 9),
                )
            })
            .collect();
        page("summary", &rows, q, PAGE)
    }
}

/// Units a call of this unit bills, as fal's apps count them: whole
/// megapixels per image (rounded up), images, seconds of video asked for
/// (else the model's default), one call otherwise.
fn metered(unit: &str, endpoint: &str, input: &Input) -> u64 {
    let images = input.num_images;
    let (w, h) = input.image_size;
    match unit {
        "megapixels" => images * (w * h).div_ceil(1024 * 1024) * 1000,
        "images" => images * 1000,
        "seconds" => input
            .duration_milli
            .unwrap_or_else(|| default_seconds_milli(endpoint)),
        _ => 1000,
    }
}

fn event_json(e: &BillingEvent) -> String {
    let units = format_scaled(u128::from(e.units_milli), 3);
    let cost = format_scaled(u128::from(e.cost_nano_usd), 9);
    format!(
        r#"{{"request_id":{},"endpoint_id":{},"timestamp":"{}Z","output_units":{units},"quantity":{units},"unit":{},"unit_price":{},"percent_discount":null,"cost_subtotal":{cost},"cost_discount":0,"cost_total":{cost},"cost_estimate_nano_usd":{}}}"#,
        quoted(&e.request_id),
        quoted(&e.endpoint_id),
        dates::format_rfc3339(e.at_ms.div_euclid(1000)),
        quoted(&e.unit),
        format_scaled(u128::from(e.unit_nano_usd), 9),
        e.cost_nano_usd
    )
}

/// `start` (default a day ago) to `end` (default now, exclusive), at most
/// 90 days; else why not, for a 400 `validation_error`.
fn range(q: &Query) -> Result<(i64, i64), String> {
    let now = crate::store::now_ms();
    let at = |name: &str, default: i64| match q.one(name) {
        None => Ok(default),
        Some(text) => dates::parse_instant(text)
            .map(|s| s * 1000)
            .ok_or_else(|| format!("{name}: not a date")),
    };
    let (start, end) = (at("start", now - 86_400_000)?, at("end", now)?);
    if end - start > NINETY_DAYS_MS {
        return Err("The range may not exceed 90 days".into());
    }
    Ok((start, end))
}

/// `size` entries from the cursor on (an offset, opaque to clients).
fn page(field: &str, all: &[String], q: &Query, size: usize) -> Response<MockBody> {
    let from: usize = q.one("cursor").and_then(|c| c.parse().ok()).unwrap_or(0);
    let to = (from + size).min(all.len());
    let rows = all.get(from..to).unwrap_or_default().join(",");
    let more = to < all.len();
    let next = if more {
        format!("\"{to}\"")
    } else {
        "null".into()
    };
    let body = format!(r#"{{"{field}":[{rows}],"next_cursor":{next},"has_more":{more}}}"#);
    json_response(StatusCode::OK, Bytes::from(body))
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response<MockBody> {
    let body = format!(
        r#"{{"error":{{"type":"{kind}","message":{}}}}}"#,
        quoted(message)
    );
    json_response(status, Bytes::from(body))
}

fn quoted(text: &str) -> String {
    let mut out = String::new();
    crate::error::push_json_string(&mut out, text);
    out
}

/// A query string's parameters, decoded; a list is `a,b` or repeated.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: &str) -> Self {
        Self(
            query
                .split('&')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (percent_decoded(k), percent_decoded(v)))
                .collect(),
        )
    }

    fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .flat_map(|(_, v)| v.split(','))
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
            .collect()
    }
}

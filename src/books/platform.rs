//! A client of fal's Platform API (`[upstream] api`, `Authorization: Key`
//! with the operator's key): prices, the model listing, billing events and
//! usage, each read page by page through `next_cursor`. Only the configured
//! host is contacted, every answer has the upstream's deadline, and a page
//! is read up to [`MAX_PAGE_BYTES`].

use std::collections::HashSet;
use std::time::Duration;

use http::StatusCode;
use simd_json::prelude::*;
use simd_json::OwnedValue;

use crate::billing::decimal::to_scaled;
use crate::config::UpstreamConfig;
use crate::dates;
use crate::error::Error;
use crate::proxy::respond::{collect_bounded, Collected};
use crate::upstream::Upstream;

const MAX_PAGE_BYTES: usize = 32 * 1024 * 1024;
/// Ids one call may name (fal's limit).
const IDS_PER_CALL: usize = 50;
/// The longest range one billing-events call may cover (fal's limit).
const MAX_RANGE_SECS: i64 = 90 * 86_400;
/// Events asked for per page.
const EVENTS_PER_PAGE: u32 = 1000;
/// A listing longer than this is taken for a server going round in circles:
/// refused rather than held in memory (a month of a busy gateway's calls
/// is well under it).
const MAX_ROWS: usize = 20_000_000;

/// fal's price for an endpoint, as its pricing API gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FalPrice {
    pub endpoint: String,
    /// fal's unit name, free text (`megapixels`, `image`, `compute seconds`, …).
    pub unit: String,
    pub nano_usd: u64,
    pub currency: String,
}

/// One call fal billed the operator for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FalEvent {
    pub request_id: String,
    pub endpoint: String,
    pub timestamp: String,
    pub units_milli: Option<u64>,
    /// fal's unit for them, where the event names it.
    pub unit: Option<String>,
    pub cost_nano_usd: u64,
}

/// A usage total (where billing events are not available to the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FalUsage {
    pub endpoint: String,
    pub unit: String,
    pub units_milli: u64,
    pub cost_nano_usd: u64,
}

/// Why the Platform API gave no answer we can use.
#[derive(Debug, thiserror::Error)]
pub enum PlatformError {
    /// 401 or 403: the key may not read this (billing events need an admin key).
    #[error("fal refused the key ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("fal's Platform API: {0}")]
    Failed(String),
}

impl From<PlatformError> for Error {
    fn from(e: PlatformError) -> Self {
        Error::Platform(e.to_string())
    }
}

pub struct Platform {
    upstream: Upstream,
}

impl Platform {
    pub fn new(cfg: &UpstreamConfig, fal_key: &str) -> Result<Self, Error> {
        Ok(Self {
            upstream: Upstream::new(cfg, fal_key)?,
        })
    }

    /// fal's prices of `endpoints` (those it knows), 50 ids a call.
    pub async fn prices(&self, endpoints: &[String]) -> Result<Vec<FalPrice>, PlatformError> {
        let mut prices = Vec::new();
        for ids in endpoints.chunks(IDS_PER_CALL) {
            let query = format!("endpoint_id={}", list(ids));
            let found = self
                .pages("/v1/models/pricing", &query, "prices", price)
                .await?;
            prices.extend(found);
        }
        Ok(prices)
    }

    /// Every endpoint fal's model listing gives.
    pub async fn endpoints(&self) -> Result<Vec<String>, PlatformError> {
        self.pages("/v1/models", "limit=100", "models", |m| {
            m.get_str("endpoint_id")
                .map(str::to_owned)
                .ok_or_else(|| malformed("a model without endpoint_id"))
        })
        .await
    }

    /// The calls fal billed from `since` to `until` (unix seconds, `until`
    /// exclusive), in ranges of at most 90 days; only those of
    /// `request_ids` when there are some.
    pub async fn billing_events(
        &self,
        since: i64,
        until: i64,
        request_ids: &[String],
    ) -> Result<Vec<FalEvent>, PlatformError> {
        let mut events = Vec::new();
        let chunks: Vec<&[String]> = match request_ids.is_empty() {
            true => vec![&[]],
            false => request_ids.chunks(IDS_PER_CALL).collect(),
        };
        for ids in chunks {
            let mut from = since;
            while from < until {
                let to = until.min(from + MAX_RANGE_SECS);
                let mut query = format!(
                    "start={}&end={}&limit={EVENTS_PER_PAGE}",
                    instant(from),
                    instant(to)
                );
                if !ids.is_empty() {
                    query.push_str(&format!("&request_id={}", list(ids)));
                }
                let found = self
                    .pages("/v1/models/billing-events", &query, "billing_events", event)
                    .await?;
                events.extend(found);
                from = to;
            }
        }
        Ok(events)
    }

    /// Totals per endpoint from `since` to `until`, from fal's usage API.
    pub async fn usage(&self, since: i64, until: i64) -> Result<Vec<FalUsage>, PlatformError> {
        let query = format!(
            "start={}&end={}&expand=summary&bound_to_timeframe=false",
            instant(since),
            instant(until)
        );
        self.pages("/v1/models/usage", &query, "summary", |row| {
            Ok(FalUsage {
                endpoint: row
                    .get_str("endpoint_id")
                    .ok_or_else(|| malformed("a usage row without endpoint_id"))?
                    .to_owned(),
                unit: row.get_str("unit").unwrap_or_default().to_owned(),
                units_milli: row.get("quantity").and_then(milli).unwrap_or(0),
                cost_nano_usd: row
                    .get("cost_total")
                    .or_else(|| row.get("cost"))
                    .and_then(nano)
                    .ok_or_else(|| malformed("a usage row without its cost"))?,
            })
        })
        .await
    }

    /// Every page of a listing, each row read by `read` as its page
    /// arrives, following `next_cursor`. A listing that says it has more
    /// but gives no rows, no cursor, or a cursor it gave before is refused:
    /// what it gave is not all there is.
    async fn pages<T>(
        &self,
        path: &str,
        query: &str,
        field: &str,
        read: impl Fn(&OwnedValue) -> Result<T, PlatformError>,
    ) -> Result<Vec<T>, PlatformError> {
        let mut rows = Vec::new();
        let mut cursor: Option<String> = None;
        let mut seen = HashSet::new();
        loop {
            let target = match &cursor {
                Some(c) => format!("{path}?{query}&cursor={}", encode(c)),
                None => format!("{path}?{query}"),
            };
            let page = self.get(&target).await?;
            let Some(found) = page.get_array(field) else {
                return Err(malformed(&format!("an answer without {field:?}")));
            };
            for row in found.iter() {
                rows.push(read(row)?);
            }
            if rows.len() > MAX_ROWS {
                return Err(malformed(&format!("more than {MAX_ROWS} rows")));
            }
            let next = page.get_str("next_cursor").map(str::to_owned);
            if !page.get_bool("has_more").unwrap_or(next.is_some()) {
                return Ok(rows);
            }
            match next {
                _ if found.is_empty() => {
                    return Err(malformed("an empty page that says there is more"))
                }
                None => return Err(malformed("more pages but no cursor to them")),
                Some(next) if !seen.insert(next.clone()) => {
                    return Err(malformed("a cursor it gave before"))
                }
                Some(next) => cursor = Some(next),
            }
        }
    }

    /// One page, read whole within the upstream's deadline (not only its
    /// headers: a page trickling in must not hold a report for ever).
    async fn get(&self, path_and_query: &str) -> Result<OwnedValue, PlatformError> {
        let deadline = self.upstream.timeout();
        tokio::time::timeout(deadline, self.get_within(path_and_query))
            .await
            .map_err(|_| PlatformError::Failed(format!("no whole answer within {deadline:?}")))?
    }

    async fn get_within(&self, path_and_query: &str) -> Result<OwnedValue, PlatformError> {
        let uri = self
            .upstream
            .api
            .uri(path_and_query)
            .map_err(|_| PlatformError::Failed(format!("bad path {path_and_query:?}")))?;
        let resp = self
            .upstream
            .get(uri)
            .await
            .map_err(|e| PlatformError::Failed(format!("{e:?}")))?;
        let status = resp.status();
        let idle: Duration = self.upstream.timeout();
        let bytes = match collect_bounded(resp.into_body(), MAX_PAGE_BYTES, idle).await {
            Ok(Collected::Whole(bytes)) => bytes,
            Ok(Collected::Overflow(..)) => return Err(malformed("a page too large")),
            Err(e) => return Err(PlatformError::Failed(format!("the answer broke off: {e}"))),
        };
        let mut copy = bytes.to_vec();
        let value = simd_json::to_owned_value(&mut copy);
        if !status.is_success() {
            let message = value
                .ok()
                .and_then(|v| {
                    let e = v.get("error")?;
                    Some(format!(
                        "{}: {}",
                        e.get_str("type").unwrap_or("error"),
                        e.get_str("message").unwrap_or("")
                    ))
                })
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes[..bytes.len().min(200)]).into());
            return Err(match status {
                StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => PlatformError::Refused {
                    status: status.as_u16(),
                    message,
                },
                _ => PlatformError::Failed(format!("{status} on {path_and_query}: {message}")),
            });
        }
        value.map_err(|_| malformed("an answer that is not JSON"))
    }
}

fn price(row: &OwnedValue) -> Result<FalPrice, PlatformError> {
    let text = |name| row.get_str(name).map(str::to_owned);
    let (Some(endpoint), Some(unit)) = (text("endpoint_id"), text("unit")) else {
        return Err(malformed("a price without endpoint_id or unit"));
    };
    let nano_usd = row
        .get("unit_price")
        .and_then(nano)
        .ok_or_else(|| malformed("a price that is not a non-negative number"))?;
    Ok(FalPrice {
        endpoint,
        unit,
        nano_usd,
        currency: text("currency").unwrap_or_else(|| "USD".into()),
    })
}

fn event(row: &OwnedValue) -> Result<FalEvent, PlatformError> {
    let text = |name| row.get_str(name).map(str::to_owned);
    let (Some(request_id), Some(endpoint)) = (text("request_id"), text("endpoint_id")) else {
        return Err(malformed(
            "a billing event without request_id or endpoint_id",
        ));
    };
    // fal's nano-dollar figure is exact; the dollar ones are floats.
    let cost_nano_usd = row
        .get_u64("cost_estimate_nano_usd")
        .or_else(|| row.get("cost_total").and_then(nano))
        .ok_or_else(|| malformed("a billing event without its cost"))?;
    Ok(FalEvent {
        request_id,
        endpoint,
        timestamp: text("timestamp").unwrap_or_default(),
        units_milli: row
            .get("quantity")
            .and_then(milli)
            .or_else(|| row.get("output_units").and_then(milli)),
        unit: text("unit"),
        cost_nano_usd,
    })
}

fn malformed(what: &str) -> PlatformError {
    PlatformError::Failed(format!("fal's answer has {what}"))
}

/// A non-negative number of dollars (or units) as integer billionths
/// (thousandths): exactly as written where it has that few places.
fn scaled(v: &OwnedValue, scale: u32) -> Option<u64> {
    let x = v.cast_f64().filter(|x| x.is_finite() && *x >= 0.0)?;
    to_scaled(x, scale)
        .ok()
        .or_else(|| Some((x * 10f64.powi(scale as i32)).round() as u64))
}

fn nano(v: &OwnedValue) -> Option<u64> {
    scaled(v, 9)
}

fn milli(v: &OwnedValue) -> Option<u64> {
    scaled(v, 3)
}

fn instant(unix: i64) -> String {
    format!("{}Z", dates::format_rfc3339(unix))
}

/// Ids as one comma-separated query value.
fn list(ids: &[String]) -> String {
    ids.iter()
        .map(|id| encode(id))
        .collect::<Vec<_>>()
        .join(",")
}

/// Percent-encodes all but RFC 3986's unreserved characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

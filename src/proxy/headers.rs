//! Which headers cross the proxy. Hop-by-hop headers belong to one connection
//! and never cross; the client's credentials never reach fal.

use http::header::{self, HeaderMap, HeaderName};

/// Our own response headers. As constants they are not parsed and
/// validated again on every insert, as a `&str` name would be.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
pub const X_BILLING_CREDITS_USED: HeaderName = HeaderName::from_static("x-billing-credits-used");
pub const X_BILLING_BALANCE_REMAINING: HeaderName =
    HeaderName::from_static("x-billing-balance-remaining");
pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// RFC 9110 §7.6.1 connection-specific fields, plus the legacy ones proxies still see.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including any that `Connection` names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass over a few names instead of nine
    // hashed removals, on each request and each answer.
    let hop = |name: &HeaderName| HOP_BY_HOP.contains(name) || name == header::UPGRADE;
    if !headers.keys().any(hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares the client's headers for fal: no hop-by-hop, no client
/// credentials, no client Host (the client sets fal's from the URI).
pub fn to_upstream(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(X_API_KEY);
}

/// `application/json` or any `+json` type, with or without parameters.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            // Compared in place: a lowercased copy was an allocation on every request and answer.
            let essence = v.split(';').next().unwrap_or("").trim().as_bytes();
            let ends_with = |suffix: &[u8]| {
                essence.len() >= suffix.len()
                    && essence[essence.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
            };
            essence.eq_ignore_ascii_case(b"application/json") || ends_with(b"+json")
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_credentials_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-api-key", HeaderValue::from_static("sk-fal-x"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Key sk-fal-x"),
        );
        h.insert(header::HOST, HeaderValue::from_static("us"));
        h.insert("x-fal-thing", HeaderValue::from_static("kept"));
        to_upstream(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-fal-thing"], "kept");
    }

    #[test]
    fn a_lone_hop_by_hop_header_is_still_found() {
        for name in [
            header::UPGRADE,
            header::TE,
            HeaderName::from_static("keep-alive"),
        ] {
            let mut h = HeaderMap::new();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            h.insert(name.clone(), HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert_eq!(h.len(), 1, "{name}");
            assert!(h.contains_key(header::CONTENT_TYPE));
        }
    }

    #[test]
    fn recognises_json_content_types() {
        let mut h = HeaderMap::new();
        for (ct, json) in [
            ("application/json", true),
            ("Application/JSON; charset=utf-8", true),
            ("application/problem+json", true),
            ("text/plain", false),
            ("multipart/form-data; boundary=x", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_json(&h), json, "{ct}");
        }
    }
}

//! The one request body we read: JSON, bounded, validated, and then
//! forwarded as the exact bytes the client sent.

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::billing::facts::RequestFacts;
use crate::billing::json;
use crate::error::ApiError;

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

/// Reads at most `limit` bytes (413 beyond, before reading if the length is
/// declared), checks they parse as JSON (400 if not), and reads what they
/// say about cost. An empty body is passed on as it is: there is nothing to
/// validate and fal decides.
pub async fn read(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
) -> Result<(Bytes, RequestFacts), ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    let bytes = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ApiError::BodyTooLarge { limit }
            } else {
                ApiError::ClientBody
            }
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Ok((bytes, RequestFacts::default()));
    }
    let facts = parse(&bytes)?;
    Ok((bytes, facts))
}

/// Validates and reads a copy: the client's bytes go to fal as they came.
pub fn parse(bytes: &[u8]) -> Result<RequestFacts, ApiError> {
    json::read(bytes, RequestFacts::read).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

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

    #[test]
    fn validates_and_reads_facts() {
        let good = br#"{"prompt": "a cat", "n": [1, 2.5, null], "num_images": 2}"#;
        assert_eq!(parse(good).unwrap().num_images, Some(2));
        assert!(parse(br#"{"prompt": "a cat""#).is_err());
        assert!(parse(b"{'single': 1}").is_err());
    }
}

//! The body of a billable request: read whatever its content type (fal
//! parses any body as JSON, so a header the client chooses must not decide
//! whether the hold sees `num_images`), bounded, parsed, read for cost, and
//! then forwarded as the exact bytes the client sent.

use bytes::Bytes;
use http::{header, HeaderMap};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;

use crate::billing::facts::RequestFacts;
use crate::billing::json;
use crate::error::ApiError;

/// Reads at most `limit` bytes (413 beyond, before reading if the length is
/// declared), checks they parse as JSON (400 if not), and reads what they
/// say about cost (400 for a cost field that cannot be read). An empty body
/// is passed on as it is: fal runs the model's defaults.
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
    json::read(bytes, RequestFacts::read).map_err(|e| ApiError::MalformedJson(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_and_reads_facts() {
        let good = br#"{"prompt": "a cat", "n": [1, 2.5, null], "num_images": 2}"#;
        assert_eq!(parse(good).unwrap().num_images, Some(2));
        assert!(parse(br#"{"prompt": "a cat""#).is_err());
        assert!(parse(b"{'single': 1}").is_err());
        assert!(matches!(
            parse(br#"{"num_images": 1e300}"#),
            Err(ApiError::InvalidInput(_))
        ));
    }
}

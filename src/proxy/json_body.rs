//! The body of a billable request: read whatever its content type (fal
//! parses any body as JSON, so a header the client chooses must not decide
//! whether the hold sees `num_images`), bounded, parsed, read for cost, and
//! then forwarded as the exact bytes the client sent.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::pace::{BodyPace, Progress};
use crate::billing::facts::RequestFacts;
use crate::billing::json;
use crate::error::ApiError;
use crate::keys::Account;

/// How much of a body may be read, and how slowly.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Per body: 413 beyond.
    pub max_bytes: usize,
    /// Per account, all its bodies in memory together: 429 beyond.
    pub account_bytes: usize,
    pub pace: BodyPace,
}

/// One body's bytes, counted against its account's buffer allowance until
/// dropped (once fal has them).
pub struct Buffered {
    account: Arc<Account>,
    bytes: usize,
    cap: usize,
}

impl Buffered {
    pub fn new(account: &Arc<Account>, cap: usize) -> Self {
        Self {
            account: Arc::clone(account),
            bytes: 0,
            cap,
        }
    }

    fn grow_to(&mut self, total: usize) -> Result<(), ApiError> {
        let more = total.saturating_sub(self.bytes);
        if more > 0 {
            if !self.account.try_buffer(more, self.cap) {
                return Err(ApiError::BodyBufferFull { limit: self.cap });
            }
            self.bytes = total;
        }
        Ok(())
    }
}

impl Drop for Buffered {
    fn drop(&mut self) {
        self.account.unbuffer(self.bytes);
    }
}

/// Reads at most `limits.max_bytes` (413 beyond, before reading if the
/// length is declared), within the account's allowance (429 beyond, also
/// before reading for a declared length) and at the minimum pace (408
/// below it); checks the bytes parse as JSON (400 if not), and reads what
/// they say about cost (400 for a cost field that cannot be read). An
/// empty body is passed on as it is: fal runs the model's defaults.
pub async fn read(
    mut body: Incoming,
    headers: &HeaderMap,
    limits: BodyLimits,
    buffered: &mut Buffered,
) -> Result<(Bytes, RequestFacts), ApiError> {
    let too_large = ApiError::BodyTooLarge {
        limit: limits.max_bytes,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let declared = match declared.map(usize::try_from) {
        Some(Ok(n)) if n <= limits.max_bytes => n,
        Some(_) => return Err(too_large),
        None => 0,
    };
    buffered.grow_to(declared)?;
    // Sized once for a declared length; pages that never receive a byte
    // (a length that lied) are never touched, so cost no memory.
    let mut buf = BytesMut::with_capacity(declared);
    let mut progress = Progress::start(limits.pace);
    loop {
        let frame = match tokio::time::timeout_at(progress.deadline(), body.frame()).await {
            Err(_) => return Err(ApiError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(Err(_))) => return Err(ApiError::ClientBody),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = buf.len() + data.len();
        if total > limits.max_bytes {
            return Err(too_large);
        }
        buffered.grow_to(total)?;
        progress.received(data.len());
        buf.extend_from_slice(&data);
    }
    let bytes = buf.freeze();
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

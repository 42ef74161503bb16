//! Bodies of our own small APIs (the admin API, the account API, Stripe's
//! events): read whole, within a size bound and a deadline, and told apart
//! as too large, broken off or too slow.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

pub async fn read(body: Incoming, max: usize, within: Duration) -> Result<Bytes, ApiError> {
    let read = Limited::new(body, max).collect();
    Ok(tokio::time::timeout(within, read)
        .await
        .map_err(|_| ApiError::BodyTimeout)?
        .map_err(|e| {
            if e.is::<LengthLimitError>() {
                ApiError::BodyTooLarge { limit: max }
            } else {
                ApiError::ClientBody
            }
        })?
        .to_bytes())
}

pub async fn read_json<T: DeserializeOwned>(
    body: Incoming,
    max: usize,
    within: Duration,
) -> Result<T, ApiError> {
    let mut bytes = read(body, max, within).await?.to_vec();
    simd_json::from_slice(&mut bytes).map_err(|e| ApiError::MalformedJson(e.to_string()))
}

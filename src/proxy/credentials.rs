//! Where a client's key is read from: `x-api-key`, or `authorization: Key …`
//! as fal's own SDKs send it.

use http::{header, HeaderMap};

use crate::error::ApiError;

pub fn presented_key(headers: &HeaderMap) -> Result<&str, ApiError> {
    if let Some(v) = headers.get(super::headers::X_API_KEY) {
        return v
            .to_str()
            .map(str::trim)
            .map_err(|_| ApiError::MalformedKey);
    }
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Err(ApiError::MissingKey);
    };
    let v = v.to_str().map_err(|_| ApiError::MalformedKey)?.trim();
    match v.split_once(' ') {
        Some((scheme, key)) if scheme.eq_ignore_ascii_case("key") => Ok(key.trim()),
        _ => Err(ApiError::MalformedKey),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn with(name: &'static str, value: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(value));
        h
    }

    #[test]
    fn reads_either_header() {
        assert_eq!(
            presented_key(&with("x-api-key", "sk-fal-a")).unwrap(),
            "sk-fal-a"
        );
        assert_eq!(
            presented_key(&with("authorization", "Key sk-fal-b")).unwrap(),
            "sk-fal-b"
        );
        assert_eq!(
            presented_key(&with("authorization", "key  sk-fal-c ")).unwrap(),
            "sk-fal-c"
        );
        assert!(matches!(
            presented_key(&HeaderMap::new()),
            Err(ApiError::MissingKey)
        ));
        assert!(matches!(
            presented_key(&with("authorization", "Bearer sk-fal-d")),
            Err(ApiError::MalformedKey)
        ));
    }
}

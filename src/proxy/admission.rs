//! Which requests may reach fal at all, whatever their path: only the
//! methods fal's APIs use, and no protocol upgrades. A `CONNECT`, a `TRACE`
//! or a WebSocket handshake forwarded under a catch-all price rule would be
//! billed as a model call and reach fal as something it never serves.

use http::{header, HeaderMap, Method};

use crate::error::ApiError;

/// What fal's run, queue and storage hosts answer; everything else is refused.
const FORWARDED: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::PATCH,
    Method::DELETE,
    Method::OPTIONS,
];

/// Refuses methods fal does not use and upgrade requests, before any key is read.
pub(super) fn check(method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
    if !FORWARDED.contains(method) {
        return Err(ApiError::MethodNotAllowed);
    }
    if upgrades(headers) {
        return Err(ApiError::UpgradeRefused);
    }
    Ok(())
}

/// An HTTP/1.1 upgrade to anything but h2c. (curl's `--http2` on a plain
/// URL offers h2c with every request; it gets its answer over HTTP/1.1, as
/// RFC 9113 allows, and is not refused for asking.)
fn upgrades(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("?").split(','))
        .any(|protocol| !protocol.trim().eq_ignore_ascii_case("h2c"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_upgrade(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, value.parse().unwrap());
        h
    }

    #[test]
    fn only_fal_methods_without_upgrades_pass() {
        let none = HeaderMap::new();
        assert!(check(&Method::POST, &none).is_ok());
        assert!(check(&Method::GET, &with_upgrade("h2c")).is_ok());
        for method in [Method::CONNECT, Method::TRACE, "PROPFIND".parse().unwrap()] {
            assert!(matches!(
                check(&method, &none),
                Err(ApiError::MethodNotAllowed)
            ));
        }
        for upgrade in ["websocket", "h2c, websocket", "WebSocket"] {
            assert!(matches!(
                check(&Method::GET, &with_upgrade(upgrade)),
                Err(ApiError::UpgradeRefused)
            ));
        }
    }
}

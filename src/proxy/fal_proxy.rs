//! fal's server-proxy protocol, at the route fal's own proxy uses
//! (`/api/fal/proxy`): the JavaScript SDK with `proxyUrl` sends every call
//! here, the real target in `x-fal-target-url`. Only fal's hosts are
//! accepted, each mapped to our configured upstream and to the same handling
//! as a direct call: `fal.run` to a billed sync run, `queue.fal.run` to the
//! queue routes, and fal's storage upload calls to `[upstream] storage`.

use http::{HeaderMap, Request, Response, Uri};
use hyper::body::Incoming;

use super::body::Body;
use super::path::Canonical;
use super::{headers, queue, Conn, Proxy, Trace};
use crate::error::ApiError;
use crate::keys::ApiKey;

pub(super) const ROUTE: &str = "/api/fal/proxy";
const TARGET_HEADER: &str = "x-fal-target-url";
/// The storage calls the SDK makes through the proxy; everything else on
/// fal's REST host (tokens, account data) is refused.
pub(crate) const STORAGE_PATHS: [&str; 3] = [
    "/storage/upload/initiate",
    "/storage/upload/initiate-multipart",
    "/storage/upload/complete-multipart",
];

/// Where a proxied call goes: a path of ours, or the storage upstream's path and query.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Target {
    Run(Canonical),
    /// Prefixed with `/queue`, as our own queue routes are.
    Queue(Canonical),
    Storage(String),
}

/// Reads `x-fal-target-url`; anything but fal's hosts over https is refused
/// here, before any connection is made, and so is a path that is not canonical.
pub(crate) fn target(headers: &HeaderMap) -> Result<Target, ApiError> {
    let raw = headers
        .get(TARGET_HEADER)
        .and_then(|v| v.to_str().ok())
        .ok_or(ApiError::InvalidTarget)?;
    let uri: Uri = raw.parse().map_err(|_| ApiError::InvalidTarget)?;
    let authority = uri.authority().ok_or(ApiError::InvalidTarget)?;
    // The host alone or with `:443`: `port_u16` reads a port that is no
    // number (`fal.run:44l-ai`) as none, and `host` ignores user info.
    let written = authority.as_str();
    let plain_host = written == authority.host() || written == format!("{}:443", authority.host());
    if uri.scheme_str() != Some("https") || !plain_host {
        return Err(ApiError::InvalidTarget);
    }
    match authority.host() {
        "fal.run" => Ok(Target::Run(Canonical::of(&uri)?)),
        "queue.fal.run" => Ok(Target::Queue(Canonical::new(
            &format!("/queue{}", uri.path()),
            uri.query(),
        )?)),
        // Only exact paths pass here: nothing to decode.
        "rest.fal.ai" if STORAGE_PATHS.contains(&uri.path()) => Ok(Target::Storage(
            uri.path_and_query()
                .map_or("/", |pq| pq.as_str())
                .to_owned(),
        )),
        _ => Err(ApiError::InvalidTarget),
    }
}

impl Proxy {
    pub(super) async fn fal_proxy(
        &self,
        mut req: Request<Incoming>,
        conn: Conn,
        key: &ApiKey,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        let target = target(req.headers())?;
        req.headers_mut().remove(TARGET_HEADER);
        match target {
            Target::Run(path) => self.forward_sync(req, &path, key, request_id, trace).await,
            Target::Queue(path) => {
                let route = queue::Route::parse(&path).ok_or(ApiError::InvalidTarget)?;
                self.queue(req, route, conn, key, request_id, trace).await
            }
            Target::Storage(pq) => self.forward_storage(req, &pq, key, trace).await,
        }
    }

    /// An upload the SDK prepares before a call: forwarded with the
    /// operator's key, not billed, counted against the poll allowance.
    async fn forward_storage(
        &self,
        req: Request<Incoming>,
        pq: &str,
        key: &ApiKey,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        self.check_poll(key, trace)?;
        let uri = self.upstream.storage.uri(pq)?;
        let (parts, incoming) = req.into_parts();
        let resp = self.send(parts, Body::Stream(incoming), uri, trace).await?;
        let (mut parts, incoming) = resp.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::Answer(incoming)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn of(url: &'static str) -> Result<Target, ()> {
        let mut h = HeaderMap::new();
        h.insert(TARGET_HEADER, HeaderValue::from_static(url));
        target(&h).map_err(|_| ())
    }

    #[test]
    fn maps_fals_hosts_and_refuses_the_rest() {
        let path = |p, q| Canonical::new(p, q).unwrap();
        assert_eq!(
            of("https://fal.run/fal-ai/flux/d%65v"),
            Ok(Target::Run(path("/fal-ai/flux/dev", None)))
        );
        assert_eq!(
            of("https://queue.fal.run/fal-ai/flux/requests/x/status?logs=0"),
            Ok(Target::Queue(path(
                "/queue/fal-ai/flux/requests/x/status",
                Some("logs=0")
            )))
        );
        assert_eq!(
            of("https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"),
            Ok(Target::Storage(
                "/storage/upload/initiate?storage_type=fal-cdn-v3".into()
            ))
        );
        for bad in [
            "https://evil.example/fal-ai/flux/dev",
            "https://fal.run.evil.example/x",
            "http://fal.run/fal-ai/flux/dev",
            "https://fal.run:8443/x",
            "https://user@fal.run/x",
            // A port that is no number (found by fuzz/target_url).
            "https://fal.run:44l-ai/flux/d:/ev",
            "https://fal.run:/x",
            "https://rest.fal.ai/tokens/",
            "https://127.0.0.1/x",
            "https://fal.run/fal-ai/flux/dev/",
            "https://fal.run/fal-ai/x/..%2Fdev",
            "https://queue.fal.run/fal-ai//flux",
            "/fal-ai/flux/dev",
            "not a url",
        ] {
            assert!(of(bad).is_err(), "{bad}");
        }
        assert!(target(&HeaderMap::new()).is_err());
    }
}

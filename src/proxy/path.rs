//! The request target a client may send. Only origin-form paths are
//! forwarded; dot segments are refused so that no path can climb out of a
//! configured upstream prefix.

use http::Uri;

use crate::error::ApiError;

/// The path and query to forward: absolute-form targets lose their scheme and
/// host here (only our configured upstream decides those).
pub fn forwardable(uri: &Uri) -> Result<&str, ApiError> {
    let pq = uri.path_and_query().map_or("/", |pq| pq.as_str());
    if !pq.starts_with('/') {
        return Err(ApiError::InvalidPath);
    }
    if uri.path().split('/').any(is_dot_segment) {
        return Err(ApiError::InvalidPath);
    }
    Ok(pq)
}

/// `.` or `..`, also percent-encoded (`%2e`, `.%2E`, …), which some servers decode.
fn is_dot_segment(segment: &str) -> bool {
    let lowered = segment.to_ascii_lowercase();
    let decoded = lowered.replace("%2e", ".");
    decoded == "." || decoded == ".."
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: &str) -> Result<String, ()> {
        let uri: Uri = target.parse().unwrap();
        forwardable(&uri).map(str::to_owned).map_err(|_| ())
    }

    #[test]
    fn keeps_paths_and_queries_as_sent() {
        assert_eq!(
            check("/fal-ai/flux/dev?a=1&b=%2F").unwrap(),
            "/fal-ai/flux/dev?a=1&b=%2F"
        );
        assert_eq!(check("/a%2Fb/..c/c..").unwrap(), "/a%2Fb/..c/c..");
        assert_eq!(check("http://evil.example/x?q").unwrap(), "/x?q");
    }

    #[test]
    fn refuses_dot_segments_in_any_spelling() {
        for bad in ["/a/../b", "/..", "/a/./b", "/a/%2e%2E/b", "/.%2e/x", "/%2E"] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }
}

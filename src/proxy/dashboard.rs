//! The user dashboard: one static page, its script and styles inline,
//! nothing fetched from elsewhere. The page holds a key, so its
//! Content-Security-Policy allows exactly the script and the stylesheet it
//! was shipped with, by hash: an injected `<script>` or `on…=` attribute
//! does not run.

use http::{header, HeaderValue, Response};

use super::body::Body;

const PAGE: &str = include_str!("../dashboard/index.html");

/// `sha256-` of the page's one `<script>` and one `<style>`; the unit test
/// below fails when the page changes and these do not.
const CSP: &str = "default-src 'none'; \
    script-src 'sha256-f25FiX7fJvq2LOLmLheXs4lCxWY711TcGwY5s1yqPZE='; \
    style-src 'sha256-KJZV/vOOVOoOSGZRY7klPt/n42QBmnJ3H8HydKa9A08='; \
    connect-src 'self'; img-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

pub(super) fn page() -> Response<Body> {
    html(PAGE, CSP)
}

/// A page of ours: HTML under `csp` (no framing, no other origins), never cached.
pub(super) fn html(page: impl Into<bytes::Bytes>, csp: &'static str) -> Response<Body> {
    let mut resp = Response::new(Body::full(page));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    /// The text of every `<tag>` element of the page.
    fn inline(tag: &str) -> Vec<&str> {
        let (open, close) = (format!("<{tag}>"), format!("</{tag}>"));
        PAGE.split(open.as_str())
            .skip(1)
            .map(|rest| rest.split(close.as_str()).next().unwrap())
            .collect()
    }

    fn base64(bytes: &[u8]) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in bytes.chunks(3) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0u32, |n, (i, &b)| n | (b as u32) << (16 - 8 * i));
            for i in 0..4 {
                out.push(match i <= chunk.len() {
                    true => ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char,
                    false => '=',
                });
            }
        }
        out
    }

    #[test]
    fn base64_is_standard_with_padding() {
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
    }

    #[test]
    fn the_policy_names_the_page_s_own_script_and_style() {
        for (tag, directive) in [("script", "script-src"), ("style", "style-src")] {
            let hashes: Vec<String> = inline(tag)
                .iter()
                .map(|text| format!("'sha256-{}'", base64(&Sha256::digest(text))))
                .collect();
            assert!(!hashes.is_empty(), "no <{tag}> in the page");
            let want = format!("{directive} {};", hashes.join(" "));
            assert!(CSP.contains(&want), "the policy needs `{want}`");
        }
        assert!(!CSP.contains("unsafe-inline"));
    }
}

//! The one spelling of a request path that is both priced and forwarded.
//! fal, like any web server, decodes percent-escapes before routing, so
//! `/x/%70ro` runs the model `/x/pro`: a path priced as sent but run as
//! decoded could buy a dear model at a cheap rule's price. Escapes of
//! unreserved characters are decoded here, and every spelling that a server
//! might route elsewhere than it reads (an encoded `/` or `\`, a backslash,
//! an empty or dot segment) is refused before anything is held.

use http::Uri;

use crate::error::ApiError;

/// A path in canonical form, with the query as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Canonical {
    path: String,
    query: Option<String>,
}

impl Canonical {
    /// The request's own target. Absolute-form targets lose their scheme and
    /// host here: only our configured upstream decides those.
    pub fn of(uri: &Uri) -> Result<Self, ApiError> {
        Self::new(uri.path(), uri.query())
    }

    pub fn new(path: &str, query: Option<&str>) -> Result<Self, ApiError> {
        let path = decode_unreserved(path)?;
        let mut segments = path
            .strip_prefix('/')
            .ok_or(ApiError::InvalidPath)?
            .split('/');
        if segments.any(|s| s.is_empty() || s == "." || s == "..") {
            return Err(ApiError::InvalidPath);
        }
        Ok(Self {
            path,
            query: query.map(str::to_owned),
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }

    /// What goes to fal: the path without our own route `prefix` (`/queue`), and the query.
    pub fn forwarded(&self, prefix: &str) -> String {
        let path = self.path.strip_prefix(prefix).unwrap_or(&self.path);
        match &self.query {
            Some(q) => format!("{path}?{q}"),
            None => path.to_owned(),
        }
    }
}

/// `%XX` of an unreserved character (ALPHA DIGIT `-` `.` `_` `~`) becomes
/// the character; other escapes stay as sent. A backslash, raw or encoded,
/// and an encoded `/` are refused: servers disagree on whether they separate
/// segments. So is a decoded hex digit that would make a new escape with a
/// `%` before it (`%%370ro` would become `%70ro`, which fal reads as
/// `pro`): the result must read the same once fal decodes it.
fn decode_unreserved(path: &str) -> Result<String, ApiError> {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], escaped_byte(&bytes[i..])) {
            (b'\\', _) | (_, Some(b'/' | b'\\')) => return Err(ApiError::InvalidPath),
            (_, Some(c)) if c.is_ascii_alphanumeric() || b"-._~".contains(&c) => {
                // After `%`, or `%` and a hex digit: a new escape, or half of one.
                let after_percent = match out.as_slice() {
                    [.., b'%'] => true,
                    [.., b'%', d] => d.is_ascii_hexdigit(),
                    _ => false,
                };
                if c.is_ascii_hexdigit() && after_percent {
                    return Err(ApiError::InvalidPath);
                }
                out.push(c);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    // Only ASCII escapes were replaced, by ASCII: the rest is the client's UTF-8 as it came.
    String::from_utf8(out).map_err(|_| ApiError::InvalidPath)
}

/// Text with every `%XX` escape decoded, as fal's server reads a path or a
/// query parameter's name (`/x/%70ro` is `/x/pro`).
pub(crate) fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match escaped_byte(&bytes[i..]) {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The byte a `%XX` escape at the start of `bytes` stands for: two hex
/// digits exactly (`u8::from_str_radix` would also take `%+1`).
pub(crate) fn escaped_byte(bytes: &[u8]) -> Option<u8> {
    let hex = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
    match bytes {
        [b'%', high, low, ..] => Some(hex(*high)? << 4 | hex(*low)?),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(target: &str) -> Result<String, ()> {
        let uri: Uri = target.parse().unwrap();
        Canonical::of(&uri).map(|c| c.forwarded("")).map_err(|_| ())
    }

    #[test]
    fn decodes_unreserved_escapes_and_keeps_the_rest() {
        for (sent, canonical) in [
            ("/fal-ai/flux/dev?a=1&b=%2F", "/fal-ai/flux/dev?a=1&b=%2F"),
            ("/fal-ai/x/%70ro", "/fal-ai/x/pro"),
            ("/%66al-ai/x/%2D%2e%5F%7e%41", "/fal-ai/x/-._~A"),
            ("/a%20b/%25/%C3%A9/c..", "/a%20b/%25/%C3%A9/c.."),
            ("/a/%zz/%4", "/a/%zz/%4"),
            ("/a/%+1/%-2", "/a/%+1/%-2"),
            ("/a/%25%34%31/%%2547/%%x%41", "/a/%2541/%%2547/%%xA"),
            ("/é/x?q=%70", "/é/x?q=%70"),
            ("http://evil.example/x?q", "/x?q"),
        ] {
            assert_eq!(check(sent).as_deref(), Ok(canonical), "{sent}");
        }
    }

    #[test]
    fn refuses_spellings_a_server_could_route_elsewhere() {
        for bad in [
            "/a/../b",
            "/..",
            "/a/./b",
            "/a/%2e%2E/b",
            "/.%2e/x",
            "/%2E",
            "/a/..%2Fb",
            "/a/%2fb",
            "/a/%5cb",
            "/a/%5C..",
            // Escapes that decoding would create (found by fuzz/path):
            // `%70ro` is `pro` to fal, `%2e%2e` is `..`, `%2F` is `/`.
            "/fal-ai/sora-2/text-to-video/%%370ro",
            "/fal-ai/x/%%32e%%32e/y",
            "/a/%%32F",
            "/a/%2%46",
            "/a/%%34%31",
            "/fal-a3%AC/'fx.%%35Fdev",
            "/a\\b",
            "/a//b",
            "//evil.example/x",
            "/a/b/",
            "/",
            "*",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn forwards_without_our_route_prefix() {
        let c = Canonical::new("/queue/fal-ai/x/%70ro", Some("fal_webhook=u")).unwrap();
        assert_eq!(c.path(), "/queue/fal-ai/x/pro");
        assert_eq!(c.forwarded("/queue"), "/fal-ai/x/pro?fal_webhook=u");
        assert_eq!(c.query(), Some("fal_webhook=u"));
    }
}

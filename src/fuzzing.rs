//! The invariants the fuzz targets in `fuzz/` check, written once: each
//! target hands its input to one `check_*` function here, and
//! `tests/fuzz_corpus.rs` replays the committed corpora through the same
//! functions under plain `cargo test`. Every check panics when its
//! invariant fails; an input the invariant says nothing about returns.
//!
//! Not part of the product: hidden from the documentation, and nothing in
//! the server calls it.

use simd_json::prelude::*;

use crate::billing::decimal::format_scaled;
use crate::billing::facts::{RequestFacts, ResponseFacts};
use crate::billing::splice::{splice, Billing};
use crate::billing::stream_facts::FactScanner;
use crate::billing::{json, lax};
use crate::config::Config;
use crate::error::ApiError;
use crate::proxy::fal_proxy::{self, Target};
use crate::proxy::json_body;
use crate::proxy::path::{escaped_byte, percent_decoded, Canonical};
use crate::proxy::Tunables;
use crate::upstream;

/// The names of the fuzz targets, which are also their corpus folders.
pub const TARGETS: [&str; 5] = ["splice", "request_facts", "path", "target_url", "config"];

/// Says whether bytes are one JSON text as RFC 8259 defines it. simd-json,
/// which the proxy reads with, also takes some bytes that are not JSON
/// (a NUL after a number, say), so the judge comes from the caller:
/// `serde_json` in the fuzz crate and in `tests/fuzz_corpus.rs`.
pub type StrictJson = fn(&[u8]) -> bool;

/// Runs the check of the target `name` on `data`.
pub fn check(name: &str, data: &[u8], strict: StrictJson) {
    match name {
        "splice" => check_splice(data, strict),
        "request_facts" => check_request_facts(data, strict),
        "path" => check_path(data),
        "target_url" => check_target_url(data),
        "config" => check_config(data),
        _ => panic!("no fuzz target {name:?}"),
    }
}

/// Figures a test chose: the model's name, credits, dollars per credit
/// (in billionths) and the balance.
struct Figures {
    model: String,
    credits: u64,
    credit_nano: u32,
    balance: i64,
}

impl Figures {
    fn billing(&self) -> Billing<'_> {
        Billing {
            model: &self.model,
            credits_used: self.credits,
            cost_usd: format_scaled(u128::from(self.credits) * u128::from(self.credit_nano), 9),
            balance_remaining: self.balance,
        }
    }

    /// `[credits: 8][balance: 8][nano: 4][model…]`, short input padded with zeros.
    fn from_bytes(bytes: &[u8]) -> Self {
        let mut fixed = [0u8; 20];
        let n = bytes.len().min(20);
        fixed[..n].copy_from_slice(&bytes[..n]);
        Self {
            credits: u64::from_le_bytes(fixed[..8].try_into().unwrap()),
            balance: i64::from_le_bytes(fixed[8..16].try_into().unwrap()),
            credit_nano: u32::from_le_bytes(fixed[16..20].try_into().unwrap()),
            model: String::from_utf8_lossy(bytes.get(20..).unwrap_or_default()).into_owned(),
        }
    }

    /// The figures every input is tried with: the usual, the extremes, and
    /// a model name that needs escaping.
    fn standard() -> [Self; 3] {
        [
            Self {
                model: "fal-ai/flux/dev".into(),
                credits: 28,
                credit_nano: 1_000_000,
                balance: 9972,
            },
            Self {
                model: String::new(),
                credits: u64::MAX,
                credit_nano: u32::MAX,
                balance: i64::MIN,
            },
            Self {
                model: "a\"b\\c\u{0}\u{1f}\u{7f}é\u{2028}😀}".into(),
                credits: 0,
                credit_nano: 1,
                balance: -1,
            },
        ]
    }
}

/// **The `_billing` splice.** The input is fal's body, optionally followed
/// by a NUL byte and the figures (`[credits: u64 LE][balance: i64 LE]
/// [usd per credit in billionths: u32 LE][model name]`); without a NUL it
/// is tried with a few fixed figures. For every input: `splice` never
/// panics; when it answers, its output is the input with exactly one run
/// of bytes inserted just before the input's last non-white-space byte, a
/// `}`, and that run is `,"_billing":{…}` (no comma in an empty object)
/// holding the figures. When the input is a valid JSON object, it
/// answers, and its output is valid JSON: the same members, plus
/// `_billing` last with the figures. A valid JSON value that is not an
/// object gets no answer.
pub fn check_splice(data: &[u8], strict: StrictJson) {
    match data.iter().rposition(|&b| b == 0) {
        Some(nul) => {
            check_splice_with(&data[..nul], &Figures::from_bytes(&data[nul + 1..]), strict)
        }
        None => {
            for figures in Figures::standard() {
                check_splice_with(data, &figures, strict);
            }
        }
    }
}

fn check_splice_with(body: &[u8], figures: &Figures, strict: StrictJson) {
    let is_ws = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let json = strict(body);
    let object = json && body.iter().find(|b| !is_ws(b)) == Some(&b'{');
    let Some(out) = splice(body, &figures.billing()) else {
        assert!(!object, "a JSON object got no `_billing`");
        return;
    };
    let close = body
        .iter()
        .rposition(|b| !is_ws(b))
        .expect("spliced into a blank body");
    assert_eq!(
        body[close], b'}',
        "spliced into a body that does not end in `}}`"
    );
    assert!(out.len() > body.len(), "nothing inserted");
    let inserted = out.len() - body.len();
    assert_eq!(
        &out[..close],
        &body[..close],
        "a byte before the insertion changed"
    );
    assert_eq!(
        &out[close + inserted..],
        &body[close..],
        "a byte after the insertion changed"
    );
    // The inserted run, read on its own as the member of an object.
    let run = &out[close..close + inserted];
    let member = run.strip_prefix(b",").unwrap_or(run);
    assert!(member.starts_with(b"\"_billing\":{"), "inserted {run:?}");
    let mut alone = [b"{", member, b"}"].concat();
    assert!(strict(&alone), "`_billing` is not valid JSON");
    let alone = simd_json::to_owned_value(&mut alone).expect("simd-json cannot read `_billing`");
    assert_billing(alone.get("_billing"), figures);

    if !json {
        return;
    }
    assert!(object, "a JSON value that is not an object got `_billing`");
    assert!(strict(&out), "JSON object in, not JSON out");
    // simd-json refuses some JSON (an integer beyond 64 bits); the bytes
    // were compared above, the members are compared where it reads both.
    let (Ok(value), Ok(spliced)) = (
        simd_json::to_owned_value(&mut body.to_vec()),
        simd_json::to_owned_value(&mut out.to_vec()),
    ) else {
        return;
    };
    let (before, after) = (value.as_object().unwrap(), spliced.as_object().unwrap());
    // Looked up on both sides alike and compared as written out again:
    // simd-json keeps a repeated key twice, and its maps then compare
    // unequal to themselves.
    let text = |v: Option<&simd_json::OwnedValue>| v.map(simd_json::to_string);
    for k in before.keys().filter(|k| k.as_str() != "_billing") {
        assert_eq!(
            text(after.get(k.as_str())),
            text(before.get(k.as_str())),
            "member {k:?} changed"
        );
    }
    // (A body that has its own `_billing` shows which one a reader takes.)
    if before.get("_billing").is_none() {
        assert_billing(after.get("_billing"), figures);
    }
    let empty = body.iter().filter(|b| !is_ws(b)).count() == 2;
    assert_eq!(run.starts_with(b","), !empty, "comma in {run:?}");
}

fn assert_billing(got: Option<&simd_json::OwnedValue>, figures: &Figures) {
    let got = got.expect("no `_billing` member");
    assert_eq!(got.get_str("model"), Some(figures.model.as_str()));
    assert_eq!(got.get_u64("credits_used"), Some(figures.credits));
    assert_eq!(got.get_i64("balance_remaining"), Some(figures.balance));
    assert!(
        got.get("cost_usd").is_some_and(|c| c.is_number()),
        "cost_usd"
    );
}

/// **The request-facts reader and the streaming answer scanner.** For any
/// bytes: reading them as a request body never panics; what it reads is
/// within the bounds a hold needs (1 to 100 images, sides up to 16384,
/// durations up to an hour) and survives the job table's text form; a body
/// simd-json cannot parse is `malformed_json`. The lax number readers never
/// panic on the bytes as a string. Read as fal's answer, the scanner, fed
/// the bytes whole, a byte at a time, cut once anywhere (short inputs) and
/// in pseudo-random pieces, never panics, and whenever the bytes are valid
/// JSON (as `strict` judges) it finds exactly what [`ResponseFacts::read`] finds in the whole
/// document (nothing, for a value that is not an object).
pub fn check_request_facts(data: &[u8], strict: StrictJson) {
    match json_body::parse(data) {
        Ok(facts) => {
            if let Some((w, h)) = facts.image_size {
                assert!(
                    (1..=16_384).contains(&w) && (1..=16_384).contains(&h),
                    "{facts:?}"
                );
            }
            if let Some(n) = facts.num_images {
                assert!((1..=100).contains(&n), "{facts:?}");
            }
            if let Some(d) = facts.duration_milli {
                assert!((1..=3_600_000).contains(&d), "{facts:?}");
            }
            assert_eq!(RequestFacts::decode(&facts.encode()), facts);
        }
        Err(ApiError::MalformedJson(_) | ApiError::InvalidInput(_)) => {}
        Err(e) => panic!("unexpected error {e:?}"),
    }
    if simd_json::to_owned_value(&mut data.to_vec()).is_err() {
        assert!(matches!(
            json_body::parse(data),
            Err(ApiError::MalformedJson(_))
        ));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let value = simd_json::OwnedValue::from(text);
        let _ = (lax::int(&value), lax::seconds_milli(&value));
    }
    check_scanner(data, strict(data));
}

/// What the whole document says, `None` for invalid JSON (`Some(None)`
/// for valid JSON that is not an object).
fn whole_answer(doc: &[u8]) -> Option<Option<ResponseFacts>> {
    json::read(doc, |v| v.is_object().then(|| ResponseFacts::read(v))).ok()
}

fn scanned(pieces: impl IntoIterator<Item = impl AsRef<[u8]>>) -> Option<ResponseFacts> {
    let mut scan = FactScanner::default();
    for piece in pieces {
        scan.feed(piece.as_ref());
    }
    scan.finish()
}

fn check_scanner(doc: &[u8], json: bool) {
    let expected = whole_answer(doc).filter(|_| json);
    let agree = |got: Option<ResponseFacts>, how: &dyn Fn() -> String| {
        if let Some(expected) = &expected {
            assert_eq!(&got, expected, "scanner fed {} disagrees", how());
        }
    };
    agree(scanned([doc]), &|| "whole".into());
    agree(scanned(doc.chunks(1)), &|| "a byte at a time".into());
    if doc.len() <= 512 {
        for cut in 0..=doc.len() {
            let (a, b) = doc.split_at(cut);
            agree(scanned([a, b]), &|| format!("cut at {cut}"));
        }
    }
    // Pieces of 1 to 64 bytes, their sizes drawn from the document itself.
    let mut seed = doc.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let mut pieces = Vec::new();
    let mut rest = doc;
    while !rest.is_empty() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let n = (seed % 64 + 1) as usize;
        let (piece, tail) = rest.split_at(n.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    agree(scanned(&pieces), &|| {
        format!(
            "in pieces of {:?}",
            pieces.iter().map(|p| p.len()).collect::<Vec<_>>()
        )
    });
}

/// **Path canonicalisation.** The input is a path, up to its first `?`,
/// and a query after it (bytes that are not UTF-8 are skipped; the same
/// text is also tried as a request target). [`Canonical`] never panics,
/// and what it accepts is a fixed point (canonicalised again it is the
/// same) that starts with `/` and has no `%2F`, `%5C` (either case), `\`,
/// empty segment, `.` or `..` segment, nor one once percent-decoded; no
/// escape left in it stands for an unreserved character (fal, decoding
/// once, reads the path we priced); the query is kept as sent.
pub fn check_path(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    if let Ok(c) = Canonical::new(path, query) {
        assert_canonical(&c);
        assert_eq!(c.query(), query);
    }
    if let Ok(uri) = text.parse::<http::Uri>() {
        if let Ok(c) = Canonical::of(&uri) {
            assert_canonical(&c);
        }
    }
}

fn assert_canonical(c: &Canonical) {
    let path = c.path();
    let again = Canonical::new(path, c.query()).expect("a canonical path is refused");
    assert_eq!(&again, c, "not a fixed point");
    let upper = path.to_ascii_uppercase();
    assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{path}");
    assert!(!path.contains('\\'), "{path}");
    // Decoded once more (as fal decodes), nothing but what we left encoded
    // changes: no escape that is left stands for an unreserved character.
    for (i, _) in path.match_indices('%') {
        if let Some(c) = escaped_byte(&path.as_bytes()[i..]) {
            let unreserved = c.is_ascii_alphanumeric() || b"-._~".contains(&c);
            assert!(!unreserved && c != b'/' && c != b'\\', "{path}");
        }
    }
    for form in [path.to_owned(), percent_decoded(path)] {
        let segments = form.strip_prefix('/').unwrap_or_else(|| panic!("{path}"));
        for s in segments.split('/') {
            assert!(!matches!(s, "" | "." | ".."), "segment {s:?} in {path}");
        }
        assert!(!form.contains('\\'), "{path}");
    }
}

/// **`x-fal-target-url`.** The input is the header's value. Reading it
/// never panics, and every target it accepts goes to one of the configured
/// upstreams (`[upstream] run`, `queue`, `storage`, here the defaults and
/// a base with a path prefix) and nowhere else: the URL asked for is
/// `https://` and the matching fal host, with no user or port but 443;
/// the path forwarded is canonical (the queue's under `/queue/`), a
/// storage path one of the SDK's three upload calls; and the upstream URL
/// built from it has the configured scheme and authority, its path under
/// the configured prefix.
pub fn check_target_url(data: &[u8]) {
    let Ok(value) = http::HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = http::HeaderMap::new();
    headers.insert("x-fal-target-url", value);
    let Ok(target) = fal_proxy::target(&headers) else {
        return;
    };
    let raw = String::from_utf8_lossy(data).to_ascii_lowercase();
    let fal_host = match &target {
        Target::Run(_) => "fal.run",
        Target::Queue(_) => "queue.fal.run",
        Target::Storage(_) => "rest.fal.ai",
    };
    // The host as written, then its port however spelt (`:0443` is 443).
    let rest = raw
        .strip_prefix("https://")
        .and_then(|r| r.strip_prefix(fal_host))
        .unwrap_or_else(|| panic!("{raw:?} accepted as {target:?}"));
    let (port, rest) = match rest.strip_prefix(':') {
        Some(r) => {
            let end = r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len());
            (r[..end].parse::<u64>().ok(), &r[end..])
        }
        None => (Some(443), rest),
    };
    assert_eq!(port, Some(443), "{raw:?} accepted as {target:?}");
    assert!(
        rest.is_empty() || rest.starts_with(['/', '?', '#']),
        "{raw:?} accepted as {target:?}"
    );
    let forwarded = match &target {
        Target::Run(c) => {
            assert_canonical(c);
            c.forwarded("")
        }
        Target::Queue(c) => {
            assert_canonical(c);
            assert!(c.path().starts_with("/queue/"), "{c:?}");
            c.forwarded("/queue")
        }
        Target::Storage(pq) => {
            let path = pq.split_once('?').map_or(pq.as_str(), |(p, _)| p);
            assert!(fal_proxy::STORAGE_PATHS.contains(&path), "{pq}");
            pq.clone()
        }
    };
    assert!(forwarded.starts_with('/'), "{forwarded}");
    for base in [
        "https://fal.run",
        "https://queue.fal.run",
        "https://rest.fal.ai",
        "http://127.0.0.1:9999/prefix/",
    ] {
        let upstream = upstream::Target::parse(base).unwrap();
        let Ok(uri) = upstream.uri(&forwarded) else {
            continue;
        };
        let configured: http::Uri = base.parse().unwrap();
        assert_eq!(uri.scheme(), configured.scheme(), "{forwarded}");
        assert_eq!(uri.authority(), configured.authority(), "{forwarded}");
        let prefix = configured.path().trim_end_matches('/');
        assert!(uri.path().starts_with(&format!("{prefix}/")), "{uri}");
    }
}

/// **The config loader.** Any text (bytes that are not UTF-8 are read
/// lossily) is either refused with an error or loaded; never a panic, also
/// in what start-up builds from a loaded config at once (the price table
/// and rate-limit plans, the derived limits and the upstream base URLs).
pub fn check_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let Ok(config) = Config::parse(&text) else {
        return;
    };
    let _ = config.limits.buffered_body_bytes_per_account();
    let _ = config.upstream_timeout();
    let _ = Tunables::new(&config, &[]);
    for url in [
        &config.upstream.run,
        &config.upstream.queue,
        &config.upstream.storage,
    ] {
        let _ = upstream::Target::parse(url);
    }
}

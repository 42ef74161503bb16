//! Invariant: reading any bytes as a billable request body
//! (`json_body::parse`, through `billing::facts` and `billing::lax`)
//! never panics, and what it reads stays within a hold's bounds; reading
//! them as fal's answer with the streaming scanner
//! (`billing::stream_facts`), fed whole, a byte at a time, cut anywhere
//! or in random pieces, never panics and, whenever the bytes are valid
//! JSON, finds exactly what `ResponseFacts::read` finds in the whole
//! document. The check is `abhiapi::fuzzing::check_request_facts`, also
//! replayed over the corpus by `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// RFC 8259 JSON: UTF-8 (which `serde_json` does not check in strings it
/// skips), and valid as `serde_json` reads it.
fn strict(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fuzz_target!(|data: &[u8]| abhiapi::fuzzing::check_request_facts(data, strict));

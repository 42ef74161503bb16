//! Invariant: `splice` never panics, and for any bytes and any figures
//! (after a last NUL byte: credits, balance, dollars per credit, model)
//! it changes no byte of fal's body: its output is the input with one
//! `,"_billing":{…}` member holding exactly those figures inserted before
//! the final `}`. A valid JSON object in gives valid JSON out with the
//! same members; a JSON value that is not an object is left alone.
//! The check is `abhiapi::fuzzing::check_splice`, also replayed over the
//! corpus by `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

/// RFC 8259 JSON: UTF-8 (which `serde_json` does not check in strings it
/// skips), and valid as `serde_json` reads it.
fn strict(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

fuzz_target!(|data: &[u8]| abhiapi::fuzzing::check_splice(data, strict));

//! Invariant: path canonicalisation (`proxy::path::Canonical`) never
//! panics, and a path it accepts is a fixed point (canonicalised again it
//! is the same) that starts with `/` and contains no `%2F`, `%5C`, `\`,
//! empty segment, `.` or `..` segment, neither as it is nor once
//! percent-decoded. The check is `abhiapi::fuzzing::check_path`, also
//! replayed over the corpus by `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| abhiapi::fuzzing::check_path(data));

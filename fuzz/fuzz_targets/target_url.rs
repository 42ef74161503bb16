//! Invariant: reading an `x-fal-target-url` value
//! (`proxy::fal_proxy::target`) never panics, and whatever it accepts
//! goes to a configured upstream and no other host: it was an `https://`
//! URL of the matching fal host (no user, no port but 443), its path is
//! canonical (a storage path one of the three upload calls), and the
//! upstream URL built from it keeps the configured scheme, authority and
//! path prefix. The check is `abhiapi::fuzzing::check_target_url`, also
//! replayed over the corpus by `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| abhiapi::fuzzing::check_target_url(data));

//! Invariant: the config loader (`Config::parse`, with its validation)
//! never panics on any text, and neither does what start-up builds at
//! once from a config it accepts (price table, rate-limit plans, derived
//! limits, upstream base URLs). The check is
//! `abhiapi::fuzzing::check_config`, also replayed over the corpus by
//! `tests/fuzz_corpus.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| abhiapi::fuzzing::check_config(data));

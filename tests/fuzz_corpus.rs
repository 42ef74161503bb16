//! Replays every fuzz target's committed corpus (`fuzz/corpus/<target>/`)
//! through the same invariant checks the targets run
//! (`abhiapi::fuzzing`), so that plain `cargo test` on stable keeps every
//! seed and every crash the fuzzers found passing.

use std::fs;
use std::path::Path;

use abhiapi::fuzzing::{check, TARGETS};

/// RFC 8259 JSON: UTF-8 (which `serde_json` does not check in strings it
/// skips), and valid as `serde_json` reads it (as the fuzz targets judge it).
fn strict(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok()
        && serde_json::from_slice::<serde::de::IgnoredAny>(bytes).is_ok()
}

#[test]
fn every_corpus_input_keeps_its_targets_invariant() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for target in TARGETS {
        let dir = root.join(target);
        let mut inputs: Vec<_> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{} has no inputs", dir.display());
        for input in inputs {
            let data = fs::read(&input).unwrap();
            let outcome = std::panic::catch_unwind(|| check(target, &data, strict));
            assert!(
                outcome.is_ok(),
                "{target}: {} breaks its invariant",
                input.display()
            );
        }
    }
}

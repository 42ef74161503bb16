//! A key store with many keys, for the benches that look keys up or load them.

use std::path::Path;

use abhiapi::args;
use abhiapi::config::StoreConfig;
use abhiapi::keys::secret;
use abhiapi::store::sql::{Conn, Mode, Sql};
use abhiapi::store::{self, admin};

/// A database at `path` with `keys` keys on one account; returns one of the secrets.
pub fn populated(path: &Path, keys: usize) -> (Conn, String) {
    let mut conn = store::open(&StoreConfig::at(path)).unwrap();
    // The operator's first key; the rest go in by SQL, past the per-account cap.
    let origin = admin::KeyOrigin {
        created_by: None,
        max_keys: 1,
    };
    let first = admin::create_key(&mut conn, "bench", 1_000_000_000, "free", origin).unwrap();
    let mut tx = conn.transaction(Mode::Plain).unwrap();
    for _ in 1..keys {
        let s = secret::generate().unwrap();
        tx.exec(
            "INSERT INTO api_keys (account_id, hash, display_prefix, created_at) VALUES (?1, ?2, 'sk-fal-x', 0)",
            args![first.account.id, &s.hash[..]],
        )
        .unwrap();
    }
    tx.commit().unwrap();
    (conn, first.secret)
}

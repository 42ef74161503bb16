//! `serve --demo`: the whole flow without a fal account. A mock fal on
//! loopback, a throwaway database, and a ready key.

use std::path::PathBuf;

use crate::config::Config;
use crate::error::Error;
use crate::mock_fal::MockFal;
use crate::store::{self, admin};

pub const ACCOUNT: &str = "demo";
const CREDITS: i64 = 10_000;
/// Sent to the mock in place of a real fal key.
pub const FAL_KEY: &str = "demo-key-id:demo-key-secret";

pub struct Demo {
    pub mock: MockFal,
    pub key: String,
    /// Removed when the demo ends.
    pub dir: PathBuf,
}

/// Starts the mock and points `config` at it and at a fresh database.
pub async fn prepare(config: &mut Config) -> Result<Demo, Error> {
    let mock = MockFal::start(None).await?;
    config.upstream.run = mock.url(false);
    config.upstream.queue = mock.queue_url(false);
    config.upstream.storage = mock.storage_url(false);
    let dir = std::env::temp_dir().join(format!("abhiapi-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    config.store.path = dir.join("demo.db");
    let mut conn = store::open(&config.store.path)?;
    let created = admin::create_key(
        &mut conn,
        ACCOUNT,
        CREDITS,
        "free",
        admin::KeyOrigin::operator(config),
    )?;
    Ok(Demo {
        mock,
        key: created.secret,
        dir,
    })
}

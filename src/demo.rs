//! `serve --demo`: the whole flow without a fal or Stripe account. A mock
//! fal and a Stripe stand-in on loopback, a throwaway database, and a ready key.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::config::{Config, StripeSecrets};
use crate::error::Error;
use crate::mock_fal::MockFal;
use crate::mock_stripe::{MockStripe, WebhookTarget};
use crate::store::{self, admin};

pub const ACCOUNT: &str = "demo";
const CREDITS: i64 = 10_000;
/// Sent to the mock in place of a real fal key.
pub const FAL_KEY: &str = "demo-key-id:demo-key-secret";

/// The demo's Stripe stand-in takes these; they guard nothing beyond loopback.
const STRIPE_KEY: &str = "sk_test_demo";
const WEBHOOK_SECRET: &str = "whsec_demo";

pub struct Demo {
    pub mock: MockFal,
    pub stripe: MockStripe,
    pub key: String,
    /// Removed when the demo ends.
    pub dir: PathBuf,
    /// The demo's settings as a file, for the operator's commands
    /// (`prices sync`, `reconcile`, `usage`) against it.
    pub config: PathBuf,
}

/// The environment variable the demo's config file names for the fal key
/// (the mock takes any).
pub const FAL_KEY_ENV: &str = "ABHIAPI_DEMO_FAL_KEY";

/// Starts the mock and points `config` at it and at a fresh database.
pub async fn prepare(config: &mut Config) -> Result<Demo, Error> {
    let mock = MockFal::start(None).await?;
    config.upstream.run = mock.url(false);
    config.upstream.queue = mock.queue_url(false);
    config.upstream.storage = mock.storage_url(false);
    config.upstream.api = mock.api_url(false);
    let dir = std::env::temp_dir().join(format!("abhiapi-demo-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    // The demo's own throwaway SQLite, never the configured store.
    config.store.path = dir.join("demo.db");
    config.store.url = None;
    let stripe = MockStripe::start(STRIPE_KEY).await?;
    config.payments.api_base = stripe.url();
    config.payments.demo_secrets = Some(StripeSecrets {
        secret_key: STRIPE_KEY.into(),
        webhook_secret: WEBHOOK_SECRET.into(),
    });
    let mut conn = store::open(&config.store)?;
    let created = admin::create_key(
        &mut conn,
        ACCOUNT,
        CREDITS,
        "free",
        admin::KeyOrigin::operator(config),
    )?;
    let mut settings = config.clone();
    settings.upstream.fal_key_env = FAL_KEY_ENV.into();
    let path = dir.join("config.toml");
    let text = toml::to_string(&settings)
        .map_err(|e| Error::Usage(format!("the demo's settings: {e}")))?;
    // It may hold secrets of the operator's config (a mail password): the
    // operator's alone.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?
        .write_all(text.as_bytes())?;
    Ok(Demo {
        mock,
        stripe,
        key: created.secret,
        dir,
        config: path,
    })
}

impl Demo {
    /// Once the proxy listens: where the stand-in's "Pay" button sends its event.
    pub fn listening(&self, plain: std::net::SocketAddr) {
        self.stripe.deliver_to(WebhookTarget {
            url: format!("http://{plain}/v1/stripe/webhook"),
            secret: WEBHOOK_SECRET.into(),
        });
    }
}

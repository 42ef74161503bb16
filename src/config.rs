//! `config.toml`: the operator's one file. Parsed and validated here; nothing
//! else in the crate reads the file system for settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::Error;

/// The repository's documented `config.toml`, compiled in so that the binary
/// runs on a bare machine with no file beside it.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.toml");

/// Where `--config` points when it is not given.
pub const DEFAULT_PATH: &str = "config.toml";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub billing: BillingConfig,
    /// The price table: `[[pricing]]` rules, longest match wins.
    #[serde(default)]
    pub pricing: Vec<PriceRuleConfig>,
    #[serde(default)]
    pub queue: QueueConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub payments: PaymentsConfig,
    #[serde(default)]
    pub signup: SignupConfig,
    #[serde(default)]
    pub email: EmailConfig,
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Rate-limit plans by name; `free` is every new account's.
    #[serde(default = "default_plans")]
    pub plans: BTreeMap<String, PlanConfig>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// The operator's listener (admin API, metrics, reload); keep it private.
    pub listen: Option<SocketAddr>,
    /// Environment variable holding the bearer token; unset, the admin API stays off.
    pub token_env: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: None,
            token_env: "ABHIAPI_ADMIN_TOKEN".into(),
        }
    }
}

/// How sign-in links are mailed.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmailConfig {
    /// The mail server, as the lettre crate reads it: `smtp://host:port`
    /// (plain, or STARTTLS with `?tls=required`), `smtps://host:port` (TLS),
    /// with `user:password@` if it needs a login. Unset, links are written
    /// to the log instead.
    pub smtp_url: Option<String>,
    /// The sender, `Name <address>` or an address.
    pub from: String,
}

impl Default for EmailConfig {
    fn default() -> Self {
        Self {
            smtp_url: None,
            from: "AbhiAPI <no-reply@localhost>".into(),
        }
    }
}

/// People sign in by a link sent to their email; no passwords.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignupConfig {
    /// Credits a new account starts with.
    pub free_credits: i64,
    /// How long a session lasts.
    pub session_days: u64,
    /// The base of the links we email (`https://api.example.com`): never
    /// taken from a request's `Host`, which anyone can set. Unset, the
    /// listener's address (plain HTTP if there is one).
    pub public_url: Option<String>,
}

impl Default for SignupConfig {
    fn default() -> Self {
        Self {
            free_credits: 0,
            session_days: 30,
            public_url: None,
        }
    }
}

/// Card payments through Stripe: credits arrive only from its signed webhook.
/// Each secret is read from the environment variable named here.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsConfig {
    /// Stripe's API (a stand-in's in tests and the demo).
    pub api_base: String,
    /// Environment variable holding Stripe's secret API key (`sk_…`); unset,
    /// `POST /v1/topups` answers 404 `payments_not_enabled`.
    pub secret_key_env: String,
    /// Environment variable holding the webhook endpoint's signing secret
    /// (`whsec_…`); unset, `POST /v1/stripe/webhook` answers 404.
    pub webhook_secret_env: String,
    /// The currency payments are made in (ISO code, lower case; two decimal
    /// places). `[billing] usd_per_credit` is read as this currency per credit.
    pub currency: String,
    /// The smallest and largest top-up, in whole units of the currency.
    pub min_usd: u64,
    pub max_usd: u64,
    /// Set by `serve --demo` for its Stripe stand-in, in place of the
    /// environment; never read from a file.
    #[serde(skip)]
    pub demo_secrets: Option<StripeSecrets>,
}

/// Stripe's secret API key and the webhook's signing secret.
#[derive(Debug, Clone)]
pub struct StripeSecrets {
    pub secret_key: String,
    pub webhook_secret: String,
}

impl PaymentsConfig {
    /// A secret from the environment variable `var` (or the demo's), if set.
    pub fn secret(&self, var: &str, demo: impl Fn(&StripeSecrets) -> &String) -> Option<String> {
        if let Some(d) = &self.demo_secrets {
            return Some(demo(d).clone());
        }
        std::env::var(var)
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
    }
}

impl Default for PaymentsConfig {
    fn default() -> Self {
        Self {
            api_base: "https://api.stripe.com".into(),
            secret_key_env: "STRIPE_SECRET_KEY".into(),
            webhook_secret_env: "STRIPE_WEBHOOK_SECRET".into(),
            currency: "usd".into(),
            min_usd: 5,
            max_usd: 1000,
            demo_secrets: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// How often the reconciler asks fal about jobs nobody has fetched.
    pub reconcile_interval_secs: u64,
    /// A job fal no longer knows is released after this age.
    pub give_up_after_secs: u64,
    /// Ended jobs stay readable by their owners (after a restart) this long.
    pub keep_ended_jobs_days: u64,
    /// Ended jobs kept in memory, the most recent; older ones are read
    /// from the store when their owner asks, so memory is bounded by count
    /// and not by `keep_ended_jobs_days` times the submission rate.
    pub max_ended_jobs_in_memory: usize,
}

impl Default for QueueConfig {
    fn default() -> Self {
        Self {
            reconcile_interval_secs: 60,
            give_up_after_secs: 24 * 3600,
            keep_ended_jobs_days: 7,
            max_ended_jobs_in_memory: 10_000,
        }
    }
}

/// The plan an account gets unless told otherwise, and must exist.
pub const DEFAULT_PLAN: &str = "free";

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlanConfig {
    /// Generation requests (sync runs, queue submissions) a key may send per minute.
    pub requests_per_minute: u64,
    /// Requests a key may send at once (default: `requests_per_minute`).
    pub burst: Option<u64>,
    /// A cap on all keys of one account together, so that more keys do not mean more requests.
    pub account_requests_per_minute: Option<u64>,
}

/// As `config.toml` has them: each capped per account at its per-key rate,
/// so that more keys never mean more allowance.
fn default_plans() -> BTreeMap<String, PlanConfig> {
    let plan = |rpm| PlanConfig {
        requests_per_minute: rpm,
        burst: None,
        account_requests_per_minute: Some(rpm),
    };
    BTreeMap::from([("free".into(), plan(30)), ("pro".into(), plan(600))])
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TLS listener; `None` turns it off.
    pub listen: Option<SocketAddr>,
    /// Plain HTTP (h1 and h2c) listener, for use behind a load balancer.
    pub plain_listen: Option<SocketAddr>,
    /// PEM chain and key; when both are absent the embedded dev certificate is used.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// A connection with no request in progress is closed after this long:
    /// from accept (after the TLS handshake), or from its last response.
    /// Silent connections would otherwise hold a descriptor each, forever.
    pub idle_timeout_secs: u64,
    /// A request's head must be complete this long after its first byte.
    pub header_read_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    /// A request body that sends nothing for this long is cut off (408);
    /// also the grace before `min_body_bytes_per_sec` is enforced.
    pub body_timeout_secs: u64,
    /// After `body_timeout_secs`, a body must have averaged at least this
    /// rate since it began, or it is cut off (408): a trickle holds a
    /// connection and a buffer as long as a stall does.
    pub min_body_bytes_per_sec: u64,
    /// Open connections allowed; beyond it, a new connection closes the
    /// one idle the longest, or is refused when none is idle. Also kept
    /// to half the descriptor limit, leaving one for each upstream call.
    pub max_connections: usize,
    /// HTTP/2 keep-alive: a ping after this long without a frame from the
    /// client, and the connection is closed if it goes unanswered as long.
    pub http2_keepalive_interval_secs: u64,
    /// Streams (requests) one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Take the client's scheme and host from `x-forwarded-proto` and
    /// `x-forwarded-host` (only behind a load balancer that sets them).
    pub trust_forwarded_headers: bool,
    /// Request threads, each a single-threaded runtime with its own
    /// listening sockets and upstream connections; 0 for one per core.
    pub workers: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            plain_listen: None,
            tls_cert: None,
            tls_key: None,
            idle_timeout_secs: 30,
            header_read_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
            body_timeout_secs: 30,
            min_body_bytes_per_sec: 4096,
            max_connections: 10_000,
            http2_keepalive_interval_secs: 20,
            http2_max_concurrent_streams: 100,
            shutdown_grace_secs: 30,
            trust_forwarded_headers: false,
            workers: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub run: String,
    pub queue: String,
    /// fal's storage host (file uploads made by the SDKs), never billed.
    pub storage: String,
    /// fal's Platform API: its prices and its billing records, read by
    /// `prices sync` and `reconcile`, never by a client's request.
    pub api: String,
    /// Name of the environment variable that holds the operator's fal key.
    pub fal_key_env: String,
    /// Longest wait for fal's response headers; the body then streams unbounded.
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// A connection to fal that has carried nothing this long is closed;
    /// shorter than front servers' usual keep-alive, so that we close first.
    pub idle_timeout_secs: u64,
    /// An extra root CA to trust for the upstream, beside the public roots.
    pub ca_file: Option<PathBuf>,
}

impl UpstreamConfig {
    /// The operator's fal key, from the environment variable `fal_key_env` names.
    pub fn fal_key(&self) -> Result<String, Error> {
        let var = &self.fal_key_env;
        match std::env::var(var) {
            Ok(k) if !k.trim().is_empty() => Ok(k.trim().to_owned()),
            _ => Err(Error::Config(format!(
                "the operator's fal key is missing: set {var} (or run `abhiapi serve --demo`)"
            ))),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            run: "https://fal.run".into(),
            queue: "https://queue.fal.run".into(),
            storage: "https://rest.fal.ai".into(),
            api: "https://api.fal.ai".into(),
            fal_key_env: "FAL_KEY".into(),
            timeout_secs: 300,
            connect_timeout_secs: 10,
            idle_timeout_secs: 50,
            ca_file: None,
        }
    }
}

/// Several nodes on one PostgreSQL (`[store] url`): each spends credit it
/// has leased from the database, never more than the account has.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// This node's name, unique among the nodes and the same across its
    /// restarts (its holds and leases are recorded under it); required
    /// with `[store] url` (a host's name may change with each restart).
    pub node: Option<String>,
    /// Credits a node leases beyond what a request needs, while the account
    /// has plenty; when it has less, a node leases per request.
    pub lease_credits: u64,
    /// Unused leased credit goes back after this long without a request
    /// for the account on this node.
    pub lease_idle_secs: u64,
    /// A node not heard from for this long is taken for gone: a peer
    /// charges its unsettled holds at their held amount and frees its
    /// leases. A node that cannot reach the database for half of it stops
    /// taking billable work first.
    pub lease_ttl_secs: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            node: None,
            lease_credits: 1000,
            lease_idle_secs: 3,
            lease_ttl_secs: 10,
        }
    }
}

impl ClusterConfig {
    /// This node's name (empty on a single node, which needs none).
    pub fn node_name(&self) -> String {
        self.node.clone().unwrap_or_default()
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite's database file; with `url`, only where the node's own files
    /// go (its hold journal, beside this path).
    pub path: PathBuf,
    /// `postgres://…`: the shared PostgreSQL of several nodes, instead of SQLite.
    pub url: Option<String>,
    /// A private CA for PostgreSQL's TLS (`sslmode=require`), beside the public roots.
    pub ca_file: Option<PathBuf>,
    /// How often the server looks for changes made by the CLI.
    pub refresh_interval_ms: u64,
    /// fsync each hold and each ledger batch, to survive power loss, not
    /// only a killed process. A billed request waits for a disk flush
    /// (shared with those beside it) before fal is called.
    pub fsync: bool,
}

impl StoreConfig {
    /// SQLite at `path`, the rest as by default.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            ..Self::default()
        }
    }

    /// The hold journal's folder, beside the database.
    pub fn journal_dir(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".holds");
        PathBuf::from(name)
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "abhiapi.db".into(),
            url: None,
            ca_file: None,
            refresh_interval_ms: 250,
            fsync: false,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_json_body_bytes: usize,
    /// Bytes of billable bodies one account may have buffered at once
    /// (being read, or held until fal has them); beyond it 429. Unset:
    /// four of the largest, see [`LimitsConfig::buffered_body_bytes_per_account`].
    pub max_buffered_body_bytes_per_account: Option<usize>,
    /// Per-key allowance for polling jobs (status, result, cancel), apart from generation.
    pub poll_requests_per_second: u64,
    /// Live keys one account may have, however they were made: each key
    /// carries its own allowances, so keys must not be free to multiply.
    pub max_keys_per_account: u64,
    /// Keys an account may create through the dashboard per minute (and at
    /// once), so that a leaked key cannot mint faster than its owner revokes.
    pub key_creations_per_minute: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_json_body_bytes: 10 * 1024 * 1024,
            max_buffered_body_bytes_per_account: None,
            poll_requests_per_second: 10,
            max_keys_per_account: 20,
            key_creations_per_minute: 5,
        }
    }
}

impl LimitsConfig {
    /// Enough for a few large bodies at once, not for a flood of them.
    pub fn buffered_body_bytes_per_account(&self) -> usize {
        self.max_buffered_body_bytes_per_account
            .unwrap_or(self.max_json_body_bytes.saturating_mul(4))
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BillingConfig {
    /// Dollars per credit (0.001: a credit is a tenth of a cent).
    pub usd_per_credit: f64,
    /// Markup over fal's price (0.10 is 10%).
    pub margin: f64,
    /// Pixels in one billed megapixel (fal: 1024 × 1024).
    pub megapixel_pixels: u64,
    /// Round each image up to whole megapixels, as fal does.
    pub round_each_image: bool,
    /// JSON answers up to this size are buffered to splice `_billing` in;
    /// larger ones stream through with the figures in headers only.
    pub max_json_response_bytes: usize,
    /// Sync prices from fal's pricing API this often (0: only by `prices sync --apply`).
    pub price_sync_interval_secs: u64,
}

impl Default for BillingConfig {
    fn default() -> Self {
        Self {
            usd_per_credit: 0.001,
            margin: 0.10,
            megapixel_pixels: 1024 * 1024,
            round_each_image: true,
            max_json_response_bytes: 8 * 1024 * 1024,
            price_sync_interval_secs: 0,
        }
    }
}

/// How a model is billed, as fal bills it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    Megapixel,
    Image,
    Second,
    Request,
}

impl Unit {
    /// The name `config.toml` uses, also how a queued job's row stores it.
    pub fn name(self) -> &'static str {
        match self {
            Unit::Megapixel => "megapixel",
            Unit::Image => "image",
            Unit::Second => "second",
            Unit::Request => "request",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Unit::Megapixel, Unit::Image, Unit::Second, Unit::Request]
            .into_iter()
            .find(|u| u.name() == name)
    }

    /// Ours for a unit name fal's pricing API gives, if we can meter it:
    /// fal's names are free text, singular or plural. Compute (GPU)
    /// seconds, tokens and characters are not in an answer or a request.
    pub fn from_fal(name: &str) -> Option<Self> {
        let name = name.trim().to_ascii_lowercase();
        let name = name.strip_suffix('s').unwrap_or(&name);
        Some(match name {
            "megapixel" | "mp" => Unit::Megapixel,
            "image" => Unit::Image,
            "second" | "video second" | "video_second" => Unit::Second,
            "request" | "video" | "call" => Unit::Request,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PriceRuleConfig {
    /// A model path (`fal-ai/flux/dev`) or a prefix ending in `*`.
    pub model: String,
    pub unit: Unit,
    /// fal's price per unit, in dollars.
    pub usd: f64,
    /// For `second`: the duration assumed when a request gives none (default 5).
    pub default_seconds: Option<f64>,
    /// Price sync reports fal's price for the endpoints this rule prices,
    /// and never changes it.
    #[serde(default)]
    pub pinned: bool,
}

#[cfg(test)]
impl PriceRuleConfig {
    /// A rule as the tests' tables write it: not pinned, the default length.
    pub fn test(model: &str, unit: Unit, usd: f64) -> Self {
        Self {
            model: model.into(),
            unit,
            usd,
            default_seconds: None,
            pinned: false,
        }
    }
}

impl Config {
    /// Reads `path`; when `path` is the default and no such file exists, the
    /// embedded default is used so that a bare binary still starts.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let (text, base) = match path {
            Some(p) => (read(p)?, parent_dir(p)),
            None if Path::new(DEFAULT_PATH).exists() => {
                (read(Path::new(DEFAULT_PATH))?, PathBuf::from("."))
            }
            None => {
                tracing::info!("no ./config.toml: using the embedded default");
                (EMBEDDED_DEFAULT.to_owned(), PathBuf::from("."))
            }
        };
        let mut config = Self::parse(&text)?;
        config.resolve_paths(&base);
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, Error> {
        let config: Self = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        let up = &self.signup;
        if !(0..=crate::store::admin::MAX_BALANCE).contains(&up.free_credits)
            || up.session_days == 0
        {
            return Err(Error::Config(
                "[signup] needs free_credits from 0 to 10^15 and session_days above 0".into(),
            ));
        }
        if let Some(url) = &up.public_url {
            crate::upstream::Target::parse(url)
                .map_err(|e| Error::Config(format!("[signup] public_url: {e}")))?;
        }
        if let Some(url) = &self.store.url {
            if self
                .cluster
                .node
                .as_deref()
                .is_none_or(|n| n.trim().is_empty())
            {
                return Err(Error::Config(
                    "[cluster] node is required with [store] url: a name unique among the nodes, \
                     the same across restarts"
                        .into(),
                ));
            }
            let scheme = url.starts_with("postgres://") || url.starts_with("postgresql://");
            let parsed = <tokio_postgres::Config as std::str::FromStr>::from_str(url);
            if let (false, _) | (_, Err(_)) = (scheme, &parsed) {
                return Err(Error::Config(
                    "[store] url: expected postgres://user:password@host:port/database".into(),
                ));
            }
        }
        let s = &self.server;
        if s.listen.is_none() && s.plain_listen.is_none() {
            return Err(Error::Config(
                "[server] needs `listen` or `plain_listen`".into(),
            ));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(Error::Config(
                "[server] `tls_cert` and `tls_key` go together".into(),
            ));
        }
        let u = &self.upstream;
        for (name, url) in [
            ("run", &u.run),
            ("queue", &u.queue),
            ("storage", &u.storage),
            ("api", &u.api),
        ] {
            crate::upstream::Target::parse(url)
                .map_err(|e| Error::Config(format!("[upstream] {name}: {e}")))?;
        }
        crate::billing::pricing::PriceTable::new(&self.billing, &self.pricing, &[])?;
        if !self.plans.contains_key(DEFAULT_PLAN) {
            return Err(Error::Config(format!(
                "[plans.{DEFAULT_PLAN}] is required: it is the default plan"
            )));
        }
        for (name, plan) in &self.plans {
            let zero = |n: Option<u64>| n == Some(0);
            if plan.requests_per_minute == 0
                || zero(plan.burst)
                || zero(plan.account_requests_per_minute)
            {
                return Err(Error::Config(format!(
                    "[plans.{name}]: limits must be positive"
                )));
            }
        }
        let l = &self.limits;
        for (name, n) in [
            ("poll_requests_per_second", l.poll_requests_per_second),
            ("max_keys_per_account", l.max_keys_per_account),
            ("key_creations_per_minute", l.key_creations_per_minute),
        ] {
            if n == 0 {
                return Err(Error::Config(format!("[limits] {name} must be positive")));
            }
        }
        if s.idle_timeout_secs == 0
            || s.header_read_timeout_secs == 0
            || s.body_timeout_secs == 0
            || s.http2_keepalive_interval_secs == 0
        {
            return Err(Error::Config("[server] timeouts must be positive".into()));
        }
        if s.min_body_bytes_per_sec == 0
            || s.max_connections == 0
            || s.http2_max_concurrent_streams == 0
        {
            return Err(Error::Config(
                "[server] min_body_bytes_per_sec, max_connections and http2_max_concurrent_streams must be positive".into(),
            ));
        }
        // Each is a thread with its own sockets and upstream connections.
        if s.workers > 1024 {
            return Err(Error::Config(
                "[server] workers must be at most 1024 (0 for one per core)".into(),
            ));
        }
        if self.limits.buffered_body_bytes_per_account() < self.limits.max_json_body_bytes {
            return Err(Error::Config(
                "[limits] max_buffered_body_bytes_per_account must hold at least one max_json_body_bytes body".into(),
            ));
        }
        if self.upstream.timeout_secs == 0
            || self.upstream.connect_timeout_secs == 0
            || self.upstream.idle_timeout_secs == 0
        {
            return Err(Error::Config("[upstream] timeouts must be positive".into()));
        }
        Ok(())
    }

    /// Relative paths mean relative to the config file, not to wherever the
    /// operator happened to start the binary.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        for p in [
            &mut self.server.tls_cert,
            &mut self.server.tls_key,
            &mut self.upstream.ca_file,
            &mut self.store.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream.timeout_secs)
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.upstream.run, "https://fal.run");
        assert_eq!(c.upstream.fal_key_env, "FAL_KEY");
    }

    /// A config without `[plans]` gets the plans `config.toml` documents.
    #[test]
    fn built_in_plans_are_the_documented_ones() {
        let documented = Config::parse(EMBEDDED_DEFAULT).unwrap().plans;
        let bare = Config::parse("[server]\nplain_listen = \"127.0.0.1:1\"").unwrap();
        assert_eq!(bare.plans, documented);
        assert!(documented
            .values()
            .all(|p| p.account_requests_per_minute.is_some()));
    }

    #[test]
    fn connection_and_body_limits_default_sanely_and_must_be_positive() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.server.idle_timeout_secs, 30);
        assert_eq!(c.server.max_connections, 10_000);
        // Four of the largest bodies, and following the body limit when it moves.
        assert_eq!(c.limits.buffered_body_bytes_per_account(), 40 << 20);
        let listen = "[server]\nplain_listen = \"127.0.0.1:1\"\n";
        let bigger = format!("{listen}[limits]\nmax_json_body_bytes = 100\n");
        let c = Config::parse(&bigger).unwrap();
        assert_eq!(c.limits.buffered_body_bytes_per_account(), 400);
        for bad in [
            "idle_timeout_secs = 0",
            "body_timeout_secs = 0",
            "min_body_bytes_per_sec = 0",
            "max_connections = 0",
        ] {
            assert!(Config::parse(&format!("{listen}{bad}\n")).is_err(), "{bad}");
        }
        let small = format!(
            "{listen}[limits]\nmax_json_body_bytes = 100\nmax_buffered_body_bytes_per_account = 99\n"
        );
        assert!(Config::parse(&small).is_err());
    }

    #[test]
    fn refuses_unknown_keys_and_bad_upstreams() {
        assert!(Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1").is_err());
        let bad = "[server]\nplain_listen = \"127.0.0.1:1\"\n[upstream]\nrun = \"ftp://x\"";
        assert!(Config::parse(bad).is_err());
    }
}

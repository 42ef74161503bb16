//! The test harness: the real `abhiapi` binary, started with its own config
//! and database in a temp dir, in front of the mock fal on 127.0.0.1:0.
#![allow(dead_code)] // each test binary uses a different part of it

pub mod cut;
pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

pub use abhiapi::mock_fal::MockFal;

pub const FAL_KEY: &str = "operator-id:operator-secret";
pub const BIN: &str = env!("CARGO_BIN_EXE_abhiapi");

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Settings a test may change; everything else is fixed by [`Options::render`].
pub struct Options {
    pub upstream: String,
    /// fal's queue host: the mock's `/_queue` prefix.
    pub queue: String,
    pub reconcile_interval_secs: u64,
    pub keep_ended_jobs_days: u64,
    pub max_ended_jobs_in_memory: usize,
    /// `[store] fsync`.
    pub fsync: bool,
    /// `[server] workers`: request threads (0, one per core, by default).
    pub workers: usize,
    pub timeout_secs: u64,
    pub header_read_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    pub idle_timeout_secs: u64,
    /// `[upstream] idle_timeout_secs`: how long a connection to fal may idle.
    pub upstream_idle_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub min_body_bytes_per_sec: u64,
    pub max_connections: usize,
    pub max_json_body_bytes: usize,
    pub ca_file: Option<PathBuf>,
    /// `[billing]` and `[[pricing]]`, as TOML.
    pub pricing: String,
    /// `[plans.*]`, as TOML.
    pub plans: String,
    /// Turn the admin listener on (token: [`ADMIN_TOKEN`]).
    pub admin: bool,
    /// Stripe's webhook on, signed with [`STRIPE_WEBHOOK_SECRET`].
    pub payments: bool,
    /// Top-ups through this Stripe API (a stand-in), with [`STRIPE_SECRET_KEY`].
    pub stripe_api: Option<String>,
    /// `[email] smtp_url`: sign-in links mailed there, not logged.
    pub smtp_url: Option<String>,
    /// `tls_cert` and `tls_key`; the embedded dev certificate when `None`.
    pub tls_files: Option<(PathBuf, PathBuf)>,
    /// More `[limits]` lines, as TOML.
    pub limits: String,
    /// `[cluster]`, as TOML: this node's name among several on one PostgreSQL.
    pub cluster: String,
    /// `[store] refresh_interval_ms`: how often the change feed is polled.
    pub refresh_interval_ms: u64,
    /// `[store] url`: PostgreSQL (see [`pg::database`]) instead of SQLite.
    pub store_url: Option<String>,
}

pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789";
pub const STRIPE_WEBHOOK_SECRET: &str = "whsec_test_0123456789abcdef";
pub const STRIPE_SECRET_KEY: &str = "sk_test_0123456789abcdef";

/// Limits no other test comes near; the rate-limit tests set real ones.
pub const UNLIMITED_PLANS: &str = "[plans.free]\nrequests_per_minute = 100000000\n";

/// The tests' price table: fal-like models, and a flat catch-all for the
/// mock's own routes (0.001 × 1.1 = 0.0011 → 2 credits a request).
pub const TEST_PRICING: &str = r#"
[billing]
usd_per_credit = 0.001
margin = 0.10

[[pricing]]
model = "fal-ai/flux/dev"
unit = "megapixel"
usd = 0.025

[[pricing]]
model = "fal-ai/kling-video/v2/*"
unit = "second"
usd = 0.07
default_seconds = 5

[[pricing]]
model = "fal-ai/creative-upscaler"
unit = "request"
usd = 0.05

[[pricing]]
model = "*"
unit = "request"
usd = 0.001
"#;

impl Options {
    pub fn new(upstream: impl Into<String>) -> Self {
        let upstream = upstream.into();
        Self {
            queue: format!("{upstream}/_queue"),
            upstream,
            reconcile_interval_secs: 3600,
            keep_ended_jobs_days: 7,
            max_ended_jobs_in_memory: 10_000,
            fsync: false,
            workers: 0,
            timeout_secs: 5,
            header_read_timeout_secs: 5,
            tls_handshake_timeout_secs: 5,
            // Longer than any test keeps a pooled connection idle.
            idle_timeout_secs: 60,
            upstream_idle_timeout_secs: 60,
            body_timeout_secs: 5,
            min_body_bytes_per_sec: 1024,
            max_connections: 1000,
            max_json_body_bytes: 64 * 1024,
            ca_file: None,
            pricing: TEST_PRICING.to_owned(),
            plans: UNLIMITED_PLANS.to_owned(),
            admin: false,
            payments: false,
            stripe_api: None,
            smtp_url: None,
            tls_files: None,
            limits: String::new(),
            store_url: None,
            refresh_interval_ms: 250,
            cluster: String::new(),
        }
    }

    /// `[email]` and `[payments]`: mail, the webhook and top-ups, each on only when asked for.
    fn payments_section(&self) -> String {
        let on = |on: bool, var: &str| {
            if on {
                var.to_owned()
            } else {
                "ABHIAPI_TEST_UNSET".to_owned()
            }
        };
        let api = self
            .stripe_api
            .as_ref()
            .map(|a| format!("api_base = \"{a}\"\n"))
            .unwrap_or_default();
        let email = self
            .smtp_url
            .as_ref()
            .map(|u| {
                format!("[email]\nsmtp_url = \"{u}\"\nfrom = \"AbhiAPI <signin@example.com>\"\n")
            })
            .unwrap_or_default();
        format!(
            "{email}[payments]\nwebhook_secret_env = \"{}\"\nsecret_key_env = \"{}\"\n{api}",
            on(self.payments, "ABHIAPI_TEST_STRIPE_WEBHOOK_SECRET"),
            on(self.stripe_api.is_some(), "ABHIAPI_TEST_STRIPE_SECRET_KEY"),
        )
    }

    pub fn render(&self, dir: &Path) -> String {
        let ca = self
            .ca_file
            .as_ref()
            .map(|p| format!("ca_file = {:?}\n", p.display().to_string()))
            .unwrap_or_default();
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
plain_listen = "127.0.0.1:0"
{tls}
header_read_timeout_secs = {hrt}
tls_handshake_timeout_secs = {tht}
idle_timeout_secs = {idle}
workers = {workers}
body_timeout_secs = {body}
min_body_bytes_per_sec = {rate}
max_connections = {conns}
shutdown_grace_secs = 10

[upstream]
run = "{up}"
queue = "{queue}"
storage = "{up}/_rest"
api = "{up}/_api"
fal_key_env = "ABHIAPI_TEST_FAL_KEY"
timeout_secs = {timeout}
connect_timeout_secs = 2
idle_timeout_secs = {upstream_idle}
{ca}
[store]
path = "{db}"
{store_url}refresh_interval_ms = {refresh}
fsync = {fsync}

{admin}
{payments}
[queue]
reconcile_interval_secs = {reconcile}
keep_ended_jobs_days = {keep}
max_ended_jobs_in_memory = {max_ended}

[limits]
max_json_body_bytes = {max_json}
{limits}
{pricing}
{plans}
{cluster}
"#,
            hrt = self.header_read_timeout_secs,
            tht = self.tls_handshake_timeout_secs,
            idle = self.idle_timeout_secs,
            body = self.body_timeout_secs,
            rate = self.min_body_bytes_per_sec,
            conns = self.max_connections,
            up = self.upstream,
            queue = self.queue,
            reconcile = self.reconcile_interval_secs,
            keep = self.keep_ended_jobs_days,
            max_ended = self.max_ended_jobs_in_memory,
            fsync = self.fsync,
            workers = self.workers,
            tls = self
                .tls_files
                .as_ref()
                .map(|(c, k)| format!(
                    "tls_cert = {:?}\ntls_key = {:?}",
                    c.display().to_string(),
                    k.display().to_string()
                ))
                .unwrap_or_default(),
            admin = if self.admin {
                "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_env = \"ABHIAPI_TEST_ADMIN_TOKEN\"\n"
            } else {
                ""
            },
            payments = self.payments_section(),
            timeout = self.timeout_secs,
            upstream_idle = self.upstream_idle_timeout_secs,
            db = dir.join("abhiapi.db").display(),
            refresh = self.refresh_interval_ms,
            cluster = match (&self.store_url, self.cluster.is_empty()) {
                (Some(_), true) => "[cluster]\nnode = \"test\"\n".to_owned(),
                _ => self.cluster.clone(),
            },
            store_url = self
                .store_url
                .as_ref()
                .map(|u| format!("url = {u:?}\n"))
                .unwrap_or_default(),
            max_json = self.max_json_body_bytes,
            limits = self.limits,
            pricing = self.pricing,
            plans = self.plans,
        )
    }
}

/// A running `abhiapi serve`; killed when dropped.
pub struct Server {
    child: Child,
    pub plain: SocketAddr,
    pub tls: SocketAddr,
    /// The admin listener, when the options turned it on.
    pub admin: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Server {
    pub fn start(opts: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, opts.render(dir.path())).unwrap();
        Self::start_config(dir, config)
    }

    /// Starts with one key (and its account) already in the database, so
    /// the key works from the first request.
    pub fn start_with_key(opts: Options, account: &str, credits: i64) -> (Self, String) {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("config.toml");
        std::fs::write(&config, opts.render(dir.path())).unwrap();
        let key = create_key(&config, account, credits);
        (Self::start_config(dir, config), key)
    }

    /// Starts on a config (and database) already prepared in `dir`.
    pub fn start_config(dir: tempfile::TempDir, config: PathBuf) -> Self {
        let stderr = log_file(dir.path());
        Self::start_with_stderr(dir, config, stderr)
    }

    /// As [`Server::start_config`], with the server's stderr going to `stderr`.
    pub fn start_with_stderr(dir: tempfile::TempDir, config: PathBuf, stderr: Stdio) -> Self {
        let (child, plain, tls, admin) = launch(dir.path(), &config, stderr);
        Self {
            child,
            plain,
            tls,
            admin,
            dir,
            config,
        }
    }

    /// Starts the server again on the same config and database (after it
    /// exited or was killed); the ports are new.
    pub fn restart(&mut self) {
        self.kill();
        let stderr = log_file(self.dir.path());
        let (child, plain, tls, admin) = launch(self.dir.path(), &self.config, stderr);
        (self.child, self.plain, self.tls, self.admin) = (child, plain, tls, admin);
    }

    /// The server's database, for reconciling the ledger.
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(self.dir.path().join("abhiapi.db")).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        conn
    }

    /// Runs `sql` on the server's store, as its config names it (SQLite
    /// or PostgreSQL), on a thread of its own: PostgreSQL's blocking client
    /// refuses a thread that runs async tasks.
    pub fn query(&self, sql: &str) -> Vec<abhiapi::store::sql::Row> {
        use abhiapi::store::sql::Sql;
        let config = abhiapi::config::Config::load(Some(&self.config)).unwrap();
        std::thread::scope(|s| {
            s.spawn(|| {
                abhiapi::store::open(&config.store)
                    .unwrap()
                    .rows(sql, &[])
                    .unwrap()
            })
            .join()
            .unwrap()
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.plain)
    }

    /// Runs an `abhiapi` CLI command against this server's database.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.config, args)
    }

    /// Creates a key while the server runs; it goes live within the refresh interval.
    pub fn create_key(&self, account: &str, credits: i64) -> String {
        create_key(&self.config, account, credits)
    }

    pub fn stderr_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap()
    }

    pub fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{signal} failed");
    }

    /// SIGKILL, and waits for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits (up to 30 s) for the process to exit, off the async runtime.
    pub async fn exited(mut self) -> (ExitStatus, Self) {
        tokio::task::spawn_blocking(move || (self.wait(), self))
            .await
            .unwrap()
    }

    /// Waits (up to 30 s) for the process to exit.
    pub fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's resident memory now, in KiB (Linux).
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// Descriptors the server has open (Linux).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `kB` field of /proc/PID/status (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// `stderr.log` in `dir`, appended to.
fn log_file(dir: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("stderr.log"))
        .unwrap()
        .into()
}

/// Starts `abhiapi serve` and reads the addresses it announces.
fn launch(
    dir: &Path,
    config: &Path,
    stderr: Stdio,
) -> (Child, SocketAddr, SocketAddr, Option<SocketAddr>) {
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .env("ABHIAPI_TEST_FAL_KEY", FAL_KEY)
        .env("ABHIAPI_TEST_ADMIN_TOKEN", ADMIN_TOKEN)
        .env("ABHIAPI_TEST_STRIPE_WEBHOOK_SECRET", STRIPE_WEBHOOK_SECRET)
        .env("ABHIAPI_TEST_STRIPE_SECRET_KEY", STRIPE_SECRET_KEY)
        .env_remove("ABHIAPI_TEST_UNSET")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .unwrap();
    let (tx, rx) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let (mut plain, mut tls, mut admin) = (None, None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while plain.is_none() || tls.is_none() {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = rx.recv_timeout(left).unwrap_or_else(|_| {
            let log = std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
            panic!("server did not announce its listeners; stderr:\n{log}")
        });
        let addr = |prefix: &str| {
            line.strip_prefix(prefix)
                .map(|a| a.parse::<SocketAddr>().unwrap())
        };
        // The admin line, when there is one, comes first.
        admin = admin.or(addr("listening admin http://"));
        plain = plain.or(addr("listening plain http://"));
        tls = tls.or(addr("listening tls https://"));
    }
    (child, plain.unwrap(), tls.unwrap(), admin)
}

pub fn cli(config: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .env("ABHIAPI_TEST_FAL_KEY", FAL_KEY)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// Creates a key through the CLI; the key is the last line it prints.
pub fn create_key(config: &Path, account: &str, credits: i64) -> String {
    let out = cli(
        config,
        &[
            "keys",
            "create",
            "--account",
            account,
            "--credits",
            &credits.to_string(),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    stdout.lines().last().unwrap().to_owned()
}

pub type TestClient = Client<HttpConnector, Full<Bytes>>;

/// HTTP/1.1 over plain TCP.
pub fn client() -> TestClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// HTTP/2 with prior knowledge (h2c).
pub fn h2c_client() -> TestClient {
    Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http()
}

/// Trusts only the development CA in `certs/`.
pub fn tls_client(h2: bool) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    tls_client_trusting(h2, &repo_path("certs/dev-ca.pem"))
}

/// Trusts the CA certificates in the PEM file `ca` (and the public roots).
pub fn tls_client_trusting(
    h2: bool,
    ca: &Path,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let tls = abhiapi::tls::client_config(Some(ca)).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(std::sync::Arc::unwrap_or_clone(tls))
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    Client::builder(TokioExecutor::new())
        .http2_only(h2)
        .build(connector)
}

pub fn post(
    url: &str,
    key: Option<&str>,
    content_type: &str,
    body: impl Into<Bytes>,
) -> Request<Full<Bytes>> {
    let mut b = Request::post(url).header("content-type", content_type);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Full::new(body.into())).unwrap()
}

pub fn get(url: &str, key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::get(url);
    if let Some(k) = key {
        b = b.header("x-api-key", k);
    }
    b.body(Full::default()).unwrap()
}

pub async fn body(resp: Response<Incoming>) -> Bytes {
    resp.into_body().collect().await.unwrap().to_bytes()
}

/// Parses a JSON body (owned, so the test can keep it).
pub fn json(bytes: &[u8]) -> simd_json::OwnedValue {
    let mut copy = bytes.to_vec();
    simd_json::to_owned_value(&mut copy)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(bytes)))
}

/// Asserts an error response: status, JSON content type, `detail` and `error_type`.
pub async fn assert_error(resp: Response<Incoming>, status: u16, error_type: &str) -> String {
    use simd_json::prelude::*;
    assert_eq!(resp.status().as_u16(), status);
    assert_eq!(resp.headers()["content-type"], "application/json");
    let v = json(&body(resp).await);
    assert_eq!(v.get_str("error_type"), Some(error_type), "{v}");
    let detail = v.get_str("detail").expect("detail").to_owned();
    assert!(!detail.is_empty());
    detail
}

/// `POST /admin/reload` on the server's admin listener: the status and the JSON answer.
pub async fn reload(server: &Server) -> (u16, simd_json::OwnedValue) {
    let req = Request::post(format!("http://{}/admin/reload", server.admin.unwrap()))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::default())
        .unwrap();
    let resp = client().request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, json(&body(resp).await))
}

/// Polls `check` every 50 ms until it holds or `within` passes.
/// The dashboard page (it needs no key): its Content-Security-Policy and its text.
pub async fn dashboard_page(server: &Server) -> (String, String) {
    let resp = client()
        .request(get(&server.url("/dashboard"), None))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let csp = resp.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    (csp, String::from_utf8(body(resp).await.to_vec()).unwrap())
}

/// POSTs `json` to `path` with `key`, as a client would.
/// The admin listener's `/metrics` (the options must turn it on).
pub async fn metrics(server: &Server) -> String {
    let admin = server.admin.expect("the admin listener is off");
    let req = Request::get(format!("http://{admin}/metrics"))
        .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
        .body(Full::default())
        .unwrap();
    let text = body(client().request(req).await.unwrap()).await;
    String::from_utf8_lossy(&text).into_owned()
}

pub async fn call(server: &Server, key: &str, path: &str, json: &str) -> Response<Incoming> {
    client()
        .request(post(
            &server.url(path),
            Some(key),
            "application/json",
            json.to_owned(),
        ))
        .await
        .unwrap()
}

pub async fn eventually<F, Fut>(within: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Splits a spliced answer into fal's original bytes and the `_billing` object.
pub fn unsplice(body: &[u8]) -> (Vec<u8>, simd_json::OwnedValue) {
    let text = std::str::from_utf8(body).unwrap();
    let start = text
        .rfind("\"_billing\":{")
        .unwrap_or_else(|| panic!("no _billing in {text}"));
    let close = text.rfind('}').unwrap();
    let field_end = text[..close].rfind('}').unwrap() + 1;
    let billing = json(&text.as_bytes()[start + "\"_billing\":".len()..field_end]);
    let cut = if text[..start].ends_with(',') {
        start - 1
    } else {
        start
    };
    let mut original = text.as_bytes()[..cut].to_vec();
    original.extend_from_slice(&text.as_bytes()[field_end..]);
    (original, billing)
}

/// Runs an install command once per test process, unless `marker` shows it
/// already ran; a failure fails every test that needs it.
pub fn installed(
    done: &'static std::sync::OnceLock<Result<(), String>>,
    marker: PathBuf,
    cmd: impl FnOnce() -> Command,
) {
    let result = done.get_or_init(|| {
        if marker.exists() {
            return Ok(());
        }
        let out = cmd()
            .output()
            .map_err(|e| format!("cannot run the installer: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    });
    if let Err(e) = result {
        panic!("installing test dependencies failed (needs the npm, PyPI or apt sources, and root for apt):\n{e}");
    }
}

/// `npm ci` in `dir` (a folder under tests/ with a package-lock.json), once.
pub fn npm_ready(
    done: &'static std::sync::OnceLock<Result<(), String>>,
    dir: &Path,
    package: &str,
) {
    let marker = dir.join("node_modules").join(package).join("package.json");
    let dir = dir.to_owned();
    installed(done, marker, move || {
        let mut c = Command::new("npm");
        c.args(["ci", "--no-audit", "--no-fund", "--prefix"])
            .arg(dir);
        c
    });
}

/// Runs a driver script and parses the one JSON line it prints last.
pub async fn drive(mut cmd: Command) -> simd_json::OwnedValue {
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no output; stderr:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    json(line.as_bytes())
}

/// One account's books, from SQLite: credits put in (opening balance and
/// top-ups, as the change feed records them), credits charged, the balance,
/// and credits still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Books {
    pub deposited: i64,
    pub charged: i64,
    pub balance: i64,
    pub held: i64,
}

impl Books {
    /// Every credit accounted for: what went in, less what was charged, is the balance.
    pub fn balance(&self) -> bool {
        self.deposited - self.charged == self.balance && self.held == 0
    }
}

/// The account's balance as the account API reports it: the server's
/// memory on one node, the database's on several (`None` while the API
/// refuses: too many polls, an unknown key).
pub async fn live_balance(server: &Server, key: &str) -> Option<i64> {
    use simd_json::prelude::*;
    let resp = client()
        .request(get(&server.url("/v1/account"), Some(key)))
        .await
        .unwrap();
    json(&body(resp).await).get_i64("balance")
}

/// Every account's books, by name, from the server's store (SQLite or PostgreSQL).
pub fn books(server: &Server) -> Vec<(String, Books)> {
    let sum = |table: &str, column: &str| {
        format!("(SELECT CAST(COALESCE(SUM({column}), 0) AS BIGINT) FROM {table} WHERE account_id = a.id)")
    };
    let rows = server.query(&format!(
        "SELECT a.name, {}, {}, a.balance, {} FROM accounts a ORDER BY a.name",
        sum("changes", "balance_delta"),
        sum("charges", "credits"),
        sum("holds", "credits")
    ));
    rows.iter()
        .map(|r| {
            let books = Books {
                deposited: r.get(1).unwrap(),
                charged: r.get(2).unwrap(),
                balance: r.get(3).unwrap(),
                held: r.get(4).unwrap(),
            };
            (r.get(0).unwrap(), books)
        })
        .collect()
}

/// Waits (up to 10 s) for the ledger writer until every account's books
/// balance and each account was charged what `charged` says (0 if not named).
pub async fn books_close(server: &Server, charged: &[(&str, i64)]) -> bool {
    let closed = eventually(Duration::from_secs(10), || async {
        books(server).iter().all(|(name, b)| {
            let want = charged.iter().find(|(n, _)| n == name).map_or(0, |c| c.1);
            b.balance() && b.charged == want
        })
    })
    .await;
    if !closed {
        eprintln!("books did not close: {:?}", books(server));
    }
    closed
}

/// A mail server on loopback (aiosmtpd, pinned in tests/smtp), installed on
/// first use; every message it takes is a JSON line in the returned file.
pub struct MailSink {
    pub child: std::process::Child,
    pub port: u16,
    pub file: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl MailSink {
    pub fn start() -> Self {
        static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        let smtp = repo_path("tests/smtp");
        let deps = smtp.join(".deps");
        installed(&DONE, deps.join("aiosmtpd"), || {
            let mut c = std::process::Command::new("python3");
            c.args(["-m", "pip", "install", "--quiet", "--no-deps", "--target"])
                .arg(&deps)
                .arg("-r")
                .arg(smtp.join("requirements.txt"));
            c
        });
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("mail.jsonl");
        let mut child = std::process::Command::new("python3")
            .arg(smtp.join("sink.py"))
            .arg(port.to_string())
            .arg(&file)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut ready,
        )
        .unwrap();
        assert_eq!(ready.trim(), "ready");
        Self {
            child,
            port,
            file,
            _dir: dir,
        }
    }

    pub fn messages(&self) -> Vec<simd_json::OwnedValue> {
        std::fs::read_to_string(&self.file)
            .unwrap_or_default()
            .lines()
            .map(|l| json(l.as_bytes()))
            .collect()
    }
}

impl Drop for MailSink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

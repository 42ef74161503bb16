//! The soak test's driver, run by `bash benches/soak.sh --minutes N`: the
//! mock fal (in this process, so that it outlives the proxy's SIGKILL), the
//! release binary in front of it on its own config and database, many
//! accounts and keys, and N minutes of mixed traffic over loopback: sync
//! flux calls, queue submit/status/result, answers over
//! `[billing] max_json_response_bytes`, 402s, 429s, upstream 5xx, stalled
//! clients, vanishing clients and silent held connections. Halfway it
//! SIGKILLs the proxy and restarts it on the same database; every minute it
//! prints the proxy's RSS and descriptors; at the end it waits for every
//! hold to settle, stops the proxy with SIGTERM and prints what it did.
//! The credits are reconciled from SQLite by `benches/soak.sh`, against
//! `expected.tsv` (each account's opening credits plus the top-ups made
//! here) written into `--dir`. Every loop ends by itself at the deadline.
//! Under `cargo test` (no `--bench`), it does nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abhiapi::mock_fal::MockFal;

#[path = "common/process.rs"]
mod process;
use parking_lot::Mutex;
use process::{free_port, release_binary};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A flux request: one 1024×1024 image, 28 credits at the config's prices.
const FLUX: &str = r#"{"prompt":"a red fox","image_size":"square_hd"}"#;
/// An answer of about 400 KB, over the config's 256 KiB `max_json_response_bytes`.
const LARGE: &str = r#"{"prompt":"a big fox","image_size":"square_hd","mock_result_bytes":400000}"#;
const ADMIN_TOKEN: &str = "soak-admin-token";
/// Load workers, each one request at a time on a new connection.
const WORKERS: usize = 32;
/// Silent connections kept open (each reopened when the server closes it).
const IDLE_HELD: usize = 300;
/// Stalled clients at most at once.
const STALLED_MAX: usize = 120;
const RICH: usize = 24;
const POOR: usize = 12;
const SLOW: usize = 8;

fn arg_text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

/// Requests made, by kind and outcome (a status code, or what the connection did).
#[derive(Default)]
struct Tally(Mutex<BTreeMap<(&'static str, String), u64>>);

impl Tally {
    fn add(&self, kind: &'static str, outcome: impl Into<String>) {
        *self.0.lock().entry((kind, outcome.into())).or_default() += 1;
    }
}

/// Connections this process has open to the proxy, now and at most.
#[derive(Default)]
struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
    total: AtomicU64,
}

struct Held<'a>(&'a Gauge);

impl Gauge {
    fn hold(&self) -> Held<'_> {
        let n = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        self.total.fetch_add(1, Ordering::Relaxed);
        Held(self)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.now.fetch_sub(1, Ordering::Relaxed);
    }
}

struct Shared {
    addr: SocketAddr,
    admin: SocketAddr,
    deadline: Instant,
    tally: Tally,
    conns: Gauge,
    rich: Vec<String>,
    poor: Vec<String>,
    slow: Vec<String>,
    stalled: tokio::sync::Semaphore,
}

/// xorshift64*: enough to mix the kinds, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, keys: &'a [String]) -> &'a str {
        &keys[self.below(keys.len())]
    }
}

fn post(path: &str, key: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn get(path: &str, key: &str) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn status_of(buf: &[u8]) -> Option<u16> {
    let line = buf.strip_prefix(b"HTTP/1.1 ")?;
    std::str::from_utf8(line.get(..3)?).ok()?.parse().ok()
}

/// One request on a new connection, the answer read to its end (the
/// request says `connection: close`): its status and raw bytes, or what
/// went wrong.
async fn exchange(s: &Shared, req: &[u8], limit: Duration) -> Result<(u16, Vec<u8>), String> {
    let work = async {
        let mut c = TcpStream::connect(s.addr)
            .await
            .map_err(|_| "connect_error".to_string())?;
        let _held = s.conns.hold();
        c.write_all(req)
            .await
            .map_err(|_| "write_error".to_string())?;
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 64 * 1024];
        loop {
            match c.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) if status_of(&buf).is_some() => break,
                Err(_) => return Err("reset".to_string()),
            }
        }
        match status_of(&buf) {
            Some(code) => Ok((code, buf)),
            None => Err("closed_without_answer".to_string()),
        }
    };
    tokio::time::timeout(limit, work)
        .await
        .unwrap_or_else(|_| Err("client_timeout".to_string()))
}

async fn call(s: &Shared, kind: &'static str, req: &[u8]) -> Option<(u16, Vec<u8>)> {
    match exchange(s, req, Duration::from_secs(40)).await {
        Ok((code, body)) => {
            s.tally.add(kind, code.to_string());
            Some((code, body))
        }
        Err(e) => {
            s.tally.add(kind, e);
            None
        }
    }
}

fn find_between<'a>(hay: &'a [u8], start: &str, end: u8) -> Option<&'a str> {
    let text = std::str::from_utf8(hay).ok()?;
    let at = text.find(start)? + start.len();
    let rest = &text[at..];
    Some(&rest[..rest.find(end as char)?])
}

/// Submit, poll until COMPLETED, fetch the result; one job in ten is never
/// fetched, for the reconciler to charge.
async fn queue_job(s: &Shared, key: &str, rng: &mut Rng) {
    let Some((200, body)) = call(
        s,
        "queue_submit",
        &post("/queue/fal-ai/flux/dev", key, FLUX),
    )
    .await
    else {
        return;
    };
    let Some(id) = find_between(&body, r#""request_id":""#, b'"').map(str::to_owned) else {
        s.tally.add("queue_submit", "no_request_id");
        return;
    };
    if rng.below(10) == 0 {
        s.tally.add("queue_abandoned", "left_to_reconciler");
        return;
    }
    let status = format!("/queue/fal-ai/flux/requests/{id}/status");
    for _ in 0..8 {
        match call(s, "queue_status", &get(&status, key)).await {
            Some((200, b)) if find_between(&b, r#""status":""#, b'"') == Some("COMPLETED") => {
                break;
            }
            Some(_) => tokio::time::sleep(Duration::from_millis(150)).await,
            None => return,
        }
    }
    call(
        s,
        "queue_result",
        &get(&format!("/queue/fal-ai/flux/requests/{id}"), key),
    )
    .await;
}

/// A client that sends the start of a request and goes silent, then waits
/// (bounded) for what the proxy does about it.
async fn stalled(s: Arc<Shared>, key: String, head_only: bool) {
    let Ok(_permit) = s.stalled.try_acquire() else {
        return;
    };
    let kind = if head_only {
        "stalled_head"
    } else {
        "stalled_body"
    };
    let Ok(mut c) = TcpStream::connect(s.addr).await else {
        s.tally.add(kind, "connect_error");
        return;
    };
    let _held = s.conns.hold();
    let part = if head_only {
        format!("POST /fal-ai/flux/dev HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\n")
    } else {
        format!("POST /fal-ai/flux/dev HTTP/1.1\r\nhost: 127.0.0.1\r\nx-api-key: {key}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"prompt\": \"")
    };
    if c.write_all(part.as_bytes()).await.is_err() {
        s.tally.add(kind, "write_error");
        return;
    }
    let mut buf = [0u8; 512];
    let outcome = match tokio::time::timeout(Duration::from_secs(50), c.read(&mut buf)).await {
        Err(_) => "still_open_after_50s".to_string(),
        Ok(Ok(0)) => "closed_by_proxy".to_string(),
        Ok(Ok(n)) => status_of(&buf[..n]).map_or("garbage".into(), |c| c.to_string()),
        Ok(Err(_)) => "reset".to_string(),
    };
    s.tally.add(kind, outcome);
}

/// A client that hangs up mid-request, in one of five places.
async fn vanishing(s: &Shared, rng: &mut Rng) {
    let key = rng.pick(&s.rich).to_owned();
    let (kind, req, after_ms, read_some): (&'static str, Vec<u8>, u64, bool) = match rng.below(5) {
        0 => {
            let mut r = post("/fal-ai/flux/dev", &key, FLUX);
            r.truncate(r.len() - FLUX.len() / 2);
            ("vanish_mid_body", r, 0, false)
        }
        1 => (
            "vanish_upstream_slow",
            post("/mock/slow/1500", &key, "{}"),
            100,
            false,
        ),
        2 => (
            "vanish_upstream_hang",
            post("/mock/hang", &key, "{}"),
            100,
            false,
        ),
        3 => (
            "vanish_queue_submit",
            post("/queue/fal-ai/flux/dev", &key, FLUX),
            0,
            false,
        ),
        _ => (
            "vanish_mid_large_answer",
            post("/fal-ai/flux/dev", &key, LARGE),
            0,
            true,
        ),
    };
    let Ok(mut c) = TcpStream::connect(s.addr).await else {
        s.tally.add(kind, "connect_error");
        return;
    };
    let _held = s.conns.hold();
    if c.write_all(&req).await.is_err() {
        s.tally.add(kind, "write_error");
        return;
    }
    tokio::time::sleep(Duration::from_millis(after_ms)).await;
    if read_some {
        let mut buf = [0u8; 1024];
        let _ = tokio::time::timeout(Duration::from_secs(10), c.read(&mut buf)).await;
    }
    s.tally.add(kind, "hung_up");
}

async fn worker(s: Arc<Shared>, seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    while Instant::now() < s.deadline {
        match rng.below(100) {
            0..=29 => {
                let k = rng.pick(&s.rich).to_owned();
                call(&s, "sync_flux", &post("/fal-ai/flux/dev", &k, FLUX)).await;
            }
            30..=44 => {
                let k = rng.pick(&s.rich).to_owned();
                queue_job(&s, &k, &mut rng).await;
            }
            45..=49 => {
                let k = rng.pick(&s.rich).to_owned();
                call(&s, "large_answer", &post("/fal-ai/flux/dev", &k, LARGE)).await;
            }
            50..=59 => {
                let k = rng.pick(&s.poor).to_owned();
                call(&s, "poor_account", &post("/fal-ai/flux/dev", &k, FLUX)).await;
            }
            60..=69 => {
                let k = rng.pick(&s.slow).to_owned();
                call(&s, "slow_plan", &post("/fal-ai/flux/dev", &k, FLUX)).await;
            }
            70..=77 => {
                let k = rng.pick(&s.rich).to_owned();
                let code = [500, 502, 503][rng.below(3)];
                let path = format!("/mock/status/{code}");
                call(&s, "upstream_5xx", &post(&path, &k, "{}")).await;
            }
            78..=81 => {
                let k = rng.pick(&s.rich).to_owned();
                call(&s, "upstream_slow", &post("/mock/slow/300", &k, "{}")).await;
            }
            82..=89 => {
                let k = rng.pick(&s.rich).to_owned();
                tokio::spawn(stalled(s.clone(), k, rng.below(2) == 0));
            }
            _ => vanishing(&s, &mut rng).await,
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A silent connection, reopened each time the proxy closes it, until the deadline.
async fn idle_holder(s: Arc<Shared>) {
    while Instant::now() < s.deadline {
        let Ok(mut c) = TcpStream::connect(s.addr).await else {
            s.tally.add("idle_held", "connect_error");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let _held = s.conns.hold();
        let left = s.deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 64];
        let outcome = match tokio::time::timeout(left, c.read(&mut buf)).await {
            Err(_) => "open_at_end",
            Ok(Ok(0)) => "closed_by_proxy",
            Ok(Ok(_)) => "answered",
            Ok(Err(_)) => "reset",
        };
        s.tally.add("idle_held", outcome);
    }
}

struct Proxy {
    child: Child,
}

fn cli(bin: &Path, config: &Path, args: &[&str]) -> String {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "abhiapi {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn start_proxy(bin: &Path, config: &Path, log: &Path) -> Proxy {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(config)
        .env("FAL_KEY", "soak:soak")
        .env("SOAK_ADMIN_TOKEN", ADMIN_TOKEN)
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    loop {
        let line = lines.next().expect("the proxy exited at start").unwrap();
        if line.starts_with("listening plain") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Proxy { child }
}

/// RSS and its anonymous part (the heap: RSS also counts the binary and
/// the hold journal's mapped segment), in MiB, and open descriptors.
fn rss_and_fds(pid: u32) -> (f64, f64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let mib = |field: &str| {
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(f64::NAN);
        kib / 1024.0
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (mib("VmRSS:"), mib("RssAnon:"), fds)
}

impl Tally {
    /// Queue jobs fal accepted so far: each stays in the proxy's memory for
    /// `keep_ended_jobs_days`.
    fn jobs(&self) -> u64 {
        self.0
            .lock()
            .get(&("queue_submit", "200".to_string()))
            .copied()
            .unwrap_or(0)
    }
}

/// `abhiapi_holds_outstanding` and `abhiapi_credits_held` from the admin listener.
async fn holds(admin: SocketAddr) -> Option<(i64, i64)> {
    let mut c = TcpStream::connect(admin).await.ok()?;
    let req = format!("GET /metrics HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {ADMIN_TOKEN}\r\nconnection: close\r\n\r\n");
    c.write_all(req.as_bytes()).await.ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    let gauge = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    Some((
        gauge("abhiapi_holds_outstanding")?,
        gauge("abhiapi_credits_held")?,
    ))
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let minutes: u64 = arg_text("--minutes")
        .and_then(|m| m.parse().ok())
        .unwrap_or(10)
        .clamp(1, 120);
    let dir = PathBuf::from(arg_text("--dir").expect("--dir DIR"));
    // `[queue] keep_ended_jobs_days`: 7 as by default; 0 forgets ended jobs
    // at each reconciler pass, to tell their memory from any other growth.
    let keep_days: u64 = arg_text("--keep-ended-jobs-days")
        .and_then(|d| d.parse().ok())
        .unwrap_or(7);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(soak(minutes, keep_days, &dir));
}

async fn soak(minutes: u64, keep_days: u64, dir: &Path) {
    let bin = release_binary();
    let mock = MockFal::start(None).await.unwrap();
    let (addr, admin) = (free_port(), free_port());
    let config = dir.join("abhiapi.toml");
    let db = dir.join("abhiapi.db");
    std::fs::write(
        &config,
        format!(
            r#"[server]
plain_listen = "{addr}"
shutdown_grace_secs = 20
[admin]
listen = "{admin}"
token_env = "SOAK_ADMIN_TOKEN"
[upstream]
run = "{mock}"
queue = "{mock}/_queue"
storage = "{mock}/_rest"
timeout_secs = 15
[store]
path = "{db}"
[queue]
reconcile_interval_secs = 5
keep_ended_jobs_days = {keep_days}
[limits]
max_keys_per_account = 20
[plans.free]
requests_per_minute = 1000000
[plans.soak]
requests_per_minute = 1000000
[plans.slow]
requests_per_minute = 6
burst = 2
account_requests_per_minute = 6
[billing]
max_json_response_bytes = 262144
[[pricing]]
model = "fal-ai/flux/dev"
unit = "megapixel"
usd = 0.025
[[pricing]]
model = "mock/*"
unit = "request"
usd = 0.001
"#,
            mock = mock.url(false),
            db = db.display()
        ),
    )
    .unwrap();

    // Accounts: rich (3 keys each), poor (100 credits: 3 flux calls, then
    // 402 until a top-up), slow (a plan of 6 a minute: 429s).
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let (mut rich, mut poor, mut slow) = (Vec::new(), Vec::new(), Vec::new());
    let key_of = |out: String| out.lines().last().unwrap().to_owned();
    let groups: [(&str, usize, usize, i64, &str); 3] = [
        ("rich", RICH, 3, 1_000_000_000, "soak"),
        ("poor", POOR, 1, 100, "soak"),
        ("slow", SLOW, 2, 1_000_000, "slow"),
    ];
    for (group, accounts, keys, credits, plan) in groups {
        for a in 0..accounts {
            let name = format!("{group}-{a:02}");
            expected.insert(name.clone(), credits);
            for _ in 0..keys {
                let c = credits.to_string();
                let args = [
                    "keys",
                    "create",
                    "--account",
                    &name,
                    "--credits",
                    &c,
                    "--plan",
                    plan,
                ];
                let key = key_of(cli(&bin, &config, &args));
                match group {
                    "rich" => rich.push(key),
                    "poor" => poor.push(key),
                    _ => slow.push(key),
                }
            }
        }
    }
    println!(
        "accounts: {RICH} rich ({} keys), {POOR} poor ({} keys, 100 credits), {SLOW} on a 6/min plan ({} keys)",
        rich.len(),
        poor.len(),
        slow.len()
    );

    let log = dir.join("abhiapi.log");
    let proxy = Arc::new(Mutex::new(start_proxy(&bin, &config, &log)));
    let pid = Arc::new(AtomicU32::new(proxy.lock().child.id()));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(minutes * 60);
    let shared = Arc::new(Shared {
        addr,
        admin,
        deadline,
        tally: Tally::default(),
        conns: Gauge::default(),
        rich,
        poor,
        slow,
        stalled: tokio::sync::Semaphore::new(STALLED_MAX),
    });

    let (rss, anon, fds) = rss_and_fds(pid.load(Ordering::Relaxed));
    println!("\n| minute | proxy pid | RSS MiB | of it anonymous | open fds | our open conns | conns opened so far | jobs accepted so far |\n| --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| start (idle) | {} | {rss:.1} | {anon:.1} | {fds} | 0 | 0 | 0 |",
        pid.load(Ordering::Relaxed)
    );

    let mut tasks = Vec::new();
    for i in 0..WORKERS {
        tasks.push(tokio::spawn(worker(shared.clone(), i as u64 + 1)));
    }
    for _ in 0..IDLE_HELD {
        tasks.push(tokio::spawn(idle_holder(shared.clone())));
    }

    // Every minute: RSS and descriptors; top-ups of three poor accounts;
    // halfway, SIGKILL and restart.
    let kill_at = minutes * 30;
    let mut killed = false;
    let mut restart_secs = 0.0;
    let mut topped = 0;
    for second in 1..=minutes * 60 {
        tokio::time::sleep_until((started + Duration::from_secs(second)).into()).await;
        if !killed && second >= kill_at {
            killed = true;
            let t = Instant::now();
            let mut p = proxy.lock();
            p.child.kill().unwrap(); // SIGKILL
            p.child.wait().unwrap();
            let old = pid.load(Ordering::Relaxed);
            *p = start_proxy(&bin, &config, &log);
            pid.store(p.child.id(), Ordering::Relaxed);
            restart_secs = t.elapsed().as_secs_f64();
            println!(
                "| {:.1} | SIGKILL {old}, restarted as {} in {restart_secs:.2} s | | | | | | |",
                second as f64 / 60.0,
                p.child.id()
            );
        }
        if second % 60 == 0 {
            let p = pid.load(Ordering::Relaxed);
            let (rss, anon, fds) = rss_and_fds(p);
            println!(
                "| {} | {p} | {rss:.1} | {anon:.1} | {fds} | {} | {} | {} |",
                second / 60,
                shared.conns.now.load(Ordering::Relaxed),
                shared.conns.total.load(Ordering::Relaxed),
                shared.tally.jobs()
            );
            for _ in 0..3 {
                let name = format!("poor-{:02}", topped % POOR);
                topped += 1;
                let (bin, config) = (bin.clone(), config.clone());
                let n = name.clone();
                tokio::task::spawn_blocking(move || {
                    cli(&bin, &config, &["accounts", "topup", &n, "--credits", "60"])
                })
                .await
                .unwrap();
                *expected.get_mut(&name).unwrap() += 60;
            }
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let (rss, anon, fds) = rss_and_fds(pid.load(Ordering::Relaxed));
    println!(
        "| end of load | {} | {rss:.1} | {anon:.1} | {fds} | {} | {} | {} |",
        pid.load(Ordering::Relaxed),
        shared.conns.now.load(Ordering::Relaxed),
        shared.conns.total.load(Ordering::Relaxed),
        shared.tally.jobs()
    );

    // Stalled clients still waiting are let go; then every hold must settle
    // (jobs nobody fetched are charged by the reconciler, hung upstream calls
    // time out): at most 120 s.
    let mut outstanding = None;
    for _ in 0..240 {
        outstanding = holds(shared.admin).await;
        if matches!(outstanding, Some((0, _))) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (rss, anon, fds) = rss_and_fds(pid.load(Ordering::Relaxed));
    println!(
        "| settled ({outstanding:?} holds, credits held) | {} | {rss:.1} | {anon:.1} | {fds} | {} | | |",
        pid.load(Ordering::Relaxed),
        shared.conns.now.load(Ordering::Relaxed)
    );

    // SIGTERM, and its exit (bounded).
    let p = pid.load(Ordering::Relaxed);
    // SAFETY: signalling our own child, which has not been waited for.
    unsafe { libc::kill(p as i32, libc::SIGTERM) };
    let t = Instant::now();
    let status = loop {
        if let Some(s) = proxy.lock().child.try_wait().unwrap() {
            break Some(s);
        }
        if t.elapsed() > Duration::from_secs(60) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    println!(
        "\nSIGTERM: exit {status:?} after {:.2} s",
        t.elapsed().as_secs_f64()
    );

    let tally = shared.tally.0.lock();
    let mut by_kind: BTreeMap<&str, Vec<(String, u64)>> = BTreeMap::new();
    for ((kind, outcome), n) in tally.iter() {
        by_kind.entry(kind).or_default().push((outcome.clone(), *n));
    }
    println!("\n| kind | total | by status or outcome |\n| --- | --- | --- |");
    let mut all = 0;
    for (kind, outcomes) in &by_kind {
        let total: u64 = outcomes.iter().map(|(_, n)| n).sum();
        all += total;
        let each: Vec<String> = outcomes.iter().map(|(o, n)| format!("{o}: {n}")).collect();
        println!("| {kind} | {total} | {} |", each.join(", "));
    }
    println!("| all | {all} | |");
    println!(
        "\nconnections: {} opened, at most {} open at once; SIGKILL + restart took {restart_secs:.2} s; {} top-ups of 60 credits",
        shared.conns.total.load(Ordering::Relaxed),
        shared.conns.peak.load(Ordering::Relaxed),
        topped
    );
    let tsv: String = expected
        .iter()
        .map(|(name, credits)| format!("{name}\t{credits}\n"))
        .collect();
    std::fs::write(dir.join("expected.tsv"), tsv).unwrap();
    if status.is_none() {
        let _ = proxy.lock().child.kill();
        eprintln!("the proxy did not exit within 60 s of SIGTERM");
        std::process::exit(1);
    }
    if !matches!(outstanding, Some((0, _))) {
        eprintln!("holds still outstanding before SIGTERM: {outstanding:?}");
    }
}

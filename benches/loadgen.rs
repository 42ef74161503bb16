//! The whole-proxy load benchmark, run by `bash benches/load.sh`. In one
//! run, on one machine, the same load against:
//!   (a) the mock fal directly (a canned flux answer),
//!   (b) AbhiAPI in front of it, everything on: key check, rate limit (a
//!       plan too high to deny), hold, settle, `_billing` splice, ledger,
//!       one log line per request,
//!   (c) nginx `proxy_pass` with upstream keepalive, no auth, no billing,
//!   (d) fal's own Node proxy, and, with `--baseline PATH`, (b0) another
//!       AbhiAPI binary, for a before/after measured in the same run,
//!   (r) a bare hyper reverse proxy threaded as AbhiAPI is (`reference`):
//!       the floor of our own cost,
//! over HTTP/1.1, h2c, and HTTP/1.1 and h2 over TLS (the repository's
//! development certificate; nginx terminates TLS with the same one):
//! closed-loop throughput and p50/p99/p99.9 latency,
//! CPU time per request of the proxy, a fixed-rate run for the latency AbhiAPI
//! adds, and 1 GiB streamed each way with AbhiAPI's peak memory.
//! Under `cargo test` (no `--bench`), it does nothing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use abhiapi::mock_fal::MockFal;

#[path = "common/process.rs"]
mod process;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use process::{free_port, release_binary};
use tokio::net::TcpStream;

mod common;
mod reference;

use common::FLUX;

fn arg_text(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).cloned()
}

fn arg(name: &str, default: u64) -> u64 {
    arg_text(name)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How a client talks to a target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2c,
    TlsH1,
    TlsH2,
}

impl Proto {
    const ALL: [Proto; 4] = [Proto::H1, Proto::H2c, Proto::TlsH1, Proto::TlsH2];

    fn label(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2c => "h2c",
            Proto::TlsH1 => "TLS HTTP/1.1",
            Proto::TlsH2 => "TLS h2",
        }
    }

    fn h2(self) -> bool {
        matches!(self, Proto::H2c | Proto::TlsH2)
    }

    fn tls(self) -> bool {
        matches!(self, Proto::TlsH1 | Proto::TlsH2)
    }

    /// Where `t` speaks it, if it does.
    fn addr(self, t: &Target) -> Option<SocketAddr> {
        match self {
            Proto::H1 => Some(t.h1),
            Proto::H2c => t.h2,
            Proto::TlsH1 | Proto::TlsH2 => t.tls,
        }
    }
}

/// The client side of TLS: the repository's development CA, ALPN as asked.
fn tls_connector(h2: bool) -> tokio_rustls::TlsConnector {
    let ca = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.pem");
    let mut config = (*abhiapi::tls::client_config(Some(&ca)).unwrap()).clone();
    config.alpn_protocols = vec![if h2 {
        b"h2".to_vec()
    } else {
        b"http/1.1".to_vec()
    }];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// One client connection, either protocol.
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

impl Conn {
    async fn open(addr: SocketAddr, proto: Proto) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        // Without it, h2's separate HEADERS and DATA writes wait on delayed ACKs (~40 ms).
        stream.set_nodelay(true).unwrap();
        if proto.tls() {
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            let tls = tls_connector(proto.h2())
                .connect(name, stream)
                .await
                .unwrap();
            Self::handshake(TokioIo::new(tls), proto.h2()).await
        } else {
            Self::handshake(TokioIo::new(stream), proto.h2()).await
        }
    }

    async fn handshake<I>(io: I, h2: bool) -> Conn
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        if h2 {
            let (send, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .unwrap();
            tokio::spawn(conn);
            Conn::H2(send)
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Conn::H1(send)
        }
    }

    /// Sends one request and reads the whole answer; true on a 2xx.
    async fn call(&mut self, req: Request<Full<Bytes>>) -> bool {
        let resp = match self {
            Conn::H1(s) => {
                let _ = s.ready().await;
                s.send_request(req).await
            }
            Conn::H2(s) => s.send_request(req).await,
        };
        match resp {
            Ok(r) => {
                let ok = r.status().is_success();
                ok && r.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        }
    }
}

#[derive(Clone)]
struct Target {
    name: &'static str,
    h1: SocketAddr,
    /// None where the target speaks no h2c.
    h2: Option<SocketAddr>,
    /// HTTP/1.1 and h2 over TLS, by ALPN; None where not measured.
    tls: Option<SocketAddr>,
    path: &'static str,
    key: Option<String>,
    /// fal's proxy protocol: where the proxy is to send the request.
    target_url: Option<String>,
    /// The processes whose CPU time is the proxy's.
    pids: Vec<u32>,
    /// More nodes of the same proxy (plain HTTP/1.1): connections are dealt
    /// round `h1` and these.
    more: Vec<SocketAddr>,
}

impl Target {
    fn request(&self, addr: SocketAddr, proto: Proto) -> Request<Full<Bytes>> {
        let scheme = if proto.tls() { "https" } else { "http" };
        let mut b = Request::post(format!("{scheme}://{addr}{}", self.path))
            .header("content-type", "application/json");
        // A bare HTTP/1.1 connection adds no Host, and nginx requires one; h2 has :authority.
        if !proto.h2() {
            b = b.header("host", addr.to_string());
        }
        if let Some(k) = &self.key {
            b = b.header("x-api-key", k);
        }
        if let Some(url) = &self.target_url {
            b = b.header("x-fal-target-url", url);
        }
        b.body(Full::new(Bytes::from_static(FLUX.as_bytes())))
            .unwrap()
    }
}

struct Run {
    ok: u64,
    errors: u64,
    secs: f64,
    latencies_us: Vec<u32>,
    cpu_secs: Option<f64>,
}

impl Run {
    fn percentile(&self, p: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.latencies_us.len() as f64 * p).ceil() as usize)
            .clamp(1, self.latencies_us.len());
        self.latencies_us[i - 1] as f64 / 1000.0
    }

    fn rps(&self) -> f64 {
        self.ok as f64 / self.secs
    }
}

/// CPU seconds (user + system) used so far by `pids`.
fn cpu_secs(pids: &[u32]) -> f64 {
    let ticks = 100.0; // sysconf(_SC_CLK_TCK) on Linux
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|stat| {
            let after = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            let (u, s): (f64, f64) = (f[11].parse().unwrap_or(0.0), f[12].parse().unwrap_or(0.0));
            (u + s) / ticks
        })
        .sum()
}

/// `conns` connections, each sending its next request as soon as the last is answered.
async fn closed_loop(t: &Target, proto: Proto, conns: u64, secs: u64) -> Run {
    let first = proto.addr(t).unwrap();
    let nodes: Vec<SocketAddr> = std::iter::once(first)
        .chain(t.more.iter().copied().filter(|_| proto == Proto::H1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let cpu_before = cpu_secs(&t.pids);
    let start = Instant::now();
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let t = t.clone();
            let addr = nodes[i as usize % nodes.len()];
            tokio::spawn(async move {
                let mut conn = Conn::open(addr, proto).await;
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    if conn.call(t.request(addr, proto)).await {
                        lat.push(sent.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                        conn = Conn::open(addr, proto).await;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    collect(tasks, start, &t.pids, cpu_before).await
}

/// One request every `1/rate` seconds, spread over `conns` connections.
async fn fixed_rate(t: &Target, rate: u64, conns: u64, secs: u64) -> Run {
    let addr = t.h1;
    let cpu_before = cpu_secs(&t.pids);
    let start = Instant::now();
    let per_conn = Duration::from_secs_f64(conns as f64 / rate as f64);
    let tasks: Vec<_> = (0..conns)
        .map(|i| {
            let t = t.clone();
            tokio::spawn(async move {
                let mut conn = Conn::open(addr, Proto::H1).await;
                let first = tokio::time::Instant::now() + per_conn.mul_f64(i as f64 / conns as f64);
                let mut tick = tokio::time::interval_at(first, per_conn);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                let n = (secs as f64 / per_conn.as_secs_f64()) as u64;
                for _ in 0..n {
                    tick.tick().await;
                    let sent = Instant::now();
                    if conn.call(t.request(addr, Proto::H1)).await {
                        lat.push(sent.elapsed().as_micros() as u32);
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    collect(tasks, start, &t.pids, cpu_before).await
}

async fn collect(
    tasks: Vec<tokio::task::JoinHandle<(Vec<u32>, u64)>>,
    start: Instant,
    pids: &[u32],
    cpu_before: f64,
) -> Run {
    let mut run = Run {
        ok: 0,
        errors: 0,
        secs: 0.0,
        latencies_us: Vec::new(),
        cpu_secs: None,
    };
    for task in tasks {
        let (lat, errors) = task.await.unwrap();
        run.ok += lat.len() as u64;
        run.errors += errors;
        run.latencies_us.extend(lat);
    }
    run.secs = start.elapsed().as_secs_f64();
    run.latencies_us.sort_unstable();
    if !pids.is_empty() {
        run.cpu_secs = Some(cpu_secs(pids) - cpu_before);
    }
    run
}

/// Starts AbhiAPI (`bin`) in front of `mock`; returns it, its plain and its
/// TLS address, and a key.
fn start_abhiapi(
    bin: &Path,
    dir: &Path,
    mock: &MockFal,
) -> (Child, SocketAddr, SocketAddr, String) {
    start_node(bin, dir, mock, None)
}

/// [`start_abhiapi`], as node `node` of a PostgreSQL at `url` when given.
fn start_node(
    bin: &Path,
    dir: &Path,
    mock: &MockFal,
    postgres: Option<(&str, &str)>,
) -> (Child, SocketAddr, SocketAddr, String) {
    let config = dir.join("abhiapi.toml");
    let mut toml = common::config_toml(mock, &dir.join("abhiapi.db"));
    if let Some((url, node)) = postgres {
        toml = toml.replace("[store]\n", &format!("[store]\nurl = {url:?}\n"));
        toml.push_str(&format!("[cluster]\nnode = {node:?}\n"));
    }
    // `--fsync`: every AbhiAPI started runs with `[store] fsync = true`.
    if std::env::args().any(|a| a == "--fsync") {
        toml = toml.replace("[store]\n", "[store]\nfsync = true\n");
    }
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    toml = toml.replace(
        "[server]\n",
        &format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\n",
            certs.join("dev-cert.pem").display().to_string(),
            certs.join("dev-key.pem").display().to_string()
        ),
    );
    std::fs::write(&config, toml).unwrap();
    let out = Command::new(bin)
        .args(["--config"])
        .arg(&config)
        .args([
            "keys",
            "create",
            "--account",
            "bench",
            "--credits",
            "1000000000000",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run benches/load.sh, which builds it)",
                bin.display()
            )
        });
    let key = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_owned();
    let mut child = Command::new(bin)
        .args(["serve", "--config"])
        .arg(&config)
        .env("FAL_KEY", "bench:bench")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("abhiapi.log")).unwrap())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let (mut plain, mut tls) = (None, None);
    while plain.is_none() || tls.is_none() {
        let line = lines.next().unwrap().unwrap();
        if let Some(a) = line.strip_prefix("listening plain http://") {
            plain = Some(a.parse().unwrap());
        }
        if let Some(a) = line.strip_prefix("listening tls https://") {
            tls = Some(a.parse().unwrap());
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    (child, plain.unwrap(), tls.unwrap(), key)
}

/// The bare hyper proxy (`reference`) in front of `mock`, as a child
/// process; returns it, its plain and its TLS address.
fn start_reference(mock: SocketAddr) -> (Child, SocketAddr, SocketAddr) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--hyper-reference", &mock.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let line = lines.next().unwrap().unwrap();
    let mut addrs = line.strip_prefix("listening ").unwrap().split(' ');
    let mut next = || addrs.next().unwrap().parse().unwrap();
    let (plain, tls) = (next(), next());
    (child, plain, tls)
}

/// nginx with keepalive to the mock, on an h1, an h2c and a TLS port (the
/// development certificate, h2 and HTTP/1.1 by ALPN); returns its pids.
fn start_nginx(
    dir: &Path,
    mock: SocketAddr,
    h1: SocketAddr,
    h2: SocketAddr,
    tls: SocketAddr,
) -> Option<(Child, Vec<u32>)> {
    let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let (cert, key) = (certs.join("dev-cert.pem"), certs.join("dev-key.pem"));
    let (cert, key) = (cert.display(), key.display());
    let nginx = ["/usr/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.exists())?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    let upstream =
        "proxy_pass http://mock; proxy_http_version 1.1; proxy_set_header Connection \"\";";
    // Streamed both ways, as AbhiAPI streams them, and of any size.
    let location = format!(
        "location / {{ {upstream} }}
  location /mock/ {{ {upstream} proxy_request_buffering off; proxy_buffering off; client_max_body_size 0; }}
  location /_rest/ {{ {upstream} proxy_request_buffering off; proxy_buffering off; client_max_body_size 0; }}"
    );
    std::fs::write(
        &conf,
        format!(
            "worker_processes 2; daemon off; pid {d}/nginx.pid; error_log {d}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  # As AbhiAPI and the hyper reference: a client connection is never closed
  # after some number of requests (nginx's default, 1,000, cut the load
  # generator's connections mid-request, counted as errors; its upstream
  # connections likewise).
  keepalive_requests 100000000;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  upstream mock {{ server {mock}; keepalive 256; keepalive_requests 100000000; }}
  server {{ listen {h1}; {location} }}
  server {{ listen {h2} http2; {location} }}
  server {{ listen {tls} ssl http2; ssl_certificate {cert}; ssl_certificate_key {key}; {location} }}
}}
"
        ),
    )
    .unwrap();
    // Its workers must not hold our stdout: a pipe reading it would never end.
    let child = Command::new(nginx)
        .arg("-c")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(500));
    let master = child.id();
    let mut pids = vec![master];
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        let after: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if after.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(master) {
            pids.push(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    Some((child, pids))
}

/// fal's own Node proxy (benches/fal-proxy) in front of `mock`, where
/// node and its installed packages are there.
fn start_fal_proxy(mock: &MockFal) -> Option<(Child, SocketAddr)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/fal-proxy");
    if !dir.join("node_modules").exists() {
        return None;
    }
    let mut child = Command::new("node")
        .arg("server.mjs")
        .arg(mock.addr.port().to_string())
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take()?));
    let port: u16 = lines
        .next()?
        .ok()?
        .strip_prefix("listening ")?
        .parse()
        .ok()?;
    std::thread::spawn(move || lines.for_each(drop));
    Some((child, SocketAddr::from(([127, 0, 0, 1], port))))
}

fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    kib / 1024.0
}

/// Streams `bytes` down from `/mock/stream/` and up to fal's storage (the
/// mock's `/_rest/`, which counts the bytes; through AbhiAPI, its unbilled
/// `/api/fal/proxy` route: a billed route reads its body); MiB/s each way.
async fn stream(addr: SocketAddr, key: Option<&str>, bytes: u64) -> (f64, f64) {
    let mut conn = Conn::open(addr, Proto::H1).await;
    let mut down =
        Request::get(format!("http://{addr}/mock/stream/{bytes}")).header("host", addr.to_string());
    let storage = "/storage/upload/initiate?storage_type=fal-cdn-v3";
    let mut up = match key {
        Some(k) => Request::post(format!("http://{addr}/api/fal/proxy"))
            .header("x-api-key", k)
            .header("x-fal-target-url", format!("https://rest.fal.ai{storage}")),
        None => Request::post(format!("http://{addr}/_rest{storage}")),
    };
    up = up
        .header("host", addr.to_string())
        .header("content-type", "application/octet-stream");
    if let Some(k) = key {
        down = down.header("x-api-key", k);
    }
    let start = Instant::now();
    assert!(
        conn.call(down.body(Full::default()).unwrap()).await,
        "download failed"
    );
    let down_rate = bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    let upload = TcpStream::connect(addr).await.unwrap();
    upload.set_nodelay(true).unwrap();
    let (mut send, c) = hyper::client::conn::http1::handshake(TokioIo::new(upload))
        .await
        .unwrap();
    tokio::spawn(c);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; 1 << 20]);
        for _ in 0..(bytes >> 20) {
            if tx.send(chunk.clone()).await.is_err() {
                return;
            }
        }
    });
    let start = Instant::now();
    let resp = send
        .send_request(up.body(abhiapi::mock_fal::ChannelBody(rx)).unwrap())
        .await
        .unwrap();
    assert!(resp.status().is_success(), "upload failed");
    resp.into_body().collect().await.unwrap();
    let up_rate = bytes as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64();
    (down_rate, up_rate)
}

fn row(round: u64, name: &str, proto: &str, run: &Run) {
    let cpu = run.cpu_secs.map_or("n/a".into(), |c| {
        format!("{:.1}", c * 1e6 / run.ok.max(1) as f64)
    });
    println!(
        "| {round} | {name} | {proto} | {:.0} | {:.3} | {:.3} | {:.3} | {cpu} | {} |",
        run.rps(),
        run.percentile(0.50),
        run.percentile(0.99),
        run.percentile(0.999),
        run.errors
    );
}

/// The median of `values` (the lower middle one for an even count).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[(values.len() - 1) / 2]
}

/// `values` as `1.23, 1.31 → median 1.27`.
fn spread(values: Vec<f64>) -> String {
    let each: Vec<String> = values.iter().map(|v| format!("{v:.2}")).collect();
    format!("{} → median {:.2}", each.join(", "), median(values))
}

fn main() {
    if let Some(upstream) = arg_text("--hyper-reference") {
        return reference::run(upstream.parse().expect("--hyper-reference ADDR"));
    }
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test` builds and runs bench targets: nothing to do here.
    }
    let secs = arg("--secs", 5);
    let conns = arg("--conns", 32);
    let rate = arg("--rate", 1000);
    let stream_mib = arg("--stream-mib", 1024);
    // Rounds of the closed loop, each target in turn: a ratio is taken
    // within a round, so that a slow spell of the machine hits both sides.
    let rounds = arg("--rounds", 3).max(1);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let mock = MockFal::start(None).await.unwrap();
        let (mut proxy, proxy_addr, proxy_tls, key) = start_abhiapi(&release_binary(), dir.path(), &mock);
        let direct = Target { name: "a direct", h1: mock.addr, h2: Some(mock.addr), tls: None, path: "/mock/canned", key: None, target_url: None, pids: vec![], more: vec![] };
        let abhiapi = Target { name: "b abhiapi", h1: proxy_addr, h2: Some(proxy_addr), tls: Some(proxy_tls), path: "/mock/canned", key: Some(key.clone()), target_url: None, pids: vec![proxy.id()], more: vec![] };
        let (nginx_h1, nginx_h2, nginx_tls) = (free_port(), free_port(), free_port());
        let nginx = start_nginx(dir.path(), mock.addr, nginx_h1, nginx_h2, nginx_tls);
        let (mut hyper_ref, hyper_addr, hyper_tls) = start_reference(mock.addr);
        let reference = Target { name: "r hyper", h1: hyper_addr, h2: Some(hyper_addr), tls: Some(hyper_tls), path: "/mock/canned", key: None, target_url: None, pids: vec![hyper_ref.id()], more: vec![] };
        let mut targets = vec![direct.clone(), abhiapi.clone(), reference];
        if let Some((_, pids)) = &nginx {
            targets.push(Target { name: "c nginx", h1: nginx_h1, h2: Some(nginx_h2), tls: Some(nginx_tls), path: "/mock/canned", key: None, target_url: None, pids: pids.clone(), more: vec![] });
        }
        // An earlier build of AbhiAPI beside this one, for a before/after in one run.
        let baseline_dir = tempfile::tempdir().unwrap();
        let baseline = arg_text("--baseline").map(|bin| start_abhiapi(Path::new(&bin), baseline_dir.path(), &mock));
        if let Some((child, addr, tls, key)) = &baseline {
            targets.push(Target { name: "b0 baseline", h1: *addr, h2: Some(*addr), tls: Some(*tls), path: "/mock/canned", key: Some(key.clone()), target_url: None, pids: vec![child.id()], more: vec![] });
        }
        // `--postgres-url URL`: AbhiAPI on PostgreSQL too, as 1, 2 and 3
        // nodes of one database (plain HTTP/1.1), beside SQLite's `b`.
        let pg_dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
        let pg_nodes: Vec<_> = match arg_text("--postgres-url") {
            Some(url) => pg_dirs
                .iter()
                .enumerate()
                .map(|(i, d)| start_node(&release_binary(), d.path(), &mock, Some((&url, &format!("node-{i}")))))
                .collect(),
            None => Vec::new(),
        };
        for (n, name) in [(1, "p1 postgres"), (2, "p2 postgres"), (3, "p3 postgres")] {
            let Some(nodes) = pg_nodes.get(..n) else { break };
            targets.push(Target {
                name,
                h1: nodes[0].1,
                h2: None,
                tls: None,
                path: "/mock/canned",
                key: Some(nodes[0].3.clone()),
                target_url: None,
                pids: nodes.iter().map(|node| node.0.id()).collect(),
                more: nodes[1..].iter().map(|node| node.1).collect(),
            });
        }
        let fal_proxy = start_fal_proxy(&mock);
        if let Some((child, addr)) = &fal_proxy {
            let target_url = Some(format!("{}/mock/canned", mock.url(false)));
            targets.push(Target { name: "d fal server-proxy", h1: *addr, h2: None, tls: None, path: "/api/fal/proxy", key: None, target_url, pids: vec![child.id()], more: vec![] });
        }

        println!("## Closed loop: {conns} connections, {secs} s each, {rounds} rounds\n");
        println!("| round | target | protocol | requests/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/request | errors |");
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut results = Vec::new();
        // `--fixed-only`: the latency figures alone, for a quick before/after.
        let fixed_only = std::env::args().any(|a| a == "--fixed-only");
        let rounds = if fixed_only { 0 } else { rounds };
        for round in 1..=rounds {
            // Each round starts one target later: no target always follows the same one.
            let mut order = targets.clone();
            order.rotate_left((round as usize - 1) % targets.len());
            for proto in Proto::ALL {
                for t in order.iter().filter(|t| proto.addr(t).is_some()) {
                    let _ = closed_loop(t, proto, conns, 1).await; // warm-up
                    let run = closed_loop(t, proto, conns, secs).await;
                    row(round, t.name, proto.label(), &run);
                    results.push((round, t.name, proto, run));
                }
            }
        }
        // One figure per round for `name` over `reference`, where both ran.
        let ratios = |name: &str, reference: &str, h2: Proto, figure: fn(&Run) -> Option<f64>| -> Vec<f64> {
            (1..=rounds)
                .filter_map(|round| {
                    let of = |n: &str| results.iter().find(|r| r.0 == round && r.1 == n && r.2 == h2).and_then(|r| figure(&r.3));
                    Some(of(name)? / of(reference)?)
                })
                .collect()
        };
        let rps: fn(&Run) -> Option<f64> = |r| Some(r.rps());
        let cpu: fn(&Run) -> Option<f64> = |r| Some(r.cpu_secs? / r.ok.max(1) as f64);
        println!();
        for h2 in Proto::ALL.into_iter().filter(|_| !fixed_only) {
            let proto = h2.label();
            if h2.addr(&direct).is_some() {
                println!("{proto}: throughput b/a = {}", spread(ratios("b abhiapi", "a direct", h2, rps)));
            }
            println!("{proto}: throughput b/r (AbhiAPI over the bare hyper proxy) = {}", spread(ratios("b abhiapi", "r hyper", h2, rps)));
            println!("{proto}: CPU per request b/r = {}", spread(ratios("b abhiapi", "r hyper", h2, cpu)));
            if let r @ [_, ..] = ratios("r hyper", "c nginx", h2, rps).as_slice() {
                println!("{proto}: throughput r/c (the bare hyper proxy over nginx) = {}", spread(r.to_vec()));
            }
            match ratios("b abhiapi", "c nginx", h2, rps) {
                r if r.is_empty() => println!("{proto}: throughput b/c = n/a (nginx not installed)"),
                r => println!("{proto}: throughput b/c = {}", spread(r)),
            }
            match ratios("b abhiapi", "d fal server-proxy", h2, rps) {
                r if !r.is_empty() => println!("{proto}: throughput b/d = {}", spread(r)),
                _ if h2 != Proto::H1 => println!("{proto}: throughput b/d = n/a (fal's Node proxy measured over plain HTTP/1.1 only)"),
                _ => println!("{proto}: throughput b/d = n/a (run npm ci in benches/fal-proxy)"),
            }
            // The steadier figure on a shared machine: what each proxy spends per request.
            let cpu_ratio = ratios("b abhiapi", "c nginx", h2, cpu);
            if !cpu_ratio.is_empty() {
                println!("{proto}: CPU per request b/c = {}", spread(cpu_ratio));
            }
            if baseline.is_some() {
                println!("{proto}: CPU per request b/b0 (this build over the baseline) = {}", spread(ratios("b abhiapi", "b0 baseline", h2, cpu)));
                println!("{proto}: throughput b/b0 = {}", spread(ratios("b abhiapi", "b0 baseline", h2, rps)));
            }
            if h2 == Proto::H1 && !pg_nodes.is_empty() {
                let p50: fn(&Run) -> Option<f64> = |r| Some(r.percentile(0.50));
                let p99: fn(&Run) -> Option<f64> = |r| Some(r.percentile(0.99));
                println!("{proto}: CPU per request p1/b (PostgreSQL over SQLite, one node) = {}", spread(ratios("p1 postgres", "b abhiapi", h2, cpu)));
                println!("{proto}: throughput p1/b = {}", spread(ratios("p1 postgres", "b abhiapi", h2, rps)));
                println!("{proto}: p50 latency p1/b = {}", spread(ratios("p1 postgres", "b abhiapi", h2, p50)));
                println!("{proto}: p99 latency p1/b = {}", spread(ratios("p1 postgres", "b abhiapi", h2, p99)));
                println!("{proto}: throughput p2/p1 (two nodes over one, same 2 cores) = {}", spread(ratios("p2 postgres", "p1 postgres", h2, rps)));
                println!("{proto}: throughput p3/p1 = {}", spread(ratios("p3 postgres", "p1 postgres", h2, rps)));
            }
        }

        println!("\n## Fixed rate: {rate} requests/s over HTTP/1.1, {secs} s\n");
        let a = fixed_rate(&direct, rate, conns, secs).await;
        let b = fixed_rate(&abhiapi, rate, conns, secs).await;
        let b0 = match targets.iter().find(|t| t.name == "b0 baseline") {
            Some(t) => Some(fixed_rate(t, rate, conns, secs).await),
            None => None,
        };
        println!("| target | achieved requests/s | p50 ms | p99 ms | p99.9 ms | errors |\n| --- | --- | --- | --- | --- | --- |");
        for (name, run) in [("a direct", Some(&a)), ("b abhiapi", Some(&b)), ("b0 baseline", b0.as_ref())] {
            let Some(run) = run else { continue };
            println!("| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {} |", run.rps(), run.percentile(0.5), run.percentile(0.99), run.percentile(0.999), run.errors);
        }
        println!("\np99 added by AbhiAPI at {rate}/s: {:.3} ms", b.percentile(0.99) - a.percentile(0.99));
        if let Some(b0) = &b0 {
            println!("p99 added by the baseline at {rate}/s: {:.3} ms", b0.percentile(0.99) - a.percentile(0.99));
        }

        let _ = proxy.kill();
        if !fixed_only {
            // Streaming, against a fresh proxy so its peak memory is the streaming's own.
            let sdir = tempfile::tempdir().unwrap();
            let (mut sproxy, saddr, _, skey) = start_abhiapi(&release_binary(), sdir.path(), &mock);
            let bytes = stream_mib << 20;
            // Best of three rounds, interleaved: one transfer is at the mercy of whatever else the machine does.
            let mut best = [(0f64, 0f64); 3];
            for _ in 0..3 {
                let mut targets = vec![(mock.addr, None), (saddr, Some(skey.as_str()))];
                if nginx.is_some() {
                    targets.push((nginx_h1, None));
                }
                for (i, (addr, key)) in targets.into_iter().enumerate() {
                    let (down, up) = stream(addr, key, bytes).await;
                    best[i] = (best[i].0.max(down), best[i].1.max(up));
                }
            }
            let [(direct_down, direct_up), (proxy_down, proxy_up), nginx_best] = best;
            // nginx moves the same bytes: what copying them through any proxy costs on this machine.
            let nginx_rates = nginx.as_ref().map(|_| nginx_best);
            println!("\n## Streaming {stream_mib} MiB\n");
            println!("| direction | direct MiB/s | through AbhiAPI MiB/s | b/a | through nginx MiB/s | c/a |\n| --- | --- | --- | --- | --- | --- |");
            let nginx_cells = |rate: Option<f64>, direct: f64| match rate {
                Some(r) => format!("{r:.0} | {:.2}", r / direct),
                None => "n/a | n/a".to_owned(),
            };
            println!("| download | {direct_down:.0} | {proxy_down:.0} | {:.2} | {} |", proxy_down / direct_down, nginx_cells(nginx_rates.map(|r| r.0), direct_down));
            println!("| upload | {direct_up:.0} | {proxy_up:.0} | {:.2} | {} |", proxy_up / direct_up, nginx_cells(nginx_rates.map(|r| r.1), direct_up));
            println!("\nAbhiAPI peak RSS while streaming: {:.1} MiB", peak_rss_mib(sproxy.id()));
            let _ = sproxy.kill();
        }
        let _ = hyper_ref.kill();
        for (mut node, _, _, _) in pg_nodes {
            let _ = node.kill();
        }
        if let Some((mut b0, _, _, _)) = baseline {
            let _ = b0.kill();
        }
        if let Some((mut d, _)) = fal_proxy {
            let _ = d.kill();
        }
        if let Some((mut n, _)) = nginx {
            // TERM, not KILL: the master takes its workers down with it.
            let _ = Command::new("kill").arg(n.id().to_string()).status();
            let _ = n.wait();
        }
    });
}

//! A throwaway PostgreSQL for the tests: Debian's `postgresql` package
//! (installed on first use, as the browser is), `initdb` into a temporary
//! folder, one server per test process on a loopback port, run as an
//! unprivileged user (PostgreSQL refuses root) and killed with the process,
//! its folder removed after it. Each test gets a database of its own.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The user PostgreSQL runs as when the tests run as root (Debian's
/// package creates it).
const SYSTEM_USER: &str = "postgres";

struct Cluster {
    port: u16,
    user: String,
}

static CLUSTER: OnceLock<Result<Cluster, String>> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(0);

/// A fresh, empty database on the tests' PostgreSQL; its `postgres://` URL.
pub fn database() -> String {
    // PostgreSQL's blocking client refuses a thread that runs async tasks.
    std::thread::spawn(create).join().unwrap()
}

fn create() -> String {
    let cluster = CLUSTER
        .get_or_init(start)
        .as_ref()
        .unwrap_or_else(|e| panic!("no PostgreSQL for the tests: {e}"));
    let name = format!(
        "t{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let url = cluster.url("postgres");
    // Listening comes a moment before accepting sessions.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admin = loop {
        match postgres::Client::connect(&url, postgres::NoTls) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("PostgreSQL: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    cluster.url(&name)
}

impl Cluster {
    fn url(&self, db: &str) -> String {
        format!("postgres://{}@127.0.0.1:{}/{db}", self.user, self.port)
    }
}

fn bin_dir() -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists())
        .collect();
    dirs.sort();
    dirs.pop()
}

fn install() -> Result<PathBuf, String> {
    if let Some(dir) = bin_dir() {
        return Ok(dir);
    }
    let status = Command::new("sh")
        .args([
            "-c",
            "(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >&2",
        ])
        .status()
        .map_err(|e| format!("cannot run apt-get: {e}"))?;
    if !status.success() {
        return Err("apt-get install postgresql failed (needs root and Debian's sources)".into());
    }
    bin_dir().ok_or_else(|| "postgresql installed, but no initdb under /usr/lib/postgresql".into())
}

/// The uid and gid to run as: our own, or [`SYSTEM_USER`]'s when we are root.
fn identity() -> Result<(u32, u32, String), String> {
    // SAFETY: plain system calls.
    let uid = unsafe { libc::getuid() };
    if uid != 0 {
        let name = std::env::var("USER").unwrap_or_else(|_| "postgres".into());
        return Ok((uid, unsafe { libc::getgid() }, name));
    }
    let out = Command::new("id")
        .args(["-u", SYSTEM_USER])
        .output()
        .map_err(|e| e.to_string())?;
    let gid = Command::new("id")
        .args(["-g", SYSTEM_USER])
        .output()
        .map_err(|e| e.to_string())?;
    let parse = |o: &[u8]| String::from_utf8_lossy(o).trim().parse::<u32>().ok();
    match (parse(&out.stdout), parse(&gid.stdout)) {
        (Some(u), Some(g)) => Ok((u, g, SYSTEM_USER.into())),
        _ => Err(format!("no {SYSTEM_USER} user to run PostgreSQL as")),
    }
}

fn as_user(cmd: &mut Command, uid: u32, gid: u32) {
    // SAFETY: only async-signal-safe calls between fork and exec. The
    // parent-death signal is set after setuid, which clears it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::getuid() != uid && (libc::setgid(gid) != 0 || libc::setuid(uid) != 0) {
                return Err(std::io::Error::last_os_error());
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
            Ok(())
        });
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start() -> Result<Cluster, String> {
    let bin = install()?;
    let (uid, gid, user) = identity()?;
    let dir = tempfile::Builder::new()
        .prefix("abhiapi-pg-")
        .tempdir()
        .map_err(|e| e.to_string())?
        .keep();
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).map_err(|e| e.to_string())?;
    let data = dir.join("data");
    let mut initdb = Command::new(bin.join("initdb"));
    initdb
        .args(["-A", "trust", "-E", "UTF8", "--no-sync", "-U", &user, "-D"])
        .arg(&data)
        .stdout(Stdio::null());
    as_user(&mut initdb, uid, gid);
    let out = initdb.output().map_err(|e| format!("initdb: {e}"))?;
    if !out.status.success() {
        return Err(format!("initdb: {}", String::from_utf8_lossy(&out.stderr)));
    }
    // The server is a child of a thread that lives as long as the process,
    // so that it dies with the process (the parent-death signal follows
    // the thread that started it).
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let result = serve(&bin, &dir, &data, uid, gid);
        let _ = tx.send(result);
        loop {
            std::thread::park();
        }
    });
    let port = rx.recv().map_err(|e| e.to_string())??;
    Ok(Cluster { port, user })
}

/// Starts the server, retrying on another port if one was taken meanwhile.
fn serve(bin: &Path, dir: &Path, data: &Path, uid: u32, gid: u32) -> Result<u16, String> {
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port();
        let log = std::fs::File::create(dir.join(format!("server-{port}.log")))
            .map_err(|e| e.to_string())?;
        // A shell between us and the server outlives the test process long
        // enough to remove the data folder (about 90 MB) once the server
        // has stopped: the parent-death signal reaches the shell, which
        // passes it on and waits. A start that fails keeps the folder for
        // the next port.
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            r#"dir=$1; shift; "$@" & pid=$!
               trap 'kill -QUIT $pid; done=1' QUIT
               trap 'kill -TERM $pid' TERM
               wait $pid; wait $pid; [ -z "$done" ] || rm -rf "$dir""#,
            "pg-reaper",
        ])
        .arg(dir)
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(data)
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "fsync=off",
            "-c",
            "max_connections=200",
        ])
        .stdout(Stdio::null())
        .stderr(log);
        as_user(&mut cmd, uid, gid);
        let mut child = cmd.spawn().map_err(|e| format!("postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // Leave the child running for the rest of the process.
                std::mem::forget(child);
                return Ok(port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: a plain system call on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
        last = std::fs::read_to_string(dir.join(format!("server-{port}.log"))).unwrap_or_default();
    }
    Err(format!("PostgreSQL did not start: {last}"))
}

//! Wiring for `serve`: open the store, hydrate the key maps, start the
//! background threads, bind, serve, and shut down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;

use crate::admin::{Admin, AdminWiring};
use crate::billing::journal::Journal;
use crate::billing::lease::{Leaser, Sweeper};
use crate::billing::ledger::Ledger;
use crate::books::{self, platform::Platform};
use crate::clock::Clock;
use crate::config::Config;
use crate::error::Error;
use crate::jobs::{Jobs, Retention};
use crate::keys::refresh::Refresher;
use crate::keys::Registry;
use crate::memory;
use crate::metrics::Metrics;
use crate::proxy::{Proxy, Wiring};
use crate::reload::Reloader;
use crate::server::threads::{Socketed, Threads};
use crate::server::{self, Listener};
use crate::shared_limits::SharedLimits;
use crate::store::limits::Remote;
use crate::store::postgres;
use crate::store::writer::{self, StoreWriter};
use crate::store::{self, db::Db, ledger, snapshot};
use crate::tls;
use crate::upstream::Upstream;
use tokio::sync::Notify;

/// How long the ledger writer waits on a lock before it reports the ledger unwritable.
const WRITER_BUSY_WAIT: Duration = Duration::from_secs(2);
const WRITER_STATEMENT: Duration = Duration::from_secs(10);

/// The addresses actually bound (a configured port 0 becomes a real one).
pub struct Bound {
    pub plain: Option<SocketAddr>,
    pub tls: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
}

/// The server's state and background threads, without listeners: what
/// [`serve`] answers requests with, and what the in-process request-path
/// bench drives directly.
pub struct Core {
    pub proxy: Arc<Proxy>,
    pub ledger: Arc<Ledger>,
    pub jobs: Arc<Jobs>,
    pub registry: Arc<Registry>,
    pub metrics: Arc<Metrics>,
    pub writer: StoreWriter,
    /// The low-rate reads and edits' connection, shared with the admin API.
    pub db: Db,
    /// Notified when the change feed says fal's synced prices moved.
    pub prices_moved: Arc<Notify>,
    refresher: Refresher,
    /// On a shared database: gives back leased credit this node leaves unused.
    sweeper: Option<Sweeper>,
    journal: Arc<Journal>,
    writer_thread: std::thread::JoinHandle<bool>,
}

impl Core {
    /// Recovers what an unclean stop left, hydrates the key maps from the
    /// store, and starts the refresher and the ledger writer.
    /// `public_url` is the base of the links the server emails.
    pub fn start(
        config: &Config,
        upstream: Upstream,
        clock: Arc<dyn Clock>,
        public_url: String,
    ) -> Result<Self, Error> {
        let mut conn = store::open(&config.store)?;
        // On a shared database this node leases what it spends, under its name.
        let node_name = config.cluster.node_name();
        let node = config.store.url.as_ref().map(|_| node_name.clone());
        recover_holds(&mut conn, &config.store.journal_dir(), node.as_deref())?;
        let journal = Arc::new(Journal::open(
            &config.store.journal_dir(),
            config.store.fsync,
        )?);
        let snapshot = snapshot::load(&mut conn)?;
        let registry = Arc::new(match node {
            Some(_) => Registry::leasing(&snapshot),
            None => Registry::from_snapshot(&snapshot),
        });
        tracing::info!(
            accounts = snapshot.accounts.len(),
            keys = snapshot.keys.len(),
            "hydrated"
        );
        let synced_prices = store::synced_prices::load(&mut conn)?;
        let prices_moved = Arc::new(Notify::new());
        let refresher = Refresher::spawn(
            &config.store,
            Arc::clone(&registry),
            snapshot.seq,
            Duration::from_millis(config.store.refresh_interval_ms),
            Arc::clone(&prices_moved),
        )?;
        let metrics = Arc::new(Metrics::default());
        // Other writers (the CLI, the admin API) hold the lock for
        // milliseconds; one held longer means the ledger cannot be written,
        // and billable requests are refused until it can.
        conn.lock_wait(WRITER_BUSY_WAIT)?;
        // On PostgreSQL, a statement that runs this long, or whose answer
        // never comes, counts as the store being down: the writer connects
        // again and retries, the journal keeping every entry meanwhile.
        conn.statement_timeout(WRITER_STATEMENT)?;
        let leaser = match node.clone() {
            Some(node) => Some(Arc::new(Leaser::start(
                &config.store,
                &config.cluster,
                node,
            )?)),
            None => None,
        };
        let shared_limits = match (&leaser, &config.store.url) {
            (Some(leaser), Some(url)) => Some(SharedLimits::new(
                Remote::new(
                    postgres::Target::parse(url, config.store.ca_file.as_deref())?,
                    tokio::runtime::Handle::current(),
                ),
                Arc::clone(leaser),
            )),
            _ => None,
        };
        let sweeper = leaser
            .as_ref()
            .map(|l| l.spawn_sweeper(&config.store, Arc::clone(&registry)))
            .transpose()?;
        let node = node.map(|name| {
            let registry = Arc::clone(&registry);
            writer::Node {
                name,
                written: Box::new(move |account_id, credits| {
                    if let Some(account) = registry.account(account_id) {
                        account.flushed(i64::try_from(credits).unwrap_or(i64::MAX));
                    }
                }),
            }
        });
        let (writer, writer_thread) =
            StoreWriter::spawn(conn, Arc::clone(&journal), Arc::clone(&metrics), node);
        let ledger = Arc::new(Ledger::new(
            writer.clone(),
            Arc::clone(&journal),
            Arc::clone(&metrics),
            leaser,
        ));
        let jobs = Arc::new(Jobs::load(
            &mut store::open(&config.store)?,
            &registry,
            Arc::clone(&ledger),
            writer.clone(),
            Retention::of(&config.queue),
            config.store.url.as_ref().map(|_| node_name.as_str()),
        )?);
        let db = Db::open(&config.store)?;
        let proxy = Arc::new(Proxy::new(
            config,
            Wiring {
                registry: Arc::clone(&registry),
                synced_prices,
                upstream,
                writer: writer.clone(),
                ledger: Arc::clone(&ledger),
                clock,
                jobs: Arc::clone(&jobs),
                db: db.clone(),
                metrics: Arc::clone(&metrics),
                refresh: refresher.waker(),
                public_url,
                shared_limits,
            },
        )?);
        Ok(Self {
            proxy,
            ledger,
            jobs,
            registry,
            metrics,
            writer,
            db,
            prices_moved,
            refresher,
            sweeper,
            journal,
            writer_thread,
        })
    }

    /// Commits what the writer has queued and stops the threads, within
    /// `grace` even if SQLite cannot be written. With `drained` (no request
    /// was cut off) and everything committed, every hold is settled in
    /// SQLite and the journal is emptied; otherwise the next start recovers
    /// it from the journal.
    pub async fn stop(self, drained: bool, grace: Duration) -> Result<(), Error> {
        if let Some(sweeper) = self.sweeper {
            tokio::task::spawn_blocking(move || sweeper.stop())
                .await
                .map_err(|e| Error::Usage(format!("lease sweeper: {e}")))?;
        }
        self.writer.close(grace).await;
        let thread = self.writer_thread;
        let joined = tokio::task::spawn_blocking(move || thread.join());
        // The writer gives up at `grace`; the margin is for its last commit attempt.
        let committed = matches!(
            tokio::time::timeout(grace + Duration::from_secs(2), joined).await,
            Ok(Ok(Ok(true)))
        );
        if drained && committed {
            self.journal.remove_all()?;
        }
        self.refresher.stop();
        Ok(())
    }
}

/// Runs the proxy until `shutdown` resolves. `on_ready` is called once
/// every listener is bound.
pub async fn serve(
    config: Config,
    config_path: Option<PathBuf>,
    fal_key: &str,
    clock: Arc<dyn Clock>,
    on_ready: impl FnOnce(&Bound),
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let _serving = {
        let (store, node) = (config.store.clone(), config.cluster.node_name());
        tokio::task::spawn_blocking(move || store::lock::acquire_store(&store, &node))
            .await
            .map_err(|e| Error::Usage(format!("start-up failed: {e}")))??
    };
    memory::unmap_large_buffers();
    let threads = server::threads::count(config.server.workers);
    let upstream = Upstream::new(&config.upstream, fal_key)?;
    // Each request thread gets its own socket on every listening address.
    let mut sockets: Vec<Vec<Socketed>> = (0..threads).map(|_| Vec::new()).collect();
    let mut bound = Bound {
        plain: None,
        tls: None,
        admin: None,
    };
    if let Some(addr) = config.server.plain_listen {
        let (addr, own) = server::threads::bind(addr, threads)?;
        bound.plain = Some(addr);
        for (thread, tcp) in sockets.iter_mut().zip(own) {
            thread.push(Socketed { tcp, tls: None });
        }
    }
    let mut tls_slot = None;
    if let Some(addr) = config.server.listen {
        let tls = tls::server_config(
            config.server.tls_cert.as_deref(),
            config.server.tls_key.as_deref(),
        )?;
        let (addr, own) = server::threads::bind(addr, threads)?;
        bound.tls = Some(addr);
        let slot = Arc::new(ArcSwap::new(tls));
        tls_slot = Some(Arc::clone(&slot));
        for (thread, tcp) in sockets.iter_mut().zip(own) {
            thread.push(Socketed {
                tcp,
                tls: Some(Arc::clone(&slot)),
            });
        }
    }

    // Links go where the operator says the server is, else to a listener.
    let public_url = match (&config.signup.public_url, bound.plain, bound.tls) {
        (Some(url), _, _) => url.clone(),
        (None, Some(plain), _) => format!("http://{plain}"),
        (None, None, Some(tls)) => format!("https://{tls}"),
        (None, None, None) => unreachable!("the config requires a listener"),
    };
    // Off the async thread: the store's start-up (recovery, hydration) blocks,
    // and PostgreSQL's client refuses to block a thread that runs tasks.
    let core = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Core::start(&config, upstream, clock, public_url))
            .await
            .map_err(|e| Error::Usage(format!("start-up failed: {e}")))??
    };
    let proxy = Arc::clone(&core.proxy);
    let (stopping, stop) = tokio::sync::watch::channel(false);
    let background = spawn_background(Arc::clone(&proxy), &config, stop.clone());
    let reloader = Arc::new(Reloader::new(
        config_path,
        config.clone(),
        Arc::clone(&proxy),
        tls_slot,
        core.db.clone(),
    ));
    let repricing = spawn_repricing(Arc::clone(&core.prices_moved), Arc::clone(&reloader));
    let platform = Arc::new(Platform::new(&config.upstream, fal_key)?);
    let price_sync = spawn_price_sync(
        &config,
        Arc::clone(&platform),
        core.db.clone(),
        Arc::clone(&reloader),
    );
    let sighup = spawn_sighup(Arc::clone(&reloader))?;
    let trimmer = memory::spawn_trimmer();

    let admin = match admin_listener(&config).await? {
        Some((tcp, token)) => {
            bound.admin = Some(tcp.local_addr()?);
            let admin = Admin::new(
                Arc::clone(&reloader),
                AdminWiring {
                    token,
                    db: core.db.clone(),
                    registry: Arc::clone(&core.registry),
                    refresh: core.refresher.waker(),
                    metrics: Arc::clone(&core.metrics),
                    writer: core.writer.clone(),
                    jobs: Arc::clone(&core.jobs),
                    platform: Arc::clone(&platform),
                },
            );
            let admin = Arc::new(admin);
            Some((Listener { tcp, tls: None }, admin))
        }
        None => None,
    };

    let limits: server::ConnectionLimits = (&config.server).into();
    let mut request_threads = Threads::spawn(
        sockets,
        Arc::clone(&proxy),
        limits,
        server::connections(&limits),
        stop.clone(),
    )?;
    on_ready(&bound);
    let admin_task = admin.map(|(listener, admin)| {
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.changed().await;
            };
            let connections = server::connections(&limits);
            server::run(vec![listener], admin, limits, connections, stopped).await
        })
    });
    let grace = Duration::from_secs(config.server.shutdown_grace_secs);
    // One deadline for the whole stop: connections, detached calls and the
    // ledger writer share the grace from the signal on.
    shutdown.await;
    let deadline = tokio::time::Instant::now() + grace;
    let _ = stopping.send(true);
    let drained = request_threads.drained().await;
    if let Some(task) = admin_task {
        let _ = task.await;
    }
    // Stopped with the listeners, at the signal: its pass is cancelled there.
    let _ = background.await;
    sighup.abort();
    repricing.abort();
    if let Some(task) = price_sync {
        task.abort();
    }
    trimmer.abort();

    // Connections that outlived the grace period are cut when the runtime
    // ends; their holds stay in the journal and are recovered at next start.
    let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
    // Calls whose clients hung up are still fal's work to settle, on the
    // request threads.
    let settled = proxy.detached_settled(left()).await;
    // The writer gets what is left, and a moment for a last commit. The
    // request threads stay up meanwhile: a settlement that waits for room
    // in the writer's queue waits on the thread that made it.
    let writer_time = left().max(Duration::from_secs(1));
    let ledger = Arc::clone(&core.ledger);
    let stopped = core.stop(drained && settled, writer_time).await;
    if !(drained && settled) {
        // What is cut off now is left to the journal, not released.
        ledger.abandon();
    }
    request_threads.end().await;
    stopped?;
    tracing::info!("stopped");
    Ok(())
}

/// Puts fal's synced prices in force whenever the change feed says they
/// moved; a failure (the database busy or down) is tried again every second
/// until it succeeds, so that no node keeps old prices for long.
fn spawn_repricing(moved: Arc<Notify>, reloader: Arc<Reloader>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            moved.notified().await;
            while let Err(e) = reloader.reprice().await {
                tracing::warn!(error = %e, "synced prices not put in force yet: trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    })
}

/// `[billing] price_sync_interval_secs`: fal's prices synced and applied
/// that often, as `prices sync --apply` does; every node of a cluster then
/// reprices from the change feed.
fn spawn_price_sync(
    config: &Config,
    platform: Arc<Platform>,
    db: Db,
    reloader: Arc<Reloader>,
) -> Option<tokio::task::JoinHandle<()>> {
    let every = match config.billing.price_sync_interval_secs {
        0 => return None,
        secs => Duration::from_secs(secs),
    };
    Some(tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let config = reloader.config();
            match books::sync::run(&platform, &db, &config, false, true).await {
                Ok(lines) => {
                    let applied = books::sync::to_apply(&lines).len();
                    tracing::info!(endpoints = lines.len(), applied, "prices synced from fal");
                }
                Err(e) => tracing::warn!(error = %e, "price sync failed: the prices in force stay"),
            }
        }
    }))
}

/// Reloads the config on every SIGHUP.
fn spawn_sighup(reloader: Arc<Reloader>) -> Result<tokio::task::JoinHandle<()>, Error> {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            // A refusal is logged by the reloader; the old settings stay.
            let _ = reloader.reload().await;
        }
    }))
}

/// The admin listener, if configured and given its token.
async fn admin_listener(config: &Config) -> Result<Option<(TcpListener, String)>, Error> {
    let Some(addr) = config.admin.listen else {
        return Ok(None);
    };
    let var = &config.admin.token_env;
    match std::env::var(var) {
        Ok(token) if !token.trim().is_empty() => Ok(Some((
            TcpListener::bind(addr).await?,
            token.trim().to_owned(),
        ))),
        _ => {
            tracing::warn!("admin API off: set {var} to its bearer token to turn it on");
            Ok(None)
        }
    }
}

/// The periodic work off the request path, every `reconcile_interval_secs`:
/// asks fal about jobs nobody has fetched, and (apart, so that a long pass
/// does not hold it up) drops from memory the ended jobs it no longer
/// keeps. Ends as soon as `stop` turns true, in the
/// middle of a pass if need be: a pass can wait on fal for `timeout_secs`
/// per job, and a job whose check is cut off stays pending (in memory and
/// in SQLite) for the next pass or the next start.
fn spawn_background(
    proxy: Arc<Proxy>,
    config: &Config,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let every = Duration::from_secs(config.queue.reconcile_interval_secs.max(1));
    let give_up_ms = config.queue.give_up_after_secs as i64 * 1000;
    tokio::spawn(async move {
        let passes = async {
            loop {
                tokio::time::sleep(every).await;
                proxy.reconcile(give_up_ms).await;
            }
        };
        // On its own timer: a pass can wait on fal for long, and memory
        // must not grow behind it.
        let forgetting = async {
            loop {
                tokio::time::sleep(every).await;
                proxy.forget_ended_jobs(store::now_ms());
            }
        };
        tokio::select! {
            _ = stop.wait_for(|stopping| *stopping) => {}
            _ = passes => {}
            _ = forgetting => {}
        }
    })
}

/// Settles holds that a process which did not stop cleanly left behind,
/// before any balance is read into memory.
fn recover_holds(
    conn: &mut store::sql::Conn,
    journal_dir: &std::path::Path,
    node: Option<&str>,
) -> Result<(), Error> {
    let journalled = Journal::read_all(journal_dir)?;
    let done = ledger::recover(conn, &journalled, store::now_ms(), node)?;
    if done.settled > 0 || done.holds > 0 {
        tracing::warn!(
            settled = done.settled,
            holds = done.holds,
            credits = done.credits,
            "recovered an unclean stop: settlements as journalled, holds without one at their held amount"
        );
    }
    Journal::clear(journal_dir)?;
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

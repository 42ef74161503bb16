//! A node of several spends credit it has leased from the shared database
//! (`store::leases`): a hold is still one compare-exchange in memory; when
//! the lease runs short, one round trip to the database leases more, and
//! what goes unused goes back, so no node strands what another could spend.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::config::{ClusterConfig, StoreConfig};
use crate::error::{ApiError, Error};
use crate::keys::{Account, Registry};
use crate::store::pool::Pool;
use crate::store::{leases, nodes, now_ms};

/// How often unused credit is looked for.
const SWEEP: Duration = Duration::from_millis(200);
/// How often this node says it is alive, and looks for silent peers.
const BEAT: Duration = Duration::from_secs(1);

pub struct Leaser {
    pool: Arc<Pool>,
    node: Arc<str>,
    extra: i64,
    idle_ms: i64,
    ttl: Duration,
    /// This node's epoch: a peer that took it over moved the database's.
    epoch: AtomicI64,
    /// The last time the database heard this node.
    heard: Mutex<Instant>,
    /// Not heard for half the TTL: a peer may soon take this node over, so
    /// it takes no billable work until it is heard again.
    fenced: AtomicBool,
}

impl Leaser {
    /// Joins the nodes of the database (after this node's own recovery).
    pub fn start(
        store: &StoreConfig,
        cluster: &ClusterConfig,
        node: String,
    ) -> Result<Self, Error> {
        let pool = Pool::new(store);
        let epoch = pool.blocking(|conn| Ok(nodes::join(conn, &node)?))?;
        Ok(Self {
            pool,
            node: node.into(),
            extra: i64::try_from(cluster.lease_credits).unwrap_or(i64::MAX),
            idle_ms: i64::try_from(cluster.lease_idle_secs.saturating_mul(1000))
                .unwrap_or(i64::MAX),
            ttl: Duration::from_secs(cluster.lease_ttl_secs.max(1)),
            epoch: AtomicI64::new(epoch),
            heard: Mutex::new(Instant::now()),
            fenced: AtomicBool::new(false),
        })
    }

    /// True while this node must not spend: see `fenced`.
    pub fn fenced(&self) -> bool {
        self.fenced.load(Ordering::Acquire)
    }

    /// Says this node is alive, and takes over peers silent past the TTL.
    /// A node that learns it was taken over drops what it had leased (the
    /// peer freed it); one the database has not heard for half the TTL
    /// fences itself.
    fn beat(&self, registry: &Registry) {
        let beat = self
            .pool
            .blocking(|conn| Ok(nodes::heartbeat(conn, &self.node)?));
        match beat {
            Ok(epoch) => {
                *self.heard.lock() = Instant::now();
                if self.epoch.swap(epoch, Ordering::AcqRel) != epoch {
                    tracing::error!(
                        "a peer took this node over while it was silent: its leases are gone"
                    );
                    for account in registry.accounts() {
                        account.take_unused();
                    }
                }
                self.fenced.store(false, Ordering::Release);
            }
            Err(e) => {
                if self.heard.lock().elapsed() >= self.ttl / 2
                    && !self.fenced.swap(true, Ordering::AcqRel)
                {
                    tracing::error!(error = %e, "the database has not heard this node for half the lease TTL: refusing billable requests");
                }
                return;
            }
        }
        let ttl_ms = i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX);
        let taken = self
            .pool
            .blocking(|conn| Ok(nodes::take_over_silent(conn, &self.node, ttl_ms, now_ms())?));
        if let Err(e) = taken {
            tracing::warn!(error = %e, "cannot take silent nodes over");
        }
    }

    /// Leases at least `need` more credits for `account`; false when the
    /// account has not that much free. 503 while the database cannot be
    /// reached. The credit reaches memory on the blocking thread, with the
    /// database's answer: a client that leaves meanwhile strands nothing.
    pub async fn lease(
        self: &Arc<Self>,
        account: &Arc<Account>,
        need: i64,
    ) -> Result<bool, ApiError> {
        let (account, extra, node) = (Arc::clone(account), self.extra, Arc::clone(&self.node));
        self.pool
            .run(move |conn| {
                let grant = leases::grant(conn, account.id, &node, need, extra)?;
                account.rebook(grant.balance);
                if grant.credits > 0 {
                    account.add_leased(grant.credits);
                    account
                        .scarce
                        .store(grant.credits == need, Ordering::Release);
                    account.leased_at_ms.store(now_ms(), Ordering::Release);
                }
                Ok(grant.credits > 0)
            })
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "cannot lease credit: refusing billable requests");
                ApiError::LedgerUnavailable
            })
    }

    /// Notes a hold on `account`: its lease is in use.
    pub fn used(&self, account: &Account) {
        account.leased_at_ms.store(now_ms(), Ordering::Release);
    }

    /// Gives back what `account` has unused on this node.
    fn give_back(&self, account: &Account) {
        let unused = account.take_unused();
        if unused == 0 {
            return;
        }
        let id = account.id;
        if let Err(e) = self
            .pool
            .blocking(|conn| Ok(leases::give_back(conn, id, &self.node, unused)?))
        {
            // Kept, to spend or to give back at the next sweep.
            account.add_leased(unused);
            tracing::warn!(error = %e, "cannot give leased credit back");
        }
    }

    /// A thread that gives back unused credit: at once where the account is
    /// scarce and nothing is held, else after `lease_idle_secs` without a lease.
    pub fn spawn_sweeper(self: &Arc<Self>, registry: Arc<Registry>) -> Sweeper {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (this, stopping) = (Arc::clone(self), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("lease-sweeper".into())
            .spawn(move || {
                let mut beat_at = Instant::now();
                while !stopping.load(Ordering::Acquire) {
                    std::thread::park_timeout(SWEEP);
                    if beat_at.elapsed() >= BEAT {
                        this.beat(&registry);
                        beat_at = Instant::now();
                    }
                    let now = now_ms();
                    for account in registry.accounts() {
                        let idle =
                            now - account.leased_at_ms.load(Ordering::Acquire) >= this.idle_ms;
                        let scarce = account.scarce.load(Ordering::Acquire) && account.held() == 0;
                        if idle || scarce {
                            this.give_back(&account);
                        }
                    }
                }
                // Stopping: everything unused goes back.
                for account in registry.accounts() {
                    this.give_back(&account);
                }
            })
            .expect("spawn the lease sweeper");
        Sweeper { stop, handle }
    }
}

pub struct Sweeper {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: JoinHandle<()>,
}

impl Sweeper {
    /// Gives back every unused credit and stops.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        self.handle.thread().unpark();
        let _ = self.handle.join();
    }
}

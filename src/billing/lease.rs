//! A node of several spends credit it has leased from the shared database
//! (`store::leases`): a hold is still one compare-exchange in memory; when
//! the lease runs short, one round trip to the database leases more, and
//! what goes unused goes back, so no node strands what another could spend.
//!
//! A node is heard from every second (`store::nodes`). One not heard for
//! the lease TTL is taken over by a peer, which frees its leases; so a node
//! the database has not heard for half the TTL stops spending first, and
//! every lease and give-back checks that the node's epoch (moved by a
//! takeover) is still the one it knows.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::RwLock;

use crate::config::{ClusterConfig, StoreConfig};
use crate::error::{ApiError, Error};
use crate::keys::{Account, Registry};
use crate::store::pool::Pool;
use crate::store::postgres::{AsyncConn, Target};
use crate::store::sql::StoreError;
use crate::store::{leases, nodes, now_ms};

/// How often unused credit is looked for.
const SWEEP: Duration = Duration::from_millis(200);
/// How often this node says it is alive, and looks for silent peers (more
/// often under a short TTL: eight beats to one, four within the time a
/// node goes on unheard).
const BEAT: Duration = Duration::from_secs(1);
/// The longest the heartbeat's connection may take to be made.
const CONNECT: Duration = Duration::from_secs(10);

pub struct Leaser {
    pool: Arc<Pool>,
    node: Arc<str>,
    extra: i64,
    idle_ms: i64,
    ttl: Duration,
    /// This node's epoch: a peer that took it over moved the database's.
    epoch: AtomicI64,
    /// Milliseconds since `origin` at which the last heartbeat the
    /// database answered was sent.
    heard_ms: AtomicI64,
    /// When the heartbeats answered without a gap began: a node takes a
    /// peer over only once it has been heard for a whole TTL itself, so
    /// that after an outage of the database the first node back does not
    /// take over peers whose only fault was the same outage.
    heard_since_ms: AtomicI64,
    origin: Instant,
    /// Nodes the database had heard within the TTL, this one included (the
    /// most seen over the last TTL, and when): what shares a rate limit
    /// while it cannot be decided in the database.
    live: AtomicI64,
    live_at_ms: AtomicI64,
    /// Where the heartbeat's async connection runs.
    runtime: tokio::runtime::Handle,
    /// Taken to read the epoch and change memory as of it (a hold, a
    /// settlement, leased credit arriving); taken alone to move to a new
    /// epoch and drop what the old one leased, so nothing of the old epoch
    /// lands in memory after that.
    epoch_change: RwLock<()>,
}

impl Leaser {
    /// Joins the nodes of the database (after this node's own recovery),
    /// in a new epoch: an earlier process under this name, if one somehow
    /// still runs, learns at its next heartbeat that it must stop spending.
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
            heard_ms: AtomicI64::new(0),
            heard_since_ms: AtomicI64::new(0),
            origin: Instant::now(),
            live: AtomicI64::new(1),
            live_at_ms: AtomicI64::new(0),
            runtime: tokio::runtime::Handle::current(),
            epoch_change: RwLock::new(()),
        })
    }

    pub fn epoch(&self) -> i64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Runs `f` with the epoch, which cannot move until it returns.
    pub fn in_epoch<T>(&self, f: impl FnOnce(i64) -> T) -> T {
        let _reading = self.epoch_change.read();
        f(self.epoch())
    }

    fn elapsed_ms(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    /// How long this node goes on spending its lease without the database:
    /// half the TTL, so that it has stopped well before a peer may take it
    /// over and free that lease.
    pub fn tolerance(&self) -> Duration {
        self.ttl / 2
    }

    /// The database has not heard this node for [`Leaser::tolerance`]
    /// (however the heartbeat failed or hung): a peer may soon take it
    /// over, so it spends nothing until it is heard again.
    pub fn fenced(&self) -> bool {
        !self.heard_within(self.tolerance())
    }

    fn heard_within(&self, within: Duration) -> bool {
        let within = i64::try_from(within.as_millis()).unwrap_or(i64::MAX);
        self.elapsed_ms() - self.heard_ms.load(Ordering::Acquire) < within
    }

    /// Nodes alive at the last heartbeat, this one included.
    pub fn live_nodes(&self) -> u64 {
        self.live.load(Ordering::Acquire).max(1) as u64
    }

    /// Leases at least `need` more credits for `account`; false when the
    /// account has not that much free. 503 while the database cannot be
    /// reached or the node was taken over. The credit reaches memory on the
    /// blocking thread, with the database's answer: a client that leaves
    /// meanwhile strands nothing.
    pub async fn lease(
        self: &Arc<Self>,
        account: &Arc<Account>,
        need: i64,
    ) -> Result<bool, ApiError> {
        let this = Arc::clone(self);
        let account = Arc::clone(account);
        self.pool
            .run(move |conn| {
                let epoch = this.epoch();
                let grant = leases::grant(conn, account.id, &this.node, epoch, need, this.extra)?;
                account.rebook(grant.balance);
                this.in_epoch(|now| {
                    if grant.credits > 0 && now == epoch {
                        account.add_leased(grant.credits);
                        account
                            .scarce
                            .store(grant.credits == need, Ordering::Release);
                        account.leased_at_ms.store(now_ms(), Ordering::Release);
                    }
                });
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

    /// Gives back what `account` has unused on this node. Should the
    /// answer be lost, the credit is not spent again here: it stays leased
    /// in the database until this node starts again or is taken over.
    fn give_back(&self, account: &Account) {
        let unused = account.take_unused();
        if unused == 0 {
            return;
        }
        let (id, epoch) = (account.id, self.epoch());
        let given = self
            .pool
            .blocking(|conn| Ok(leases::give_back(conn, id, &self.node, epoch, unused)?));
        if let Err(e) = given {
            tracing::warn!(error = %e, credits = unused, "cannot give leased credit back: it stays leased");
        }
    }

    /// Says this node is alive, within a deadline: a connection that does
    /// not answer in time is dropped, and the next beat connects again, so
    /// that a database that hangs does not keep the node fenced once it is
    /// back. A node that learns it was taken over drops what it had leased
    /// (the peer freed it).
    fn beat(&self, link: &mut Option<AsyncConn>, target: &Target, registry: &Registry) {
        let sent = self.elapsed_ms();
        let ttl_ms = self.ttl_ms();
        let answered = self.runtime.block_on(async {
            if link.as_ref().is_none_or(|c| c.client.is_closed()) {
                // Connecting has its own budget: several round trips, and
                // the URL's connect timeout per host.
                let connected = tokio::time::timeout(CONNECT, target.connect_async(&self.runtime));
                *link = Some(connected.await.unwrap_or_else(|_| {
                    Err(StoreError::Unanswered("connecting took too long".into()))
                })?);
            }
            let client = &link.as_ref().expect("connected above").client;
            // Late enough to ride out a slow database, early enough that a
            // dead connection is made again before the node is fenced.
            let answer =
                (self.tolerance().saturating_sub(self.beat_every() * 2)).max(self.beat_every());
            tokio::time::timeout(answer, nodes::heartbeat(client, &self.node, ttl_ms))
                .await
                .unwrap_or_else(|_| Err(StoreError::Unanswered("no heartbeat answer".into())))
        });
        let nodes::Beat { epoch, live } = match answered {
            Ok(beat) => beat,
            Err(e) => {
                *link = None;
                if self.fenced() {
                    tracing::error!(error = %e, "the database has not heard this node for half the lease TTL: refusing billable requests");
                }
                return;
            }
        };
        if self.epoch() != epoch {
            let _changing = self.epoch_change.write();
            self.epoch.store(epoch, Ordering::Release);
            for account in registry.accounts() {
                account.take_unused();
            }
            tracing::error!("a peer took this node over while it was silent: its leases are gone");
        }
        let gap = sent - self.heard_ms.swap(sent, Ordering::AcqRel);
        if gap >= self.streak_break_ms() {
            self.heard_since_ms.store(sent, Ordering::Release);
        }
        self.count_live(live, sent);
    }

    fn beat_every(&self) -> Duration {
        BEAT.min(self.ttl / 8)
    }

    fn ttl_ms(&self) -> i64 {
        i64::try_from(self.ttl.as_millis()).unwrap_or(i64::MAX)
    }

    /// A gap between answered heartbeats that starts a new streak: long
    /// enough that one slow beat does not, short enough that an outage that
    /// fenced this node does.
    fn streak_break_ms(&self) -> i64 {
        let beats = i64::try_from((self.beat_every() * 2).as_millis()).unwrap_or(i64::MAX);
        beats.max(self.ttl_ms() / 2)
    }

    /// Keeps the most nodes seen alive within the TTL: a node back from an
    /// outage sees its peers stale for a moment, and a count too low would
    /// give it too large a share of a rate limit.
    fn count_live(&self, live: i64, at_ms: i64) {
        let kept_at = self.live_at_ms.load(Ordering::Acquire);
        // Lower only once heard for a whole TTL: just back from an outage,
        // the peers' last signs of life are as stale as this node's.
        let settled = at_ms - self.heard_since_ms.load(Ordering::Acquire) >= self.ttl_ms();
        if live >= self.live.load(Ordering::Acquire)
            || (settled && at_ms - kept_at >= self.ttl_ms())
        {
            self.live.store(live, Ordering::Release);
            self.live_at_ms.store(at_ms, Ordering::Release);
        }
    }

    /// Takes over peers silent past the TTL, once this node has itself been
    /// heard for a whole TTL. On a thread of its own: a takeover that
    /// hangs delays no heartbeat.
    fn take_over(&self) {
        let heard_for = self.elapsed_ms() - self.heard_since_ms.load(Ordering::Acquire);
        if self.fenced() || heard_for < self.ttl_ms() {
            return;
        }
        let ttl_ms = self.ttl_ms();
        let taken = self
            .pool
            .blocking(|conn| Ok(nodes::take_over_silent(conn, &self.node, ttl_ms, now_ms())?));
        if let Err(e) = taken {
            tracing::warn!(error = %e, "cannot take silent nodes over");
        }
    }

    /// Three threads: the heartbeat; the takeover of silent peers; and the
    /// sweeper that gives back unused credit (at once where the account is
    /// scarce and nothing is held, else after `lease_idle_secs` without a
    /// lease, and all of it on stop). While the heartbeat goes unanswered
    /// the sweeper waits: a give-back would fail, and the credit it took
    /// out of memory could not be spent through the outage.
    pub fn spawn_sweeper(
        self: &Arc<Self>,
        store: &StoreConfig,
        registry: Arc<Registry>,
    ) -> Result<Sweeper, Error> {
        let target = Target::parse(
            store.url.as_deref().unwrap_or_default(),
            store.ca_file.as_deref(),
        )?;
        let stop = Arc::new(AtomicBool::new(false));
        let every = |name: &str, period: Duration, work: Box<dyn FnMut() + Send>| {
            let stop = Arc::clone(&stop);
            let mut work = work;
            std::thread::Builder::new()
                .name(name.into())
                .spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        work();
                        std::thread::park_timeout(period);
                    }
                })
                .expect("spawn a lease thread")
        };
        let (beater, beating) = (Arc::clone(self), Arc::clone(&registry));
        let mut link = None;
        let heartbeat = every(
            "heartbeat",
            self.beat_every(),
            Box::new(move || beater.beat(&mut link, &target, &beating)),
        );
        let taker = Arc::clone(self);
        let takeover = every(
            "takeover",
            self.beat_every(),
            Box::new(move || taker.take_over()),
        );
        let (this, stopping) = (Arc::clone(self), Arc::clone(&stop));
        let sweeper = std::thread::Builder::new()
            .name("lease-sweeper".into())
            .spawn(move || {
                while !stopping.load(Ordering::Acquire) {
                    std::thread::park_timeout(SWEEP);
                    if !this.heard_within(this.beat_every() * 2) {
                        continue;
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
                for account in registry.accounts() {
                    this.give_back(&account);
                }
            })
            .expect("spawn the lease sweeper");
        Ok(Sweeper {
            stop,
            threads: vec![heartbeat, takeover, sweeper],
        })
    }
}

pub struct Sweeper {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The longest a stop waits for the lease threads: one stuck on a database
/// that hangs is left behind, its credit to the node's next start.
const STOP_WAIT: Duration = Duration::from_secs(10);

impl Sweeper {
    /// Gives back every unused credit and stops.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Release);
        let deadline = Instant::now() + STOP_WAIT;
        for thread in &self.threads {
            thread.thread().unpark();
        }
        for thread in self.threads {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::error!("a lease thread did not stop in time: left behind");
            }
        }
    }
}

//! Rate limits that hold across the nodes of one PostgreSQL: GCRA (see
//! `ratelimit`) on a row per key or account instead of an atomic, by the
//! database's clock, so that every node decides against the same state.
//!
//! Billable requests make this round trip (one per slice of admissions,
//! see `slices`), so it is async, from the request threads themselves, on
//! one connection that pipelines them (its connection task runs on the
//! background runtime): no blocking thread and no pool slot per request.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio_postgres::Statement;

use super::postgres::{bind, numbered, AsyncConn, Target};
use super::sql::{Param, StoreError};

/// The database's clock, in nanoseconds since the epoch.
const NOW_NS: &str = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000000 AS BIGINT)";
/// The longest one decision may take before it counts as the database
/// being unreachable.
const DEADLINE: Duration = Duration::from_secs(1);
/// The longest connecting and preparing may take: several round trips.
const CONNECT: Duration = Duration::from_secs(5);

pub struct Remote {
    target: Target,
    runtime: tokio::runtime::Handle,
    live: ArcSwapOption<Live>,
    connecting: tokio::sync::Mutex<()>,
}

struct Live {
    conn: AsyncConn,
    take: Statement,
    lead: Statement,
    refund: Statement,
}

impl Remote {
    /// Connects on first use; the connection's task runs on `runtime`.
    pub fn new(target: Target, runtime: tokio::runtime::Handle) -> Self {
        Self {
            target,
            runtime,
            live: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The connection as it is. A decision does not wait for one to be
    /// made (under a database that hangs, connecting takes its whole
    /// budget): [`Remote::ping`] makes it, from the fallback's probe.
    fn current(&self) -> Result<Arc<Live>, StoreError> {
        self.live
            .load_full()
            .filter(|l| !l.conn.client.is_closed())
            .ok_or_else(|| StoreError::Unanswered("not connected to the database".into()))
    }

    /// The connection, made again (one caller at a time) if it broke or
    /// hung.
    async fn live(&self) -> Result<Arc<Live>, StoreError> {
        tokio::time::timeout(CONNECT, self.connect())
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unanswered(
                    "connecting to the database took too long".into(),
                ))
            })
    }

    async fn connect(&self) -> Result<Arc<Live>, StoreError> {
        if let Some(live) = self.live.load_full().filter(|l| !l.conn.client.is_closed()) {
            return Ok(live);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(live) = self.live.load_full().filter(|l| !l.conn.client.is_closed()) {
            return Ok(live);
        }
        let conn = self.target.connect_async(&self.runtime).await?;
        let client = &conn.client;
        // Each decision commits alone, and every request of a key updates
        // its one row: waiting for the WAL flush made each wait for the
        // last. A limit row lost in a crash of the database costs no money.
        client.batch_execute("SET synchronous_commit = off").await?;
        // `excluded.tat_ns - interval` is the statement's now, read once.
        let take = client
            .prepare(&numbered(&format!(
                "INSERT INTO rate_limits (subject, tat_ns) VALUES (?1, {NOW_NS} + ?2)
                 ON CONFLICT (subject) DO UPDATE
                 SET tat_ns = GREATEST(rate_limits.tat_ns, excluded.tat_ns - ?2) + ?2
                 WHERE GREATEST(rate_limits.tat_ns, excluded.tat_ns - ?2) - (excluded.tat_ns - ?2) + ?4 <= ?3
                 RETURNING tat_ns - {NOW_NS}"
            )))
            .await?;
        let lead = client
            .prepare(&numbered(&format!(
                "SELECT tat_ns - {NOW_NS} FROM rate_limits WHERE subject = ?1"
            )))
            .await?;
        let refund = client
            .prepare(&numbered(
                "UPDATE rate_limits SET tat_ns = tat_ns - ?2 WHERE subject = ?1",
            ))
            .await?;
        let live = Arc::new(Live {
            conn,
            take,
            lead,
            refund,
        });
        self.live.store(Some(Arc::clone(&live)));
        Ok(live)
    }

    /// `count` requests at once against `subject`'s limit (all of them or
    /// none; `count - 1` intervals must fit the tolerance): `Ok(lead)` when
    /// allowed, with the lead of the new theoretical arrival time over now;
    /// `Err(lead)` when refused, with the current lead. Allowing moves the
    /// state; refusing leaves it.
    pub async fn take(
        &self,
        subject: &str,
        interval_ns: i64,
        tolerance_ns: i64,
        count: i64,
    ) -> Result<Result<i64, i64>, StoreError> {
        let live = self.current()?;
        self.within(&live, async {
            let args = [
                Param::Text(subject),
                Param::Int(interval_ns.saturating_mul(count)),
                Param::Int(tolerance_ns),
                Param::Int(interval_ns.saturating_mul(count - 1)),
            ];
            if let Some(row) = live.conn.client.query_opt(&live.take, &bind(&args)).await? {
                return Ok(Ok(row.try_get(0)?));
            }
            let args = [Param::Text(subject)];
            let lead: i64 = live
                .conn
                .client
                .query_one(&live.lead, &bind(&args))
                .await?
                .try_get(0)?;
            Ok(Err(lead.max(0)))
        })
        .await
    }

    /// Where the connection's task runs.
    pub fn runtime(&self) -> &tokio::runtime::Handle {
        &self.runtime
    }

    /// Whether the database answers (connecting again if need be).
    pub async fn ping(&self) -> Result<(), StoreError> {
        let live = self.live().await?;
        self.within(&live, async {
            live.conn.client.simple_query("SELECT 1").await?;
            Ok(())
        })
        .await
    }

    /// Runs `work` on `live` within [`DEADLINE`]; past it the connection
    /// is dropped (its socket closed as the last user lets go), for the
    /// next call to connect again.
    async fn within<T>(
        &self,
        live: &Arc<Live>,
        work: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(DEADLINE, work).await {
            Ok(done) => done,
            Err(_) => {
                // Only this connection: not one made meanwhile.
                self.live.compare_and_swap(&Some(Arc::clone(live)), None);
                Err(StoreError::Unanswered(
                    "the database took too long to decide".into(),
                ))
            }
        }
    }

    /// Gives back `count` allowed requests (taken ahead and not used).
    pub async fn refund(
        &self,
        subject: &str,
        interval_ns: i64,
        count: i64,
    ) -> Result<(), StoreError> {
        let live = self.current()?;
        self.within(&live, async {
            let args = [
                Param::Text(subject),
                Param::Int(interval_ns.saturating_mul(count)),
            ];
            live.conn.client.execute(&live.refund, &bind(&args)).await?;
            Ok(())
        })
        .await
    }
}

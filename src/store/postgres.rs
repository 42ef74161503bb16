//! PostgreSQL, for several nodes on one database. Each user of the store
//! (the ledger writer, the refresher, the server's low-rate reads, the CLI)
//! owns one connection, as with SQLite; a connection that broke is made
//! again on its next use, and each statement text is prepared once on it.

use std::error::Error as StdError;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use tokio_postgres::types::{IsNull, ToSql, Type};
use tokio_postgres_rustls::MakeRustlsConnect;

use super::sql::{Mode, Param, Prepared, Row, StoreError, Value};
use crate::args;
use crate::error::Error;

/// Serialises [`Mode::Serial`] transactions across every node: the key of a
/// transaction-scoped advisory lock ("abhi").
const SERIAL_LOCK: i64 = 0x6162_6869;

/// How long connecting may take, unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the database is and how to reach it.
#[derive(Clone)]
pub struct Target {
    config: tokio_postgres::Config,
    tls: MakeRustlsConnect,
}

impl Target {
    /// `url` as libpq reads it (`postgres://user:pass@host:port/db?sslmode=require`);
    /// TLS through rustls with the public roots, plus `ca_file` if given.
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, Error> {
        use tokio_postgres::config::{Host, SslMode};
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| Error::Config(format!("[store] url: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // `prefer` falls back to plain text when a man in the middle says
        // so: off this machine, TLS is required unless the URL disables it.
        let local = config.get_hosts().iter().all(|h| match h {
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
            Host::Unix(_) => true,
        });
        if !local && config.get_ssl_mode() == SslMode::Prefer {
            config.ssl_mode(SslMode::Require);
        }
        // A peer gone without a word (a cut network) is noticed in seconds,
        // not after the kernel's two hours.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(5));
        config.keepalives_interval(Duration::from_secs(2));
        config.keepalives_retries(3);
        config.tcp_user_timeout(Duration::from_secs(10));
        // A node cut off inside a transaction must not keep its rows
        // locked for the others: the server ends such a session.
        if config.get_options().is_none() {
            config.options("-c idle_in_transaction_session_timeout=5000");
        }
        let mut tls = (*crate::tls::client_config(ca_file)?).clone();
        tls.alpn_protocols.clear();
        Ok(Self {
            config,
            tls: MakeRustlsConnect::new(tls),
        })
    }

    /// An async connection; its connection task runs on `runtime`.
    pub async fn connect_async(
        &self,
        runtime: &tokio::runtime::Handle,
    ) -> Result<AsyncConn, StoreError> {
        let (client, connection) = self.config.connect(self.tls.clone()).await?;
        let task = runtime.spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!(error = %e, "a PostgreSQL connection ended");
            }
        });
        Ok(AsyncConn { client, task })
    }
}

/// An async connection that closes its socket when dropped, answers
/// pending or not: a database that hangs (it, or something between, takes
/// the bytes and never answers) is met by no TCP timeout, so the caller's
/// deadline drops the connection and the next use connects again.
pub struct AsyncConn {
    pub client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for AsyncConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One connection for a blocking caller (the ledger writer, the refresher,
/// the pool's calls, the CLI). It runs its connection on a runtime of its
/// own while a call waits, as the blocking client does, but every call has
/// a deadline: a database that hangs (it, or something between, takes the
/// bytes and never answers) meets no TCP timeout, so past the deadline the
/// connection is dropped and the next call connects again.
pub struct Pg {
    target: Target,
    link: Option<Link>,
    runtime: Driver,
    prepared: Prepared,
    /// `SET` statements this connection keeps across reconnections.
    settings: Vec<String>,
    /// The longest one call waits for its answer.
    deadline: Duration,
    /// A call in a transaction went unanswered: the transaction held the
    /// connection, so it is dropped before the next call instead.
    hung: bool,
    /// The connection was made again since the last wait for notifications:
    /// those sent meanwhile are lost, so the wait says one came.
    fresh: bool,
}

/// Without a statement timeout: a call that takes this long is hanging.
const DEADLINE: Duration = Duration::from_secs(300);
/// Beyond the statement timeout, for its answer to come back.
const ANSWER_SLACK: Duration = Duration::from_secs(2);

/// A live connection: its client, and the task that drives it (aborted
/// with it, closing the socket), which passes notifications on.
struct Link {
    client: tokio_postgres::Client,
    notices: tokio::sync::mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits for `work` on `runtime`, at most `deadline`.
fn block<T>(
    runtime: &tokio::runtime::Runtime,
    deadline: Duration,
    work: impl std::future::Future<Output = Result<T, StoreError>>,
) -> Result<T, StoreError> {
    runtime.block_on(async {
        tokio::time::timeout(deadline, work)
            .await
            .unwrap_or_else(|_| {
                Err(StoreError::Unanswered(format!(
                    "PostgreSQL did not answer within {deadline:?}"
                )))
            })
    })
}

impl Pg {
    pub fn open(target: Target) -> Result<Self, StoreError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Value(format!("a runtime for PostgreSQL: {e}")))?;
        let mut pg = Self {
            target,
            link: None,
            runtime: Driver(Some(runtime)),
            prepared: Prepared::new(),
            settings: Vec::new(),
            deadline: DEADLINE,
            hung: false,
            fresh: false,
        };
        pg.live()?;
        Ok(pg)
    }

    pub fn lock_wait(&mut self, wait: Duration) -> Result<(), StoreError> {
        self.keep_setting(&format!("SET lock_timeout = {}", wait.as_millis()))
    }

    /// The longest one statement may run, on the server; the caller waits
    /// for its answer a little longer, then drops the connection.
    pub fn statement_timeout(&mut self, limit: Duration) -> Result<(), StoreError> {
        self.deadline = limit + ANSWER_SLACK;
        self.keep_setting(&format!("SET statement_timeout = {}", limit.as_millis()))
    }

    /// Runs `set` now and again on every reconnection.
    pub fn keep_setting(&mut self, set: &str) -> Result<(), StoreError> {
        self.batch(set)?;
        self.settings.push(set.to_owned());
        Ok(())
    }

    /// The live connection, made again if it broke or hung.
    fn live(&mut self) -> Result<&tokio_postgres::Client, StoreError> {
        let broken = self.link.as_ref().is_none_or(|l| l.client.is_closed());
        if broken || self.hung {
            self.link = None;
            self.hung = false;
            self.prepared.clear();
            let (config, tls) = (&self.target.config, self.target.tls.clone());
            // Connecting has its own deadline: the statement timeout is not
            // set on the session yet.
            let connect = config
                .get_connect_timeout()
                .copied()
                .unwrap_or(CONNECT_TIMEOUT);
            let (client, mut connection) = block(&self.runtime, connect + ANSWER_SLACK, async {
                Ok(config.connect(tls).await?)
            })?;
            let (tx, notices) = tokio::sync::mpsc::unbounded_channel();
            let task = self.runtime.spawn(async move {
                use tokio_postgres::AsyncMessage;
                loop {
                    match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                        Some(Ok(AsyncMessage::Notification(_))) => {
                            let _ = tx.send(());
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "a PostgreSQL connection ended");
                            break;
                        }
                        None => break,
                    }
                }
            });
            let link = Link {
                client,
                notices,
                task,
            };
            for set in &self.settings {
                block(&self.runtime, self.deadline, async {
                    Ok(link.client.batch_execute(set).await?)
                })?;
            }
            self.link = Some(link);
            self.fresh = true;
        }
        Ok(&self.link.as_ref().expect("connected above").client)
    }

    /// What one call needs, on the live connection.
    fn parts(&mut self) -> Result<Parts<'_>, StoreError> {
        self.live()?;
        Ok(Parts {
            runtime: &self.runtime,
            deadline: self.deadline,
            client: &self.link.as_ref().expect("live").client,
            prepared: &mut self.prepared,
        })
    }

    /// A call that went unanswered drops the connection.
    fn answered<T>(&mut self, done: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(done, Err(StoreError::Unanswered(_))) {
            self.link = None;
        }
        done
    }

    pub fn transaction(&mut self, mode: Mode) -> Result<PgTx<'_>, StoreError> {
        self.live()?;
        let Pg {
            runtime,
            link,
            prepared,
            deadline,
            hung,
            ..
        } = self;
        let client = &mut link.as_mut().expect("live").client;
        let begun = block(runtime, *deadline, async {
            let tx = match mode {
                Mode::Snapshot => {
                    client
                        .build_transaction()
                        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .await?
                }
                Mode::Plain | Mode::Serial => client.transaction().await?,
            };
            if mode == Mode::Serial {
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&SERIAL_LOCK])
                    .await?;
            }
            Ok(tx)
        });
        match begun {
            Ok(tx) => Ok(PgTx {
                tx: Some(tx),
                runtime,
                prepared,
                deadline: *deadline,
                hung,
            }),
            Err(e) => {
                *hung = matches!(e, StoreError::Unanswered(_));
                Err(e)
            }
        }
    }

    /// The statement for `sql` on the live connection (prepared once).
    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        let Parts {
            runtime,
            deadline,
            client,
            prepared,
        } = self.parts()?;
        let done = block(runtime, deadline, statement(prepared, client, sql));
        self.answered(done)
    }

    /// Runs `work` on the live connection, within the deadline.
    fn call<T>(
        &mut self,
        work: impl AsyncFnOnce(&tokio_postgres::Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Parts {
            runtime,
            deadline,
            client,
            ..
        } = self.parts()?;
        let done = block(runtime, deadline, work(client));
        self.answered(done)
    }

    pub fn exec(&mut self, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError> {
        let stmt = self.statement(sql)?;
        self.call(async |client| Ok(client.execute(&stmt, &bind(args)).await?))
    }

    pub fn rows(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        let stmt = self.statement(sql)?;
        self.call(async |client| {
            client
                .query(&stmt, &bind(args))
                .await?
                .iter()
                .map(row)
                .collect()
        })
    }

    /// Waits up to `timeout` for a notification on `channel`, listening from
    /// the first call on (and again after a reconnection); true if one came.
    pub fn notified(&mut self, channel: &str, timeout: Duration) -> Result<bool, StoreError> {
        let listen = format!("LISTEN {channel}");
        if !self.settings.contains(&listen) {
            self.keep_setting(&listen)?;
        }
        self.live()?;
        if std::mem::take(&mut self.fresh) {
            return Ok(true);
        }
        let link = self.link.as_mut().expect("live");
        let came = self
            .runtime
            .block_on(async { tokio::time::timeout(timeout, link.notices.recv()).await });
        let came = match came {
            Ok(Some(())) => true,
            Ok(None) => return Err(StoreError::Unanswered("the connection ended".into())),
            Err(_) => false,
        };
        // Those that queued meanwhile are one read of the feed, too.
        while link.notices.try_recv().is_ok() {}
        Ok(came)
    }

    /// Runs statements as they are, without arguments (the schema's migrations).
    pub fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.call(async |client| Ok(client.batch_execute(sql).await?))
    }
}

struct Parts<'a> {
    runtime: &'a tokio::runtime::Runtime,
    deadline: Duration,
    client: &'a tokio_postgres::Client,
    prepared: &'a mut Prepared,
}

/// The runtime a [`Pg`] drives its connection on. A runtime may not be
/// dropped on a thread that runs async tasks (a server stopping): there it
/// goes to a thread of its own.
struct Driver(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for Driver {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("kept until dropped")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("pg-close".into())
                    .spawn(move || drop(runtime));
            }
        }
    }
}

/// Held while a server uses the database: session-level advisory locks,
/// released when their connection closes, also when the process dies.
pub struct ServeLock {
    _pg: Pg,
}

/// Every node holds it shared; `store migrate` holds it alone ("serv").
const SERVE_LOCK: i64 = 0x7365_7276;
/// With a hash of the node's name: one process per node name ("node").
const NODE_LOCK: i64 = 0x6e6f_6465;

impl ServeLock {
    /// For node `node`: refused while another process runs under the same
    /// name (it would recover this one's live holds as its own) or while
    /// the database is being migrated into.
    pub fn node(target: Target, node: &str) -> Result<Self, Error> {
        let mut pg = Pg::open(target)?;
        let mine = lock(
            &mut pg,
            "pg_try_advisory_lock(?1::int4, hashtext(?2))",
            args![NODE_LOCK, node],
        )?;
        if !mine {
            return Err(Error::Usage(format!(
                "another `abhiapi serve` is running as node {node:?} on this PostgreSQL database: \
                 give each node its own [cluster] node (the keys and accounts commands work beside it)"
            )));
        }
        if !lock(
            &mut pg,
            "pg_try_advisory_lock_shared(?1)",
            args![SERVE_LOCK],
        )? {
            return Err(Error::Usage(
                "the PostgreSQL database is being migrated into: start the nodes after `store migrate`".into(),
            ));
        }
        Ok(Self { _pg: pg })
    }

    /// For `store migrate`: refused while any node runs on the database.
    pub fn alone(target: Target) -> Result<Self, Error> {
        let mut pg = Pg::open(target)?;
        if !lock(&mut pg, "pg_try_advisory_lock(?1)", args![SERVE_LOCK])? {
            return Err(Error::Usage(
                "an `abhiapi serve` is running on this PostgreSQL database: stop every node first"
                    .into(),
            ));
        }
        Ok(Self { _pg: pg })
    }
}

fn lock(pg: &mut Pg, call: &str, args: &[Param<'_>]) -> Result<bool, StoreError> {
    let rows = pg.rows(&format!("SELECT {call}"), args)?;
    rows.first().ok_or_else(StoreError::no_row)?.get(0)
}

pub struct PgTx<'c> {
    /// Taken by a commit; one dropped still here is rolled back at once.
    tx: Option<tokio_postgres::Transaction<'c>>,
    runtime: &'c tokio::runtime::Runtime,
    prepared: &'c mut Prepared,
    deadline: Duration,
    hung: &'c mut bool,
}

impl PgTx<'_> {
    /// Runs `work` in the transaction, within the deadline. A call that
    /// went unanswered marks the connection to be made again (the
    /// transaction holds it until dropped).
    fn call<T>(
        &mut self,
        work: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>, &mut Prepared) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let tx = self.tx.as_ref().expect("open until committed");
        let done = block(self.runtime, self.deadline, work(tx, self.prepared));
        self.answered(done)
    }

    fn answered<T>(&mut self, done: Result<T, StoreError>) -> Result<T, StoreError> {
        if matches!(done, Err(StoreError::Unanswered(_))) {
            *self.hung = true;
        }
        done
    }

    pub fn commit(mut self) -> Result<(), StoreError> {
        let tx = self.tx.take().expect("open until committed");
        let done = block(self.runtime, self.deadline, async {
            Ok(tx.commit().await?)
        });
        self.answered(done)
    }

    pub fn exec(&mut self, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError> {
        self.call(async |tx, prepared| {
            let stmt = statement(prepared, tx, sql).await?;
            Ok(tx.execute(&stmt, &bind(args)).await?)
        })
    }

    pub fn rows(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        self.call(async |tx, prepared| {
            let stmt = statement(prepared, tx, sql).await?;
            tx.query(&stmt, &bind(args))
                .await?
                .iter()
                .map(row)
                .collect()
        })
    }

    pub fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        self.call(async |tx, _| Ok(tx.batch_execute(sql).await?))
    }
}

impl Drop for PgTx<'_> {
    /// The connection's runtime runs only while a call waits on it: a
    /// rollback merely queued would keep the transaction's locks until the
    /// connection's next use. (Transactions live on blocking threads.)
    fn drop(&mut self) {
        // A connection that went unanswered is dropped before its next use,
        // and the server ends the transaction with it.
        if *self.hung {
            return;
        }
        if let Some(tx) = self.tx.take() {
            let done = block(self.runtime, self.deadline, async {
                Ok(tx.rollback().await?)
            });
            if done.is_err() {
                *self.hung = true;
            }
        }
    }
}

/// The statement for `sql`, prepared on first use. Our statements number
/// `?1, ?2, …` as SQLite does; PostgreSQL numbers `$1, $2, …`.
async fn statement(
    prepared: &mut Prepared,
    client: &impl tokio_postgres::GenericClient,
    sql: &str,
) -> Result<tokio_postgres::Statement, StoreError> {
    if let Some(stmt) = prepared.get(sql) {
        return Ok(stmt.clone());
    }
    let stmt = client.prepare(&numbered(sql)).await?;
    prepared.insert(sql.to_owned(), stmt.clone());
    Ok(stmt)
}

/// `?N` → `$N`. Our statements hold no `?` in string literals.
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '?' && chars.peek().is_some_and(char::is_ascii_digit) {
            out.push('$');
        } else {
            out.push(c);
        }
    }
    out
}

pub(crate) fn bind<'a>(args: &'a [Param<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn ToSql + Sync)).collect()
}

fn row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let mut values = Vec::with_capacity(r.len());
    for (i, column) in r.columns().iter().enumerate() {
        let ty = column.type_();
        let value = if *ty == Type::INT8 {
            r.try_get::<_, Option<i64>>(i)?.map(Value::Int)
        } else if *ty == Type::INT4 {
            r.try_get::<_, Option<i32>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::INT2 {
            r.try_get::<_, Option<i16>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BOOL {
            r.try_get::<_, Option<bool>>(i)?
                .map(|v| Value::Int(v.into()))
        } else if *ty == Type::BYTEA {
            r.try_get::<_, Option<Vec<u8>>>(i)?.map(Value::Blob)
        } else if [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME].contains(ty) {
            r.try_get::<_, Option<String>>(i)?.map(Value::Text)
        } else {
            return Err(StoreError::Value(format!(
                "column {} is {ty}: cast it to BIGINT or TEXT",
                column.name()
            )));
        };
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Row(values))
}

impl ToSql for Param<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        match *self {
            Param::Null => Ok(IsNull::Yes),
            Param::Int(i) => int(i, ty, out),
            Param::UInt(u) => int(Param::int(u)?, ty, out),
            Param::Text(s) => s.to_sql_checked(ty, out),
            Param::Blob(b) => b.to_sql_checked(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
        self.to_sql(ty, out)
    }
}

/// An integer into whatever integer column PostgreSQL inferred, if it fits.
fn int(i: i64, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn StdError + Sync + Send>> {
    if *ty == Type::INT4 {
        i32::try_from(i)?.to_sql_checked(ty, out)
    } else if *ty == Type::INT2 {
        i16::try_from(i)?.to_sql_checked(ty, out)
    } else if *ty == Type::BOOL {
        (i != 0).to_sql_checked(ty, out)
    } else {
        i.to_sql_checked(ty, out)
    }
}

/// The database cannot take work now (gone, restarting, full, or a
/// conflict to retry), as opposed to refusing one statement.
pub(super) fn unavailable(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            ["08", "53", "57", "58"]
                .iter()
                .any(|class| code.starts_with(class))
                || ["40001", "40P01", "25006", "55P03"].contains(&code)
        }
        // No answer from the server (I/O, TLS, a timeout), unless it is a
        // value of ours that could not be sent.
        None => {
            let mut cause = e.source();
            while let Some(c) = cause {
                if c.is::<StoreError>() || c.is::<std::num::TryFromIntError>() {
                    return false;
                }
                cause = c.source();
            }
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode;

    /// Off this machine a URL that says nothing of TLS gets it required
    /// (`prefer` would fall back to plain text when told to); on loopback,
    /// or where the URL says so, it is left as it is.
    #[test]
    fn tls_is_required_off_this_machine() {
        let mode = |url: &str| {
            super::Target::parse(url, None)
                .unwrap()
                .config
                .get_ssl_mode()
        };
        assert_eq!(mode("postgres://u@db.internal:5432/x"), SslMode::Require);
        assert_eq!(mode("postgres://u@10.1.2.3/x"), SslMode::Require);
        assert_eq!(mode("postgres://u@127.0.0.1:5432/x"), SslMode::Prefer);
        assert_eq!(mode("postgres://u@localhost/x"), SslMode::Prefer);
        assert_eq!(
            mode("postgres://u@db.internal/x?sslmode=disable"),
            SslMode::Disable
        );
    }

    #[test]
    fn placeholders_are_renumbered_for_postgres() {
        assert_eq!(
            super::numbered("SELECT a FROM t WHERE id = ?1 AND b > ?12 OR c = '?'"),
            "SELECT a FROM t WHERE id = $1 AND b > $12 OR c = '?'"
        );
    }
}

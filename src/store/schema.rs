//! Schema migrations: one list for both stores, written for SQLite and
//! read by PostgreSQL through [`postgres_ddl`]. SQLite tracks the version
//! in `PRAGMA user_version`, PostgreSQL in `schema_version`.

use rusqlite::Connection;

use super::sql::{Conn, Mode, StoreError};

/// Each entry moves the schema one version forward; never edit a shipped one.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, hashed keys, and the change feed that carries CLI edits to a running server.
    "CREATE TABLE accounts (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        plan TEXT NOT NULL,
        balance INTEGER NOT NULL,
        suspended INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL
    );
    CREATE TABLE api_keys (
        id INTEGER PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        hash BLOB NOT NULL UNIQUE,
        display_prefix TEXT NOT NULL,
        disabled INTEGER NOT NULL DEFAULT 0,
        created_at INTEGER NOT NULL,
        last_used_at INTEGER
    );
    CREATE INDEX api_keys_account ON api_keys(account_id);
    -- One row per edit made outside the server. balance_delta carries top-ups
    -- as deltas, so the server adds them to its in-memory balance instead of
    -- overwriting charges it has not flushed yet.
    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        account_id INTEGER,
        key_id INTEGER,
        balance_delta INTEGER NOT NULL DEFAULT 0,
        at INTEGER NOT NULL
    );",
    // 2: the ledger. Every hold ends as exactly one `charges` row with the
    // same id (the request id): charged, released, or recovered after a crash.
    "CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,
        credits INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL
    );
    CREATE INDEX holds_account ON holds(account_id);
    CREATE TABLE charges (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        model TEXT NOT NULL,
        units_milli INTEGER NOT NULL,
        credits INTEGER NOT NULL,
        held INTEGER NOT NULL,
        shortfall INTEGER NOT NULL,
        fal_status INTEGER,
        outcome TEXT NOT NULL,
        started_at_ms INTEGER NOT NULL,
        settled_at_ms INTEGER NOT NULL
    );
    CREATE INDEX charges_account_time ON charges(account_id, settled_at_ms);",
    // 3: queued jobs. A pending job owns its hold (`hold_id`, our request id
    // of the submission and the id of its eventual charge) across restarts.
    "CREATE TABLE jobs (
        request_id TEXT PRIMARY KEY,
        hold_id TEXT NOT NULL UNIQUE,
        account_id INTEGER NOT NULL,
        key_id INTEGER NOT NULL,
        app TEXT NOT NULL,
        model TEXT NOT NULL,
        held INTEGER NOT NULL,
        estimate_units INTEGER NOT NULL,
        facts TEXT NOT NULL,
        state TEXT NOT NULL,
        credits_used INTEGER,
        balance_remaining INTEGER,
        created_at_ms INTEGER NOT NULL,
        settled_at_ms INTEGER
    );
    CREATE INDEX jobs_state ON jobs(state, created_at_ms);",
    // 4: what prices a queued job (`Tariff::encode`), fixed when it was
    // admitted. NULL in rows from before: those are priced by the table in force.
    "ALTER TABLE jobs ADD COLUMN tariff TEXT;",
    // 5: ledger entries SQLite refused, set aside for an operator with the
    // reason, so that one bad entry never stops the writer.
    "CREATE TABLE ledger_rejects (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        subject TEXT,
        entry TEXT NOT NULL,
        reason TEXT NOT NULL,
        at_ms INTEGER NOT NULL
    );",
    // 6: the key a key was created with (through the dashboard), so that
    // revoking a leaked key also revokes what it minted. NULL for keys the
    // operator created (the CLI, the admin API) and for keys from before.
    "ALTER TABLE api_keys ADD COLUMN created_by INTEGER REFERENCES api_keys(id);",
    // 7: fal reported the job COMPLETED: it did the work, so the job is
    // charged, never released, even if its result is gone by the time we ask.
    "ALTER TABLE jobs ADD COLUMN completed INTEGER NOT NULL DEFAULT 0;",
    // 8: the most recent ended jobs are loaded at start-up, the older ones
    // read one at a time when their owner asks.
    "CREATE INDEX jobs_created ON jobs(created_at_ms);",
    // 9: card payments, one row per paid Stripe Checkout Session (its id is
    // the key, so a replayed event credits nothing). Amounts are in the
    // currency's smallest unit; refunds are cumulative, as Stripe reports them.
    "CREATE TABLE payments (
        id TEXT PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        payment_intent TEXT UNIQUE,
        currency TEXT NOT NULL,
        amount INTEGER NOT NULL,
        credits INTEGER NOT NULL,
        refunded_amount INTEGER NOT NULL DEFAULT 0,
        refunded_credits INTEGER NOT NULL DEFAULT 0,
        created_at_ms INTEGER NOT NULL
    );
    CREATE INDEX payments_account ON payments(account_id, created_at_ms);",
    // 10: refunds whose charge's payment is not (yet) in `payments`: Stripe
    // does not promise its events' order, so a refund may arrive before the
    // payment it refunds, and is taken back when the payment arrives.
    "CREATE TABLE early_refunds (
        payment_intent TEXT PRIMARY KEY,
        currency TEXT NOT NULL,
        amount_refunded INTEGER NOT NULL
    );",
    // 11: people sign in by email: an account may have one, a link sent to
    // it is single use and short-lived, a session is a cookie. Links and
    // sessions are stored by the SHA-256 of their secret only.
    "ALTER TABLE accounts ADD COLUMN email TEXT;
    CREATE UNIQUE INDEX accounts_email ON accounts(email) WHERE email IS NOT NULL;
    CREATE TABLE sign_in_links (
        hash BLOB PRIMARY KEY,
        email TEXT NOT NULL,
        expires_at_ms INTEGER NOT NULL,
        used_at_ms INTEGER
    );
    CREATE TABLE sessions (
        hash BLOB PRIMARY KEY,
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        csrf TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX sessions_account ON sessions(account_id);",
    // 12: the receipt Stripe keeps for each card charge, by its payment
    // intent; a charge's event may come before its Checkout Session's.
    "CREATE TABLE receipts (
        payment_intent TEXT PRIMARY KEY,
        url TEXT NOT NULL
    );",
    // 13: several nodes on one database. A hold belongs to the node that
    // took it ('' on a single node), and a node spends only credit it has
    // leased: the account's balance less every lease is free to lease.
    "ALTER TABLE holds ADD COLUMN node TEXT NOT NULL DEFAULT '';
    CREATE TABLE leases (
        account_id INTEGER NOT NULL REFERENCES accounts(id),
        node TEXT NOT NULL,
        credits INTEGER NOT NULL,
        PRIMARY KEY (account_id, node)
    );",
    // 14: rate limits several nodes share: a GCRA state per key or account
    // (`k<id>`, `a<id>`), in nanoseconds of the database's clock.
    "CREATE TABLE rate_limits (
        subject TEXT PRIMARY KEY,
        tat_ns INTEGER NOT NULL
    );",
    // 15: the nodes of a shared database, each heard from every second.
    // `epoch` moves when a peer takes a silent node's holds and leases over.
    "CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        seen_at_ms INTEGER NOT NULL,
        epoch INTEGER NOT NULL DEFAULT 0
    );",
    // 16: fal's books. A charge keeps fal's own request id and the units
    // fal reported, where it gave them, so that fal's billing records can
    // be matched to ours; prices synced from fal's pricing API override the
    // table's, one endpoint each, and a change in the feed says they moved;
    // each reconciliation's unbilled total is kept for the metric. No index
    // on the new columns: each cost the writer's batch a third more
    // (BENCHMARKS.md), for a report run once a month that scans instead.
    "ALTER TABLE charges ADD COLUMN fal_request_id TEXT;
    ALTER TABLE charges ADD COLUMN fal_units_milli INTEGER;
    ALTER TABLE changes ADD COLUMN prices INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE synced_prices (
        endpoint TEXT PRIMARY KEY,
        unit TEXT NOT NULL,
        nano_usd INTEGER NOT NULL,
        synced_at_ms INTEGER NOT NULL
    );
    CREATE TABLE reconcile_runs (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        at_ms INTEGER NOT NULL,
        since_ms INTEGER NOT NULL,
        until_ms INTEGER NOT NULL,
        unbilled_nano_usd INTEGER NOT NULL
    );",
];

/// Brings the schema up to date, in one transaction; nodes starting together
/// take turns ([`Mode::Serial`]), so each migration runs once.
pub fn migrate(conn: &mut Conn) -> Result<(), StoreError> {
    match conn {
        Conn::Sqlite(c) => Ok(migrate_sqlite(c)?),
        Conn::Postgres(pg) => {
            pg.batch("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")?;
            let mut tx = pg.transaction(Mode::Serial)?;
            let rows = tx.rows("SELECT version FROM schema_version", &[])?;
            let version: usize = match rows.first() {
                Some(row) => row.get(0)?,
                None => {
                    tx.exec("INSERT INTO schema_version (version) VALUES (0)", &[])?;
                    0
                }
            };
            if version > MIGRATIONS.len() {
                return Err(newer(version));
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
                tx.batch(&postgres_ddl(sql))?;
                tx.exec(
                    "UPDATE schema_version SET version = ?1",
                    crate::args![i + 1],
                )?;
            }
            tx.commit()
        }
    }
}

fn migrate_sqlite(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: usize = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() {
        return Err(newer(version));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i + 1)?;
    }
    Ok(tx.commit()?)
}

/// A database a newer AbhiAPI migrated: this one would misread it.
fn newer(version: usize) -> StoreError {
    StoreError::Value(format!(
        "the database is at schema version {version}, newer than this build's {}: run the newer build",
        MIGRATIONS.len()
    ))
}

/// The same schema in PostgreSQL's types: integers are 64-bit, row ids
/// are identities, bytes are `bytea`.
pub(super) fn postgres_ddl(sql: &str) -> String {
    const IDENTITY: &str = "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY";
    sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", IDENTITY)
        .replace("INTEGER PRIMARY KEY", IDENTITY)
        .replace("INTEGER", "BIGINT")
        .replace("BLOB", "BYTEA")
}

/// The tables, in an order that respects their references: what `store
/// migrate` copies.
pub const TABLES: &[&str] = &[
    "accounts",
    "api_keys",
    "changes",
    "holds",
    "charges",
    "jobs",
    "ledger_rejects",
    "payments",
    "early_refunds",
    "sign_in_links",
    "sessions",
    "receipts",
    "leases",
    "rate_limits",
    "nodes",
    "synced_prices",
    "reconcile_runs",
];

#[cfg(test)]
mod tests {
    use super::*;
    use crate::billing::pricing::PriceTable;
    use crate::config::Config;
    use crate::store::jobs;

    /// A pending job written before jobs kept their tariff loads after the
    /// migration without one (it is priced by the table in force); a job
    /// written after keeps its own.
    #[test]
    fn a_job_table_from_before_tariffs_migrates() {
        let conn = Connection::open_in_memory().unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute_batch(
            "INSERT INTO accounts (id, name, plan, balance, created_at) VALUES (1, 'acme', 'free', 100, 0);
             INSERT INTO jobs (request_id, hold_id, account_id, key_id, app, model, held,
                 estimate_units, facts, state, created_at_ms)
             VALUES ('old', 'h1', 1, 1, 'fal-ai/flux', 'fal-ai/flux/dev', 28, 1000, ',,,', 'pending', 0);",
        )
        .unwrap();
        let mut conn = Conn::Sqlite(conn);
        migrate(&mut conn).unwrap();

        let config = Config::parse(crate::config::EMBEDDED_DEFAULT).unwrap();
        let tariff = PriceTable::new(&config.billing, &config.pricing, &[])
            .unwrap()
            .tariff("fal-ai/flux/dev");
        let mut record = jobs::load(&mut conn, 0, usize::MAX, None)
            .unwrap()
            .remove(0)
            .record;
        assert_eq!(
            (record.request_id.as_str(), record.tariff.as_ref()),
            ("old", None)
        );
        (record.request_id, record.hold.id, record.tariff) = ("new".into(), "h2".into(), tariff);
        let mut tx = conn.transaction(Mode::Plain).unwrap();
        jobs::insert(&mut tx, &record).unwrap();
        tx.commit().unwrap();
        let loaded = jobs::load(&mut conn, 0, usize::MAX, None).unwrap();
        let new = loaded
            .iter()
            .find(|j| j.record.request_id == "new")
            .unwrap();
        assert!(new.record.tariff.is_some());
        assert_eq!(new.record.tariff, record.tariff);
    }
}

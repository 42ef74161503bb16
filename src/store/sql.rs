//! One way to speak SQL to either store: SQLite (one node, embedded) or
//! PostgreSQL (several nodes). Statements are written once, in the SQL both
//! understand, with `?N` placeholders; where the two differ, [`Dialect`]
//! says which one is listening. Values cross as four kinds (null, integer,
//! text, bytes), the ones our schema uses, so a row reads the same from both.

use std::collections::HashMap;

use super::postgres::Pg;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// What a store refused, and whether the refusal is about the store (down,
/// locked, full: try again later) or about the statement itself.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    /// A value that does not fit where it goes (a negative count, a u64 past i64).
    #[error("{0}")]
    Value(String),
    /// No answer in time: the database, or the way to it, hangs.
    #[error("{0}")]
    Unanswered(String),
}

impl StoreError {
    /// The store cannot take any write now, whatever the statement: the
    /// writer retries until it can. Any other error is the statement's own.
    pub fn unavailable(&self) -> bool {
        match self {
            StoreError::Sqlite(e) => {
                use rusqlite::ErrorCode::*;
                matches!(
                    e.sqlite_error_code(),
                    Some(
                        DatabaseBusy
                            | DatabaseLocked
                            | DiskFull
                            | ReadOnly
                            | SystemIoFailure
                            | CannotOpen
                            | PermissionDenied
                            | OutOfMemory
                            | FileLockingProtocolFailed
                    )
                )
            }
            StoreError::Postgres(e) => super::postgres::unavailable(e),
            StoreError::Unanswered(_) => true,
            StoreError::Value(_) => false,
        }
    }

    /// No row where one was required.
    pub fn no_row() -> Self {
        StoreError::Value("no such row".into())
    }
}

/// A statement's argument, borrowed from the caller.
#[derive(Debug, Clone, Copy)]
pub enum Param<'a> {
    Null,
    Int(i64),
    /// Checked against i64 when bound: money never wraps.
    UInt(u64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl Param<'_> {
    pub(super) fn int(u: u64) -> Result<i64, StoreError> {
        i64::try_from(u)
            .map_err(|_| StoreError::Value(format!("{u} does not fit a signed 64-bit column")))
    }
}

pub trait ToParam {
    fn param(&self) -> Param<'_>;
}

macro_rules! signed {
    ($($t:ty),*) => {$(
        impl ToParam for $t {
            fn param(&self) -> Param<'_> {
                Param::Int(i64::from(*self))
            }
        }
    )*};
}
signed!(i64, i32, u32, u16);

impl ToParam for u64 {
    fn param(&self) -> Param<'_> {
        Param::UInt(*self)
    }
}

impl ToParam for usize {
    fn param(&self) -> Param<'_> {
        Param::UInt(*self as u64)
    }
}

impl ToParam for bool {
    fn param(&self) -> Param<'_> {
        Param::Int(i64::from(*self))
    }
}

impl ToParam for str {
    fn param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for String {
    fn param(&self) -> Param<'_> {
        Param::Text(self)
    }
}

impl ToParam for [u8] {
    fn param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl<const N: usize> ToParam for [u8; N] {
    fn param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl ToParam for Vec<u8> {
    fn param(&self) -> Param<'_> {
        Param::Blob(self)
    }
}

impl<T: ToParam + ?Sized> ToParam for &T {
    fn param(&self) -> Param<'_> {
        (**self).param()
    }
}

impl<T: ToParam> ToParam for Option<T> {
    fn param(&self) -> Param<'_> {
        self.as_ref().map_or(Param::Null, ToParam::param)
    }
}

/// `args![a, b, c]`: a statement's arguments, in `?1, ?2, ?3` order.
#[macro_export]
macro_rules! args {
    ($($p:expr),* $(,)?) => {
        &[$($crate::store::sql::ToParam::param(&$p)),*][..]
    };
}

/// One value of a result row.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl Value {
    /// The value as an argument of another statement.
    pub fn param(&self) -> Param<'_> {
        match self {
            Value::Null => Param::Null,
            Value::Int(i) => Param::Int(*i),
            Value::Text(s) => Param::Text(s),
            Value::Blob(b) => Param::Blob(b),
        }
    }
}

/// One result row, owned: read it with [`Row::get`] by column index.
#[derive(Debug, PartialEq)]
pub struct Row(pub(super) Vec<Value>);

impl Row {
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let value = self
            .0
            .get(i)
            .ok_or_else(|| StoreError::Value(format!("no column {i}")))?;
        T::from_value(value)
    }
}

pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, StoreError>;
}

fn mismatch(want: &str, v: &Value) -> StoreError {
    StoreError::Value(format!("expected {want}, found {v:?}"))
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => Err(mismatch("an integer", v)),
        }
    }
}

macro_rules! narrow {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, StoreError> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| mismatch(stringify!($t), v))
            }
        }
    )*};
}
narrow!(u64, u32, u16, i32, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        Ok(i64::from_value(v)? != 0)
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err(mismatch("text", v)),
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(mismatch("bytes", v)),
        }
    }
}

impl<const N: usize> FromValue for [u8; N] {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        match v {
            Value::Blob(b) => b.as_slice().try_into().map_err(|_| mismatch("a hash", v)),
            _ => Err(mismatch("bytes", v)),
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, StoreError> {
        match v {
            Value::Null => Ok(None),
            _ => T::from_value(v).map(Some),
        }
    }
}

/// What every connection and transaction can do.
pub trait Sql {
    fn dialect(&self) -> Dialect;

    /// Runs a statement; the number of rows it changed.
    fn exec(&mut self, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError>;

    /// Runs a query; every row it returns.
    fn rows(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>, StoreError>;

    /// The first row, if any.
    fn row(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, args)?.into_iter().next())
    }
}

impl dyn Sql + '_ {
    /// The first column of the one row the query must return.
    pub fn value<T: FromValue>(&mut self, sql: &str, args: &[Param<'_>]) -> Result<T, StoreError> {
        self.row(sql, args)?.ok_or_else(StoreError::no_row)?.get(0)
    }
}

/// An open store: one connection, owned by one user at a time (the ledger
/// writer, the refresher, the server's low-rate reads, the CLI).
pub enum Conn {
    Sqlite(rusqlite::Connection),
    Postgres(Box<Pg>),
}

/// How a transaction starts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Reads, and the ledger writer's own writes, which commute (inserts
    /// by id, balance deltas).
    Plain,
    /// Reads that must agree with each other (the snapshot and the change
    /// feed's position): one view of the database for the whole
    /// transaction, as SQLite's always is.
    Snapshot,
    /// An edit that reads, decides and writes (a key cap, a top-up, the
    /// change feed): one at a time across every node and the CLI, as
    /// SQLite's single writer does.
    Serial,
}

pub struct Tx<'c>(TxInner<'c>);

enum TxInner<'c> {
    Sqlite(rusqlite::Transaction<'c>),
    Postgres(super::postgres::PgTx<'c>),
}

impl Conn {
    /// How long a statement waits for another writer's lock before it
    /// fails as unavailable.
    pub fn lock_wait(&mut self, wait: std::time::Duration) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(c) => Ok(c.busy_timeout(wait)?),
            Conn::Postgres(pg) => pg.lock_wait(wait),
        }
    }

    /// The longest one statement may run (PostgreSQL; SQLite's statements
    /// wait only for locks, see [`Conn::lock_wait`]).
    pub fn statement_timeout(&mut self, limit: std::time::Duration) -> Result<(), StoreError> {
        match self {
            Conn::Sqlite(_) => Ok(()),
            Conn::Postgres(pg) => pg.statement_timeout(limit),
        }
    }

    pub fn transaction(&mut self, mode: Mode) -> Result<Tx<'_>, StoreError> {
        Ok(Tx(match self {
            Conn::Sqlite(c) => TxInner::Sqlite(c.transaction_with_behavior(match mode {
                Mode::Plain | Mode::Snapshot => rusqlite::TransactionBehavior::Deferred,
                Mode::Serial => rusqlite::TransactionBehavior::Immediate,
            })?),
            Conn::Postgres(pg) => TxInner::Postgres(pg.transaction(mode)?),
        }))
    }
}

impl Tx<'_> {
    pub fn commit(self) -> Result<(), StoreError> {
        match self.0 {
            TxInner::Sqlite(t) => Ok(t.commit()?),
            TxInner::Postgres(t) => t.commit(),
        }
    }
}

impl Sql for Conn {
    fn dialect(&self) -> Dialect {
        match self {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Postgres(_) => Dialect::Postgres,
        }
    }

    fn exec(&mut self, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError> {
        match self {
            Conn::Sqlite(c) => sqlite_exec(c, sql, args),
            Conn::Postgres(pg) => pg.exec(sql, args),
        }
    }

    fn rows(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        match self {
            Conn::Sqlite(c) => sqlite_rows(c, sql, args),
            Conn::Postgres(pg) => pg.rows(sql, args),
        }
    }
}

impl Sql for Tx<'_> {
    fn dialect(&self) -> Dialect {
        match &self.0 {
            TxInner::Sqlite(_) => Dialect::Sqlite,
            TxInner::Postgres(_) => Dialect::Postgres,
        }
    }

    fn exec(&mut self, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError> {
        match &mut self.0 {
            TxInner::Sqlite(t) => sqlite_exec(t, sql, args),
            TxInner::Postgres(t) => t.exec(sql, args),
        }
    }

    fn rows(&mut self, sql: &str, args: &[Param<'_>]) -> Result<Vec<Row>, StoreError> {
        match &mut self.0 {
            TxInner::Sqlite(t) => sqlite_rows(t, sql, args),
            TxInner::Postgres(t) => t.rows(sql, args),
        }
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Null => ValueRef::Null,
            Param::Int(i) => ValueRef::Integer(i),
            Param::UInt(u) => ValueRef::Integer(
                Param::int(u).map_err(|e| rusqlite::Error::ToSqlConversionFailure(e.into()))?,
            ),
            Param::Text(s) => ValueRef::Text(s.as_bytes()),
            Param::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

fn sqlite_exec(c: &rusqlite::Connection, sql: &str, args: &[Param<'_>]) -> Result<u64, StoreError> {
    Ok(c.prepare_cached(sql)?
        .execute(rusqlite::params_from_iter(args))? as u64)
}

fn sqlite_rows(
    c: &rusqlite::Connection,
    sql: &str,
    args: &[Param<'_>],
) -> Result<Vec<Row>, StoreError> {
    use rusqlite::types::ValueRef;
    let mut stmt = c.prepare_cached(sql)?;
    let width = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let mut row = Vec::with_capacity(width);
        for i in 0..width {
            row.push(match r.get_ref(i)? {
                ValueRef::Null => Value::Null,
                ValueRef::Integer(i) => Value::Int(i),
                ValueRef::Real(f) => {
                    return Err(StoreError::Value(format!(
                        "a real number ({f}) in column {i}"
                    )))
                }
                ValueRef::Text(t) => Value::Text(
                    String::from_utf8(t.to_vec())
                        .map_err(|_| StoreError::Value(format!("column {i} is not UTF-8")))?,
                ),
                ValueRef::Blob(b) => Value::Blob(b.to_vec()),
            });
        }
        out.push(Row(row));
    }
    Ok(out)
}

/// Prepared statements by their text, per connection: PostgreSQL prepares
/// in a round trip of its own, so each text is prepared once.
pub(super) type Prepared = HashMap<String, tokio_postgres::Statement>;

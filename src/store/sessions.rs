//! Sign-in links and sessions in the store, each stored by the SHA-256 of its
//! secret: a link is used at most once and only before it expires; a
//! session lives until it expires or its owner signs out.

use super::admin::{find_account, insert_returning_id, record_change, require_account, write_tx};
use super::now_ms;
use super::snapshot::AccountRow;
use super::sql::{Conn, Sql};
use crate::args;
use crate::error::Error;

pub type SecretHash = [u8; 32];

pub fn insert_link(
    conn: &mut dyn Sql,
    hash: &SecretHash,
    email: &str,
    expires_at_ms: i64,
) -> Result<(), Error> {
    // Expired links go as new ones come: the table stays small.
    conn.exec(
        "DELETE FROM sign_in_links WHERE expires_at_ms < ?1",
        args![now_ms() - 86_400_000],
    )?;
    conn.exec(
        "INSERT INTO sign_in_links (hash, email, expires_at_ms) VALUES (?1, ?2, ?3)",
        args![&hash[..], email, expires_at_ms],
    )?;
    Ok(())
}

/// The email a link was sent to, if it is unused and unexpired; it is used
/// from then on (one statement: two clicks racing cannot both succeed).
pub fn use_link(
    conn: &mut dyn Sql,
    hash: &SecretHash,
    now_ms: i64,
) -> Result<Option<String>, Error> {
    Ok(conn
        .row(
            "UPDATE sign_in_links SET used_at_ms = ?2
             WHERE hash = ?1 AND used_at_ms IS NULL AND expires_at_ms > ?2
             RETURNING email",
            args![&hash[..], now_ms],
        )?
        .map(|r| r.get(0))
        .transpose()?)
}

/// The account signed in with `email`: its own, or a new one on the free
/// plan with `free_credits`, named after the address (and a number, should
/// an operator's account already have that name). `true` if new.
pub fn account_for_email(
    conn: &mut Conn,
    email: &str,
    free_credits: i64,
) -> Result<(AccountRow, bool), Error> {
    // One write transaction: two first sign-ins racing make one account.
    let mut tx = write_tx(conn)?;
    let existing: Option<String> = tx
        .row("SELECT name FROM accounts WHERE email = ?1", args![email])?
        .map(|r| r.get(0))
        .transpose()?;
    if let Some(name) = existing {
        return Ok((require_account(&mut tx, &name)?, false));
    }
    let mut name = email.to_owned();
    let mut n = 1;
    while find_account(&mut tx, &name)?.is_some() {
        n += 1;
        name = format!("{email}-{n}");
    }
    let id = insert_returning_id(
        &mut tx,
        "INSERT INTO accounts (name, plan, balance, created_at, email) VALUES (?1, ?2, ?3, ?4, ?5)",
        args![
            name,
            crate::config::DEFAULT_PLAN,
            free_credits,
            now_ms() / 1000,
            email
        ],
    )?;
    record_change(&mut tx, Some(id), None, free_credits)?;
    let row = require_account(&mut tx, &name)?;
    tx.commit()?;
    Ok((row, true))
}

pub fn insert_session(
    conn: &mut dyn Sql,
    hash: &SecretHash,
    account_id: i64,
    csrf: &str,
    expires_at_ms: i64,
) -> Result<(), Error> {
    conn.exec(
        "DELETE FROM sessions WHERE expires_at_ms < ?1",
        args![now_ms()],
    )?;
    conn.exec(
        "INSERT INTO sessions (hash, account_id, csrf, created_at_ms, expires_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        args![&hash[..], account_id, csrf, now_ms(), expires_at_ms],
    )?;
    Ok(())
}

/// A live session: its account, its CSRF token, and the account's email.
pub struct SessionRow {
    pub account_id: i64,
    pub csrf: String,
    pub email: Option<String>,
}

pub fn session(
    conn: &mut dyn Sql,
    hash: &SecretHash,
    now_ms: i64,
) -> Result<Option<SessionRow>, Error> {
    let row = conn.row(
        "SELECT s.account_id, s.csrf, a.email FROM sessions s JOIN accounts a ON a.id = s.account_id
         WHERE s.hash = ?1 AND s.expires_at_ms > ?2",
        args![&hash[..], now_ms],
    )?;
    let Some(r) = row else { return Ok(None) };
    Ok(Some(SessionRow {
        account_id: r.get(0)?,
        csrf: r.get(1)?,
        email: r.get(2)?,
    }))
}

pub fn delete_session(conn: &mut dyn Sql, hash: &SecretHash) -> Result<(), Error> {
    conn.exec("DELETE FROM sessions WHERE hash = ?1", args![&hash[..]])?;
    Ok(())
}

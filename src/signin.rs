//! Sign-in by a link sent to an email address: no passwords are stored.
//! A link is a random secret, valid for 15 minutes and once; following it
//! makes the account on first use and starts a session, itself a random
//! secret in a cookie. Both are kept in SQLite by their SHA-256 only.

use std::net::IpAddr;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::{ApiError, Error};
use crate::mail::Mailer;
use crate::ratelimit::{ceil_secs, Decision, Gcra, Throttle};
use crate::store::db::Db;
use crate::store::sessions::{self, SecretHash, SessionRow};
use crate::store::{now_ms, snapshot};

pub const LINK_TTL: Duration = Duration::from_secs(15 * 60);
pub const COOKIE: &str = "abhiapi_session";
/// Where a link is followed.
pub const LINK_ROUTE: &str = "/v1/auth/link";

pub struct SignIn {
    db: Db,
    /// The base of the links we send (never a request's `Host`).
    public_url: String,
    session_ttl: Duration,
    free_credits: i64,
    per_address: Throttle,
    per_email: Throttle,
    mailer: Mailer,
}

/// A session just started, for its cookie.
pub struct Started {
    pub secret: String,
    pub max_age: Duration,
    /// The change feed's position once the account existed: a new account
    /// is in the server's memory when the feed has been applied this far.
    pub change: i64,
}

impl SignIn {
    pub fn new(config: &Config, db: Db, public_url: String) -> Result<Self, Error> {
        Ok(Self {
            db,
            public_url: public_url.trim_end_matches('/').to_owned(),
            session_ttl: Duration::from_secs(config.signup.session_days * 86_400),
            free_credits: config.signup.free_credits,
            // A few links at once, then one every 5 minutes per address, and
            // one every 30 seconds per client: enough for a typo or a lost
            // mail, not for mail-bombing anyone.
            per_email: Throttle::new(Gcra::every(Duration::from_secs(300), 3)),
            per_address: Throttle::new(Gcra::every(Duration::from_secs(30), 10)),
            mailer: Mailer::new(&config.email)?,
        })
    }

    /// Mails a sign-in link to `email`.
    /// The answer is the same whether or not the address has an account.
    pub async fn send_link(
        &self,
        email: &str,
        client: IpAddr,
        now_ns: u64,
    ) -> Result<(), ApiError> {
        let email = normalize(email)
            .ok_or_else(|| ApiError::InvalidInput("`email` is not an email address".into()))?;
        for decision in [
            self.per_address.check(&client_name(client), now_ns),
            self.per_email.check(&email, now_ns),
        ] {
            if let Decision::Deny { retry_after_ns, .. } = decision {
                return Err(ApiError::SignInLimited {
                    retry_after: ceil_secs(retry_after_ns),
                });
            }
        }
        let token = secret()?;
        let hash = digest(&token);
        let expires = now_ms() + LINK_TTL.as_millis() as i64;
        let stored = email.clone();
        self.db
            .run(move |conn| sessions::insert_link(conn, &hash, &stored, expires))
            .await?;
        let link = format!("{}{LINK_ROUTE}?token={token}", self.public_url);
        self.mailer.sign_in_link(&email, &link).await
    }

    /// Follows a link: the session it starts, or `None` if the link is
    /// unknown, used or expired. The account is made on first use.
    pub async fn follow(&self, token: &str) -> Result<Option<Started>, ApiError> {
        if !well_formed(token) {
            return Ok(None);
        }
        let hash = digest(token);
        let free = self.free_credits;
        let session = secret()?;
        let csrf = secret()?;
        let session_hash = digest(&session);
        let expires = now_ms() + self.session_ttl.as_millis() as i64;
        let started = self
            .db
            .run(move |conn| {
                let Some(email) = sessions::use_link(conn, &hash, now_ms())? else {
                    return Ok(None);
                };
                let (account, _) = sessions::account_for_email(conn, &email, free)?;
                sessions::insert_session(conn, &session_hash, account.id, &csrf, expires)?;
                Ok(Some(snapshot::latest_change(conn)?))
            })
            .await?;
        Ok(started.map(|change| Started {
            secret: session,
            max_age: self.session_ttl,
            change,
        }))
    }

    /// The live session a cookie's secret names, if any.
    pub async fn session(&self, secret: &str) -> Result<Option<SessionRow>, ApiError> {
        if !well_formed(secret) {
            return Ok(None);
        }
        let hash = digest(secret);
        Ok(self
            .db
            .run(move |conn| sessions::session(conn, &hash, now_ms()))
            .await?)
    }

    pub async fn sign_out(&self, secret: &str) -> Result<(), ApiError> {
        let hash = digest(secret);
        Ok(self
            .db
            .run(move |conn| sessions::delete_session(conn, &hash))
            .await?)
    }
}

/// The name a client is limited by: its IPv4 address, or its IPv6 /64 (a
/// host is routinely given a whole /64, and would otherwise be 2^64 clients).
fn client_name(client: IpAddr) -> String {
    match client.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
    }
}

/// 32 random bytes, as 64 hex digits.
fn secret() -> Result<String, ApiError> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|_| ApiError::Internal)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

pub fn well_formed(secret: &str) -> bool {
    secret.len() == 64 && secret.bytes().all(|b| b.is_ascii_hexdigit())
}

fn digest(secret: &str) -> SecretHash {
    Sha256::digest(secret.as_bytes()).into()
}

/// The address in lower case, if it looks like one: a local part and a
/// domain with a dot, no spaces or controls, at most 254 characters.
pub fn normalize(email: &str) -> Option<String> {
    let email = email.trim().to_ascii_lowercase();
    let (local, domain) = email.split_once('@')?;
    let valid = email.len() <= 254
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !domain.contains('@')
        && email.bytes().all(|b| b.is_ascii_graphic());
    valid.then_some(email)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_lower_cased_and_checked() {
        assert_eq!(
            normalize(" Ada@Example.COM ").as_deref(),
            Some("ada@example.com")
        );
        for bad in [
            "",
            "ada",
            "ada@",
            "@example.com",
            "ada@example",
            "a da@example.com",
            "ada@@example.com",
            "ada@example.com.",
            "ada@.example.com",
        ] {
            assert_eq!(normalize(bad), None, "{bad}");
        }
        assert_eq!(normalize(&format!("{}@example.com", "a".repeat(250))), None);
    }

    #[test]
    fn a_client_is_its_ipv4_address_or_its_ipv6_slash_64() {
        let name = |ip: &str| client_name(ip.parse().unwrap());
        // One host's /64 is all its own: rotating through it is one client.
        assert_eq!(
            name("2001:db8:1:2::1"),
            name("2001:db8:1:2:ffff:ffff:ffff:fffe")
        );
        assert_ne!(name("2001:db8:1:2::1"), name("2001:db8:1:3::1"));
        // An IPv4 client reaching a dual-stack listener is its IPv4 address,
        // not one /64 shared by every IPv4 client.
        assert_eq!(name("::ffff:192.0.2.1"), name("192.0.2.1"));
        assert_ne!(name("::ffff:192.0.2.1"), name("::ffff:192.0.2.2"));
        assert_ne!(name("192.0.2.1"), name("192.0.2.2"));
    }
}

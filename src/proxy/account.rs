//! The signed-in user's own data, for the dashboard: `/v1/account`,
//! `/v1/account/usage`, `/v1/account/payments`, their keys (`POST /v1/keys`, `DELETE /v1/keys/{id}`)
//! and top-ups (`POST /v1/topups`). Everything is scoped to the caller's account;
//! another account's key is as unknown as a missing one.

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::body::Body;
use super::json;
use super::small_body;
use super::{Conn, Proxy, Trace};
use crate::error::ApiError;
use crate::keys::{issue, Account};
use crate::metrics::Denial;
use crate::payments::checkout::{Checkout, Offer};
use crate::ratelimit::{ceil_secs, Decision};
use crate::store::admin::{self, KeyListing, KeyOrigin};
use crate::store::leases::{self, Standing};
use crate::store::ledger::{self, ChargeRow, DailyUsage};
use crate::store::now_ms;
use crate::store::payments;

pub(super) const PREFIX: &str = "/v1/";
const MAX_DAYS: i64 = 90;
/// `{"usd": N}` and some room.
const MAX_TOPUP_BODY: usize = 1024;

#[derive(Serialize)]
struct AccountView {
    account: String,
    plan: String,
    #[serde(flatten)]
    standing: Standing,
    /// The key this request was made with, so a page can tell it apart
    /// (none when signed in by session).
    key_id: Option<i64>,
    /// Signed in by session: the address, and the token its changes carry
    /// as `x-csrf-token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    csrf_token: Option<String>,
    keys: Vec<KeyListing>,
    /// Top-ups by card, when this gateway takes them.
    topup: Option<Offer>,
}

#[derive(Serialize)]
struct UsageView {
    days: i64,
    daily: Vec<DailyUsage>,
    recent: Vec<ChargeRow>,
}

#[derive(Serialize)]
struct NewKey {
    id: i64,
    key: String,
    prefix: String,
}

impl Proxy {
    pub(super) async fn account_api(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        caller: &Caller,
        request_id: &str,
        trace: &mut Trace,
    ) -> Result<Response<Body>, ApiError> {
        match &caller.key {
            Some(key) => self.check_poll(key, trace)?,
            None => self.check_account_poll(&caller.account, trace)?,
        }
        if let Some(session) = &caller.session {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                self.check_same_site(&req, conn, session)?;
            }
        }
        let path = req.uri().path().trim_end_matches('/');
        let route = path.strip_prefix(PREFIX).unwrap_or("");
        let account = &caller.account;
        match (req.method(), route) {
            (&Method::GET, "account") => self.account_view(caller).await,
            (&Method::GET, "account/usage") => self.usage_view(&req, account).await,
            (&Method::GET, "account/payments") => {
                let account_id = account.id;
                let rows = self
                    .db
                    .run(move |conn| payments::list(conn, account_id))
                    .await?;
                json(StatusCode::OK, &rows)
            }
            (&Method::POST, "keys") => self.create_key(caller).await,
            (&Method::POST, "topups") => self.top_up(req, conn, account, request_id).await,
            (&Method::DELETE, id) if id.starts_with("keys/") => {
                let id = id["keys/".len()..]
                    .parse()
                    .map_err(|_| ApiError::NotFound)?;
                self.revoke_key(account, id).await
            }
            _ => Err(ApiError::NotFound),
        }
    }

    async fn account_view(&self, caller: &Caller) -> Result<Response<Body>, ApiError> {
        let account = &caller.account;
        let (name, id) = (account.name.clone(), account.id);
        // On a database several nodes share, this node's memory holds only
        // its own lease: the account's standing is the database's.
        let shared = self.registry.is_leasing();
        let (keys, stored) = self
            .db
            .run(move |conn| {
                let keys = admin::list_keys(conn, Some(&name))?;
                let stored = shared.then(|| leases::standing(conn, id)).transpose()?;
                Ok((keys, stored))
            })
            .await?;
        let view = AccountView {
            account: account.name.clone(),
            plan: account.plan.load().to_string(),
            standing: stored.unwrap_or(Standing {
                balance: account.balance(),
                leased: 0,
                held: account.held(),
                available: account.available(),
            }),
            key_id: caller.key.as_ref().map(|k| k.id),
            email: caller.session.as_ref().and_then(|s| s.email.clone()),
            csrf_token: caller.session.as_ref().map(|s| s.csrf.clone()),
            keys,
            topup: self.checkout.as_ref().map(Checkout::offer),
        };
        json(StatusCode::OK, &view)
    }

    async fn usage_view(
        &self,
        req: &Request<Incoming>,
        account: &Account,
    ) -> Result<Response<Body>, ApiError> {
        let days = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("days=")))
            .and_then(|d| d.parse::<i64>().ok())
            .unwrap_or(30)
            .clamp(1, MAX_DAYS);
        let account_id = account.id;
        // Whole UTC days: today and the `days - 1` before it.
        let today_start = now_ms() / 86_400_000 * 86_400_000;
        let since = today_start - (days - 1) * 86_400_000;
        let (daily, recent) = self
            .db
            .run(move |conn| {
                Ok((
                    ledger::daily(conn, account_id, since)?,
                    ledger::recent(conn, account_id, 20)?,
                ))
            })
            .await?;
        json(
            StatusCode::OK,
            &UsageView {
                days,
                daily,
                recent,
            },
        )
    }

    /// A new key on the caller's account, live at once; shown only in this
    /// answer. Recorded as created by the caller's key, so that revoking that
    /// key revokes this one too.
    async fn create_key(&self, caller: &Caller) -> Result<Response<Body>, ApiError> {
        let account = &caller.account;
        let tunables = self.tunables.load();
        let decision = tunables.limits.key_creation(account, self.clock.now_ns());
        if let Decision::Deny { retry_after_ns, .. } = decision {
            self.metrics.denied(Denial::KeyCreation);
            return Err(ApiError::KeyCreationLimited {
                retry_after: ceil_secs(retry_after_ns),
            });
        }
        let origin = KeyOrigin {
            created_by: caller.key.as_ref().map(|k| k.id),
            max_keys: tunables.max_keys_per_account,
        };
        let created = issue::create(
            &self.db,
            &self.registry,
            account.name.clone(),
            account.plan.load().to_string(),
            origin,
        )
        .await?;
        let view = NewKey {
            id: created.id,
            key: created.secret,
            prefix: created.display_prefix,
        };
        json(StatusCode::CREATED, &view)
    }

    /// A Stripe Checkout Session for `{"usd": N}` of credits on the caller's
    /// account, its `url` where the dashboard sends the user to pay. Credits
    /// arrive only with Stripe's signed webhook, once paid.
    async fn top_up(
        &self,
        req: Request<Incoming>,
        conn: Conn,
        account: &Account,
        request_id: &str,
    ) -> Result<Response<Body>, ApiError> {
        #[derive(Deserialize)]
        struct TopUp {
            usd: u64,
        }
        let checkout = self.checkout.as_ref().ok_or(ApiError::PaymentsOff)?;
        let dashboard = format!("{}/dashboard", self.public_base(&req, conn)?);
        let TopUp { usd } =
            small_body::read_json(req.into_body(), MAX_TOPUP_BODY, self.body_pace.timeout).await?;
        let created = checkout
            .create(&account.name, usd, &dashboard, request_id)
            .await?;
        json(StatusCode::CREATED, &created)
    }

    /// Disables one of the caller's account's keys, and the keys created
    /// with it (down the line), at once.
    async fn revoke_key(&self, account: &Account, id: i64) -> Result<Response<Body>, ApiError> {
        let revoked = issue::revoke(&self.db, &self.registry, id, account.id).await?;
        if revoked.is_empty() {
            return Err(ApiError::NotFound);
        }
        #[derive(Serialize)]
        struct Revoked {
            id: i64,
            state: &'static str,
            /// Every key disabled: `id` and the keys created with it.
            revoked: Vec<i64>,
        }
        json(
            StatusCode::OK,
            &Revoked {
                id,
                state: "disabled",
                revoked,
            },
        )
    }
}

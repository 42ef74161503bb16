//! The operator's API, on its own listener (`[admin] listen`), behind a
//! bearer token: accounts, keys, usage and the price table in force, as
//! JSON, described by `docs/openapi.json`. Edits apply to the running
//! server at once (top-ups within a refresh: balances move only by deltas).

use std::sync::Arc;

use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::billing::decimal::format_scaled;
use crate::billing::pricing::PriceTable;
use crate::books::platform::Platform;
use crate::books::reconcile::{self, Period};
use crate::config::{BillingConfig, PriceRuleConfig, DEFAULT_PLAN};
use crate::error::{ApiError, Error};
use crate::jobs::Jobs;
use crate::keys::issue;
use crate::keys::refresh::RefreshWaker;
use crate::keys::Registry;
use crate::metrics::{Gauges, Metrics};
use crate::proxy::body::Body;
use crate::proxy::json;
use crate::proxy::path::percent_decoded;
use crate::proxy::small_body;
use crate::proxy::Conn;
use crate::reload::Reloader;
use crate::server::Handler;
use crate::store::admin::{self, KeyListing};
use crate::store::books;
use crate::store::db::Db;
use crate::store::leases::{self, Standing};
use crate::store::payments;
use crate::store::snapshot::{self, AccountRow};
use crate::store::writer::StoreWriter;
use crate::usage;

/// The API's description, served at `/admin/openapi.json` and checked against the server by a test.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");
const MAX_BODY: usize = 64 * 1024;

pub struct Admin {
    w: AdminWiring,
    /// Reloads the config, and knows the one in force.
    reloader: Arc<Reloader>,
}

/// The server's state the admin API reads and edits, built by `app`.
pub struct AdminWiring {
    pub token: String,
    pub db: Db,
    pub registry: Arc<Registry>,
    /// Edits reach memory through the change feed; this makes it read them now.
    pub refresh: RefreshWaker,
    pub metrics: Arc<Metrics>,
    /// For the ledger queue's depth.
    pub writer: StoreWriter,
    /// For the jobs held in memory.
    pub jobs: Arc<Jobs>,
    /// fal's Platform API, for reconciliation.
    pub platform: Arc<Platform>,
}

#[derive(Serialize)]
struct AccountView {
    name: String,
    plan: String,
    suspended: bool,
    #[serde(flatten)]
    standing: Standing,
}

#[derive(Serialize)]
struct CreatedKey {
    id: i64,
    account: String,
    key: String,
    prefix: String,
}

/// A price synced from fal, which prices its endpoint in place of the rule.
#[derive(Serialize)]
struct SyncedView {
    endpoint: String,
    unit: &'static str,
    usd: String,
}

#[derive(Serialize)]
struct PriceTableView<'a> {
    billing: &'a BillingConfig,
    pricing: &'a [PriceRuleConfig],
    synced: Vec<SyncedView>,
}

#[derive(Serialize)]
struct Reloaded {
    reloaded: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewAccount {
    name: String,
    #[serde(default)]
    credits: i64,
    plan: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credits {
    credits: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Plan {
    plan: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewKey {
    account: String,
}

/// A store refusal is the caller's mistake; anything else is ours.
fn invalid(e: Error) -> ApiError {
    match e {
        Error::Usage(why) => ApiError::Invalid(why),
        other => other.into(),
    }
}

/// A query parameter's value, percent-decoded.
fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|p| p.strip_prefix(name)?.strip_prefix('='))
        .map(percent_decoded)
}

/// The longest an admin request's body may take to arrive.
const BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn read_json<T: DeserializeOwned>(req: Request<Incoming>) -> Result<T, ApiError> {
    small_body::read_json(req.into_body(), MAX_BODY, BODY_WAIT).await
}

impl Handler for Admin {
    async fn handle(&self, req: Request<Incoming>, _conn: Conn) -> Response<Body> {
        let (method, path) = (req.method().clone(), req.uri().path().to_owned());
        let resp = match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        tracing::info!(%method, %path, status = resp.status().as_u16(), "admin");
        resp
    }
}

impl Admin {
    pub fn new(reloader: Arc<Reloader>, w: AdminWiring) -> Self {
        Self { w, reloader }
    }

    /// Compares the whole token whatever the first difference, so timing tells nothing.
    fn authorized(&self, req: &Request<Incoming>) -> bool {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        bool::from(presented.as_bytes().ct_eq(self.w.token.as_bytes()))
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        if !self.authorized(&req) {
            return Err(ApiError::AdminUnauthorized);
        }
        let path = req.uri().path().to_owned();
        if path == "/metrics" && req.method() == Method::GET {
            return Ok(self.metrics().await);
        }
        let segments: Vec<&str> = path
            .strip_prefix("/admin/")
            .ok_or(ApiError::NotFound)?
            .trim_end_matches('/')
            .split('/')
            .collect();
        match (req.method().clone(), segments.as_slice()) {
            (Method::GET, ["openapi.json"]) => {
                let mut resp = Response::new(Body::full(OPENAPI));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Ok(resp)
            }
            (Method::GET, ["prices"]) => {
                let config = self.reloader.config();
                // Those in force: not a stored price a pinned rule masks,
                // nor one whose rule is gone.
                let synced = self
                    .reloader
                    .tunables()
                    .prices
                    .synced_prices()
                    .into_iter()
                    .map(|p| SyncedView {
                        endpoint: p.endpoint,
                        unit: p.unit.name(),
                        usd: format_scaled(u128::from(p.nano_usd), 9),
                    })
                    .collect();
                let view = PriceTableView {
                    billing: &config.billing,
                    pricing: &config.pricing,
                    synced,
                };
                json(StatusCode::OK, &view)
            }
            (Method::POST, ["reload"]) => {
                self.reloader
                    .reload()
                    .await
                    .map_err(|e| ApiError::Invalid(e.to_string()))?;
                json(StatusCode::OK, &Reloaded { reloaded: true })
            }
            (Method::POST, ["accounts"]) => self.create_account(read_json(req).await?).await,
            (Method::GET, ["accounts", name]) => self.account(name).await,
            (Method::POST, ["accounts", name, "topup"]) => {
                let Credits { credits } = read_json(req).await?;
                let name = name.to_string();
                self.edit_account(&name.clone(), move |conn| {
                    admin::topup(conn, &name, credits)
                })
                .await
            }
            (Method::POST, ["accounts", name, action @ ("suspend" | "resume")]) => {
                let (name, suspend) = (name.to_string(), *action == "suspend");
                self.edit_account(&name.clone(), move |conn| {
                    admin::set_suspended(conn, &name, suspend)?;
                    admin::account(conn, &name)
                })
                .await
            }
            (Method::PUT, ["accounts", name, "plan"]) => {
                let name = name.to_string();
                let Plan { plan } = read_json(req).await?;
                self.known_plan(&plan)?;
                self.edit_account(&name.clone(), move |conn| {
                    admin::set_plan(conn, &name, &plan)?;
                    admin::account(conn, &name)
                })
                .await
            }
            (Method::GET, ["accounts", name, "payments"]) => {
                let account = self.find(name).await?;
                let rows = self
                    .w
                    .db
                    .run(move |conn| payments::list(conn, account.id))
                    .await?;
                json(StatusCode::OK, &rows)
            }
            (Method::GET, ["reconcile"]) => {
                let period = Period::parse(
                    query_param(&req, "since").as_deref(),
                    query_param(&req, "until").as_deref(),
                    query_param(&req, "tolerance_usd").as_deref(),
                )
                .map_err(|e| ApiError::Invalid(e.to_string()))?;
                let config = self.reloader.config();
                let report = reconcile::run(
                    &self.w.platform,
                    &self.w.db,
                    &config,
                    period.since,
                    period.until,
                )
                .await
                .map_err(|e| match e {
                    Error::Platform(why) => ApiError::PlatformFailed(why),
                    other => other.into(),
                })?;
                json(StatusCode::OK, &period.judged(report))
            }
            (Method::GET, ["accounts", name, "usage"]) => {
                let since = query_param(&req, "since");
                self.usage(name, since).await
            }
            (Method::GET, ["keys"]) => {
                let account = query_param(&req, "account");
                let keys: Vec<KeyListing> = self
                    .w
                    .db
                    .run(move |conn| admin::list_keys(conn, account.as_deref()))
                    .await?;
                json(StatusCode::OK, &keys)
            }
            (Method::POST, ["keys"]) => self.create_key(read_json(req).await?).await,
            (Method::POST, ["keys", id, action @ ("disable" | "enable")]) => {
                let id: i64 = id.parse().map_err(|_| ApiError::NotFound)?;
                self.set_key(id, *action == "disable").await
            }
            _ => Err(ApiError::NotFound),
        }
    }

    async fn metrics(&self) -> Response<Body> {
        // A scrape answers within a second whatever the database does
        // (the gauge is then left out).
        let unbilled = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            self.w.db.run(|c| Ok(books::last_unbilled(c)?)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
        let gauges = Gauges {
            credits_held: self.w.registry.credits_held(),
            ledger_queue_depth: self.w.writer.queue_depth(),
            jobs_in_memory: self.w.jobs.in_memory(),
            reconcile_unbilled_nano_usd: unbilled,
        };
        let mut resp = Response::new(Body::full(self.w.metrics.render(gauges)));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }

    fn known_plan(&self, plan: &str) -> Result<(), ApiError> {
        match self.reloader.config().plans.contains_key(plan) {
            true => Ok(()),
            false => Err(ApiError::Invalid(format!("no plan named {plan:?}"))),
        }
    }

    /// An account as it is now: on a single node, in memory if this server
    /// knows it, else as stored; on a database several nodes share, as the
    /// database has it (each node's memory holds only its own lease).
    async fn view(&self, row: &AccountRow) -> Result<AccountView, ApiError> {
        let live = self.w.registry.account(row.id);
        let standing = match (self.w.registry.is_leasing(), live) {
            (false, Some(a)) => Standing {
                balance: a.balance(),
                leased: 0,
                held: a.held(),
                available: a.available(),
            },
            _ => {
                let id = row.id;
                self.w
                    .db
                    .run(move |conn| Ok(leases::standing(conn, id)?))
                    .await?
            }
        };
        Ok(AccountView {
            name: row.name.clone(),
            plan: row.plan.clone(),
            suspended: row.suspended,
            standing,
        })
    }

    async fn find(&self, name: &str) -> Result<AccountRow, ApiError> {
        let name = name.to_owned();
        self.w
            .db
            .run(move |conn| admin::account(conn, &name))
            .await
            .map_err(|_| ApiError::NotFound)
    }

    async fn account(&self, name: &str) -> Result<Response<Body>, ApiError> {
        let row = self.find(name).await?;
        json(StatusCode::OK, &self.view(&row).await?)
    }

    async fn create_account(&self, new: NewAccount) -> Result<Response<Body>, ApiError> {
        let plan = new.plan.unwrap_or_else(|| DEFAULT_PLAN.to_owned());
        self.known_plan(&plan)?;
        let name = new.name.clone();
        let exists = self.find(&name).await.is_ok();
        if exists {
            return Err(ApiError::Conflict(format!("account {name:?} exists")));
        }
        let row = self
            .w
            .db
            .run(move |conn| admin::create_account(conn, &new.name, new.credits, &plan))
            .await
            .map_err(invalid)?;
        // The opening balance reaches memory through the change feed, like a
        // top-up: answer once it has, so a key made next works at once.
        self.w.refresh.wake();
        for _ in 0..200 {
            if self.w.registry.account(row.id).is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        json(StatusCode::CREATED, &self.view(&row).await?)
    }

    /// Runs an edit of account `name` (404 if it does not exist), applies
    /// the row to memory, and answers with the account.
    async fn edit_account<F>(&self, name: &str, edit: F) -> Result<Response<Body>, ApiError>
    where
        F: FnOnce(&mut crate::store::sql::Conn) -> Result<AccountRow, Error> + Send + 'static,
    {
        self.find(name).await?;
        let row = self.w.db.run(edit).await.map_err(invalid)?;
        self.w.registry.account_changed(&row);
        self.w.refresh.wake();
        json(StatusCode::OK, &self.view(&row).await?)
    }

    async fn usage(&self, name: &str, since: Option<String>) -> Result<Response<Body>, ApiError> {
        self.find(name).await?;
        let config = self.reloader.config();
        let prices = PriceTable::new(&config.billing, &config.pricing, &[])?;
        let name = name.to_owned();
        let report = self
            .w
            .db
            .run(move |conn| usage::report(conn, &prices, &name, since))
            .await
            .map_err(invalid)?;
        json(StatusCode::OK, &report)
    }

    async fn create_key(&self, new: NewKey) -> Result<Response<Body>, ApiError> {
        self.find(&new.account).await?;
        let origin = admin::KeyOrigin::operator(&self.reloader.config());
        let created = issue::create(
            &self.w.db,
            &self.w.registry,
            new.account.clone(),
            DEFAULT_PLAN.into(),
            origin,
        )
        .await?;
        let view = CreatedKey {
            id: created.id,
            account: new.account,
            key: created.secret,
            prefix: created.display_prefix,
        };
        json(StatusCode::CREATED, &view)
    }

    async fn set_key(&self, id: i64, disabled: bool) -> Result<Response<Body>, ApiError> {
        let listing = self
            .w
            .db
            .run(move |conn| {
                if admin::key_account(conn, id)?.is_none() {
                    return Ok(None);
                }
                admin::set_key_disabled(conn, id, disabled)?;
                let row = snapshot::key_by_id(conn, id)?;
                let listing = admin::list_keys(conn, None)?
                    .into_iter()
                    .find(|k| k.id == id);
                Ok(row.zip(listing))
            })
            .await?
            .ok_or(ApiError::NotFound)?;
        self.w.registry.key_changed(&listing.0);
        json(StatusCode::OK, &listing.1)
    }
}

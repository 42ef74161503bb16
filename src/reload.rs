//! Reloading `config.toml` while the server runs (SIGHUP, `POST
//! /admin/reload`): prices, plans and limits, and the TLS certificate. The
//! new file is read and everything built from it first; only if all of it
//! is good is anything swapped in, so a bad file changes nothing. Requests
//! in flight finish under the settings they started with.

use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::billing::pricing::SyncedPrice;
use crate::config::Config;
use crate::error::Error;
use crate::proxy::{Proxy, Tunables};
use crate::store::{db::Db, synced_prices};
use crate::tls;

pub struct Reloader {
    /// The file to read again (`None`: ./config.toml or the embedded default, as at start).
    path: Option<PathBuf>,
    /// Where fal's synced prices are read from.
    db: Db,
    /// One rebuild at a time: a reprice must not put back prices built
    /// from the config a reload is replacing.
    turn: tokio::sync::Mutex<()>,
    proxy: Arc<Proxy>,
    /// The TLS listener's settings, if there is one.
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    /// The config in force.
    config: ArcSwap<Config>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        config: Config,
        proxy: Arc<Proxy>,
        tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
        db: Db,
    ) -> Self {
        Self {
            path,
            db,
            turn: tokio::sync::Mutex::new(()),
            proxy,
            tls,
            config: ArcSwap::from_pointee(config),
        }
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The settings (prices among them) new requests are admitted under.
    pub fn tunables(&self) -> Arc<Tunables> {
        self.proxy.tunables()
    }

    pub async fn reload(&self) -> Result<(), Error> {
        let result = self.try_reload().await;
        match &result {
            Ok(()) => tracing::info!("config reloaded"),
            Err(e) => tracing::warn!(error = %e, "reload refused: the old settings stay in force"),
        }
        result
    }

    /// fal's synced prices moved: the table is built again from the config
    /// in force and the store's prices. Requests admitted before keep theirs.
    pub async fn reprice(&self) -> Result<(), Error> {
        let _turn = self.turn.lock().await;
        let synced = self.synced().await?;
        let tunables = Tunables::new(&self.config.load(), &synced)?;
        self.proxy.retune(tunables);
        tracing::info!(synced = synced.len(), "synced prices in force");
        Ok(())
    }

    async fn synced(&self) -> Result<Vec<SyncedPrice>, Error> {
        self.db.run(|conn| Ok(synced_prices::load(conn)?)).await
    }

    /// The synced prices from the store, else (it cannot be read) those in
    /// force: a reload (a certificate's, say) never waits on the database.
    async fn synced_or_in_force(&self) -> Vec<SyncedPrice> {
        match self.synced().await {
            Ok(synced) => synced,
            Err(e) => {
                tracing::warn!(error = %e, "synced prices unread: those in force are kept");
                self.proxy.tunables().prices.synced_prices()
            }
        }
    }

    async fn try_reload(&self) -> Result<(), Error> {
        let _turn = self.turn.lock().await;
        let mut new = Config::load(self.path.as_deref())?;
        let tunables = Tunables::new(&new, &self.synced_or_in_force().await)?;
        let cert = match &self.tls {
            Some(_) => Some(tls::server_config(
                new.server.tls_cert.as_deref(),
                new.server.tls_key.as_deref(),
            )?),
            None => None,
        };
        let old = self.config.load();
        self.keep_what_needs_a_restart(&old, &mut new);
        self.proxy.retune(tunables);
        if let (Some(slot), Some(cert)) = (&self.tls, cert) {
            slot.store(cert);
        }
        self.config.store(Arc::new(new));
        Ok(())
    }

    /// Listeners, upstreams and the store are set up once: a changed value
    /// is reported and the running one kept.
    fn keep_what_needs_a_restart(&self, old: &Config, new: &mut Config) {
        let changed = [
            (
                "[server] listen/plain_listen",
                old.server.listen != new.server.listen
                    || old.server.plain_listen != new.server.plain_listen,
            ),
            (
                "[upstream]",
                format!("{:?}", old.upstream) != format!("{:?}", new.upstream),
            ),
            (
                "[store]",
                (&old.store.path, &old.store.url, &old.store.ca_file)
                    != (&new.store.path, &new.store.url, &new.store.ca_file),
            ),
            ("[admin]", old.admin.listen != new.admin.listen),
        ];
        for (section, differs) in changed {
            if differs {
                tracing::warn!("{section} changed: it takes effect at the next restart");
            }
        }
        new.server = crate::config::ServerConfig {
            tls_cert: new.server.tls_cert.clone(),
            tls_key: new.server.tls_key.clone(),
            ..old.server.clone()
        };
        new.upstream = old.upstream.clone();
        new.store = old.store.clone();
        new.admin = old.admin.clone();
    }
}

//! `config.toml`: the operator's one file. Parsed and validated here; nothing
//! else in the crate reads the file system for settings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::Error;

/// The repository's documented `config.toml`, compiled in so that the binary
/// runs on a bare machine with no file beside it.
pub const EMBEDDED_DEFAULT: &str = include_str!("../config.toml");

/// Where `--config` points when it is not given.
pub const DEFAULT_PATH: &str = "config.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    #[serde(default)]
    pub upstream: UpstreamConfig,
    #[serde(default)]
    pub store: StoreConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// TLS listener; `None` turns it off.
    pub listen: Option<SocketAddr>,
    /// Plain HTTP (h1 and h2c) listener, for use behind a load balancer.
    pub plain_listen: Option<SocketAddr>,
    /// PEM chain and key; when both are absent the embedded dev certificate is used.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub header_read_timeout_secs: u64,
    pub tls_handshake_timeout_secs: u64,
    /// How long in-flight requests get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: None,
            plain_listen: None,
            tls_cert: None,
            tls_key: None,
            header_read_timeout_secs: 10,
            tls_handshake_timeout_secs: 10,
            shutdown_grace_secs: 30,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    pub run: String,
    pub queue: String,
    /// Name of the environment variable that holds the operator's fal key.
    pub fal_key_env: String,
    /// Longest wait for fal's response headers; the body then streams unbounded.
    pub timeout_secs: u64,
    pub connect_timeout_secs: u64,
    /// An extra root CA to trust for the upstream, beside the public roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            run: "https://fal.run".into(),
            queue: "https://queue.fal.run".into(),
            fal_key_env: "FAL_KEY".into(),
            timeout_secs: 300,
            connect_timeout_secs: 10,
            ca_file: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub path: PathBuf,
    /// How often the server looks for changes made by the CLI.
    pub refresh_interval_ms: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: "abhiapi.db".into(),
            refresh_interval_ms: 250,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_json_body_bytes: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_json_body_bytes: 10 * 1024 * 1024,
        }
    }
}

impl Config {
    /// Reads `path`; when `path` is the default and no such file exists, the
    /// embedded default is used so that a bare binary still starts.
    pub fn load(path: Option<&Path>) -> Result<Self, Error> {
        let (text, base) = match path {
            Some(p) => (read(p)?, parent_dir(p)),
            None if Path::new(DEFAULT_PATH).exists() => {
                (read(Path::new(DEFAULT_PATH))?, PathBuf::from("."))
            }
            None => {
                tracing::info!("no ./config.toml: using the embedded default");
                (EMBEDDED_DEFAULT.to_owned(), PathBuf::from("."))
            }
        };
        let mut config = Self::parse(&text)?;
        config.resolve_paths(&base);
        Ok(config)
    }

    pub fn parse(text: &str) -> Result<Self, Error> {
        let config: Self = toml::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), Error> {
        let s = &self.server;
        if s.listen.is_none() && s.plain_listen.is_none() {
            return Err(Error::Config(
                "[server] needs `listen` or `plain_listen`".into(),
            ));
        }
        if s.tls_cert.is_some() != s.tls_key.is_some() {
            return Err(Error::Config(
                "[server] `tls_cert` and `tls_key` go together".into(),
            ));
        }
        for (name, url) in [("run", &self.upstream.run), ("queue", &self.upstream.queue)] {
            crate::upstream::Target::parse(url)
                .map_err(|e| Error::Config(format!("[upstream] {name}: {e}")))?;
        }
        if self.upstream.timeout_secs == 0 || self.upstream.connect_timeout_secs == 0 {
            return Err(Error::Config("[upstream] timeouts must be positive".into()));
        }
        Ok(())
    }

    /// Relative paths mean relative to the config file, not to wherever the
    /// operator happened to start the binary.
    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.store.path);
        for p in [
            &mut self.server.tls_cert,
            &mut self.server.tls_key,
            &mut self.upstream.ca_file,
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    pub fn upstream_timeout(&self) -> Duration {
        Duration::from_secs(self.upstream.timeout_secs)
    }
}

fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))
}

fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_parses() {
        let c = Config::parse(EMBEDDED_DEFAULT).unwrap();
        assert_eq!(c.upstream.run, "https://fal.run");
        assert_eq!(c.upstream.fal_key_env, "FAL_KEY");
    }

    #[test]
    fn refuses_unknown_keys_and_bad_upstreams() {
        assert!(Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 1").is_err());
        let bad = "[server]\nplain_listen = \"127.0.0.1:1\"\n[upstream]\nrun = \"ftp://x\"";
        assert!(Config::parse(bad).is_err());
    }
}

//! rustls configuration for both sides: the server's certificate (with the
//! embedded development one as a fallback) and the roots trusted upstream.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::error::Error;

/// The development certificate in `certs/`, for `localhost` and 127.0.0.1,
/// signed by `certs/dev-ca.pem`. Used when no `tls_cert` is configured.
const DEV_CERT: &[u8] = include_bytes!("../certs/dev-cert.pem");
const DEV_KEY: &[u8] = include_bytes!("../certs/dev-key.pem");

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| Error::Tls(format!("cannot read {}: {e}", path.display())))
}

fn certs(pem: &[u8], what: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Tls(format!("{what}: {e}")))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!("{what}: no certificate found")));
    }
    Ok(certs)
}

/// The server side: HTTP/2 and HTTP/1.1 offered by ALPN.
pub fn server_config(cert: Option<&Path>, key: Option<&Path>) -> Result<Arc<ServerConfig>, Error> {
    let (cert_pem, key_pem) = match (cert, key) {
        (Some(c), Some(k)) => (read(c)?, read(k)?),
        _ => {
            tracing::warn!("no tls_cert configured: serving the embedded development certificate");
            (DEV_CERT.to_vec(), DEV_KEY.to_vec())
        }
    };
    let chain = certs(&cert_pem, "tls_cert")?;
    let key: PrivateKeyDer = rustls_pemfile::private_key(&mut &key_pem[..])
        .map_err(|e| Error::Tls(format!("tls_key: {e}")))?
        .ok_or_else(|| Error::Tls("tls_key: no private key found".into()))?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The upstream side: the public web roots, plus `ca_file` if given.
pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, Error> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        for cert in certs(&read(path)?, "ca_file")? {
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("ca_file: {e}")))?;
        }
    }
    let config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

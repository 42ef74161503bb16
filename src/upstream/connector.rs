//! How a new connection to fal is opened: TCP to the configured host, with
//! TLS (ALPN offering h2, then HTTP/1.1) for an `https` one; or a pipe in
//! memory to a service in this process. The pipe is for the in-process
//! request-path bench, where loopback networking would swamp the proxy's
//! own work; no config reaches it.

use std::io;
use std::sync::Arc;

use http::uri::Authority;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Serves HTTP on the far end of each new in-memory connection.
pub type ServeInMemory = Arc<dyn Fn(DuplexStream) + Send + Sync>;

/// Bytes in flight each way on an in-memory connection.
const PIPE_BYTES: usize = 64 * 1024;

pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// An open connection, and whether its peer chose HTTP/2.
pub struct Connected {
    pub io: TokioIo<Box<dyn Io>>,
    pub h2: bool,
}

pub enum Connector {
    Network(TlsConnector),
    Memory(ServeInMemory),
}

impl Connector {
    pub fn network(mut tls: rustls::ClientConfig) -> Self {
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Connector::Network(TlsConnector::from(Arc::new(tls)))
    }

    pub async fn connect(&self, https: bool, authority: &Authority) -> io::Result<Connected> {
        let tls = match self {
            Connector::Memory(serve) => {
                let (ours, theirs) = tokio::io::duplex(PIPE_BYTES);
                serve(theirs);
                return Ok(plain(ours));
            }
            Connector::Network(tls) => tls,
        };
        // An IPv6 literal comes bracketed in a URL, bare to the resolver.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        if !https {
            return Ok(plain(tcp));
        }
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let stream = tls.connect(name, tcp).await?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        Ok(Connected {
            io: TokioIo::new(Box::new(stream)),
            h2,
        })
    }
}

fn plain(io: impl Io + 'static) -> Connected {
    Connected {
        io: TokioIo::new(Box::new(io)),
        h2: false,
    }
}

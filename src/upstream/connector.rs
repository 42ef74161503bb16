//! How a new connection to fal is opened: TCP to the configured host, with
//! TLS (ALPN offering h2, then HTTP/1.1) for an `https` one; or a pipe in
//! memory to a service in this process. The pipe is for the in-process
//! request-path bench, where loopback networking would swamp the proxy's
//! own work; no config reaches it.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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

    /// `within` bounds the TCP connect (see [`first_to_answer`]); the caller bounds the whole.
    pub async fn connect(
        &self,
        https: bool,
        authority: &Authority,
        within: Duration,
    ) -> io::Result<Connected> {
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
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
        let tcp = first_to_answer(&addrs, within).await?;
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

/// TCP to the first of `addrs` that answers, each given its share of
/// `within`, as hyper's own connector did: an address that drops every SYN
/// (a dead node still in DNS, an IPv6 path that goes nowhere) must not use
/// up the whole connect timeout of a host whose other addresses answer.
async fn first_to_answer(addrs: &[SocketAddr], within: Duration) -> io::Result<TcpStream> {
    let share = within / u32::try_from(addrs.len().max(1)).unwrap_or(u32::MAX);
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the host has no address");
    for addr in addrs {
        match tokio::time::timeout(share, TcpStream::connect(addr)).await {
            Ok(Ok(tcp)) => return Ok(tcp),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = io::Error::new(io::ErrorKind::TimedOut, format!("{addr} never answered"))
            }
        }
    }
    Err(last)
}

fn plain(io: impl Io + 'static) -> Connected {
    Connected {
        io: TokioIo::new(Box::new(io)),
        h2: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, TcpSocket};

    /// A listener whose accept queue is full: a connect to it hangs.
    async fn black_hole() -> (TcpListener, Vec<TcpStream>) {
        let sock = TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = sock.listen(0).unwrap();
        let addr = listener.local_addr().unwrap();
        let mut fill = Vec::new();
        for _ in 0..4 {
            let s = TcpSocket::new_v4().unwrap();
            match tokio::time::timeout(Duration::from_millis(300), s.connect(addr)).await {
                Ok(Ok(c)) => fill.push(c),
                _ => break,
            }
        }
        (listener, fill)
    }

    #[tokio::test]
    async fn an_address_that_never_answers_leaves_time_for_the_next() {
        let (hole, _fill) = black_hole().await;
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = [hole.local_addr().unwrap(), good.local_addr().unwrap()];
        let within = Duration::from_secs(2);
        let tcp = tokio::time::timeout(within, first_to_answer(&addrs, within))
            .await
            .expect("the first address used up the whole connect timeout")
            .unwrap();
        assert_eq!(tcp.peer_addr().unwrap(), addrs[1]);
    }
}

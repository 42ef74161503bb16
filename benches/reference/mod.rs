//! The floor the load benchmark measures AbhiAPI's own cost against: a
//! reverse proxy on hyper and nothing else (no auth, no billing, no log
//! line, no deadlines), threaded as AbhiAPI is: a current-thread runtime
//! per core, each with its own `SO_REUSEPORT` socket (AbhiAPI's own
//! `bind`) and its own pooled client. It runs as a child process, the
//! loadgen binary started again with `--hyper-reference UPSTREAM`, so that
//! its CPU time is its own.

use std::net::SocketAddr;

use http::{header, Request, Uri, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// Serves until killed; prints `listening PLAIN TLS` once bound. TLS with
/// the development certificate, h2 and HTTP/1.1 by ALPN, as AbhiAPI's.
pub fn run(upstream: SocketAddr) {
    let threads = abhiapi::server::threads::count(0);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (plain, plain_sockets) = abhiapi::server::threads::bind(any, threads).unwrap();
    let (tls, tls_sockets) = abhiapi::server::threads::bind(any, threads).unwrap();
    println!("listening {plain} {tls}");
    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
    let config = abhiapi::tls::server_config(
        Some(&certs.join("dev-cert.pem")),
        Some(&certs.join("dev-key.pem")),
    )
    .unwrap();
    let threads: Vec<_> = plain_sockets
        .into_iter()
        .zip(tls_sockets)
        .map(|(plain, tls)| {
            let acceptor = TlsAcceptor::from(config.clone());
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(async move {
                        tokio::join!(
                            serve(plain, upstream, None),
                            serve(tls, upstream, Some(acceptor))
                        );
                    });
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

async fn serve(socket: std::net::TcpListener, upstream: SocketAddr, tls: Option<TlsAcceptor>) {
    let listener = TcpListener::from_std(socket).unwrap();
    // As AbhiAPI's: without it, a request written in two segments waits
    // on the mock's delayed ACK (40 ms p99 over h2c).
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<_, Incoming> = Client::builder(TokioExecutor::new()).build(http);
    let server = auto::Builder::new(TokioExecutor::new());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (client, server, tls) = (client.clone(), server.clone(), tls.clone());
        tokio::spawn(async move {
            let service = service_fn(move |mut req: Request<Incoming>| {
                let client = client.clone();
                async move {
                    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
                    let uri: Uri = format!("http://{upstream}{path}").parse().unwrap();
                    *req.uri_mut() = uri;
                    *req.version_mut() = Version::HTTP_11;
                    req.headers_mut().remove(header::HOST);
                    client.request(req).await
                }
            });
            match tls {
                None => {
                    let _ = server.serve_connection(TokioIo::new(stream), service).await;
                }
                Some(acceptor) => {
                    let Ok(stream) = acceptor.accept(stream).await else {
                        return;
                    };
                    let _ = server.serve_connection(TokioIo::new(stream), service).await;
                }
            }
        });
    }
}

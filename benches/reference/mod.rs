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

/// Serves until killed; prints `listening ADDR` once bound.
pub fn run(upstream: SocketAddr) {
    let threads = abhiapi::server::threads::count(0);
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (addr, sockets) = abhiapi::server::threads::bind(any, threads).unwrap();
    println!("listening {addr}");
    let threads: Vec<_> = sockets
        .into_iter()
        .map(|socket| {
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(serve(socket, upstream));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

async fn serve(socket: std::net::TcpListener, upstream: SocketAddr) {
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
        let (client, server) = (client.clone(), server.clone());
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
            let _ = server.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

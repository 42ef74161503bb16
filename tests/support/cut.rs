//! A loopback TCP relay that the tests can cut, to take a server (the
//! tests' PostgreSQL) away from the nodes and give it back, as a network
//! or a database outage would: connections refused and reset, or frozen
//! (bytes stop, nothing closes, as when packets are dropped).

use std::net::SocketAddr;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Open,
    /// New connections are closed at once; open ones are reset.
    Refused,
    /// Nothing passes, and nothing closes, until the link changes.
    Frozen,
    /// New connections pass again, but those frozen stay so for good, as a
    /// proxy between holds the connections of a server that went away.
    Back,
}

impl Link {
    fn passes(self) -> bool {
        matches!(self, Link::Open | Link::Back)
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    link: watch::Sender<Link>,
}

impl Relay {
    /// Relays 127.0.0.1:(a free port) to `target`, on the current runtime.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, watching) = watch::channel(Link::Open);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target, watching.clone()));
            }
        });
        Self { addr, link }
    }

    pub fn set(&self, link: Link) {
        self.link.send_replace(link);
    }
}

async fn relay(mut client: TcpStream, target: SocketAddr, mut link: watch::Receiver<Link>) {
    // A connection made while frozen hangs until the link changes.
    let now = *link.borrow_and_update();
    if now == Link::Frozen {
        let _ = link.changed().await;
    }
    if !link.borrow_and_update().passes() {
        return reset(client);
    }
    let Ok(mut server) = TcpStream::connect(target).await else {
        return reset(client);
    };
    let cut = async {
        let _ = link.wait_for(|l| !l.passes()).await;
    };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
        _ = cut => {}
    }
    if *link.borrow() == Link::Frozen {
        // Held open, silent, until the link changes again.
        let _ = link.wait_for(|l| *l != Link::Frozen).await;
        if *link.borrow() == Link::Back {
            let _ = link.wait_for(|l| *l == Link::Refused).await;
        }
    }
    let _ = server.shutdown().await;
    reset(client);
}

/// Closes with a reset, as a peer that has gone does.
fn reset(client: TcpStream) {
    // A zero linger does not block the drop: it resets at once.
    #[allow(deprecated)]
    let _ = client.set_linger(Some(std::time::Duration::ZERO));
    drop(client);
}

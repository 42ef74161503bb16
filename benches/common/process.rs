//! What the benches that run the release binary as a process share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A loopback port free a moment ago.
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// This tree's release binary, which the bench scripts build.
pub fn release_binary() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/release/abhiapi")
}

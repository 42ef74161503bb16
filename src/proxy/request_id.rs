//! Request ids: the id of every charge, returned to clients as `x-request-id`.
//! A random per-process prefix plus a counter: unique across restarts
//! without a syscall per request.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl RequestIds {
    pub fn new() -> Result<Self, getrandom::Error> {
        let mut seed = [0u8; 8];
        getrandom::getrandom(&mut seed)?;
        Ok(Self {
            prefix: format!("req_{:016x}", u64::from_le_bytes(seed)),
            next: AtomicU64::new(1),
        })
    }

    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{}{n:08x}", self.prefix)
    }
}

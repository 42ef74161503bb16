//! Request ids: the id of every charge, returned to clients as `x-request-id`.
//! A random per-process prefix plus a counter: unique across restarts
//! without a syscall per request.

use std::sync::atomic::{AtomicU64, Ordering};

pub struct RequestIds {
    /// `req_` and 16 hex digits of randomness.
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

    /// The prefix and at least 8 hex digits of the counter, written by hand:
    /// `format!` cost more than the rest of the id's work together.
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(8);
        let mut id = String::with_capacity(self.prefix.len() + digits as usize);
        id.push_str(&self.prefix);
        for shift in (0..digits).rev() {
            let nibble = (n >> (shift * 4)) & 0xf;
            id.push(char::from(b"0123456789abcdef"[nibble as usize]));
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_the_prefix_then_the_counter_in_hex() {
        let ids = RequestIds::new().unwrap();
        ids.next.store(0xab, Ordering::Relaxed);
        assert_eq!(ids.next(), format!("{}{:08x}", ids.prefix, 0xab));
        ids.next.store(0x1_2345_6789, Ordering::Relaxed);
        assert_eq!(
            ids.next(),
            format!("{}{:08x}", ids.prefix, 0x1_2345_6789u64)
        );
        assert_eq!(ids.prefix.len(), 20);
    }
}

//! The descriptor limit, which the connection cap must stay under: a
//! server that runs out of descriptors cannot accept even `/healthz`.

/// Raises the soft descriptor limit to the hard one (the soft default,
/// often 1024, is set for programs that do not expect many connections),
/// and keeps `max` to half of it: each client connection may need one
/// upstream connection too, and the store and journal need a few.
pub fn cap(max: usize) -> usize {
    let Some(limit) = raise_limit() else {
        return max;
    };
    let room = usize::try_from(limit / 2).unwrap_or(usize::MAX);
    if max > room {
        tracing::warn!(
            max_connections = max,
            descriptor_limit = limit,
            "max_connections is over half the descriptor limit: capping connections at {room}"
        );
    }
    max.min(room).max(1)
}

fn raise_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    Some(lim.rlim_cur)
}

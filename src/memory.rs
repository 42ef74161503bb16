//! Giving memory back to the operating system after a burst: a flood of
//! stalled bodies or silent connections must not leave the process at its
//! high-water mark once the clients have gone. (glibc only; other
//! allocators need none of this.)

use std::time::Duration;

/// How often freed memory is handed back: soon after a flood, seldom
/// enough to cost nothing measurable.
const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Request bodies are buffered up to `max_json_body_bytes` each. glibc
/// serves such sizes with mmap at first, but after the first is freed it
/// raises its threshold to that size and serves the next ones from heaps it
/// seldom shrinks: a burst of stalled bodies then kept its memory after
/// the clients left. A fixed threshold turns that adjustment off, so a
/// large buffer is always its own mapping, returned whole when freed.
pub fn unmap_large_buffers() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation policy; called once,
    // before the server allocates request buffers.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Each connection's small allocations (a few KiB) come from heaps that
/// glibc shrinks only from the top, so the pages freed when thousands of
/// connections close stay resident; `malloc_trim` releases every free page.
/// Runs until aborted.
pub fn spawn_trimmer() -> tokio::task::JoinHandle<()> {
    tokio::spawn(async {
        loop {
            tokio::time::sleep(TRIM_EVERY).await;
            #[cfg(all(target_os = "linux", target_env = "gnu"))]
            // SAFETY: malloc_trim only returns free pages to the OS.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    })
}

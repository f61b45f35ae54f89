//! Graceful shutdown on SIGTERM or SIGINT: stop taking clients, close every
//! connection with 1001 after its queued frames, wait a bounded time, exit.
//!
//! Every acknowledged message is already durable (an ack is sent only after its
//! commit), so nothing acked is lost however the wait ends; the 1001 tells clients
//! to reconnect (to another node, behind a balancer) and `sync`.

use crate::node::Shared;
use std::time::{Duration, Instant};

/// Blocks SIGTERM and SIGINT in this thread (and the threads it starts after), so
/// [`wait`] can take them synchronously.
pub fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: `set` is initialised by sigemptyset before use; the calls only read and
    // write it and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            anyhow::bail!("blocking SIGTERM/SIGINT: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits for one of the blocked signals; returns its name.
pub fn wait(set: &libc::sigset_t) -> anyhow::Result<&'static str> {
    let mut sig = 0;
    // SAFETY: `set` came from `block_signals`; `sig` is a valid out-pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        anyhow::bail!("waiting for a signal: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" })
}

/// Marks the process draining (readiness fails, new sockets get 503, every shard
/// closes its connections with 1001) and waits up to `grace` for them to go.
/// Returns the connections still open when it stopped waiting.
pub fn drain(shared: &Shared, grace: Duration) -> i64 {
    shared.health.start_draining();
    let deadline = Instant::now() + grace;
    loop {
        let left = shared.metrics.connections.get();
        if left <= 0 || Instant::now() >= deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

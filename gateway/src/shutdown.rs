//! Signals: SIGHUP reloads the config ([`crate::reload`]); SIGTERM or SIGINT
//! drains the node and ends the process, in this order, within
//! `limits.shutdown_grace_secs` from the signal:
//!
//! 1. `/readyz` fails (503 "draining for shutdown") while the node goes on serving
//!    everyone for `limits.drain_notice_ms`, so the balancer's health checks take it
//!    out and sends new connections elsewhere.
//! 2. New sockets get 503; every connection gets its queued frames, then close 1001
//!    (reason: reconnect and sync). Requests a client sends after its close frame
//!    are not read (they have no answer; the client resends them after reconnecting,
//!    with the same `client_msg_id`, and the store's idempotency keys answer them
//!    with the first outcome). Commands already queued in the node still commit.
//! 3. Once the connections are gone, or 2 s before the deadline: in a fleet, the
//!    node stops reading its stream, finishes the commands it read and sends the
//!    replies and events queued for other nodes (their clients wait for them),
//!    then leaves the fleet's ring, and the others take its conversations over at
//!    their next heartbeat (claiming them fences this node's writes; the lowest
//!    reaps what was left unread in its stream), instead of after its TTL.
//! 4. The process exits (a watchdog thread ends it at the deadline, whatever is left).
//!
//! Every acknowledged message is already durable (an ack is sent only after its
//! commit), so nothing acked is lost however the drain ends.

use crate::node::Shared;
use std::time::{Duration, Instant};

/// What the drain keeps for leaving the fleet before the deadline.
const LEAVE_BUDGET: Duration = Duration::from_secs(2);

/// A signal [`wait`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Stop(&'static str),
    /// SIGHUP: reload the config.
    Reload,
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and the threads it starts
/// after), so [`wait`] can take them synchronously.
pub fn block_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: `set` is initialised by sigemptyset before use; the calls only read and
    // write it and this thread's signal mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if rc != 0 {
            anyhow::bail!("blocking SIGTERM/SIGINT/SIGHUP: {}", std::io::Error::from_raw_os_error(rc));
        }
        Ok(set)
    }
}

/// Waits for one of the blocked signals.
pub fn wait(set: &libc::sigset_t) -> anyhow::Result<Signal> {
    let mut sig = 0;
    // SAFETY: `set` came from `block_signals`; `sig` is a valid out-pointer.
    let rc = unsafe { libc::sigwait(set, &mut sig) };
    if rc != 0 {
        anyhow::bail!("waiting for a signal: {}", std::io::Error::from_raw_os_error(rc));
    }
    Ok(match sig {
        libc::SIGHUP => Signal::Reload,
        libc::SIGINT => Signal::Stop("SIGINT"),
        _ => Signal::Stop("SIGTERM"),
    })
}

/// Drains the node (steps 1-3 above) and returns the connections still open when
/// it stopped waiting for them. Starts a watchdog that ends the process at the
/// deadline in case a step hangs (a store or Redis call stuck in a timeout).
///
/// Runs on: main.
pub fn drain(shared: &Shared, notice: Duration, grace: Duration) -> i64 {
    let deadline = Instant::now() + grace;
    std::thread::Builder::new()
        .name("drain-deadline".into())
        .spawn(move || {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            tracing::warn!(deadline_secs = grace.as_secs(), "drain deadline reached: exiting now");
            std::process::exit(0);
        })
        .ok();
    shared.health.start_draining();
    shared.metrics.draining.set(1);
    tracing::info!(notice_ms = notice.as_millis() as u64, "draining: /readyz fails; still serving");
    std::thread::sleep(notice.min(deadline.saturating_duration_since(Instant::now())));
    tracing::info!(connections = shared.metrics.connections.get(), "closing connections with 1001");
    shared.health.start_closing();
    let close_by = deadline.checked_sub(LEAVE_BUDGET).unwrap_or(deadline);
    let left = loop {
        let left = shared.metrics.connections.get();
        if left <= 0 || Instant::now() >= close_by {
            break left;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    // In a fleet: stop reading this node's stream and finish what was read (the
    // replies to other nodes' clients go out), then leave, so the others take this
    // node's conversations over at their next heartbeat rather than after its
    // registration expires (and reap what is left in its stream).
    let rest = deadline.saturating_duration_since(Instant::now());
    if !shared.router.quiesce(&shared.sequencer, rest.saturating_sub(LEAVE_BUDGET / 2).min(LEAVE_BUDGET)) {
        tracing::warn!("draining: the fleet queues did not empty in time");
    }
    shared.router.leave(deadline.saturating_duration_since(Instant::now()).min(LEAVE_BUDGET));
    left
}

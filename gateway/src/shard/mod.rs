//! A shard: one thread, pinned to one core, running one monoio runtime with its
//! own SO_REUSEPORT listener. Everything in [`ShardCtx`] stays on its thread.
//!
//! The room holds what runs on a shard: its loop (here), its WebSocket
//! connections (`conn`), its HTTP routes (`http`) over the HTTP/1.1 codec
//! (`http1`) and socket I/O (`netio`).

pub mod blobs;
pub mod conn;
pub mod http;
pub mod http1;
pub mod netio;

use crate::config::IoDriver;
use crate::mailbox::{Drain, Mailbox};
use crate::node::Shared;
use crate::shard::conn::Conn;
use crate::shard::netio::Signal;
use monoio::net::TcpListener;
use protocol::UserId;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::marker::PhantomData;
use std::rc::Rc;
use std::rc::Weak;
use std::sync::Arc;
use std::time::Instant;

/// A user's presence on this shard: its mailbox here and its connections here.
pub struct UserSlot {
    pub user: UserId,
    pub drain: RefCell<Drain>,
    pub conns: RefCell<Vec<Rc<Conn>>>,
}

pub struct ShardCtx {
    pub id: u16,
    /// This shard's series of `shard_connections`.
    pub connections: prometheus::IntGauge,
    pub shared: Arc<Shared>,
    pub users: RefCell<HashMap<UserId, Rc<UserSlot>>>,
    /// The one read buffer every connection on this shard reads into.
    pub scratch: RefCell<Vec<u8>>,
    /// Connections with frames to write; each at most once (its `Flush` state), so
    /// bounded by the connections on the shard.
    pub flush_list: RefCell<Vec<Rc<Conn>>>,
    /// Wakes the flusher.
    pub flush_wake: Signal,
    /// New connections' sync deadlines, in order (all are equally long): one timer
    /// task per shard rather than one per connection. Each entry leaves at its
    /// deadline, so this holds at most the connections made in the last
    /// `sync_deadline_secs`.
    pub sync_deadlines: RefCell<VecDeque<(Instant, Weak<Conn>)>>,
    /// Wakes the deadline task when the queue was empty.
    pub deadline_wake: Signal,
    _not_send: PhantomData<*const ()>,
}

const SCRATCH: usize = 64 * 1024;

impl ShardCtx {
    /// Adds a connection to its user's slot, creating the slot (and its mailbox and
    /// drain task) on the user's first connection here.
    pub fn attach(self: &Rc<Self>, conn: Rc<Conn>) {
        let user = conn.user;
        let slot = self
            .users
            .borrow_mut()
            .entry(user)
            .or_insert_with(|| {
                let (mailbox, drain) = Mailbox::new(self.shared.cfg.limits.mailbox_capacity.get());
                let slot =
                    Rc::new(UserSlot { user, drain: RefCell::new(drain), conns: RefCell::new(Vec::new()) });
                self.shared.registry.insert(user, self.id, mailbox);
                self.shared.presence.changed(user);
                slot
            })
            .clone();
        slot.conns.borrow_mut().push(conn);
    }

    pub fn detach(&self, conn: &Rc<Conn>) {
        let mut users = self.users.borrow_mut();
        let Some(slot) = users.get(&conn.user) else { return };
        slot.conns.borrow_mut().retain(|c| !Rc::ptr_eq(c, conn));
        if slot.conns.borrow().is_empty() {
            // Events already pushed stay in the mailbox and are dropped with it: the
            // dispatcher only drains mailboxes that are still their user's slot's.
            self.shared.registry.remove(conn.user, self.id);
            users.remove(&conn.user);
            self.shared.presence.changed(conn.user);
        }
    }
}

/// Closes with 4010 each connection that has not sent `sync` by its deadline.
///
/// Runs on: the owning shard.
async fn sync_deadlines(ctx: Rc<ShardCtx>) {
    loop {
        let next = ctx.sync_deadlines.borrow().front().map(|(at, _)| *at);
        match next {
            None => ctx.deadline_wake.wait().await,
            Some(at) => {
                let now = Instant::now();
                if at > now {
                    monoio::time::sleep(at - now).await;
                }
                let now = Instant::now();
                loop {
                    let due = {
                        let mut q = ctx.sync_deadlines.borrow_mut();
                        match q.front() {
                            Some((at, _)) if *at <= now => q.pop_front(),
                            _ => None,
                        }
                    };
                    let Some((_, conn)) = due else { break };
                    if let Some(c) = conn.upgrade() {
                        c.sync_deadline_passed();
                    }
                }
            }
        }
    }
}

/// Moves events from the mailboxes on this shard's inbox to their users'
/// connections here. One task per shard: a commit batch wakes it once.
///
/// Runs on: the owning shard.
async fn dispatch(ctx: Rc<ShardCtx>) {
    let inbox = ctx.shared.registry.inbox(ctx.id);
    loop {
        inbox.ready().await;
        let mut n = 0u32;
        while let Some((user, mailbox)) = inbox.pop() {
            mailbox.unschedule();
            let slot = ctx.users.borrow().get(&user).cloned();
            // A mailbox whose user left (or reconnected with a new mailbox) is dropped unread.
            let Some(slot) = slot.filter(|s| Arc::ptr_eq(s.drain.borrow().mailbox(), &mailbox)) else {
                continue;
            };
            if mailbox.take_overflowed() {
                for c in slot.conns.borrow().iter() {
                    c.close(Some(protocol::CloseCode::SlowConsumer));
                }
            }
            {
                let mut drain = slot.drain.borrow_mut();
                while let Some(ev) = drain.pop() {
                    for c in slot.conns.borrow().iter() {
                        c.offer(&ev);
                    }
                    n += 1;
                }
            }
            // Let the flusher and readers run between large rounds.
            if n >= 1024 {
                n = 0;
                crate::shard::netio::yield_now().await;
            }
        }
    }
}

/// Writes the queued frames of every connection on the flush list: after a
/// dispatch round (or a request) has queued all it will, so each connection
/// costs one vectored `sendmsg` per round.
///
/// Runs on: the owning shard.
async fn flusher(ctx: Rc<ShardCtx>) {
    let mut list = Vec::new();
    loop {
        ctx.flush_wake.wait().await;
        std::mem::swap(&mut list, &mut *ctx.flush_list.borrow_mut());
        for conn in list.drain(..) {
            conn.flush();
        }
    }
}

/// On shutdown, once the readiness notice is over (the process sets `health.closing`):
/// closes every connection on this shard with 1001 after its queued frames. New
/// sockets get 503 from then on.
///
/// Runs on: the owning shard.
async fn drain_on_shutdown(ctx: Rc<ShardCtx>) {
    ctx.shared.health.closed().await;
    let conns: Vec<Rc<Conn>> =
        ctx.users.borrow().values().flat_map(|slot| slot.conns.borrow().clone()).collect();
    for c in conns {
        c.close(Some(protocol::CloseCode::GoingAway));
    }
}

/// Which requests a listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The public port: accounts, WebSocket, health (and `/metrics` unless it has its own).
    Public,
    /// `metrics_listen`: `/metrics`, `/healthz`, `/readyz` only.
    Management,
}

/// Accepts connections, keeping the socket cap: past it a new socket is answered
/// 503 at once and closed (the fd reserve pays for that moment), with one log line
/// per 10 s. Accept errors (EMFILE and friends) back off, doubling up to 1 s.
///
/// Runs on: the owning shard.
pub async fn accept_loop(ctx: Rc<ShardCtx>, listener: TcpListener, kind: Listener) {
    let full_log = crate::capacity::LogEvery::new(std::time::Duration::from_secs(10));
    let err_log = crate::capacity::LogEvery::new(std::time::Duration::from_secs(10));
    let mut backoff = std::time::Duration::from_millis(10);
    let refused = ctx.shared.metrics.rejected.with_label_values(&["connections"]);
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = std::time::Duration::from_millis(10);
                let slot = ctx.shared.capacity.admit_socket().filter(|_| !ctx.shared.health.closing());
                let Some(slot) = slot else {
                    refused.inc();
                    if let Some(n) = full_log.tick() {
                        tracing::warn!(
                            shard = ctx.id,
                            refused = n,
                            max_connections = ctx.shared.capacity.max_sockets(),
                            "at the socket cap; answering 503"
                        );
                    }
                    crate::shard::http1::refuse_full(&stream);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                // Reap peers that vanished without a FIN, with no timer per connection:
                // by default after 2 min idle, 6 probes 20 s apart (gone within about 4
                // min). Three probes 10 s apart after 60 s cut live clients when 100k
                // connections shared one loaded host: its loopback queue dropped bursts
                // of probes (benches/RESULTS.md, "100k connections"); at a million on
                // one host even the default does (scripts/million sets 15 min idle).
                let l = &ctx.shared.cfg.limits;
                let _ = stream.set_tcp_keepalive(
                    Some(std::time::Duration::from_secs(l.keepalive_idle_secs.get())),
                    Some(std::time::Duration::from_secs(l.keepalive_interval_secs.get())),
                    Some(l.keepalive_probes.get()),
                );
                let source = crate::shard::http::source_of(peer.ip());
                monoio::spawn(crate::shard::http::serve(ctx.clone(), stream, slot, kind, source));
            }
            Err(e) => {
                if let Some(n) = err_log.tick() {
                    tracing::warn!(shard = ctx.id, error = %e, failures = n, "accept failed; backing off");
                }
                monoio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
            }
        }
    }
}

/// Starts shard `id` on its own thread, which runs until the process exits. `ready` receives the I/O driver's name
/// once the shard accepts connections.
pub fn spawn(
    id: u16,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    management: Option<std::net::TcpListener>,
    driver: IoDriver,
    ready: std::sync::mpsc::Sender<anyhow::Result<&'static str>>,
) {
    std::thread::Builder::new()
        .name(format!("shard-{id}"))
        .spawn(move || {
            if let Some(cores) = core_affinity::get_core_ids()
                && !cores.is_empty()
            {
                core_affinity::set_for_current(cores[id as usize % cores.len()]);
            }
            let failed = ready.clone();
            let main = move |name: &'static str| async move {
                let ctx = Rc::new(ShardCtx {
                    id,
                    connections: shared.metrics.shard_connections.with_label_values(&[&id.to_string()]),
                    shared,
                    users: RefCell::new(HashMap::new()),
                    scratch: RefCell::new(vec![0; SCRATCH]),
                    flush_list: RefCell::new(Vec::new()),
                    flush_wake: Signal::default(),
                    sync_deadlines: RefCell::new(VecDeque::new()),
                    deadline_wake: Signal::default(),
                    _not_send: PhantomData,
                });
                match TcpListener::from_std(listener) {
                    Ok(l) => {
                        monoio::spawn(dispatch(ctx.clone()));
                        monoio::spawn(flusher(ctx.clone()));
                        monoio::spawn(drain_on_shutdown(ctx.clone()));
                        monoio::spawn(sync_deadlines(ctx.clone()));
                        // The management listener, if any, runs on shard 0.
                        if let (0, Some(m)) = (id, management) {
                            match TcpListener::from_std(m) {
                                Ok(m) => {
                                    monoio::spawn(accept_loop(ctx.clone(), m, Listener::Management));
                                }
                                Err(e) => {
                                    let _ = ready.send(Err(e.into()));
                                    return;
                                }
                            }
                        }
                        let _ = ready.send(Ok(name));
                        accept_loop(ctx, l, Listener::Public).await;
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e.into()));
                    }
                }
            };
            let entries = 4096;
            match driver {
                IoDriver::Auto => {
                    match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                        .with_entries(entries)
                        .enable_timer()
                        .build()
                    {
                        Ok(monoio::FusionRuntime::Uring(mut rt)) => rt.block_on(main("io_uring")),
                        Ok(monoio::FusionRuntime::Legacy(mut rt)) => rt.block_on(main("epoll")),
                        Err(e) => {
                            let _ = failed.send(Err(e.into()));
                        }
                    }
                }
                IoDriver::IoUring => {
                    match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .with_entries(entries)
                        .enable_timer()
                        .build()
                    {
                        Ok(mut rt) => rt.block_on(main("io_uring")),
                        Err(e) => {
                            let _ = failed.send(Err(anyhow::anyhow!("io_uring unavailable: {e}")));
                        }
                    }
                }
                IoDriver::Epoll => {
                    match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
                        Ok(mut rt) => rt.block_on(main("epoll")),
                        Err(e) => {
                            let _ = failed.send(Err(e.into()));
                        }
                    }
                }
            }
        })
        .expect("spawning a shard thread");
}

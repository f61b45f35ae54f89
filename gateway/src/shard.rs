//! A shard: one thread, pinned to one core, running one monoio runtime with its
//! own SO_REUSEPORT listener. Everything in [`ShardCtx`] stays on its thread.

use crate::config::IoDriver;
use crate::conn::Conn;
use crate::mailbox::Mailbox;
use crate::server::Shared;
use monoio::net::TcpListener;
use protocol::UserId;
use std::cell::RefCell;
use std::collections::HashMap;
use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

/// A user's presence on this shard: its mailbox here and its connections here.
pub struct UserSlot {
    pub user: UserId,
    pub mailbox: Arc<Mailbox>,
    pub conns: RefCell<Vec<Rc<Conn>>>,
}

pub struct ShardCtx {
    pub id: u16,
    pub shared: Arc<Shared>,
    pub users: RefCell<HashMap<UserId, Rc<UserSlot>>>,
    /// The one read buffer every connection on this shard reads into.
    pub scratch: RefCell<Vec<u8>>,
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
                let mailbox = Arc::new(Mailbox::new(self.shared.cfg.limits.mailbox_capacity.get()));
                let slot =
                    Rc::new(UserSlot { user, mailbox: mailbox.clone(), conns: RefCell::new(Vec::new()) });
                self.shared.registry.insert(user, self.id, mailbox);
                monoio::spawn(drain(slot.clone()));
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
            self.shared.registry.remove(conn.user, self.id);
            slot.mailbox.close();
            users.remove(&conn.user);
        }
    }
}

/// Moves a user's events from its mailbox to its connections on this shard.
///
/// Runs on: the owning shard, one task per user slot.
async fn drain(slot: Rc<UserSlot>) {
    loop {
        slot.mailbox.ready().await;
        if slot.mailbox.is_closed() {
            return;
        }
        if slot.mailbox.take_overflowed() {
            for c in slot.conns.borrow().iter() {
                c.close(Some(protocol::CloseCode::SlowConsumer));
            }
        }
        let mut n = 0u32;
        while let Some(ev) = slot.mailbox.pop() {
            for c in slot.conns.borrow().iter() {
                c.offer(&ev);
            }
            n += 1;
            if n.is_multiple_of(1024) {
                crate::netio::yield_now().await;
            }
        }
    }
}

async fn accept_loop(ctx: Rc<ShardCtx>, listener: TcpListener) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                // Reap peers that vanished without a FIN, with no timer per connection.
                let _ = stream.set_tcp_keepalive(
                    Some(std::time::Duration::from_secs(60)),
                    Some(std::time::Duration::from_secs(10)),
                    Some(3),
                );
                monoio::spawn(crate::http::serve(ctx.clone(), stream));
            }
            Err(e) => {
                // EMFILE and friends: back off briefly rather than spin.
                tracing::warn!(shard = ctx.id, error = %e, "accept failed");
                monoio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// Starts shard `id` on its own thread. `ready` receives the I/O driver's name
/// once the shard accepts connections.
pub fn spawn(
    id: u16,
    shared: Arc<Shared>,
    listener: std::net::TcpListener,
    driver: IoDriver,
    ready: std::sync::mpsc::Sender<anyhow::Result<&'static str>>,
) -> std::thread::JoinHandle<()> {
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
                    shared,
                    users: RefCell::new(HashMap::new()),
                    scratch: RefCell::new(vec![0; SCRATCH]),
                    _not_send: PhantomData,
                });
                match TcpListener::from_std(listener) {
                    Ok(l) => {
                        let _ = ready.send(Ok(name));
                        accept_loop(ctx, l).await;
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
        .expect("spawning a shard thread")
}

//! One WebSocket connection (one device): upgrade, read loop, write loop, and
//! the request handlers.
//!
//! A connection is one task on its shard, the reader: it parses frames
//! (tungstenite's `WebSocketContext`, fed from the shard's scratch buffer) and
//! takes requests in arrival order. Events reach the outbound queue from the
//! user's mailbox through [`Conn::offer`]. The shard's flusher writes queued
//! frames with one vectored, non-blocking send per connection per round; a
//! connection whose socket is full gets a second task that waits for
//! writability and ends once the queue is written.
//!
//! Overflow policy (outbound queue): at most `max_out_bytes` bytes wait for the
//! socket. A connection that stops reading is closed with 4008 (slow consumer):
//! its queue is dropped, the `slow_consumers` counter goes up, one line is
//! logged (first time only), and the client resyncs on reconnect. Nobody else
//! waits for it.

use crate::capacity::SocketSlot;
use crate::ratelimit::{Budget, ConnLimits, Verdict, budget_of};
use crate::shard::ShardCtx;
use crate::shard::http1::{Request, choose_subprotocol, error_response};
use crate::shard::netio::{self, Signal};
use crate::vocab::command::{Command, SendCmd};
use crate::vocab::event::{Answer, ConnId, Event, EventKind, Origin};
use bytes::Bytes;
use monoio::net::TcpStream;
use protocol::{
    ClientFrame, ClientMsg, CloseCode, ConversationId, ConversationSummary, ErrorCode, Position, Seq,
    ServerFrame, ServerMsg, Subprotocol, UserId,
};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};

/// Frames of a sync replay are sent in pages of this many messages.
const SYNC_PAGE: usize = 100;

/// How long a graceful close (1001, 1008, 4010) waits for in-flight acks and for the
/// peer's side of the close before the socket is dropped.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

pub struct Conn {
    pub id: ConnId,
    pub user: UserId,
    pub proto: Subprotocol,
    stream: TcpStream,
    shard: Rc<ShardCtx>,
    out: RefCell<VecDeque<Bytes>>,
    /// Total bytes in `out` not yet written.
    out_bytes: Cell<usize>,
    /// Bytes of `out[0]` already written.
    out_offset: Cell<usize>,
    /// This connection, for putting itself on the shard's flush list.
    me: Weak<Conn>,
    /// Where the outbound queue stands with respect to the socket.
    flush: Cell<Flush>,
    /// Wakes a sync replay waiting for room in `out`.
    out_drained: Signal,
    sync: RefCell<SyncState>,
    /// The WebSocket protocol state (only the reader uses it). Here rather than in the
    /// reader's future: an async fn's arguments are stored twice in its future.
    ws: RefCell<WebSocketContext>,
    /// The request budgets' state (the rates are the shard's).
    limits: ConnLimits,
    /// `Some(code)`: closing; the queue is flushed (or dropped, for overflow), then the
    /// close frame goes out if there is a code, and the socket is shut.
    closing: Cell<Option<Option<CloseCode>>>,
    /// Sends submitted to the sequencer whose ack (or failure) has not reached the queue yet.
    /// A graceful close waits for them (at most `LINGER`), so a stored send is acked.
    inflight: Cell<u32>,
    /// The graceful close's time is up: close now, whatever is still in flight.
    linger_over: Cell<bool>,
    /// The socket's place under the process's cap and the user's; freed with the connection.
    _slots: (SocketSlot, crate::capacity::UserSlot),
}

/// The outbound queue's state. Frames are written by the shard's flusher after
/// the task that queued them yields (so a round of events costs one `sendmsg`
/// per connection); only a connection whose socket is full gets a task of its
/// own, which waits for writability and ends once the queue is written.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Flush {
    /// Nothing queued, or queued and not yet listed.
    Idle,
    /// On the shard's flush list.
    Listed,
    /// The socket was full; a blocked-writer task owns the queue.
    Blocked,
    /// Closed and shut; nothing more is written.
    Done,
}

/// What one write attempt achieved.
enum Progress {
    /// The queue is empty (written, or dropped after a socket error).
    Drained,
    /// The socket is full and frames remain.
    WouldBlock,
}

#[derive(Default)]
struct SyncState {
    /// Live events flow to the socket only after the client's `sync`.
    synced: bool,
    /// A `sync` has been asked for (it may still be replaying).
    started: bool,
    /// Events held until then (bounded by `max_pending_events`).
    pending: VecDeque<Arc<Event>>,
    /// Per conversation, the highest position the client has (by its word, the replay
    /// or live delivery): the connection's order. A live event at or below it is not
    /// shown again (one committed before the replay read, still on its way through the
    /// mailbox; a new owner's re-shown tail after a fail-over; a deposed owner's late
    /// event). One past it is shown and moves it. Further on, a position was skipped
    /// (its event was lost in a fail-over): the connection is closed with 4008 so the
    /// client syncs the gap from the store, in order. At most [`ORDER_TRACKED`]
    /// conversations per connection (past that, new ones go unchecked).
    floor: HashMap<ConversationId, Seq>,
}

/// tungstenite's view of the socket: the bytes we just read, and a sink for the
/// control frames it writes (pong, close replies).
struct MemIo<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for MemIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.input.read(buf)?;
        Ok(n)
    }
}

impl Write for MemIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn ws_config(max_frame: usize) -> WebSocketConfig {
    // Small buffers: the defaults (128 KiB read buffer per connection) would
    // dominate an idle connection's memory. The read buffer only stages bytes
    // already read into the shard's scratch buffer (a frame's payload gets an
    // allocation of its own size), so 64 bytes cost a few more memcpy calls at most.
    WebSocketConfig::default()
        .read_buffer_size(64)
        .write_buffer_size(0)
        .max_message_size(Some(max_frame))
        .max_frame_size(Some(max_frame))
}

/// Validates an upgrade request, answers it, and runs the connection.
///
/// Runs on: the shard that accepted the TCP connection.
pub async fn upgrade(
    shard: Rc<ShardCtx>,
    stream: TcpStream,
    req: Request,
    leftover: Vec<u8>,
    slot: SocketSlot,
) {
    let fail = |code: ErrorCode, msg: &str| error_response(code, msg, false);
    let reject = match check_upgrade(&shard, &req) {
        Ok(ok) => Err(ok),
        Err(resp) => Ok(resp),
    };
    let (user, proto, offered, key) = match reject {
        Ok((code, msg)) => {
            let _ = netio::send_all(&stream, fail(code, msg)).await;
            return;
        }
        Err(ok) => ok,
    };
    // A token is only as good as its account: a validly signed token for a user id
    // that does not exist (deleted, or minted with a leaked key for a made-up id) is refused.
    let store = shard.shared.store.clone();
    let exists = shard.shared.readers.run(move || store.user(user).map(|u| u.is_some())).await;
    let refusal = match exists {
        Ok(Ok(true)) => None,
        Ok(Ok(false)) => Some((ErrorCode::Unauthorized, "invalid or expired token")),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the user of an upgrade failed");
            Some((ErrorCode::HttpInternal, "try again"))
        }
        Err(_) => Some((ErrorCode::HttpOverloaded, "busy; retry")),
    };
    if let Some((code, msg)) = refusal {
        let _ = netio::send_all(&stream, fail(code, msg)).await;
        return;
    }
    let Some(user_slot) = shard.shared.capacity.admit_user(user) else {
        let msg = "this user has the most connections allowed; close one or retry later";
        let _ = netio::send_all(&stream, fail(ErrorCode::TooManyConnections, msg)).await;
        return;
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    let proto_line =
        if offered { format!("sec-websocket-protocol: {}\r\n", proto.name()) } else { String::new() };
    let head = format!(
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{proto_line}\r\n"
    );
    if netio::send_all(&stream, Bytes::from(head)).await.is_err() {
        return;
    }
    let max_frame = shard.shared.cfg.limits.max_frame_bytes.get();
    let conn = Rc::new_cyclic(|me| Conn {
        id: shard.shared.next_conn.fetch_add(1, Ordering::Relaxed),
        user,
        proto,
        stream,
        shard: shard.clone(),
        out: RefCell::new(VecDeque::new()),
        out_bytes: Cell::new(0),
        out_offset: Cell::new(0),
        me: me.clone(),
        flush: Cell::new(Flush::Idle),
        out_drained: Signal::default(),
        sync: RefCell::new(SyncState::default()),
        ws: RefCell::new(WebSocketContext::from_partially_read(
            leftover,
            Role::Server,
            Some(ws_config(max_frame as usize)),
        )),
        limits: ConnLimits::default(),
        closing: Cell::new(None),
        inflight: Cell::new(0),
        linger_over: Cell::new(false),
        _slots: (slot, user_slot),
    });
    // In a fleet, the user's location names this node before anything is read: a
    // commit after the sync's store read is then fanned out to this node.
    shard.shared.router.arrive(user).await;
    // Registered before anything is read: events from now on reach this connection
    // (held until `sync`), so a sync's store read and the live stream overlap, never gap.
    shard.attach(conn.clone());
    shard.shared.metrics.connections.inc();
    shard.connections.inc();
    shard.shared.metrics.connections_total.inc();
    conn.reply(
        0,
        ServerMsg::Welcome {
            user_id: user,
            connection_id: conn.id,
            server_time_ms: crate::vocab::clock::now_ms(),
            max_frame_bytes: max_frame,
        },
    );
    let deadline = std::time::Instant::now()
        + std::time::Duration::from_secs(shard.shared.cfg.limits.sync_deadline_secs.get());
    shard.sync_deadlines.borrow_mut().push_back((deadline, Rc::downgrade(&conn)));
    shard.deadline_wake.notify();
    // Its own task: the handshake's state above is large and an idle connection must not keep it.
    monoio::spawn(run(conn));
}

/// Ends a graceful close's wait: after `LINGER`, whatever is in flight, the close frame
/// goes out and the socket is shut both ways (which also wakes a lingering reader).
///
/// Runs on: the owning shard.
async fn linger_timer(conn: Weak<Conn>) {
    monoio::time::sleep(LINGER).await;
    let Some(c) = conn.upgrade() else { return };
    c.linger_over.set(true);
    if c.flush.get() != Flush::Done {
        // The close frame was waiting for acks: the flusher sends it on its next round.
        c.want_flush();
        drop(c);
        monoio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    if let Some(c) = conn.upgrade() {
        netio::shutdown(&c.stream);
    }
}

/// After the reader stops on a graceful close: stays attached (so acks still arrive)
/// and reads and drops the peer's input until it closes, or `LINGER` runs out.
///
/// Runs on: the owning shard.
async fn linger(conn: &Rc<Conn>) {
    if !matches!(conn.closing.get(), Some(Some(_))) {
        return;
    }
    loop {
        if conn.linger_over.get() {
            return;
        }
        if conn.stream.readable(false).await.is_err() {
            return;
        }
        match netio::try_recv(&conn.stream, &mut conn.shard.scratch.borrow_mut()) {
            Ok(Some(0)) | Err(_) => {
                // The peer is gone; if acks are still due, they cannot be delivered.
                if conn.flush.get() != Flush::Done {
                    conn.linger_over.set(true);
                    conn.want_flush();
                }
                return;
            }
            Ok(_) => {}
        }
    }
}

/// The connection's life after the handshake: read until it ends, then leave the shard.
///
/// Runs on: the owning shard.
async fn run(conn: Rc<Conn>) {
    reader(&conn).await;
    conn.close(None);
    linger(&conn).await;
    conn.shard.detach(&conn);
    conn.shard.shared.router.depart(conn.user);
    conn.shard.shared.metrics.connections.dec();
    conn.shard.connections.dec();
}

type Accepted = (UserId, Subprotocol, bool, String);

fn check_upgrade(shard: &ShardCtx, req: &Request) -> Result<Accepted, (ErrorCode, &'static str)> {
    let bad = |m| (ErrorCode::InvalidRequest, m);
    if !req.header("upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket")) {
        return Err(bad("expected a WebSocket upgrade (Upgrade: websocket)"));
    }
    if !req.header("connection").is_some_and(|v| v.to_ascii_lowercase().contains("upgrade")) {
        return Err(bad("expected Connection: Upgrade"));
    }
    if req.header("sec-websocket-version") != Some("13") {
        return Err(bad("expected Sec-WebSocket-Version: 13"));
    }
    let key = req.header("sec-websocket-key").ok_or(bad("missing Sec-WebSocket-Key"))?.to_owned();
    let token = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .or_else(|| req.query_param("token"))
        .ok_or((ErrorCode::Unauthorized, "missing bearer token (Authorization header or ?token=)"))?;
    let user = shard.shared.auth.verify(token.trim()).map_err(|c| (c, "invalid or expired token"))?;
    let offered = req.header("sec-websocket-protocol");
    let proto =
        choose_subprotocol(offered).map_err(|c| (c, "offer switchboard.v1.fb or switchboard.v1.json"))?;
    Ok((user, proto.unwrap_or(Subprotocol::Json), proto.is_some(), key))
}

impl Conn {
    fn limits(&self) -> &crate::config::Limits {
        &self.shard.shared.cfg.limits
    }

    fn is_closing(&self) -> bool {
        self.closing.get().is_some()
    }

    /// Closing gracefully, with sends still to acknowledge.
    fn awaiting_acks(&self) -> bool {
        matches!(self.closing.get(), Some(Some(_))) && self.inflight.get() > 0 && !self.linger_over.get()
    }

    /// An ack or failure for one of this connection's sends has been queued.
    fn settled(&self) {
        self.inflight.set(self.inflight.get().saturating_sub(1));
        if self.inflight.get() == 0 && self.is_closing() {
            // The close frame was waiting for this.
            self.want_flush();
        }
    }

    /// Queues a frame for the socket, or closes the connection as a slow consumer.
    fn enqueue(&self, frame: Bytes) {
        if self.is_closing() && !self.awaiting_acks() {
            return;
        }
        let queued = self.out_bytes.get() + frame.len();
        if queued > self.limits().max_out_bytes.get() {
            self.close(Some(CloseCode::SlowConsumer));
            return;
        }
        self.out_bytes.set(queued);
        self.shard.shared.metrics.frames_out.inc();
        self.out.borrow_mut().push_back(frame);
        self.want_flush();
    }

    fn reply(&self, id: u64, body: ServerMsg) {
        self.enqueue(crate::vocab::frame::server_frame(self.proto, &ServerFrame { id, body }));
    }

    fn error(&self, id: u64, code: ErrorCode, client_msg_id: Option<String>) {
        self.shard.shared.metrics.errors.with_label_values(&[code.name()]).inc();
        self.reply(
            id,
            ServerMsg::Error {
                code: code.code(),
                name: code.name().to_owned(),
                message: code.description().to_owned(),
                client_msg_id,
            },
        );
    }

    /// Starts closing. `Some(code)`: send that close frame; overflow codes drop the queue.
    ///
    /// Runs on: the owning shard.
    pub fn close(&self, code: Option<CloseCode>) {
        if self.is_closing() {
            return;
        }
        let metrics = &self.shard.shared.metrics;
        let overflow = match code {
            Some(CloseCode::SlowConsumer) => Some(&metrics.slow_consumers),
            Some(CloseCode::SyncBacklog) => Some(&metrics.sync_backlogs),
            _ => None,
        };
        self.closing.set(Some(code));
        self.sync.borrow_mut().pending.clear();
        if let (Some(counter), Some(code)) = (overflow, code) {
            counter.inc();
            if counter.get() == 1 {
                tracing::warn!(
                    user = self.user,
                    conn = self.id,
                    code = code.code(),
                    "{} (logged once)",
                    code.reason()
                );
            }
            // The peer is not reading, so its socket may never drain: drop
            // the queue, say why if we are at a frame boundary, and shut the socket now.
            self.out.borrow_mut().clear();
            self.out_bytes.set(0);
            if self.out_offset.replace(0) == 0 {
                let q = VecDeque::from([crate::vocab::frame::close_frame(code)]);
                let _ = netio::try_send(&self.stream, &q, 0);
            }
            netio::shutdown(&self.stream);
            self.closing.set(Some(None));
        } else if code.is_some() {
            monoio::spawn(linger_timer(self.me.clone()));
        }
        self.want_flush();
        self.out_drained.notify();
    }

    /// Keeps the connection's order for a message event (see `SyncState::floor`):
    /// false when it is not to be shown. An ack (`mine`) is always shown (the
    /// client waits for it) unless a position before it was skipped.
    ///
    /// Runs on: the owning shard.
    fn in_order(&self, m: &protocol::Message, mine: bool) -> bool {
        let mut sync = self.sync.borrow_mut();
        // Before `sync`, events are held and offered again once it is done.
        if !sync.synced {
            return true;
        }
        let conv = m.conversation_id;
        let removed =
            matches!(m.kind, protocol::MessageKind::MemberRemoved | protocol::MessageKind::MemberLeft)
                && m.target_user_id == Some(self.user);
        match sync.floor.get(&conv).copied() {
            Some(last) if m.seq <= last => return mine,
            Some(last) if m.seq > last + 1 => {
                drop(sync);
                let gaps = &self.shard.shared.metrics.order_gaps;
                gaps.inc();
                if gaps.get() == 1 {
                    tracing::warn!(
                        user = self.user,
                        conversation = conv,
                        after = last,
                        got = m.seq,
                        "an event skipped a position: the connection resyncs (logged once)"
                    );
                }
                self.close(Some(CloseCode::SlowConsumer));
                return false;
            }
            Some(_) => {
                sync.floor.insert(conv, m.seq);
            }
            None if sync.floor.len() < ORDER_TRACKED => {
                sync.floor.insert(conv, m.seq);
            }
            None => {}
        }
        // Removed from it: what comes after (if added again) is not this order's next.
        if removed {
            sync.floor.remove(&conv);
        }
        true
    }

    /// Shows an event from the user's mailbox to this connection.
    ///
    /// Runs on: the owning shard (the user slot's drain task).
    pub fn offer(&self, ev: &Arc<Event>) {
        match &ev.kind {
            EventKind::Message { message, origin, to_others } => {
                // The connection's order (see `SyncState::floor`); acks take their place in it too.
                let mine = *origin == Some(self.id);
                if (mine || *to_others) && !self.in_order(message, mine) {
                    return;
                }
                if mine {
                    self.shard.shared.metrics.acks.inc();
                    // Queued before `settled`: the close frame, if waiting, goes after it.
                    self.reply(
                        0,
                        ServerMsg::Ack {
                            conversation_id: message.conversation_id,
                            client_msg_id: message.client_msg_id.clone(),
                            seq: message.seq,
                            ts_ms: message.ts_ms,
                        },
                    );
                    self.settled();
                    return;
                }
                if !to_others {
                    return;
                }
                let mut sync = self.sync.borrow_mut();
                if !sync.synced {
                    if sync.pending.len() >= self.limits().max_pending_events.get() {
                        drop(sync);
                        self.close(Some(CloseCode::SyncBacklog));
                    } else {
                        sync.pending.push_back(ev.clone());
                    }
                    return;
                }
                drop(sync);
                if let Some(f) = ev.broadcast_frame(self.proto) {
                    let m = &self.shard.shared.metrics;
                    m.deliveries.inc();
                    m.delivery_seconds.observe(ev.submitted.elapsed().as_secs_f64());
                    self.enqueue(f);
                }
            }
            EventKind::SendFailed { origin, client_msg_id, code, .. } => {
                if *origin == self.id {
                    self.error(0, *code, Some(client_msg_id.clone()));
                    self.settled();
                }
            }
            EventKind::Reply { origin, result, settles } => {
                if origin.conn != self.id {
                    return;
                }
                match result {
                    Ok(Answer::Ok) => self.reply(origin.request, ServerMsg::Ok),
                    Ok(Answer::Conversation(c)) => {
                        self.reply(origin.request, ServerMsg::Conversation { conversation: c.clone() })
                    }
                    Err(code) => self.error(origin.request, *code, None),
                }
                if *settles {
                    self.settled();
                }
            }
            // One that has not asked for `sync` yet reads the store when it does: it
            // has nothing to resync (closing it would only cost it a reconnect).
            EventKind::Resync => {
                if self.sync.borrow().started {
                    self.close(Some(CloseCode::SlowConsumer));
                }
            }
            EventKind::Receipt { .. }
            | EventKind::Typing { .. }
            | EventKind::Reaction { .. }
            | EventKind::Presence(_) => {
                // State, not history: never held for an unsynced connection (it would be
                // stale by the time the sync is done; `list_conversations`, `get_receipts`,
                // history and `get_presence` give the current state). Typing skips the
                // typist's devices.
                let own_typing = matches!(ev.kind, EventKind::Typing { user, .. } if user == self.user);
                if own_typing || !self.sync.borrow().synced {
                    return;
                }
                if let Some(f) = ev.broadcast_frame(self.proto) {
                    self.enqueue(f);
                }
            }
        }
    }

    /// Applies one of the connection's rate limits. False: the request is refused
    /// (error 1021, and the connection closed with 1008 if the abuse budget is spent).
    fn within_limit(&self, id: u64, client_msg_id: Option<&str>, budget: Budget) -> bool {
        let verdict = self.limits.check(&self.shard.shared.rates, budget, crate::ratelimit::now());
        if verdict != Verdict::Allow {
            self.error(id, ErrorCode::RateLimited, client_msg_id.map(str::to_owned));
        }
        if verdict == Verdict::Close {
            self.close(Some(CloseCode::PolicyViolation));
        }
        verdict == Verdict::Allow
    }

    /// At the sync deadline: an unsynced connection holds events for nothing, so it
    /// may not linger; close it with 4010.
    ///
    /// Runs on: the owning shard (its deadline task).
    pub fn sync_deadline_passed(&self) {
        if !self.sync.borrow().started {
            self.close(Some(CloseCode::SyncTimeout));
        }
    }

    /// Waits until a replayed frame of `len` bytes fits in half the outbound queue
    /// (the other half stays free for live traffic), or the queue is empty.
    async fn room_for(&self, len: usize) {
        let max = self.limits().max_out_bytes.get();
        while !self.is_closing() && self.out_bytes.get() > 0 && self.out_bytes.get() + len > max / 2 {
            self.out_drained.wait().await;
        }
    }
}

impl Conn {
    /// Puts the connection on the shard's flush list, unless it is there already or
    /// its blocked writer will pick the new frames up.
    fn want_flush(&self) {
        if self.flush.get() != Flush::Idle {
            return;
        }
        if let Some(me) = self.me.upgrade() {
            self.flush.set(Flush::Listed);
            self.shard.flush_list.borrow_mut().push(me);
            self.shard.flush_wake.notify();
        }
    }

    /// Writes as much of the queue as the socket takes now.
    fn write_some(&self) -> Progress {
        loop {
            if self.out.borrow().is_empty() {
                return Progress::Drained;
            }
            let r = {
                let out = self.out.borrow();
                netio::try_send(&self.stream, &out, self.out_offset.get())
            };
            match r {
                Ok(0) => return Progress::WouldBlock,
                Ok(mut w) => {
                    self.out_bytes.set(self.out_bytes.get() - w);
                    let mut out = self.out.borrow_mut();
                    let mut off = self.out_offset.get();
                    while w > 0 {
                        let left = out[0].len() - off;
                        if w >= left {
                            w -= left;
                            off = 0;
                            out.pop_front();
                        } else {
                            off += w;
                            w = 0;
                        }
                    }
                    self.out_offset.set(off);
                    drop(out);
                    self.out_drained.notify();
                }
                Err(_) => {
                    self.socket_failed();
                    return Progress::Drained;
                }
            }
        }
    }

    /// The socket is gone: drop what was queued and close.
    fn socket_failed(&self) {
        self.out.borrow_mut().clear();
        self.out_bytes.set(0);
        self.close(None);
    }

    /// After the queue is written: if the connection is closing, sends its close
    /// frame (if any) and shuts the socket; otherwise goes back to idle.
    fn drained(&self) {
        match self.closing.get() {
            None => self.flush.set(Flush::Idle),
            // Acks still to come: write them as they arrive, close after.
            Some(Some(_)) if self.awaiting_acks() => self.flush.set(Flush::Idle),
            Some(Some(code)) => {
                // Graceful: the close frame, then only our side shut; the peer's close and
                // anything it still sends are read (and dropped) until it closes or LINGER
                // ends, so the socket is not reset under unread input.
                let q = VecDeque::from([crate::vocab::frame::close_frame(code)]);
                let _ = netio::try_send(&self.stream, &q, 0);
                netio::shutdown_write(&self.stream);
                self.flush.set(Flush::Done);
            }
            Some(None) => {
                netio::shutdown(&self.stream);
                self.flush.set(Flush::Done);
            }
        }
    }

    /// Writes the queue now, or hands it to a blocked-writer task if the socket is full.
    ///
    /// Runs on: the owning shard (its flusher).
    pub fn flush(self: &Rc<Self>) {
        match self.write_some() {
            Progress::Drained => self.drained(),
            Progress::WouldBlock => {
                self.flush.set(Flush::Blocked);
                monoio::spawn(blocked_writer(self.clone()));
            }
        }
    }
}

/// Waits for a full socket to take the rest of the queue, then ends.
///
/// Runs on: the owning shard.
async fn blocked_writer(conn: Rc<Conn>) {
    loop {
        if conn.stream.writable(false).await.is_err() {
            conn.socket_failed();
            conn.drained();
            return;
        }
        if let Progress::Drained = conn.write_some() {
            conn.drained();
            return;
        }
    }
}

/// What one read round produced.
enum Inbound {
    Frame(Bytes, bool),
    Close,
}

/// Why reading stopped for good.
enum Fatal {
    /// The peer closed (or the connection was already closing).
    Closed,
    /// A protocol violation: optionally an error frame, then this close code.
    Violation(Option<ErrorCode>, CloseCode),
}

/// Parses the `n` bytes just read into the shard's scratch buffer (plus whatever
/// `ctx` held over), and queues tungstenite's control replies (pongs, close echoes).
///
/// Synchronous on purpose: nothing here lives across an await, so none of it
/// takes space in an idle connection's task.
fn parse(conn: &Conn, n: usize) -> (Vec<Inbound>, Option<Fatal>) {
    let mut inbound = Vec::new();
    let mut ctx = conn.ws.borrow_mut();
    let scratch = conn.shard.scratch.borrow();
    let mut io = MemIo { input: &scratch[..n], output: Vec::new() };
    let mut fatal = None;
    loop {
        match ctx.read(&mut io) {
            Ok(tungstenite::Message::Text(t)) => inbound.push(Inbound::Frame(Bytes::from(t), true)),
            Ok(tungstenite::Message::Binary(b)) => inbound.push(Inbound::Frame(b, false)),
            Ok(tungstenite::Message::Close(_)) => inbound.push(Inbound::Close),
            Ok(_) => {} // ping/pong: tungstenite queues the pong itself
            Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                fatal = Some(match &e {
                    tungstenite::Error::Capacity(_) => {
                        Fatal::Violation(Some(ErrorCode::FrameTooLarge), CloseCode::MessageTooBig)
                    }
                    tungstenite::Error::Utf8(_) => {
                        Fatal::Violation(Some(ErrorCode::InvalidUtf8), CloseCode::InvalidPayload)
                    }
                    tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => Fatal::Closed,
                    _ => Fatal::Violation(None, CloseCode::ProtocolError),
                });
                tracing::debug!(conn = conn.id, error = %e, "websocket error");
                break;
            }
        }
    }
    let _ = ctx.flush(&mut io);
    if !io.output.is_empty() {
        conn.enqueue(Bytes::from(io.output));
    }
    (inbound, fatal)
}

/// Reads and handles frames until the peer leaves or the connection closes.
///
/// Runs on: the owning shard.
async fn reader(conn: &Rc<Conn>) {
    // Bytes that arrived with the upgrade request are already in `ctx`.
    let mut n = 0;
    loop {
        if conn.is_closing() {
            return;
        }
        let (inbound, fatal) = parse(conn, n);
        for item in inbound {
            // A request that closed the connection (1008) ends the handling of the rest.
            if conn.is_closing() {
                return;
            }
            match item {
                Inbound::Frame(payload, is_text) => {
                    if let Some(slow) = handle_frame(conn, &payload, is_text) {
                        slow.await;
                    }
                }
                Inbound::Close => {
                    conn.close(None);
                    return;
                }
            }
        }
        match fatal {
            None => {}
            Some(Fatal::Closed) => {
                conn.close(None);
                return;
            }
            Some(Fatal::Violation(code, close)) => {
                if let Some(c) = code {
                    conn.error(0, c, None);
                }
                conn.close(Some(close));
                return;
            }
        }
        n = loop {
            if conn.stream.readable(false).await.is_err() || conn.is_closing() {
                return;
            }
            match netio::try_recv(&conn.stream, &mut conn.shard.scratch.borrow_mut()) {
                Ok(Some(0)) | Err(_) => return,
                Ok(None) => continue,
                Ok(Some(n)) => break n,
            }
        };
    }
}

/// Handles what needs no waiting (sends, pings, bad frames) at once; returns the
/// other requests as boxed futures, whose state (a sync's replay, a store read)
/// is large and must not sit in every idle connection's task.
fn handle_frame(conn: &Rc<Conn>, payload: &[u8], is_text: bool) -> Option<Pin<Box<dyn Future<Output = ()>>>> {
    conn.shard.shared.metrics.frames_in.inc();
    if conn.proto == Subprotocol::FlatBuffers && is_text {
        conn.error(0, ErrorCode::MalformedFrame, None);
        return None;
    }
    let frame = match conn.proto.decode_client(payload) {
        Ok(f) => f,
        Err(e) => {
            tracing::debug!(conn = conn.id, error = %e, "bad frame");
            conn.error(conn.proto.request_id(payload), e.code(), None);
            return None;
        }
    };
    let client_msg_id = match &frame.body {
        ClientMsg::Send { client_msg_id, .. } => Some(client_msg_id.as_str()),
        _ => None,
    };
    if !conn.within_limit(frame.id, client_msg_id, budget_of(&frame.body)) {
        return None;
    }
    match frame {
        ClientFrame {
            id,
            body: ClientMsg::Send { conversation_id, client_msg_id, body, attachment: None },
        } => {
            send(conn, id, conversation_id, client_msg_id, body, None);
            None
        }
        ClientFrame { id, body: ClientMsg::Ping } => {
            conn.reply(id, ServerMsg::Pong);
            None
        }
        ClientFrame { id, body: ClientMsg::Typing { conversation_id, typing } } => {
            typing_request(conn, id, conversation_id, typing);
            None
        }
        ClientFrame { id, body: ClientMsg::MarkDelivered { conversation_id, seq } } => {
            mark(conn, id, conversation_id, seq, false);
            None
        }
        ClientFrame { id, body: ClientMsg::MarkRead { conversation_id, seq } } => {
            mark(conn, id, conversation_id, seq, true);
            None
        }
        ClientFrame { id, body } => {
            let conn = conn.clone();
            Some(Box::pin(async move { handle(&conn, id, body).await }))
        }
    }
}

/// Queues a command that always gets an answer (`conversation`, `ok` or an error),
/// which comes back as a [`EventKind::Reply`] through the user's mailbox, after the
/// command's commit and in its place among the conversation's events.
fn command(conn: &Conn, id: u64, make: impl FnOnce(Origin) -> Command) {
    if submit(conn, id, make(Origin::new(conn.id, id))) {
        conn.inflight.set(conn.inflight.get() + 1);
    }
}

/// Runs a store read on a reader thread, mapping storage failures to `Internal`.
async fn read<T: Send + 'static>(
    conn: &Conn,
    f: impl FnOnce(&dyn storage::Store) -> Result<T, ErrorCode> + Send + 'static,
) -> Result<T, ErrorCode> {
    let store = conn.shard.shared.store.clone();
    match conn.shard.shared.readers.run(move || f(&*store)).await {
        Ok(r) => r,
        Err(_) => Err(ErrorCode::Overloaded),
    }
}

fn internal(e: storage::StorageError) -> ErrorCode {
    tracing::error!(error = %e, "store read failed");
    ErrorCode::Internal
}

/// Checks membership and returns the conversation's newest position.
fn member_head(store: &dyn storage::Store, conv: ConversationId, user: UserId) -> Result<Seq, ErrorCode> {
    let rec = store.conversation(conv).map_err(internal)?.ok_or(ErrorCode::NotFound)?;
    store.member_role(conv, user).map_err(internal)?.ok_or(ErrorCode::NotMember)?;
    Ok(rec.last_seq)
}

/// Largest inline preview a send may carry with its attachment, bytes.
const MAX_PREVIEW: usize = 8 * 1024;

/// The attachment a send names, once its upload is checked: uploaded, by this
/// user, to this conversation. The size, type, checksum and name come from the
/// upload, not from the client.
async fn attachment_of(
    conn: &Conn,
    conversation: ConversationId,
    r: protocol::AttachmentRef,
) -> Result<protocol::Attachment, ErrorCode> {
    let key = crate::attachments::ObjectKey::parse(&r.attachment_id).ok_or(ErrorCode::AttachmentInvalid)?;
    if key.conversation != conversation || key.uploader != conn.user {
        return Err(ErrorCode::AttachmentInvalid);
    }
    let dimension = |d: Option<u32>| d.is_some_and(|d| d == 0 || d > 100_000);
    if r.preview.len() > MAX_PREVIEW || dimension(r.width) || dimension(r.height) {
        return Err(ErrorCode::InvalidField);
    }
    let shared = conn.shard.shared.clone();
    // Marked as named before the commit (see `Attachments::link`).
    match conn.shard.shared.attachments.io.run(move || shared.attachments.link(&key)).await {
        Ok(Ok(Some(meta))) => Ok(protocol::Attachment {
            attachment_id: r.attachment_id,
            file_name: meta.file_name,
            media_type: meta.media_type,
            size: meta.size,
            sha256: meta.sha256,
            width: r.width,
            height: r.height,
            preview: r.preview,
        }),
        Ok(Ok(None)) => Err(ErrorCode::AttachmentInvalid),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "checking an attachment failed");
            Err(ErrorCode::AttachmentStoreUnavailable)
        }
        Err(_) => Err(ErrorCode::Overloaded),
    }
}

/// Validates a send and queues it for the sequencer; the ack (or error) comes back
/// through the user's mailbox in conversation order.
fn send(
    conn: &Conn,
    id: u64,
    conversation_id: ConversationId,
    client_msg_id: String,
    body: String,
    attachment: Option<Box<protocol::Attachment>>,
) {
    let user = conn.user;
    let shared = &conn.shard.shared;
    // A body may be empty only as an attachment's caption; U+0000 is never in one.
    let bad = if client_msg_id.is_empty()
        || client_msg_id.len() > 64
        || (body.is_empty() && attachment.is_none())
        || body.contains('\0')
    {
        Some(ErrorCode::InvalidField)
    } else if body.len() > conn.limits().max_body_bytes.get() as usize {
        Some(ErrorCode::BodyTooLarge)
    } else {
        None
    };
    if let Some(code) = bad {
        return conn.error(id, code, Some(client_msg_id));
    }
    let cmd = Command::Send(SendCmd {
        conversation: conversation_id,
        sender: user,
        client_msg_id,
        body,
        attachment,
        origin: Origin::new(conn.id, id),
        submitted: std::time::Instant::now(),
    });
    if let Err(Command::Send(cmd)) = shared.router.submit(&shared.sequencer, cmd) {
        conn.error(id, ErrorCode::Overloaded, Some(cmd.client_msg_id));
    } else {
        conn.inflight.set(conn.inflight.get() + 1);
        conn.shard.shared.metrics.sends.inc();
    }
}

/// Relays a typing start or stop to the conversation's other members, through the
/// sequencer (which knows the members) but without storing anything.
fn typing_request(conn: &Conn, id: u64, conversation_id: ConversationId, typing: bool) {
    let cmd = Command::Typing {
        conversation: conversation_id,
        user: conn.user,
        typing,
        origin: Origin::new(conn.id, id),
    };
    submit(conn, id, cmd);
}

/// Moves the user's delivered (or read) position forward, through the sequencer.
/// No reply: every member's connections, the user's included, get the `receipt`.
fn mark(conn: &Conn, id: u64, conversation_id: ConversationId, seq: Seq, read: bool) {
    let cmd = Command::Mark {
        conversation: conversation_id,
        user: conn.user,
        seq,
        read,
        origin: Origin::new(conn.id, id),
    };
    submit(conn, id, cmd);
}

/// Submits a command; refusals come back as errors with the request's id. False if
/// it was refused here (the sequencer's queue was full).
fn submit(conn: &Conn, id: u64, cmd: Command) -> bool {
    let shared = &conn.shard.shared;
    if shared.router.submit(&shared.sequencer, cmd).is_err() {
        conn.error(id, ErrorCode::Overloaded, None);
        return false;
    }
    true
}

async fn handle(conn: &Rc<Conn>, id: u64, msg: ClientMsg) {
    let user = conn.user;
    match msg {
        ClientMsg::Ping => conn.reply(id, ServerMsg::Pong),
        ClientMsg::Typing { conversation_id, typing } => typing_request(conn, id, conversation_id, typing),
        ClientMsg::MarkDelivered { conversation_id, seq } => mark(conn, id, conversation_id, seq, false),
        ClientMsg::MarkRead { conversation_id, seq } => mark(conn, id, conversation_id, seq, true),
        ClientMsg::GetReceipts { conversation_id } => {
            let r = read(conn, move |s| {
                let mut members = s.members(conversation_id).map_err(internal)?;
                if members.is_empty() && s.conversation(conversation_id).map_err(internal)?.is_none() {
                    return Err(ErrorCode::NotFound);
                }
                if !members.iter().any(|(u, _)| *u == user) {
                    return Err(ErrorCode::NotMember);
                }
                let stored: HashMap<_, _> =
                    s.all_positions(conversation_id).map_err(internal)?.into_iter().collect();
                members.sort_by_key(|(u, _)| *u);
                Ok(members
                    .into_iter()
                    .map(|(user_id, _)| {
                        let p = stored.get(&user_id).copied().unwrap_or_default();
                        protocol::MemberPositions { user_id, delivered_seq: p.delivered, read_seq: p.read }
                    })
                    .collect())
            })
            .await;
            match r {
                Ok(members) => conn.reply(id, ServerMsg::Receipts { conversation_id, members }),
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::Send { conversation_id, client_msg_id, body, attachment } => {
            // Only sends with an attachment come here: its upload is checked first.
            // (A connection's requests are handled one after another, so this send
            // still takes its place among the connection's others.)
            let checked = match attachment {
                Some(a) => attachment_of(conn, conversation_id, a).await.map(|a| Some(Box::new(a))),
                None => Ok(None),
            };
            match checked {
                Ok(a) => send(conn, id, conversation_id, client_msg_id, body, a),
                Err(code) => conn.error(id, code, Some(client_msg_id)),
            }
        }
        ClientMsg::React { conversation_id, seq, emoji } => {
            if !valid_emoji(&emoji) {
                return conn.error(id, ErrorCode::InvalidField, None);
            }
            command(conn, id, |origin| Command::React {
                actor: user,
                conversation: conversation_id,
                seq,
                emoji,
                origin,
            })
        }
        ClientMsg::GetPresence { user_ids } => {
            if user_ids.len() > crate::presence::MAX_QUERY {
                return conn.error(id, ErrorCode::InvalidField, None);
            }
            match conn.shard.shared.presence.query(user, user_ids).await {
                Ok(users) => conn.reply(id, ServerMsg::PresenceList { users }),
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::SetPrivacy { hide_last_seen } => {
            match conn.shard.shared.presence.set_hide(user, hide_last_seen).await {
                Ok(()) => conn.reply(id, ServerMsg::Ok),
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::CreateDirect { user_id } => {
            command(conn, id, |origin| Command::CreateDirect { user, peer: user_id, origin })
        }
        ClientMsg::CreateGroup { title, members } => {
            if let Err(code) = may_add(conn, &members).await {
                return conn.error(id, code, None);
            }
            let group = conn.shard.shared.ids.next();
            command(conn, id, |origin| Command::CreateGroup {
                id: group,
                owner: user,
                title,
                members,
                origin,
            })
        }
        ClientMsg::AddMembers { conversation_id, user_ids } => {
            if let Err(code) = may_add(conn, &user_ids).await {
                return conn.error(id, code, None);
            }
            command(conn, id, |origin| Command::AddMembers {
                actor: user,
                conversation: conversation_id,
                users: user_ids,
                origin,
            })
        }
        ClientMsg::RemoveMember { conversation_id, user_id } => command(conn, id, |origin| {
            Command::RemoveMember { actor: user, conversation: conversation_id, user: user_id, origin }
        }),
        ClientMsg::SetRole { conversation_id, user_id, role } => command(conn, id, |origin| {
            Command::SetRole { actor: user, conversation: conversation_id, user: user_id, role, origin }
        }),
        ClientMsg::Leave { conversation_id } => {
            command(conn, id, |origin| Command::Leave { actor: user, conversation: conversation_id, origin })
        }
        ClientMsg::Edit { conversation_id, seq, body } => {
            if body.is_empty() || body.contains('\0') {
                return conn.error(id, ErrorCode::InvalidField, None);
            }
            if body.len() > conn.limits().max_body_bytes.get() as usize {
                return conn.error(id, ErrorCode::BodyTooLarge, None);
            }
            command(conn, id, |origin| Command::Edit {
                actor: user,
                conversation: conversation_id,
                seq,
                body,
                origin,
            })
        }
        ClientMsg::Mute { conversation_id, muted } => command(conn, id, |origin| Command::Mute {
            actor: user,
            conversation: conversation_id,
            muted,
            origin,
        }),
        ClientMsg::Delete { conversation_id, seq } => command(conn, id, |origin| Command::Delete {
            actor: user,
            conversation: conversation_id,
            seq,
            origin,
        }),
        ClientMsg::GetConversation { conversation_id } => {
            let r = read(conn, move |s| {
                let rec = s.conversation(conversation_id).map_err(internal)?.ok_or(ErrorCode::NotFound)?;
                let mut members = s.members(conversation_id).map_err(internal)?;
                if !members.iter().any(|(u, _)| *u == user) {
                    return Err(ErrorCode::NotMember);
                }
                members.sort_by_key(|(u, _)| *u);
                Ok(protocol::Conversation {
                    conversation_id,
                    kind: rec.kind,
                    title: rec.title,
                    members: members
                        .into_iter()
                        .map(|(user_id, role)| protocol::Member { user_id, role })
                        .collect(),
                    last_seq: rec.last_seq,
                    last_ts_ms: rec.last_ts_ms,
                    created_ms: rec.created_ms,
                })
            })
            .await;
            match r {
                Ok(conversation) => conn.reply(id, ServerMsg::Conversation { conversation }),
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::History { conversation_id, before, after, limit } => {
            let limit = limit.unwrap_or(50);
            if !(1..=storage::MAX_PAGE as u32).contains(&limit) {
                return conn.error(id, ErrorCode::InvalidField, None);
            }
            let anchor = match (before, after) {
                (Some(_), Some(_)) => return conn.error(id, ErrorCode::BadCursor, None),
                (Some(b), None) => storage::Anchor::Before(b),
                (None, Some(a)) => storage::Anchor::After(a),
                (None, None) => storage::Anchor::Latest,
            };
            let r = read(conn, move |s| {
                let head = member_head(s, conversation_id, user)?;
                match anchor {
                    storage::Anchor::Before(b) if b == 0 || b > head + 1 => return Err(ErrorCode::BadCursor),
                    storage::Anchor::After(a) if a > head => return Err(ErrorCode::BadCursor),
                    _ => {}
                }
                let mut p = storage::page(s, conversation_id, anchor, limit as usize).map_err(internal)?;
                fit_page(&mut p);
                storage::add_reactions(s, conversation_id, user, &mut p.messages).map_err(internal)?;
                Ok(p)
            })
            .await;
            match r {
                Ok(p) => conn.reply(
                    id,
                    ServerMsg::History { conversation_id, messages: p.messages, has_more: p.has_more },
                ),
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::ListConversations { limit, cursor } => {
            let limit = limit.unwrap_or(50);
            if !(1..=storage::MAX_PAGE as u32).contains(&limit) {
                return conn.error(id, ErrorCode::InvalidField, None);
            }
            let after = match cursor.as_deref().map(|c| conn.shard.shared.auth.open_cursor(user, c)) {
                None => None,
                Some(Some(c)) => Some(c),
                Some(None) => return conn.error(id, ErrorCode::BadCursor, None),
            };
            let r = read(conn, move |s| list_conversations(s, user, limit as usize, after)).await;
            match r {
                Ok((items, next)) => {
                    let next_cursor = next.map(|(ts, c)| conn.shard.shared.auth.seal_cursor(user, ts, c));
                    conn.reply(id, ServerMsg::Conversations { items, next_cursor })
                }
                Err(code) => conn.error(id, code, None),
            }
        }
        ClientMsg::Sync { positions } => sync(conn, id, positions).await,
    }
}

/// Most message bytes (bodies plus a per-message allowance for the other fields) one
/// `history` page carries: a page of 100 long messages would otherwise be a frame of
/// 1.6 MB, past many WebSocket clients' default limit of 1 MiB.
pub const MAX_PAGE_BYTES: usize = 512 * 1024;

/// Bytes counted per message on top of its body (ids, times, kind, reactions).
const MESSAGE_OVERHEAD: usize = 256;

/// Ends a page early once it holds [`MAX_PAGE_BYTES`] (never before its first message);
/// `has_more` then says the rest is still to fetch.
fn fit_page(p: &mut storage::Page) {
    let mut bytes = 0;
    let keep = p
        .messages
        .iter()
        .position(|m| {
            bytes += m.body.len() + MESSAGE_OVERHEAD;
            bytes > MAX_PAGE_BYTES
        })
        .map_or(p.messages.len(), |i| i.max(1));
    if keep < p.messages.len() {
        p.messages.truncate(keep);
        p.has_more = true;
    }
}

/// Whether `adder` may add every one of `users` to a group under the `contacts`
/// policy: each has sent or read a message in their direct conversation with the
/// adder (sending moves one's own read position, so a reply counts). Reading
/// the other's message is the consent; a stranger who opens a direct chat gets none.
fn consented(s: &dyn storage::Store, adder: UserId, users: &[UserId]) -> Result<bool, ErrorCode> {
    for &u in users.iter().filter(|&&u| u != adder) {
        let Some(direct) = s.direct(adder, u).map_err(internal)? else { return Ok(false) };
        if s.positions(direct, u).map_err(internal)?.read == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Applies `limits.group_adds` to a group add (on a reader thread: one or two reads per user).
async fn may_add(conn: &Conn, users: &[UserId]) -> Result<(), ErrorCode> {
    if conn.limits().group_adds == crate::config::GroupAdds::Anyone {
        return Ok(());
    }
    let (adder, users) = (conn.user, users.to_vec());
    match read(conn, move |s| consented(s, adder, &users)).await? {
        true => Ok(()),
        false => Err(ErrorCode::NotAContact),
    }
}

/// Longest reaction, in bytes (an emoji with skin tone and joiners fits).
const MAX_EMOJI_BYTES: usize = 32;

/// A reaction: empty (removal), or short with no whitespace or control characters.
/// Which emoji a client shows is its business; the server only bounds it.
fn valid_emoji(e: &str) -> bool {
    e.len() <= MAX_EMOJI_BYTES && !e.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// A page and where the next one starts (its last item's activity time and id).
type ListPage = (Vec<ConversationSummary>, Option<(u64, ConversationId)>);

/// One page of the user's conversation list, with its cursor (see [`storage::conversation_list`]).
fn list_conversations(
    s: &dyn storage::Store,
    user: UserId,
    limit: usize,
    after: Option<(u64, ConversationId)>,
) -> Result<ListPage, ErrorCode> {
    let (items, more) = storage::conversation_list(s, user, limit, after).map_err(internal)?;
    let next = if more { items.last().map(|l| (l.last_ts_ms, l.conversation_id)) } else { None };
    Ok((items, next))
}

/// Most messages a sync looks back through, in a conversation the user no longer
/// belongs to, for the event that removed them.
const REMOVAL_LOOKBACK: usize = 10_000;

/// Where a sync replays one conversation up to, after checking the client's positions.
///
/// A member's conversations run to their head. A listed conversation the user was
/// removed from (or left, from another device) runs to that removal event, so an
/// offline device learns of it in the conversation's order and nothing after it
/// reaches the device. A position beyond a conversation's end is `bad_cursor`.
fn sync_targets(
    s: &dyn storage::Store,
    user: UserId,
    known: &HashMap<ConversationId, Seq>,
) -> Result<Vec<(ConversationId, Seq)>, ErrorCode> {
    let mut v = Vec::new();
    let mut member = std::collections::HashSet::new();
    for c in s.user_conversations(user).map_err(internal)? {
        if let Some(r) = s.conversation(c).map_err(internal)? {
            if known.get(&c).is_some_and(|&p| p > r.last_seq) {
                return Err(ErrorCode::BadCursor);
            }
            member.insert(c);
            v.push((c, r.last_seq));
        }
    }
    for (&c, &after) in known {
        if member.contains(&c) {
            continue;
        }
        let rec = s.conversation(c).map_err(internal)?.ok_or(ErrorCode::BadCursor)?;
        if after > rec.last_seq {
            return Err(ErrorCode::BadCursor);
        }
        if let Some(removed_at) = removal_after(s, c, user, after)? {
            v.push((c, removed_at));
        }
    }
    Ok(v)
}

/// The newest event after `after` that took `user` out of `conv`, looking back at
/// most [`REMOVAL_LOOKBACK`] messages. None: not removed since then (the client's
/// position already covers it, or it never was a member: nothing is disclosed).
fn removal_after(
    s: &dyn storage::Store,
    conv: ConversationId,
    user: UserId,
    after: Seq,
) -> Result<Option<Seq>, ErrorCode> {
    let mut anchor = storage::Anchor::Latest;
    let mut seen = 0;
    while seen < REMOVAL_LOOKBACK {
        let page = storage::page(s, conv, anchor, storage::MAX_PAGE).map_err(internal)?;
        for m in &page.messages {
            if m.seq <= after {
                return Ok(None);
            }
            let removal =
                matches!(m.kind, protocol::MessageKind::MemberRemoved | protocol::MessageKind::MemberLeft);
            if removal && m.target_user_id == Some(user) {
                return Ok(Some(m.seq));
            }
        }
        seen += page.messages.len();
        match page.messages.last() {
            Some(m) if page.has_more => anchor = storage::Anchor::Before(m.seq),
            _ => return Ok(None),
        }
    }
    Ok(None)
}

/// Most conversations whose order one connection keeps (`SyncState::floor`).
const ORDER_TRACKED: usize = 1024;

/// Replays what the client missed, then switches the connection to live events.
///
/// For every conversation of the user: messages after the client's position (or
/// from the start, for conversations it did not list) are sent oldest first, then
/// the events held since the connection opened, without the ones already replayed.
/// Listed conversations the user has been removed from replay up to the removal.
async fn sync(conn: &Rc<Conn>, id: u64, positions: Vec<Position>) {
    let user = conn.user;
    {
        let mut s = conn.sync.borrow_mut();
        s.synced = false;
        s.started = true;
    }
    let known: HashMap<ConversationId, Seq> = positions.iter().map(|p| (p.conversation_id, p.seq)).collect();
    let heads = {
        let known = known.clone();
        read(conn, move |s| sync_targets(s, user, &known)).await
    };
    let heads = match heads {
        Ok(h) => h,
        Err(code) => return conn.error(id, code, None),
    };
    // Per conversation: the highest position the client has, by its word or by our replay.
    let mut floor: HashMap<ConversationId, Seq> = known.clone();
    let (mut replayed_convs, mut replayed) = (0u32, 0u64);
    for (c, head) in heads {
        let mut after = known.get(&c).copied().unwrap_or(0);
        if head <= after {
            continue;
        }
        replayed_convs += 1;
        'pages: loop {
            if conn.is_closing() {
                return;
            }
            let page = read(conn, move |s| {
                let mut p =
                    storage::page(s, c, storage::Anchor::After(after), SYNC_PAGE).map_err(internal)?;
                storage::add_reactions(s, c, user, &mut p.messages).map_err(internal)?;
                Ok(p)
            })
            .await;
            let page = match page {
                Ok(p) => p,
                Err(code) => return conn.error(id, code, None),
            };
            for m in page.messages {
                if m.seq > head {
                    break 'pages;
                }
                after = m.seq;
                let frame = crate::vocab::frame::server_frame(
                    conn.proto,
                    &ServerFrame { id: 0, body: ServerMsg::Message { message: m } },
                );
                // Paced by the socket: however large the messages, the replay never
                // outruns the outbound queue (and so is never closed for its volume).
                conn.room_for(frame.len()).await;
                if conn.is_closing() {
                    return;
                }
                replayed += 1;
                conn.enqueue(frame);
            }
            if !page.has_more || after >= head {
                break;
            }
        }
        floor.insert(c, after);
    }
    // No await from here on: the held events and the switch to live happen at once.
    let pending = {
        let mut s = conn.sync.borrow_mut();
        s.synced = true;
        s.floor = floor;
        std::mem::take(&mut s.pending)
    };
    for ev in pending {
        conn.offer(&ev);
    }
    conn.reply(id, ServerMsg::SyncDone { conversations: replayed_convs, messages: replayed });
}

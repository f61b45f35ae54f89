//! A worker: holds its share of the connections, runs its own conversations
//! (so every check is local), sends open-loop and reports to the coordinator.
//!
//! Open loop: each active connection has its own schedule `start + phase + k *
//! interval`, fixed before the run. A send that could not go out on time goes out
//! as soon as it can, still carrying its scheduled time, so queueing delay in the
//! client, the network or the server is measured, never hidden (no coordinated
//! omission). End-to-end latency = a recipient's receive time minus the scheduled
//! send time carried in the message body.

use crate::plan::{Assignment, Counters, FromWorker, Scenario, ToWorker, WorkerResult};
use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use hdrhistogram::serialization::{Serializer, V2Serializer};
use protocol::{ClientFrame, ClientMsg, MessageKind, ServerFrame, ServerMsg, Subprotocol};
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

type Ws = WebSocketStream<TcpStream>;

pub fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub fn histogram() -> Histogram<u64> {
    // 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

pub fn encode_hist(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    V2Serializer::new().serialize(h, &mut buf).expect("serialising to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_hist(s: &str) -> anyhow::Result<Histogram<u64>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s)?;
    let mut d = hdrhistogram::serialization::Deserializer::new();
    d.deserialize(&mut &bytes[..]).map_err(|e| anyhow!("histogram: {e:?}"))
}

/// Delivery bookkeeping of one conversation, indexed by position.
#[derive(Default)]
struct ConvTrack {
    /// Recipients each message must reach: members minus the sender's one device.
    expected: u16,
    delivered: Vec<u16>,
    acked: Vec<bool>,
}

impl ConvTrack {
    fn slot<T: Default + Clone>(v: &mut Vec<T>, seq: u64) -> &mut T {
        let i = seq as usize;
        if v.len() <= i {
            v.resize(i + 1, T::default());
        }
        &mut v[i]
    }
}

struct State {
    c: Counters,
    latency: Histogram<u64>,
    ack_latency: Histogram<u64>,
    /// How late each send reached the socket after its scheduled time: loadgen's
    /// own timing error, which every latency above includes.
    send_lag: Histogram<u64>,
    convs: HashMap<u64, ConvTrack>,
    timeline: Vec<(u64, u64)>,
    start: Option<Instant>,
    /// Scheduled send times before this (µs, Unix) are warm-up: not in the histograms.
    measured_from_us: u64,
}

impl State {
    fn tick(&mut self) -> Option<&mut (u64, u64)> {
        let s = self.start?.elapsed().as_secs() as usize;
        if self.timeline.len() <= s {
            self.timeline.resize(s + 1, (0, 0));
        }
        self.timeline.get_mut(s)
    }
}

/// Per (connection, conversation): highest position seen, and which were seen.
#[derive(Default)]
struct Seen {
    last: u64,
    bits: Vec<u64>,
}

impl Seen {
    /// Returns (duplicate, out_of_order).
    fn observe(&mut self, seq: u64) -> (bool, bool) {
        let (w, b) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        if self.bits[w] & (1 << b) != 0 {
            return (true, false);
        }
        self.bits[w] |= 1 << b;
        let ooo = seq < self.last;
        self.last = self.last.max(seq);
        (false, ooo)
    }
}

struct Conn {
    ws: Ws,
    proto: Subprotocol,
    next_id: u64,
}

impl Conn {
    async fn send(&mut self, body: ClientMsg) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let bytes = self.proto.encode_client(&ClientFrame { id, body });
        let msg = match self.proto {
            Subprotocol::Json => Message::text(String::from_utf8(bytes)?),
            Subprotocol::FlatBuffers => Message::binary(bytes),
        };
        self.ws.send(msg).await?;
        Ok(id)
    }

    async fn recv(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            match self.ws.next().await.ok_or_else(|| anyhow!("connection closed"))?? {
                Message::Text(t) => return Ok(self.proto.decode_server(t.as_bytes())?),
                Message::Binary(b) => return Ok(self.proto.decode_server(&b)?),
                Message::Close(c) => bail!("closed by server: {c:?}"),
                _ => {}
            }
        }
    }

    /// Sends a request and waits for its reply, dropping events meanwhile (set-up only).
    async fn request(&mut self, body: ClientMsg) -> anyhow::Result<ServerMsg> {
        let id = self.send(body).await?;
        loop {
            let f = self.recv().await?;
            if f.id == id {
                if let ServerMsg::Error { name, .. } = &f.body {
                    bail!("request failed: {name}");
                }
                return Ok(f.body);
            }
        }
    }
}

fn ws_config() -> WebSocketConfig {
    // Small buffers: tungstenite's 128 KiB default read buffer times 19k connections would be 2.4 GB.
    WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0)
}

async fn connect(a: &Assignment, addr: SocketAddr, token: &str, index: usize) -> anyhow::Result<Conn> {
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(prefix) = &a.source_prefix {
        let ip = format!("{prefix}{}", index % 250 + 1);
        // Let the kernel pick the port at connect time, per destination: a port bound
        // at bind time cannot be shared with sockets in TIME_WAIT from an earlier run.
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a valid int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        sock.bind(SocketAddr::new(ip.parse()?, 0)).context("binding the source address")?;
    }
    let stream = sock.connect(addr).await?;
    stream.set_nodelay(true)?;
    let proto = if a.json_protocol { Subprotocol::Json } else { Subprotocol::FlatBuffers };
    let mut req = format!("{}/v1/ws", a.target).into_client_request()?;
    req.headers_mut().insert("authorization", format!("Bearer {token}").parse()?);
    req.headers_mut().insert("sec-websocket-protocol", proto.name().parse()?);
    let (ws, _) = tokio_tungstenite::client_async_with_config(req, stream, Some(ws_config())).await?;
    let mut c = Conn { ws, proto, next_id: 1 };
    match c.recv().await?.body {
        ServerMsg::Welcome { .. } => {}
        other => bail!("expected welcome, got {other:?}"),
    }
    match c.request(ClientMsg::Sync { positions: vec![] }).await? {
        ServerMsg::SyncDone { .. } => Ok(c),
        other => bail!("expected sync_done, got {other:?}"),
    }
}

fn resolve(target: &str) -> anyhow::Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    let hostport = target.strip_prefix("ws://").ok_or_else(|| anyhow!("target must be ws://host:port"))?;
    hostport.to_socket_addrs()?.next().ok_or_else(|| anyhow!("cannot resolve {hostport}"))
}

/// Conversations as lists of local user indices; the first member creates it.
fn plan_conversations(a: &Assignment, active: usize) -> Vec<Vec<usize>> {
    let in_groups = match a.scenario {
        Scenario::Pairs => 0,
        Scenario::Groups => active,
        Scenario::Mix => (active as f64 * a.group_fraction) as usize,
    };
    let g = a.group_size.max(2);
    let mut out = Vec::new();
    let mut i = 0;
    while i + g <= in_groups {
        out.push((i..i + g).collect());
        i += g;
    }
    // Left-over users join the pairs.
    while i + 2 <= active {
        out.push(vec![i, i + 1]);
        i += 2;
    }
    out
}

/// Runs one worker against a coordinator.
pub async fn run(coordinator: &str) -> anyhow::Result<()> {
    let stream =
        TcpStream::connect(coordinator).await.with_context(|| format!("connecting to {coordinator}"))?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    let a = match serde_json::from_str(&lines.next_line().await?.ok_or_else(|| anyhow!("no assignment"))?)? {
        ToWorker::Assign(a) => *a,
        other => bail!("expected an assignment, got {other:?}"),
    };
    let local = tokio::task::LocalSet::new();
    let result = local.run_until(work(&a, &mut lines, &mut wr)).await;
    if let Err(e) = &result {
        let msg = serde_json::to_string(&FromWorker::Failed(format!("{e:#}")))? + "\n";
        let _ = wr.write_all(msg.as_bytes()).await;
    }
    result
}

async fn send_line(wr: &mut tokio::net::tcp::OwnedWriteHalf, m: &FromWorker) -> anyhow::Result<()> {
    wr.write_all((serde_json::to_string(m)? + "\n").as_bytes()).await?;
    Ok(())
}

async fn work(
    a: &Assignment,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> anyhow::Result<()> {
    let addr = resolve(&a.target)?;
    let n = a.users.len();
    let state = Rc::new(RefCell::new(State {
        c: Counters { connections: n as u64, ..Default::default() },
        latency: histogram(),
        ack_latency: histogram(),
        send_lag: histogram(),
        convs: HashMap::new(),
        timeline: Vec::new(),
        start: None,
        measured_from_us: 0,
    }));

    // 1. Connect at the ramp rate, many handshakes in flight.
    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let gap = Duration::from_secs_f64(1.0 / a.ramp.max(1.0));
    let t0 = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for (i, u) in a.users.iter().enumerate() {
        let at = t0 + gap * i as u32;
        let token = u.token.clone();
        pending.push(async move {
            tokio::time::sleep_until(at.into()).await;
            (i, connect(a, addr, &token, i).await)
        });
    }
    let mut first_error = None;
    while let Some((i, r)) = pending.next().await {
        match r {
            Ok(c) => {
                conns[i] = Some(c);
                state.borrow_mut().c.connected += 1;
            }
            Err(e) => {
                state.borrow_mut().c.connect_errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    drop(pending);
    if let Some(e) = first_error {
        eprintln!("worker {}: connect errors, first: {e:#}", a.worker);
    }

    // 2. Conversations among the active (non-idle) users that connected.
    let active = n.saturating_sub(a.idle);
    let plan = plan_conversations(a, active);
    let mut conv_of: Vec<Option<u64>> = vec![None; n];
    for members in &plan {
        if members.iter().any(|&m| conns[m].is_none()) {
            continue;
        }
        let ids: Vec<u64> = members[1..].iter().map(|&m| a.users[m].user_id.parse().unwrap_or(0)).collect();
        let creator = conns[members[0]].as_mut().expect("checked");
        let reply = if members.len() == 2 {
            creator.request(ClientMsg::CreateDirect { user_id: ids[0] }).await?
        } else {
            creator
                .request(ClientMsg::CreateGroup { title: format!("lg-{}", a.worker), members: ids })
                .await?
        };
        let ServerMsg::Conversation { conversation } = reply else { bail!("expected a conversation") };
        for &m in members {
            conv_of[m] = Some(conversation.conversation_id);
        }
        state.borrow_mut().convs.insert(
            conversation.conversation_id,
            ConvTrack { expected: (members.len() - 1) as u16, ..Default::default() },
        );
    }
    let senders: usize = conv_of.iter().filter(|c| c.is_some()).count();
    let c = state.borrow().c.clone();
    send_line(wr, &FromWorker::Ready(c)).await?;

    // 3. Wait for Go.
    let start_unix_ms =
        match serde_json::from_str(&lines.next_line().await?.ok_or_else(|| anyhow!("coordinator left"))?)? {
            ToWorker::Go { start_unix_ms } => start_unix_ms,
            other => bail!("expected go, got {other:?}"),
        };
    let now_unix_us = now_us();
    let start_unix_us = start_unix_ms * 1000;
    let start = Instant::now() + Duration::from_micros(start_unix_us.saturating_sub(now_unix_us));
    let end = start + Duration::from_millis(a.warmup_ms + a.duration_ms);
    {
        let mut s = state.borrow_mut();
        s.start = Some(start);
        s.measured_from_us = start_unix_us + a.warmup_ms * 1000;
    }
    let interval = if a.rate > 0.0 && senders > 0 { senders as f64 / a.rate } else { f64::INFINITY };
    let timer = crate::clock::Timer::start().context("creating the send timer")?;

    // 4. Per connection: a reader, and (if in a conversation) an open-loop sender.
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let Some(conn) = conn else { continue };
        let (mut sink, mut stream) = conn.ws.split();
        let proto = conn.proto;
        let st = state.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let mut seen: HashMap<u64, Seen> = HashMap::new();
            while let Some(m) = stream.next().await {
                let bytes = match m {
                    Ok(Message::Text(t)) => t.as_bytes().to_vec(),
                    Ok(Message::Binary(b)) => b.to_vec(),
                    Ok(Message::Close(_)) | Err(_) => break,
                    Ok(_) => continue,
                };
                let Ok(f) = proto.decode_server(&bytes) else { continue };
                let now = now_us();
                let mut s = st.borrow_mut();
                match f.body {
                    ServerMsg::Message { message } => {
                        let (dup, ooo) =
                            seen.entry(message.conversation_id).or_default().observe(message.seq);
                        s.c.duplicates += u64::from(dup);
                        s.c.out_of_order += u64::from(ooo);
                        if message.kind != MessageKind::Text || dup {
                            continue;
                        }
                        let Some(sched) = message.body.split(':').next().and_then(|v| v.parse::<u64>().ok())
                        else {
                            continue;
                        };
                        s.c.delivered += 1;
                        if sched >= s.measured_from_us {
                            let _ = s.latency.record(now.saturating_sub(sched).max(1));
                        }
                        if let Some(t) = s.tick() {
                            t.1 += 1;
                        }
                        if let Some(track) = s.convs.get_mut(&message.conversation_id) {
                            *ConvTrack::slot(&mut track.delivered, message.seq) += 1;
                        }
                    }
                    ServerMsg::Ack { conversation_id, client_msg_id, seq, .. } => {
                        let (_, ooo) = seen.entry(conversation_id).or_default().observe(seq);
                        s.c.out_of_order += u64::from(ooo);
                        s.c.acked += 1;
                        if let Some(sched) =
                            client_msg_id.split('.').nth(1).and_then(|v| v.parse::<u64>().ok())
                            && sched >= s.measured_from_us
                        {
                            let _ = s.ack_latency.record(now.saturating_sub(sched).max(1));
                        }
                        if let Some(track) = s.convs.get_mut(&conversation_id) {
                            *ConvTrack::slot(&mut track.acked, seq) = true;
                        }
                    }
                    ServerMsg::Error { client_msg_id: Some(_), .. } => s.c.send_errors += 1,
                    _ => {}
                }
            }
            st.borrow_mut().c.disconnects += 1;
        }));
        let Some(conv) = conv_of[i] else {
            // Idle: keep the write half alive so the socket stays open.
            tasks.push(tokio::task::spawn_local(async move {
                tokio::time::sleep_until(end.into()).await;
                drop(sink);
            }));
            continue;
        };
        let st = state.clone();
        let size = a.message_size;
        let timer = timer.clone();
        tasks.push(tokio::task::spawn_local(async move {
            let phase = rand::random::<f64>() * interval;
            let mut k: u64 = 0;
            let pad = "x".repeat(size);
            loop {
                let offset = phase + k as f64 * interval;
                let at = start + Duration::from_secs_f64(offset.min(1e9));
                if at >= end {
                    break;
                }
                timer.sleep_until(at).await;
                let sched = start_unix_us + (offset * 1e6) as u64;
                let mut body = format!("{sched}:{i}:{k}:");
                if body.len() < size {
                    body.push_str(&pad[..size - body.len()]);
                }
                let frame = ClientFrame {
                    id: 0,
                    body: ClientMsg::Send {
                        conversation_id: conv,
                        client_msg_id: format!("{k}.{sched}"),
                        body,
                    },
                };
                let bytes = proto.encode_client(&frame);
                let msg = match proto {
                    Subprotocol::Json => Message::text(String::from_utf8(bytes).expect("json is utf-8")),
                    Subprotocol::FlatBuffers => Message::binary(bytes),
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
                {
                    let mut s = st.borrow_mut();
                    if sched >= s.measured_from_us {
                        let _ = s.send_lag.record(now_us().saturating_sub(sched).max(1));
                    }
                    s.c.sent += 1;
                    if let Some(t) = s.tick() {
                        t.0 += 1;
                    }
                }
                k += 1;
            }
            // Keep the socket open through the grace period.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(sink);
        }));
    }

    // 5. Progress once a second until the end, then wait for stragglers up to the grace period.
    let mut next = start + Duration::from_secs(1);
    while next <= end {
        tokio::time::sleep_until(next.into()).await;
        let (c, h) = {
            let s = state.borrow();
            (s.c.clone(), encode_hist(&s.latency))
        };
        send_line(wr, &FromWorker::Progress { counters: c, latency: h }).await?;
        next += Duration::from_secs(1);
    }
    tokio::time::sleep_until(end.into()).await;
    let deadline = end + Duration::from_millis(a.grace_ms);
    loop {
        let missing = count_lost(&state.borrow());
        let (acked, sent) = (state.borrow().c.acked + state.borrow().c.send_errors, state.borrow().c.sent);
        if (missing == 0 && acked >= sent) || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for t in tasks {
        t.abort();
    }
    let result = {
        let mut s = state.borrow_mut();
        s.c.lost = count_lost(&s);
        WorkerResult {
            counters: s.c.clone(),
            latency: encode_hist(&s.latency),
            ack_latency: encode_hist(&s.ack_latency),
            send_lag: encode_hist(&s.send_lag),
            timeline: s.timeline.clone(),
        }
    };
    send_line(wr, &FromWorker::Result(Box::new(result))).await?;
    Ok(())
}

/// Acknowledged messages that have not reached every recipient.
fn count_lost(s: &State) -> u64 {
    let mut lost = 0;
    for t in s.convs.values() {
        for (seq, acked) in t.acked.iter().enumerate() {
            if *acked && t.delivered.get(seq).copied().unwrap_or(0) < t.expected {
                lost += 1;
            }
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_classifies_duplicates_and_reordering() {
        let mut s = Seen::default();
        assert_eq!(s.observe(1), (false, false));
        assert_eq!(s.observe(3), (false, false));
        assert_eq!(s.observe(2), (false, true), "2 after 3 is out of order");
        assert_eq!(s.observe(3), (true, false), "3 again is a duplicate");
        assert_eq!(s.observe(200), (false, false));
    }

    #[test]
    fn conversations_cover_active_users() {
        let mut a: Assignment = serde_json::from_value(serde_json::json!({
            "worker": 0, "target": "ws://x:1", "users": [], "scenario": "mix", "group_size": 4,
            "group_fraction": 0.5, "idle": 0, "rate": 1.0, "message_size": 10, "duration_ms": 1,
            "grace_ms": 1, "ramp": 1.0, "source_prefix": null, "json_protocol": false
        }))
        .unwrap();
        let p = plan_conversations(&a, 20);
        assert_eq!(p.iter().filter(|c| c.len() == 4).count(), 2);
        assert_eq!(p.iter().filter(|c| c.len() == 2).count(), 6);
        a.scenario = Scenario::Pairs;
        assert_eq!(plan_conversations(&a, 7).len(), 3, "an odd user out stays idle");
    }
}

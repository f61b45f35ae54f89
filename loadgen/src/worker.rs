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
use protocol::{
    ClientFrame, ClientMsg, ErrorCode, MessageKind, Position, ServerFrame, ServerMsg, Subprotocol,
};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::Role;
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
    /// The node that owns it (by the ring of the nodes seen at set-up), if known.
    owner: Option<u16>,
    /// Which send (sender index << 32 | its counter) each position holds: one send
    /// at two positions is a duplicate however the client dedupes.
    sends: HashMap<u64, u64>,
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
    /// Attachment downloads in flight (at most `MAX_UPLOADS`).
    downloading: usize,
    latency: Histogram<u64>,
    /// send→deliver by node-to-node hops (0, 1, 2).
    by_hops: [Histogram<u64>; 3],
    ack_latency: Histogram<u64>,
    /// How late each send reached the socket after its scheduled time: loadgen's
    /// own timing error, which every latency above includes.
    send_lag: Histogram<u64>,
    /// With --reconnect: drop to `sync` done on the next connection.
    reconnect_time: Histogram<u64>,
    /// The longest scheduled-send-to-first-sight of any delivery, warm-up included.
    longest_delivery_us: u64,
    /// Out-of-order and duplicate observations so far (the first few of each are logged).
    anomalies: u64,
    duplicates_noted: u64,
    convs: HashMap<u64, ConvTrack>,
    /// The node each local user's connection is on now (from its `connection_id`).
    node: Vec<u16>,
    timeline: Vec<(u64, u64)>,
    start: Option<Instant>,
    /// Scheduled send times before this (µs, Unix) are warm-up: not in the histograms.
    measured_from_us: u64,
    /// Messages scheduled from `measured_from_us` to this (µs, Unix; `u64::MAX`
    /// without a split) are also timed in `before_split`.
    split_at_us: u64,
    before_split: Histogram<u64>,
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

pub(crate) struct Conn {
    ws: Ws,
    proto: Subprotocol,
    next_id: u64,
    /// The gateway node holding this connection: the top 16 bits of its `connection_id`.
    node: u16,
}

impl Conn {
    fn message(&self, body: ClientMsg, id: u64) -> Message {
        let bytes = self.proto.encode_client(&ClientFrame { id, body });
        match self.proto {
            Subprotocol::Json => Message::text(String::from_utf8(bytes).expect("json is utf-8")),
            Subprotocol::FlatBuffers => Message::binary(bytes),
        }
    }

    pub(crate) async fn send(&mut self, body: ClientMsg) -> anyhow::Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let msg = self.message(body, id);
        self.ws.send(msg).await?;
        Ok(id)
    }

    /// Sends a `send` (its answers are events: request id 0).
    pub(crate) async fn send_frame(&mut self, body: ClientMsg) -> anyhow::Result<()> {
        let msg = self.message(body, 0);
        self.ws.send(msg).await?;
        Ok(())
    }

    fn decode(&self, m: Message) -> Option<ServerFrame> {
        match m {
            Message::Text(t) => self.proto.decode_server(t.as_bytes()).ok(),
            Message::Binary(b) => self.proto.decode_server(&b).ok(),
            _ => None,
        }
    }

    pub(crate) async fn recv(&mut self) -> anyhow::Result<ServerFrame> {
        loop {
            let m = self.ws.next().await.ok_or_else(|| anyhow!("connection closed"))??;
            if let Message::Close(c) = &m {
                bail!("closed by server: {c:?}");
            }
            if let Some(f) = self.decode(m) {
                return Ok(f);
            }
        }
    }

    /// Sends a request and waits for its reply, dropping events meanwhile (set-up only).
    pub(crate) async fn request(&mut self, body: ClientMsg) -> anyhow::Result<ServerMsg> {
        let id = self.send(body).await?;
        loop {
            let f = self.recv().await?;
            if f.id == id {
                if let ServerMsg::Error { name, .. } = &f.body {
                    if name == "not_a_contact" {
                        bail!(
                            "request failed: not_a_contact: the gateway adds to groups only users \
                             who chatted with the adder, and loadgen's users have not; the groups \
                             and mix scenarios need `group_adds = \"anyone\"` in its [limits]"
                        );
                    }
                    bail!("request failed: {name}");
                }
                return Ok(f.body);
            }
        }
    }
}

fn ws_config() -> WebSocketConfig {
    // A small read buffer (it grows for a larger frame): tungstenite's 128 KiB
    // default, times a worker's 18k connections, would be 2.4 GB.
    WebSocketConfig::default().read_buffer_size(256).write_buffer_size(0)
}

/// Opens a connection and waits for `welcome` (no `sync` yet).
async fn open(a: &Assignment, target: &str, token: &str, index: usize) -> anyhow::Result<Conn> {
    open_with(a.source_prefix.as_deref(), a.json_protocol, target, token, index).await
}

/// [`open`] with its settings given: `index` picks the source address under `source_prefix`.
pub(crate) async fn open_with(
    source_prefix: Option<&str>,
    json_protocol: bool,
    target: &str,
    token: &str,
    index: usize,
) -> anyhow::Result<Conn> {
    let addr = resolve(target)?;
    let sock = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(prefix) = source_prefix {
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
    let proto = if json_protocol { Subprotocol::Json } else { Subprotocol::FlatBuffers };
    let mut stream = stream;
    let host = target.strip_prefix("ws://").unwrap_or(target);
    let tail = upgrade(&mut stream, host, token, proto).await?;
    let ws = WebSocketStream::from_partially_read(stream, tail, Role::Client, Some(ws_config())).await;
    let mut c = Conn { ws, proto, next_id: 1, node: 0 };
    match c.recv().await?.body {
        ServerMsg::Welcome { connection_id, .. } => c.node = (connection_id >> 48) as u16,
        other => bail!("expected welcome, got {other:?}"),
    }
    Ok(c)
}

/// The WebSocket upgrade of `stream` as `token`'s user; returns what the server
/// sent after its response (frames already on their way).
///
/// Done here rather than by tokio-tungstenite's client handshake: that one
/// hands its 4 KiB response buffer to the connection as its read buffer for the
/// connection's life (heaptrack: 4 KB of every loadgen connection, 4 GB at a
/// million). The response is parsed by httparse and the accept key checked with
/// tungstenite's own derivation; the connection's read buffer is then
/// `ws_config`'s.
async fn upgrade(
    stream: &mut TcpStream,
    host: &str,
    token: &str,
    proto: Subprotocol,
) -> anyhow::Result<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::handshake::{client::generate_key, derive_accept_key};
    let key = generate_key();
    let request = format!(
        "GET /v1/ws HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Protocol: {}\r\n\
         Authorization: Bearer {token}\r\n\r\n",
        proto.name()
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            bail!("the server closed the connection during the upgrade");
        }
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut response = httparse::Response::new(&mut headers);
        let httparse::Status::Complete(len) = response.parse(&buf).context("the upgrade's response")? else {
            if buf.len() > 16 * 1024 {
                bail!("the upgrade's response is over 16 KiB");
            }
            continue;
        };
        if response.code != Some(101) {
            bail!(
                "the upgrade was refused: HTTP {} {}",
                response.code.unwrap_or(0),
                String::from_utf8_lossy(&buf[len..]).trim()
            );
        }
        let accept = response.headers.iter().find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"));
        if accept.map(|h| h.value) != Some(derive_accept_key(key.as_bytes()).as_bytes()) {
            bail!("the upgrade's Sec-WebSocket-Accept does not match its key");
        }
        return Ok(buf[len..].to_vec());
    }
}

/// A fresh connection, synced with no positions (what it missed before is not counted).
async fn connect(a: &Assignment, target: &str, token: &str, index: usize) -> anyhow::Result<Conn> {
    let mut c = open(a, target, token, index).await?;
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

/// Where each member of conversation number `index` should sit, given its owner
/// and the live nodes (sorted): together on the owner, or (the `cross` share of
/// conversations, spread evenly) the first member on the owner and the others on
/// the following nodes in turn, so that every message crosses one node boundary.
fn placement(index: usize, cross: f64, owner: u16, nodes: &[u16], members: usize) -> Vec<u16> {
    let crossing = (((index + 1) as f64 * cross).floor() - (index as f64 * cross).floor()) >= 1.0;
    let at = nodes.iter().position(|&n| n == owner).unwrap_or(0);
    (0..members)
        .map(|j| {
            if !crossing || nodes.len() < 2 || j == 0 {
                owner
            } else {
                nodes[(at + 1 + (j - 1) % (nodes.len() - 1)) % nodes.len()]
            }
        })
        .collect()
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

/// Handshakes one worker has in flight at most: beyond, the ramp waits (a slow
/// server is not buried under connects, and their state stays bounded).
const MAX_CONNECTING: usize = 256;

/// Connects `who` (user indices, with their target) at the ramp rate, many
/// handshakes in flight; with `progress`, tells the coordinator how far it got
/// once a second. A handshake's state exists only from its turn to its end, so
/// memory holds what is in flight, not the whole schedule. Returns the first
/// error, if any.
async fn connect_all(
    a: &Assignment,
    who: Vec<(usize, String)>,
    conns: &mut [Option<Conn>],
    state: &RefCell<State>,
    mut progress: Option<&mut tokio::net::tcp::OwnedWriteHalf>,
) -> anyhow::Result<Option<anyhow::Error>> {
    let gap = Duration::from_secs_f64(1.0 / a.ramp.max(1.0));
    let t0 = Instant::now();
    let mut pending = futures_util::stream::FuturesUnordered::new();
    let (mut next, mut done, mut failed) = (0usize, 0u64, 0u64);
    let mut told = Instant::now();
    let mut first_error = None;
    loop {
        while next < who.len() && pending.len() < MAX_CONNECTING && t0 + gap * next as u32 <= Instant::now() {
            let (i, target) = &who[next];
            let i = *i;
            pending.push(async move { (i, connect(a, target, &a.users[i].token, i).await) });
            next += 1;
        }
        if next == who.len() && pending.is_empty() {
            break;
        }
        let due = t0 + gap * next as u32;
        let room = pending.len() < MAX_CONNECTING;
        tokio::select! {
            Some((i, r)) = pending.next(), if !pending.is_empty() => match r {
                Ok(c) => {
                    done += 1;
                    state.borrow_mut().node[i] = c.node;
                    conns[i] = Some(c);
                }
                Err(e) => {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
            },
            _ = tokio::time::sleep_until(due.into()), if next < who.len() && room => {}
        }
        if let Some(wr) = progress.as_deref_mut()
            && told.elapsed() >= Duration::from_secs(1)
        {
            send_line(wr, &FromWorker::Connecting { done, failed }).await?;
            told = Instant::now();
        }
    }
    Ok(first_error)
}

/// This process's resident memory now (`VmRSS`), bytes; 0 where /proc cannot tell.
pub(crate) fn rss_bytes() -> u64 {
    proc_status_kb("VmRSS:") * 1024
}

/// This process's peak resident memory (`VmHWM`), bytes.
fn rss_peak_bytes() -> u64 {
    proc_status_kb("VmHWM:") * 1024
}

fn proc_status_kb(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// What every connection's task shares.
struct Ctx {
    a: Assignment,
    state: Rc<RefCell<State>>,
    timer: crate::clock::Timer,
    /// Unix µs and `Instant` of the schedule's zero.
    start_unix_us: u64,
    start: Instant,
    /// Sending stops here; reconnecting at `end + grace`.
    end: Instant,
    interval: f64,
    /// The user ids of the worker's users, by index.
    user_ids: Vec<u64>,
    /// `message_size` bytes of padding, made once: a body is its header plus the rest of this.
    pad: String,
    /// The file attached to a share of sends (`attachment_share`), made once.
    file: Option<Arc<AttachedFile>>,
    /// Uploads this worker has in flight (at most `MAX_UPLOADS`).
    uploading: Cell<usize>,
}

/// The bytes every attachment of a run carries, and their SHA-256 (hex).
struct AttachedFile {
    bytes: Vec<u8>,
    sha256: String,
    media_type: String,
    agent: ureq::Agent,
}

/// Uploads one worker runs at once (blocking, on tokio's blocking threads);
/// an attachment due beyond that goes as a plain text send (`uploads_skipped`).
const MAX_UPLOADS: usize = 16;

/// An upload slot for `conv` as `token`'s user, then the file `PUT` to the
/// presigned URL with the headers the slot names; returns the attachment id.
fn upload(f: &AttachedFile, base: &str, token: &str, conv: u64) -> anyhow::Result<String> {
    let slot: serde_json::Value = f
        .agent
        .post(&format!("{base}/v1/attachments"))
        .header("authorization", &format!("Bearer {token}"))
        .send_json(serde_json::json!({
            "conversation_id": conv.to_string(), "size": f.bytes.len(), "media_type": f.media_type,
            "sha256": f.sha256, "file_name": "loadgen.bin",
        }))?
        .body_mut()
        .read_json()?;
    let (Some(id), Some(url)) = (slot["attachment_id"].as_str(), slot["upload_url"].as_str()) else {
        bail!("no upload slot: {slot}");
    };
    let url = if url.starts_with('/') { format!("{base}{url}") } else { url.to_owned() };
    let mut put = f.agent.put(&url);
    for (k, v) in slot["headers"].as_object().into_iter().flatten() {
        put = put.header(k, v.as_str().unwrap_or_default());
    }
    put.send(&f.bytes[..])?;
    Ok(id.to_owned())
}

/// What a recipient's client does with an attachment: a download URL from the
/// gateway, then the bytes from it (checked against the upload's length).
fn download(f: &AttachedFile, base: &str, token: &str, id: &str) -> anyhow::Result<()> {
    let d: serde_json::Value = f
        .agent
        .get(&format!("{base}/v1/attachments/{id}"))
        .header("authorization", &format!("Bearer {token}"))
        .call()?
        .body_mut()
        .read_json()?;
    let Some(url) = d["url"].as_str() else { bail!("no download URL: {d}") };
    let url = if url.starts_with('/') { format!("{base}{url}") } else { url.to_owned() };
    let got = f.agent.get(&url).call()?.body_mut().with_config().limit(u64::MAX).read_to_vec()?;
    if got.len() != f.bytes.len() {
        bail!("downloaded {} bytes of {}", got.len(), f.bytes.len());
    }
    Ok(())
}

/// Does send `k` carry an attachment? `share` of sends do, evenly spread over
/// each sender's sends from a random start (`offset`), so senders that send only
/// a few still carry their share between them.
fn attached(share: f64, offset: u64, k: u64) -> bool {
    let k = k + offset;
    share > 0.0 && ((k + 1) as f64 * share).floor() > (k as f64 * share).floor()
}

async fn work(
    a: &Assignment,
    lines: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> anyhow::Result<()> {
    if a.targets.is_empty() {
        bail!("no target");
    }
    let n = a.users.len();
    let user_ids: Vec<u64> = a.users.iter().map(|u| u.user_id.parse().unwrap_or(0)).collect();
    let state = Rc::new(RefCell::new(State {
        c: Counters { connections: n as u64, rss_before_bytes: rss_bytes(), ..Default::default() },
        latency: histogram(),
        by_hops: [histogram(), histogram(), histogram()],
        ack_latency: histogram(),
        send_lag: histogram(),
        reconnect_time: histogram(),
        longest_delivery_us: 0,
        anomalies: 0,
        duplicates_noted: 0,
        convs: HashMap::new(),
        node: vec![0; n],
        timeline: Vec::new(),
        start: None,
        measured_from_us: 0,
        split_at_us: u64::MAX,
        before_split: histogram(),
        downloading: 0,
    }));

    // 1. Connect, each user to the targets in turn.
    let mut conns: Vec<Option<Conn>> = (0..n).map(|_| None).collect();
    let who = (0..n).map(|i| (i, a.targets[i % a.targets.len()].clone())).collect();
    if let Some(e) = connect_all(a, who, &mut conns, &state, Some(&mut *wr)).await? {
        eprintln!("worker {}: connect errors, first: {e:#}", a.worker);
    }
    // The nodes behind the targets: the ring's live set as far as this worker can tell.
    let mut node_target: BTreeMap<u16, String> = BTreeMap::new();
    for (i, c) in conns.iter().enumerate() {
        if let Some(c) = c {
            node_target.entry(c.node).or_insert_with(|| a.targets[i % a.targets.len()].clone());
        }
    }
    let nodes: Vec<u16> = node_target.keys().copied().collect();
    let ring = router::Ring::new(nodes.iter().copied());

    // 2. Conversations among the active (non-idle) users that connected.
    let active = n.saturating_sub(a.idle);
    let plan = plan_conversations(a, active);
    let mut conv_of: Vec<Option<u64>> = vec![None; n];
    let mut want: Vec<(usize, u16)> = Vec::new();
    for (index, members) in plan.iter().enumerate() {
        if members.iter().any(|&m| conns[m].is_none()) {
            continue;
        }
        let ids: Vec<u64> = members[1..].iter().map(|&m| user_ids[m]).collect();
        let creator = conns[members[0]].as_mut().expect("checked");
        let reply = if members.len() == 2 {
            creator.request(ClientMsg::CreateDirect { user_id: ids[0] }).await
        } else {
            creator.request(ClientMsg::CreateGroup { title: format!("lg-{}", a.worker), members: ids }).await
        };
        let conversation = match reply {
            Ok(ServerMsg::Conversation { conversation }) => conversation,
            // A refusal is the run's set-up being wrong: stop, saying why.
            Ok(other) => bail!("expected a conversation, got {other:?}"),
            Err(e) if e.to_string().starts_with("request failed") => return Err(e),
            // The creator's connection died: at a million connections on one host
            // some do. Its conversation is left out, its members counted as
            // connect errors, and the run goes on.
            Err(e) => {
                note_anomaly(&mut state.borrow_mut().anomalies, None, || {
                    format!("a connection died while setting up its conversation: {e:#}")
                });
                for &m in members {
                    conns[m] = None;
                }
                continue;
            }
        };
        let id = conversation.conversation_id;
        let owner = ring.owner(router::Key::Conversation(id));
        for &m in members {
            conv_of[m] = Some(id);
        }
        if let (Some(owner), Some(cross)) = (owner, a.cross_node) {
            let place = placement(index, cross, owner, &nodes, members.len());
            want.extend(members.iter().copied().zip(place));
        }
        state
            .borrow_mut()
            .convs
            .insert(id, ConvTrack { expected: (members.len() - 1) as u16, owner, ..Default::default() });
    }
    // 3. Move members to the node their conversation's layout asks for (when the
    // targets are the nodes themselves; behind one balancer they stay where they landed).
    if a.targets.len() > 1 && a.cross_node.is_some() {
        let moves: Vec<(usize, String)> = want
            .into_iter()
            .filter(|&(i, node)| conns[i].as_ref().is_some_and(|c| c.node != node))
            .map(|(i, node)| (i, node_target[&node].clone()))
            .collect();
        for (i, _) in &moves {
            conns[*i] = None;
        }
        if let Some(e) = connect_all(a, moves, &mut conns, &state, None).await? {
            eprintln!("worker {}: reconnect errors while placing users, first: {e:#}", a.worker);
        }
    }
    {
        let mut s = state.borrow_mut();
        s.c.connected = conns.iter().filter(|c| c.is_some()).count() as u64;
        s.c.connect_errors = n as u64 - s.c.connected;
        s.c.rss_ready_bytes = rss_bytes();
    }
    let senders: usize = (0..n).filter(|&i| conv_of[i].is_some() && conns[i].is_some()).count();
    let c = state.borrow().c.clone();
    send_line(wr, &FromWorker::Ready(c)).await?;

    // 4. Wait for Go.
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
        if let Some(split) = a.split_ms {
            s.split_at_us = start_unix_us + split * 1000;
        }
    }
    let ctx = Rc::new(Ctx {
        a: a.clone(),
        state: state.clone(),
        timer: crate::clock::Timer::start().context("creating the send timer")?,
        start_unix_us,
        start,
        end,
        interval: if a.rate > 0.0 && senders > 0 { senders as f64 / a.rate } else { f64::INFINITY },
        user_ids,
        pad: "x".repeat(a.message_size),
        file: (a.attachment_share > 0.0).then(|| {
            use sha2::Digest;
            let bytes: Vec<u8> = (0..a.attachment_size).map(|_| rand::random::<u8>()).collect();
            let sha256 = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            let agent =
                ureq::Agent::config_builder().timeout_global(Some(Duration::from_secs(60))).build().into();
            Arc::new(AttachedFile { bytes, sha256, media_type: a.attachment_type.clone(), agent })
        }),
        uploading: Cell::new(0),
    });

    // 5. One task per connection: reads, sends open-loop if in a conversation,
    // and (with --reconnect) reconnects.
    let mut tasks = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let Some(conn) = conn else { continue };
        tasks.push(tokio::task::spawn_local(drive(ctx.clone(), i, conn, conv_of[i])));
    }

    // 6. Progress once a second until the end, then wait for stragglers up to the grace period.
    let mut next = start + Duration::from_secs(1);
    while next <= end {
        tokio::time::sleep_until(next.into()).await;
        if next == start + Duration::from_secs(1) {
            state.borrow_mut().c.rss_held_bytes = rss_bytes();
        }
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
        let answered = {
            let c = &state.borrow().c;
            if a.reconnect { c.unanswered == 0 } else { c.acked + c.send_errors >= c.sent }
        };
        if (missing == 0 && answered) || Instant::now() >= deadline {
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
        s.c.rss_peak_bytes = rss_peak_bytes();
        if s.c.rss_held_bytes == 0 {
            // A run shorter than a second.
            s.c.rss_held_bytes = rss_bytes();
        }
        WorkerResult {
            counters: s.c.clone(),
            latency: encode_hist(&s.latency),
            latency_by_hops: s.by_hops.iter().map(encode_hist).collect(),
            ack_latency: encode_hist(&s.ack_latency),
            send_lag: encode_hist(&s.send_lag),
            timeline: s.timeline.clone(),
            reconnect_time: encode_hist(&s.reconnect_time),
            longest_delivery_us: s.longest_delivery_us,
            latency_before_split: if a.split_ms.is_some() {
                encode_hist(&s.before_split)
            } else {
                String::new()
            },
        }
    };
    send_line(wr, &FromWorker::Result(Box::new(result))).await?;
    Ok(())
}

/// One connection's own view: what it has seen, and (with --reconnect) its sends
/// not yet acknowledged.
struct Local {
    i: usize,
    seen: HashMap<u64, Seen>,
    /// Send counter → scheduled time, until acknowledged (only with --reconnect).
    /// (scheduled time, when it last went out.)
    pending: BTreeMap<u64, (u64, Instant)>,
    /// Sends refused with a retryable error, to send again at the given time.
    retry: VecDeque<(Instant, u64)>,
    /// Send counter → the attachment it names, while it may be sent (again).
    attached: HashMap<u64, String>,
    /// The target this connection is on (index into `targets`).
    target: usize,
}

/// A send's frame: the body carries its scheduled time, sender and counter.
fn send_msg(ctx: &Ctx, me: &Local, conv: u64, k: u64, sched: u64) -> ClientMsg {
    let mut body = format!("{sched}:{}:{k}:", me.i);
    if body.len() < ctx.pad.len() {
        body.push_str(&ctx.pad[body.len()..]);
    }
    let attachment = me.attached.get(&k).map(|id| protocol::AttachmentRef {
        attachment_id: id.clone(),
        width: None,
        height: None,
        preview: String::new(),
    });
    ClientMsg::Send { conversation_id: conv, client_msg_id: format!("{k}.{sched}"), body, attachment }
}

/// Counts one frame received by user `me.i`'s connection on node `node`.
fn on_frame(ctx: &Ctx, me: &mut Local, node: u16, f: ServerFrame) {
    let now = now_us();
    let mut s = ctx.state.borrow_mut();
    let s = &mut *s;
    match f.body {
        ServerMsg::Message { message } => {
            let (dup, ooo) = me.seen.entry(message.conversation_id).or_default().observe(message.seq);
            if dup {
                if ctx.a.reconnect {
                    s.c.redelivered += 1;
                } else {
                    s.c.duplicates += 1;
                }
                return;
            }
            s.c.out_of_order += u64::from(ooo);
            if ooo {
                note_anomaly(&mut s.anomalies, s.start, || {
                    format!(
                        "out of order: user {} on node {node} got conversation {} position {} after {}",
                        me.i, message.conversation_id, message.seq, me.seen[&message.conversation_id].last
                    )
                });
            }
            if message.kind != MessageKind::Text {
                return;
            }
            let mut parts = message.body.split(':');
            let (Some(sched), Some(from), Some(k)) = (
                parts.next().and_then(|v| v.parse::<u64>().ok()),
                parts.next().and_then(|v| v.parse::<usize>().ok()),
                parts.next().and_then(|v| v.parse::<u64>().ok()),
            ) else {
                return;
            };
            let Some(track) = s.convs.get_mut(&message.conversation_id) else { return };
            // One send stored at two positions: a real duplicate.
            let send = ((from as u64) << 32) | k;
            let twice = track.sends.insert(send, message.seq).filter(|&other| other != message.seq);
            if let Some(other) = twice {
                s.c.duplicates += 1;
                let conv = message.conversation_id;
                note_anomaly(&mut s.duplicates_noted, s.start, || {
                    format!(
                        "duplicate: send {from}/{k} stored at positions {other} and {} of conversation {conv} \
                         (seen by user {} on node {node})",
                        message.seq, me.i
                    )
                });
            }
            if message.sender_id == ctx.user_ids[me.i] {
                // Our own message, replayed by a sync or shown again after a fail-over:
                // stored, so as good as its ack; not a delivery.
                if me.pending.remove(&k).is_some() {
                    s.c.acked += 1;
                    s.c.unanswered -= 1;
                }
                *ConvTrack::slot(&mut track.acked, message.seq) = true;
                return;
            }
            *ConvTrack::slot(&mut track.delivered, message.seq) += 1;
            let hops = track
                .owner
                .map(|o| usize::from(s.node.get(from).is_some_and(|&n| n != o)) + usize::from(node != o));
            s.c.delivered += 1;
            s.longest_delivery_us = s.longest_delivery_us.max(now.saturating_sub(sched));
            if sched >= s.measured_from_us {
                let v = now.saturating_sub(sched).max(1);
                let _ = s.latency.record(v);
                if sched < s.split_at_us {
                    let _ = s.before_split.record(v);
                }
                if let Some(h) = hops {
                    let _ = s.by_hops[h].record(v);
                }
            }
            if let Some(t) = s.tick() {
                t.1 += 1;
            }
            if let (Some(att), Some(file)) = (&message.attachment, &ctx.file)
                && ctx.a.attachment_fetch
            {
                fetch(ctx, s, me, file.clone(), att.attachment_id.clone());
            }
        }
        ServerMsg::Ack { conversation_id, client_msg_id, seq, .. } => {
            let (_, ooo) = me.seen.entry(conversation_id).or_default().observe(seq);
            s.c.out_of_order += u64::from(ooo);
            if ooo {
                note_anomaly(&mut s.anomalies, s.start, || {
                    format!(
                        "out of order: user {} on node {node} got the ack of conversation {conversation_id} position {seq} after {}",
                        me.i, me.seen[&conversation_id].last
                    )
                });
            }
            let mut id = client_msg_id.split('.');
            let k = id.next().and_then(|v| v.parse::<u64>().ok());
            if ctx.a.reconnect && k.is_none_or(|k| me.pending.remove(&k).is_none()) {
                return; // acknowledged already (by a replay of the message)
            }
            if ctx.a.reconnect {
                s.c.unanswered -= 1;
            }
            s.c.acked += 1;
            if let Some(sched) = id.next().and_then(|v| v.parse::<u64>().ok())
                && sched >= s.measured_from_us
            {
                let _ = s.ack_latency.record(now.saturating_sub(sched).max(1));
            }
            if let Some(track) = s.convs.get_mut(&conversation_id) {
                *ConvTrack::slot(&mut track.acked, seq) = true;
            }
        }
        ServerMsg::Error { client_msg_id: Some(id), code, .. } => {
            let k = id.split('.').next().and_then(|v| v.parse::<u64>().ok());
            let retryable = ErrorCode::from_code(code).is_some_and(ErrorCode::retryable);
            match k {
                Some(k) if ctx.a.reconnect && retryable && me.pending.contains_key(&k) => {
                    me.retry.push_back((Instant::now() + RETRY_AFTER, k));
                }
                _ => {
                    if let Some(k) = k
                        && me.pending.remove(&k).is_some()
                    {
                        s.c.unanswered -= 1;
                    }
                    s.c.send_errors += 1;
                }
            }
        }
        _ => {}
    }
}

/// Fetches a received attachment on a task of its own, as a client showing it
/// does (at most `MAX_UPLOADS` at once per worker; beyond: skipped, counted).
fn fetch(ctx: &Ctx, s: &mut State, me: &Local, file: Arc<AttachedFile>, id: String) {
    let Ok(base) = crate::coordinator::http_base(&ctx.a.targets[me.target]) else { return };
    if s.downloading >= MAX_UPLOADS {
        s.c.downloads_skipped += 1;
        return;
    }
    s.downloading += 1;
    let (token, state) = (ctx.a.users[me.i].token.clone(), ctx.state.clone());
    tokio::task::spawn_local(async move {
        let done = tokio::task::spawn_blocking(move || download(&file, &base, &token, &id)).await;
        let mut s = state.borrow_mut();
        s.downloading -= 1;
        match done {
            Ok(Ok(())) => s.c.downloads += 1,
            _ => s.c.download_errors += 1,
        }
    });
}

/// Logs the first few anomalies (out of order, duplicate) a worker sees, with what
/// identifies them, for whoever reads a failed run's log.
fn note_anomaly(count: &mut u64, start: Option<Instant>, what: impl FnOnce() -> String) {
    *count += 1;
    if *count <= 10 {
        eprintln!(
            "loadgen worker: {} (+{} ms into the run)",
            what(),
            start.map_or(0, |t| t.elapsed().as_millis())
        );
    }
}

/// A send with no answer this long on a live connection goes again (same id).
const RESEND_AFTER: Duration = Duration::from_secs(10);

/// A send refused with a retryable error (1020, 1022) goes again after this.
const RETRY_AFTER: Duration = Duration::from_millis(250);

/// One connection for the whole run: reads, sends on its schedule, and with
/// --reconnect comes back after a drop (to another target, at random), syncs from the
/// positions it holds and sends again what was not acknowledged.
async fn drive(ctx: Rc<Ctx>, i: usize, mut conn: Conn, conv: Option<u64>) {
    let mut target = i % ctx.a.targets.len();
    let mut me = Local {
        i,
        seen: HashMap::new(),
        pending: BTreeMap::new(),
        retry: VecDeque::new(),
        attached: HashMap::new(),
        target,
    };
    // Finished uploads: (send counter, attachment id or the failure). Made at the
    // first upload: most connections never upload, and a channel is ~1 KB.
    let mut uploads: Option<Uploads> = None;
    let mut k: u64 = 0;
    let phase = rand::random::<f64>() * ctx.interval;
    let offset = if ctx.a.attachment_share > 0.0 {
        rand::random_range(0..(1.0 / ctx.a.attachment_share).ceil() as u64)
    } else {
        0
    };
    let due = |k: u64| phase + k as f64 * ctx.interval;
    let at = |k: u64| ctx.start + Duration::from_secs_f64(due(k).min(1e9));
    let mut sleep = ctx.timer.sleep_until(at(0));
    let mut backoff = Duration::from_millis(100);
    let mut resend_check = Instant::now() + Duration::from_secs(1);
    loop {
        // One session: until the connection drops.
        loop {
            let sending = conv.is_some() && at(k) < ctx.end;
            let retry_at = me.retry.front().map(|r| r.0);
            tokio::select! {
                m = conn.ws.next() => {
                    let m = match m {
                        Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                        Some(Ok(m)) => m,
                    };
                    if let Some(f) = conn.decode(m) {
                        on_frame(&ctx, &mut me, conn.node, f);
                    }
                }
                () = &mut sleep, if sending => {
                    let conv = conv.expect("sending");
                    let sched = ctx.start_unix_us + (due(k) * 1e6) as u64;
                    let this = k;
                    k += 1;
                    sleep = ctx.timer.sleep_until(at(k));
                    // A send with a file: uploaded first, sent when that is done (below).
                    if let Some(file) = ctx.file.clone().filter(|_| attached(ctx.a.attachment_share, offset, this)) {
                        if ctx.uploading.get() < MAX_UPLOADS {
                            ctx.uploading.set(ctx.uploading.get() + 1);
                            let tx = uploads.get_or_insert_with(tokio::sync::mpsc::unbounded_channel).0.clone();
                            let base = crate::coordinator::http_base(&ctx.a.targets[target]);
                            let token = ctx.a.users[i].token.clone();
                            tokio::task::spawn_local(async move {
                                let done = match base {
                                    Ok(base) => tokio::task::spawn_blocking(move || upload(&file, &base, &token, conv))
                                        .await
                                        .unwrap_or_else(|e| Err(anyhow!("upload task: {e}"))),
                                    Err(e) => Err(e),
                                };
                                let _ = tx.send((this, done));
                            });
                            continue;
                        }
                        ctx.state.borrow_mut().c.uploads_skipped += 1;
                    }
                    let msg = conn.message(send_msg(&ctx, &me, conv, this, sched), 0);
                    if ctx.a.reconnect {
                        me.pending.insert(this, (sched, Instant::now()));
                        ctx.state.borrow_mut().c.unanswered += 1;
                    }
                    // Counted as sent even if the write fails: with --reconnect it goes again.
                    {
                        let mut s = ctx.state.borrow_mut();
                        s.c.sent += 1;
                        if let Some(t) = s.tick() {
                            t.0 += 1;
                        }
                    }
                    if conn.ws.send(msg).await.is_err() {
                        break;
                    }
                    let mut s = ctx.state.borrow_mut();
                    if sched >= s.measured_from_us {
                        let _ = s.send_lag.record(now_us().saturating_sub(sched).max(1));
                    }
                }
                Some((this, done)) = async { uploads.as_mut().expect("checked").1.recv().await }, if uploads.is_some() => {
                    ctx.uploading.set(ctx.uploading.get() - 1);
                    let id = match done {
                        Ok(id) => id,
                        Err(e) => {
                            let s = &mut *ctx.state.borrow_mut();
                            s.c.upload_errors += 1;
                            note_anomaly(&mut s.anomalies, s.start, || format!("an upload failed: {e:#}"));
                            continue;
                        }
                    };
                    let conv = conv.expect("only senders upload");
                    // Its time starts now: the latency is the message's, not the upload's.
                    let sched = now_us();
                    me.attached.insert(this, id);
                    {
                        let mut s = ctx.state.borrow_mut();
                        s.c.uploads += 1;
                        s.c.upload_bytes += ctx.a.attachment_size as u64;
                        s.c.attachments += 1;
                        s.c.sent += 1;
                        if ctx.a.reconnect {
                            s.c.unanswered += 1;
                        }
                    }
                    if ctx.a.reconnect {
                        me.pending.insert(this, (sched, Instant::now()));
                    }
                    let msg = send_msg(&ctx, &me, conv, this, sched);
                    if !ctx.a.reconnect {
                        me.attached.remove(&this);
                    } else if me.attached.len() > 4096 {
                        me.attached.retain(|k, _| me.pending.contains_key(k));
                    }
                    if conn.send_frame(msg).await.is_err() {
                        break;
                    }
                }
                // No answer on a live connection for RESEND_AFTER (its reply was lost
                // with a node that failed after committing it): send it again, as a
                // client does; the server answers a resend with the first outcome.
                // The wait grows with the send's age (half of it, at least
                // RESEND_AFTER), so an overloaded fleet is not sent every slow
                // send again every RESEND_AFTER.
                () = tokio::time::sleep_until(resend_check.into()), if ctx.a.reconnect && !me.pending.is_empty() => {
                    resend_check = Instant::now() + Duration::from_secs(1);
                    let now = now_us();
                    let stale: Vec<(u64, u64)> = me
                        .pending
                        .iter()
                        .filter(|(_, (sched, at))| {
                            let age = Duration::from_micros(now.saturating_sub(*sched));
                            at.elapsed() >= RESEND_AFTER.max(age / 2)
                        })
                        .map(|(&k, &(s, _))| (k, s))
                        .collect();
                    if let Some(conv) = conv {
                        for (rk, sched) in stale {
                            ctx.state.borrow_mut().c.resent += 1;
                            if let Some(p) = me.pending.get_mut(&rk) {
                                p.1 = Instant::now();
                            }
                            if conn.send_frame(send_msg(&ctx, &me, conv, rk, sched)).await.is_err() {
                                break;
                            }
                        }
                    }
                }
                () = tokio::time::sleep_until(retry_at.unwrap_or(ctx.end).into()), if retry_at.is_some() => {
                    let (_, rk) = me.retry.pop_front().expect("due");
                    if let (Some(conv), Some(&(sched, _))) = (conv, me.pending.get(&rk)) {
                        ctx.state.borrow_mut().c.resent += 1;
                        if conn.send_frame(send_msg(&ctx, &me, conv, rk, sched)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        ctx.state.borrow_mut().c.disconnects += 1;
        if !ctx.a.reconnect {
            return;
        }
        let dropped = Instant::now();
        // Reconnect: another target, with jittered exponential backoff, until the grace period ends.
        let give_up = ctx.end + Duration::from_millis(ctx.a.grace_ms);
        if ctx.a.reconnect_spread_ms > 0 {
            let wait = Duration::from_millis(rand::random_range(0..ctx.a.reconnect_spread_ms));
            tokio::time::sleep(wait.min(give_up.saturating_duration_since(Instant::now()))).await;
        }
        conn = loop {
            if Instant::now() >= give_up {
                return;
            }
            // Another target, at random, as a balancer would pick: the clients of a
            // dead node spread over every other node rather than all landing on the next.
            let n = ctx.a.targets.len();
            if n > 1 {
                target = (target + 1 + rand::random_range(0..n - 1)) % n;
            }
            me.target = target;
            let token = ctx.a.users[i].token.clone();
            // Boxed: the handshake's state is large and only a reconnect needs it.
            match Box::pin(resume(&ctx, &mut me, &ctx.a.targets[target], &token)).await {
                Ok(c) => break c,
                Err(_) => {
                    let jitter = backoff.mul_f64(rand::random::<f64>() * 0.5);
                    tokio::time::sleep(backoff + jitter).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        backoff = Duration::from_millis(100);
        {
            let mut s = ctx.state.borrow_mut();
            s.c.reconnects += 1;
            let _ = s.reconnect_time.record((dropped.elapsed().as_micros() as u64).max(1));
        }
        // What was not acknowledged goes again, same client_msg_id (the server dedupes).
        if let Some(conv) = conv {
            me.retry.clear();
            let again: Vec<(u64, u64)> = me.pending.iter().map(|(&k, &(s, _))| (k, s)).collect();
            for (rk, sched) in again {
                ctx.state.borrow_mut().c.resent += 1;
                if conn.send_frame(send_msg(&ctx, &me, conv, rk, sched)).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// A connection's finished uploads: (send counter, attachment id or the failure).
type Uploads = (
    tokio::sync::mpsc::UnboundedSender<(u64, anyhow::Result<String>)>,
    tokio::sync::mpsc::UnboundedReceiver<(u64, anyhow::Result<String>)>,
);

/// A new connection for a dropped one: `sync` from the highest position seen in
/// each conversation, the replay counted like live traffic.
async fn resume(ctx: &Ctx, me: &mut Local, target: &str, token: &str) -> anyhow::Result<Conn> {
    let mut c = open(&ctx.a, target, token, me.i).await?;
    ctx.state.borrow_mut().node[me.i] = c.node;
    let positions =
        me.seen.iter().map(|(&conversation_id, s)| Position { conversation_id, seq: s.last }).collect();
    let id = c.send(ClientMsg::Sync { positions }).await?;
    loop {
        let f = c.recv().await?;
        if f.id == id {
            return match f.body {
                ServerMsg::SyncDone { .. } => Ok(c),
                other => Err(anyhow!("expected sync_done, got {other:?}")),
            };
        }
        on_frame(ctx, me, c.node, f);
    }
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
            "worker": 0, "targets": ["ws://x:1"], "users": [], "scenario": "mix", "group_size": 4,
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

    #[test]
    fn placement_spreads_the_crossing_share() {
        let nodes = [1, 5, 9];
        // Together on the owner.
        assert_eq!(placement(0, 0.0, 5, &nodes, 2), vec![5, 5]);
        // Crossing: the first member on the owner, the others on the next nodes in turn.
        assert_eq!(placement(0, 1.0, 5, &nodes, 2), vec![5, 9]);
        assert_eq!(placement(3, 1.0, 9, &nodes, 4), vec![9, 1, 5, 1]);
        // Half of the conversations cross, every other one.
        let crossing = (0..100).filter(|&i| placement(i, 0.5, 1, &nodes, 2)[1] != 1).count();
        assert_eq!(crossing, 50);
        // One node: nothing to cross to.
        assert_eq!(placement(0, 1.0, 1, &[1], 3), vec![1, 1, 1]);
    }
}

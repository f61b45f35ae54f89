//! The transport: one Redis stream per node carries what other nodes send it.
//!
//! Payloads are opaque bytes here (the envelope codec that fills them comes
//! with the gateway's seams). Each entry also carries its sender's node id, the
//! sender process's instance and a counter per (sender instance, receiver), so
//! that a receiver notices entries it never got.
//!
//! - Stream `{prefix:node:ID}:in`, one hash tag per node: a node's traffic stays
//!   on one slot of a Redis Cluster.
//! - [`Outbound::send`] appends a batch of payloads to one node's stream in one
//!   round trip (pipelined `XADD`s), each with `MAXLEN ~ max_len`.
//! - Overflow policy: a stream is trimmed to about `max_len` entries, oldest
//!   first, whether read or not. A receiver that falls that far behind loses
//!   entries; it learns it from the counters ([`Delivery::Gap`]) and must treat
//!   the sender's traffic as lost (the gateway makes the affected devices
//!   resync from the store, where everything acknowledged is).
//! - [`Inbound`] reads its stream through the consumer group `gw` as consumer
//!   "node ID": entries stay pending until [`Inbound::ack`] (call it after the
//!   hand-off to mailboxes or the sequencer). A restarted node first gets back
//!   what it had read and not acknowledged, then new entries.
//! - [`drain_dead`]: after a node dies, the node that takes over its work
//!   claims the dead node's pending entries (`XAUTOCLAIM`) and reads its unread
//!   ones, so nothing sent to it is dropped silently; [`forget_dead`] then
//!   deletes the stream.

use crate::NodeId;
use crate::link::{Link, RedisOptions};
use redis::Value;
use std::collections::HashMap;
use std::time::Duration;

/// Where the streams live and how long they may grow.
#[derive(Debug, Clone)]
pub struct TransportOptions {
    pub redis: RedisOptions,
    /// About how many entries a stream keeps (`MAXLEN ~`).
    pub max_len: usize,
}

impl TransportOptions {
    pub fn new(redis: RedisOptions) -> TransportOptions {
        TransportOptions { redis, max_len: 100_000 }
    }

    /// The stream node `node` reads.
    pub fn stream(&self, node: NodeId) -> String {
        format!("{{{}:node:{node}}}:in", self.redis.prefix)
    }
}

const GROUP: &str = "gw";

/// Why a transport call failed (all retryable but `Malformed`).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("a stream entry that is not ours: {0}")]
    Malformed(&'static str),
}

type Result<T> = std::result::Result<T, TransportError>;

fn connect(opts: &TransportOptions) -> Result<Link> {
    Ok(opts.redis.connect()?)
}

/// Sends to other nodes' streams.
pub struct Outbound {
    opts: TransportOptions,
    me: NodeId,
    instance: u64,
    conn: Option<Link>,
    /// The last counter used towards each node.
    sent: HashMap<NodeId, u64>,
}

impl Outbound {
    pub fn new(opts: TransportOptions, me: NodeId) -> Outbound {
        Outbound { opts, me, instance: rand::random(), conn: None, sent: HashMap::new() }
    }

    /// Appends `payloads`, in order, to node `to`'s stream: one round trip.
    /// On an error none or some of them may have been appended (the receiver's
    /// counters show a gap for any that were not, once later ones arrive).
    pub fn send(&mut self, to: NodeId, payloads: &[&[u8]]) -> Result<()> {
        if payloads.is_empty() {
            return Ok(());
        }
        let stream = self.opts.stream(to);
        let next = self.sent.entry(to).or_insert(0);
        let cmds: Vec<redis::Cmd> = payloads
            .iter()
            .map(|p| {
                *next += 1;
                let mut c = redis::cmd("XADD");
                c.arg(&stream).arg("MAXLEN").arg("~").arg(self.opts.max_len).arg("*");
                c.arg("s").arg(self.me).arg("i").arg(self.instance).arg("n").arg(*next).arg("p").arg(*p);
                c
            })
            .collect();
        if self.conn.is_none() {
            self.conn = Some(connect(&self.opts)?);
        }
        self.conn.as_mut().expect("just set").pipeline::<Vec<redis::Value>>(cmds).map(drop).map_err(|e| {
            self.conn = None;
            e.into()
        })
    }
}

/// One entry read from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The stream entry id, for [`Inbound::ack`].
    pub id: String,
    pub from: NodeId,
    pub payload: Vec<u8>,
}

/// What a read yields, in stream order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    Entry(Entry),
    /// `missed` entries from `from` were trimmed (or their send failed) before
    /// this node read them; they come just before the next entry from `from`.
    Gap {
        from: NodeId,
        missed: u64,
    },
}

/// Reads this node's stream.
pub struct Inbound {
    opts: TransportOptions,
    stream: String,
    consumer: String,
    conn: Option<Link>,
    /// While re-reading what this consumer had read and not acknowledged: the
    /// id after which to go on.
    recovering: Option<String>,
    /// The last counter seen from each sender instance.
    seen: HashMap<(NodeId, u64), u64>,
}

impl Inbound {
    /// Opens node `me`'s stream, creating it and its consumer group if needed.
    pub fn open(opts: TransportOptions, me: NodeId) -> Result<Inbound> {
        let mut inbound = Inbound {
            stream: opts.stream(me),
            consumer: format!("node {me}"),
            opts,
            conn: None,
            recovering: Some("0".into()),
            seen: HashMap::new(),
        };
        inbound.ensure_group()?;
        Ok(inbound)
    }

    fn link(&mut self) -> Result<&mut Link> {
        if self.conn.is_none() {
            self.conn = Some(connect(&self.opts)?);
        }
        Ok(self.conn.as_mut().expect("just set"))
    }

    fn conn(&mut self) -> Result<&mut dyn redis::ConnectionLike> {
        Ok(self.link()?.conn())
    }

    fn ensure_group(&mut self) -> Result<()> {
        let stream = self.stream.clone();
        let r = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query::<()>(self.conn()?);
        match r {
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            r => r.map_err(Into::into),
        }
    }

    /// Up to `max` deliveries, waiting up to `block` for the first. A dropped
    /// connection, or a Redis that lost the stream (restarted empty), is set up
    /// again on the next call.
    pub fn read(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>> {
        let reused = self.conn.is_some();
        match self.read_once(max, block) {
            Err(TransportError::Redis(e)) => {
                self.conn = None;
                let lost_group = e.code() == Some("NOGROUP");
                if !lost_group && !(reused && (e.is_connection_dropped() || e.is_io_error())) {
                    return Err(e.into());
                }
                // Once more, on a new connection: a kept connection that died
                // (Redis restarted), then perhaps an empty Redis without our group.
                match self.read_once(max, block) {
                    Err(TransportError::Redis(e)) if e.code() == Some("NOGROUP") => {
                        self.ensure_group()?;
                        self.read_once(max, block)
                    }
                    r => r,
                }
            }
            r => r,
        }
    }

    fn read_once(&mut self, max: usize, block: Duration) -> Result<Vec<Delivery>> {
        let (stream, consumer) = (self.stream.clone(), self.consumer.clone());
        let from = self.recovering.clone().unwrap_or_else(|| ">".into());
        let wait = if self.recovering.is_some() { Duration::ZERO } else { block };
        let timeout = self.opts.redis.timeout + wait;
        let link = self.link()?;
        link.set_read_timeout(timeout)?;
        let conn = link.conn();
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP").arg(GROUP).arg(&consumer).arg("COUNT").arg(max);
        if from == ">" {
            cmd.arg("BLOCK").arg(wait.as_millis() as u64);
        }
        let reply: Value = cmd.arg("STREAMS").arg(&stream).arg(&from).query(conn)?;
        let entries = stream_entries(reply)?;
        if self.recovering.is_some() {
            match entries.last() {
                Some((id, _)) => self.recovering = Some(id.clone()),
                None => {
                    self.recovering = None;
                    return self.read_once(max, block);
                }
            }
        }
        let mut out = Vec::with_capacity(entries.len());
        for (id, fields) in entries {
            // A pending entry trimmed away comes back as an id without fields.
            let Some(fields) = fields else { continue };
            let e = parse_entry(id, fields)?;
            let last = self.seen.insert((e.from, e.instance), e.n);
            if let Some(last) = last
                && e.n > last + 1
            {
                out.push(Delivery::Gap { from: e.from, missed: e.n - last - 1 });
            }
            out.push(Delivery::Entry(Entry { id: e.id, from: e.from, payload: e.payload }));
        }
        Ok(out)
    }

    /// Acknowledges entries handed off: they will not be delivered again.
    pub fn ack(&mut self, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let stream = self.stream.clone();
        redis::cmd("XACK").arg(&stream).arg(GROUP).arg(ids).query::<i64>(self.conn()?)?;
        Ok(())
    }
}

/// Everything left for dead node `dead`: the entries it had read and not
/// acknowledged (claimed for `claimer`), then those it never read; acknowledged
/// on its stream as they are returned. The caller re-routes them.
pub fn drain_dead(opts: &TransportOptions, dead: NodeId, claimer: NodeId) -> Result<Vec<Entry>> {
    let stream = opts.stream(dead);
    let consumer = format!("node {claimer} for {dead}");
    let mut conn = connect(opts)?;
    let mut raw: Vec<(String, Vec<Value>)> = Vec::new();
    let mut cursor = "0-0".to_string();
    loop {
        let reply: Value = redis::cmd("XAUTOCLAIM")
            .arg(&stream)
            .arg(GROUP)
            .arg(&consumer)
            .arg(0)
            .arg(&cursor)
            .arg("COUNT")
            .arg(1000)
            .query(conn.conn())
            .or_else(|e| if e.code() == Some("NOGROUP") { Ok(Value::Nil) } else { Err(e) })?;
        let Value::Array(mut parts) = reply else { break };
        if parts.len() < 2 {
            return Err(TransportError::Malformed("XAUTOCLAIM reply"));
        }
        let claimed = parts.swap_remove(1);
        cursor = text(&parts[0]).ok_or(TransportError::Malformed("XAUTOCLAIM cursor"))?;
        raw.extend(entry_list(claimed)?.into_iter().filter_map(|(id, f)| f.map(|f| (id, f))));
        if cursor == "0-0" {
            break;
        }
    }
    loop {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&consumer)
            .arg("COUNT")
            .arg(1000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query(conn.conn())
            .or_else(|e| if e.code() == Some("NOGROUP") { Ok(Value::Nil) } else { Err(e) })?;
        let batch: Vec<(String, Vec<Value>)> =
            stream_entries(reply)?.into_iter().filter_map(|(id, f)| f.map(|f| (id, f))).collect();
        if batch.is_empty() {
            break;
        }
        raw.extend(batch);
    }
    let mut out = Vec::with_capacity(raw.len());
    for (id, fields) in raw {
        let e = parse_entry(id, fields)?;
        out.push(Entry { id: e.id, from: e.from, payload: e.payload });
    }
    if !out.is_empty() {
        let ids: Vec<&str> = out.iter().map(|e| e.id.as_str()).collect();
        redis::cmd("XACK").arg(&stream).arg(GROUP).arg(&ids).query::<i64>(conn.conn())?;
    }
    Ok(out)
}

/// Deletes dead node `dead`'s stream (after [`drain_dead`] and the re-routing).
pub fn forget_dead(opts: &TransportOptions, dead: NodeId) -> Result<()> {
    redis::cmd("DEL").arg(opts.stream(dead)).query::<i64>(connect(opts)?.conn())?;
    Ok(())
}

struct Parsed {
    id: String,
    from: NodeId,
    instance: u64,
    n: u64,
    payload: Vec<u8>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

fn number<T: std::str::FromStr>(v: &Value) -> Option<T> {
    text(v)?.parse().ok()
}

/// The entries of an `XREADGROUP` reply on one stream: (id, fields or `None`
/// for a pending entry that was trimmed).
fn stream_entries(reply: Value) -> Result<Vec<(String, Option<Vec<Value>>)>> {
    let streams = match reply {
        Value::Nil => return Ok(Vec::new()),
        Value::Array(s) => s,
        Value::Map(m) => m.into_iter().map(|(k, v)| Value::Array(vec![k, v])).collect(),
        _ => return Err(TransportError::Malformed("XREADGROUP reply")),
    };
    let mut out = Vec::new();
    for s in streams {
        let Value::Array(mut kv) = s else { return Err(TransportError::Malformed("XREADGROUP stream")) };
        if kv.len() != 2 {
            return Err(TransportError::Malformed("XREADGROUP stream"));
        }
        out.extend(entry_list(kv.swap_remove(1))?);
    }
    Ok(out)
}

fn entry_list(v: Value) -> Result<Vec<(String, Option<Vec<Value>>)>> {
    let Value::Array(entries) = v else { return Err(TransportError::Malformed("entry list")) };
    entries
        .into_iter()
        .map(|e| {
            let Value::Array(mut pair) = e else { return Err(TransportError::Malformed("entry")) };
            if pair.len() != 2 {
                return Err(TransportError::Malformed("entry"));
            }
            let fields = match pair.swap_remove(1) {
                Value::Array(f) => Some(f),
                Value::Nil => None,
                _ => return Err(TransportError::Malformed("entry fields")),
            };
            Ok((text(&pair[0]).ok_or(TransportError::Malformed("entry id"))?, fields))
        })
        .collect()
}

fn parse_entry(id: String, fields: Vec<Value>) -> Result<Parsed> {
    let (mut from, mut instance, mut n, mut payload) = (None, None, None, None);
    for kv in fields.chunks(2) {
        let [k, v] = kv else { return Err(TransportError::Malformed("odd field list")) };
        match text(k).as_deref() {
            Some("s") => from = number::<NodeId>(v),
            Some("i") => instance = number::<u64>(v),
            Some("n") => n = number::<u64>(v),
            Some("p") => {
                payload = match v {
                    Value::BulkString(b) => Some(b.clone()),
                    _ => None,
                }
            }
            _ => {}
        }
    }
    Ok(Parsed {
        id,
        from: from.ok_or(TransportError::Malformed("no sender"))?,
        instance: instance.ok_or(TransportError::Malformed("no instance"))?,
        n: n.ok_or(TransportError::Malformed("no counter"))?,
        payload: payload.ok_or(TransportError::Malformed("no payload"))?,
    })
}

//! What the coordinator tells a worker, and what workers report back.
//! Newline-delimited JSON over one TCP connection per worker.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// 1:1 chats: users paired two by two, both sending.
    Pairs,
    /// Groups of `--group-size` members, every member sending.
    Groups,
    /// `--group-fraction` of users in groups, the rest in pairs.
    Mix,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct User {
    pub username: String,
    pub user_id: String,
    pub token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Assignment {
    pub worker: usize,
    /// `ws://host:port` of each gateway node (or one load balancer). Users start
    /// spread over them in turn.
    pub targets: Vec<String>,
    /// Share of conversations whose members sit on different nodes (the rest sit
    /// together on the node that owns the conversation). Needs several targets.
    /// `None`: users stay where they landed.
    #[serde(default)]
    pub cross_node: Option<f64>,
    /// A dropped connection reconnects (to another target, at random), syncs and goes on.
    #[serde(default)]
    pub reconnect: bool,
    /// Before its first reconnect attempt a dropped client waits a random time
    /// below this (ms): no thundering herd when a node dies.
    #[serde(default)]
    pub reconnect_spread_ms: u64,
    /// Deliveries of messages scheduled before this point of the sending (ms
    /// from its start) are also timed on their own (`latency_before_split`).
    #[serde(default)]
    pub split_ms: Option<u64>,
    pub users: Vec<User>,
    pub scenario: Scenario,
    pub group_size: usize,
    pub group_fraction: f64,
    /// Connections of this worker that stay idle (connected, synced, silent).
    pub idle: usize,
    /// Messages per second this worker sends, spread over its active connections.
    pub rate: f64,
    pub message_size: usize,
    pub duration_ms: u64,
    /// Sending before the measured window: counted and checked, but not in any latency.
    #[serde(default)]
    pub warmup_ms: u64,
    pub grace_ms: u64,
    /// Connections per second this worker opens.
    pub ramp: f64,
    /// Source addresses to spread client sockets over (`PREFIX1` .. `PREFIX250`), if any:
    /// one destination admits ~28k ports per source address, fewer across back-to-back runs
    /// while old sockets sit in TIME_WAIT.
    pub source_prefix: Option<String>,
    pub json_protocol: bool,
    /// Share of sends that carry an attachment of `attachment_size` bytes: each
    /// is uploaded (slot, then `PUT` to the URL given) when its send is due, and
    /// the message naming it goes once the upload is done.
    #[serde(default)]
    pub attachment_share: f64,
    #[serde(default)]
    pub attachment_size: usize,
    #[serde(default)]
    pub attachment_type: String,
    /// Recipients fetch each file (a download URL, then the bytes).
    #[serde(default)]
    pub attachment_fetch: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ToWorker {
    Assign(Box<Assignment>),
    /// Start sending at this Unix time (ms).
    Go {
        start_unix_ms: u64,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counters {
    pub connections: u64,
    pub connected: u64,
    pub connect_errors: u64,
    pub sent: u64,
    pub acked: u64,
    pub send_errors: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    pub disconnects: u64,
    /// Successful reconnects (`--reconnect`).
    #[serde(default)]
    pub reconnects: u64,
    /// Messages seen again by a connection after a reconnect or a fail-over, and
    /// dropped by position as a client does (`--reconnect`; otherwise duplicates).
    #[serde(default)]
    pub redelivered: u64,
    /// Sends sent again: unacknowledged at a drop, or refused with a retryable error.
    #[serde(default)]
    pub resent: u64,
    /// Sends with neither an ack nor an error at the end (`--reconnect`).
    #[serde(default)]
    pub unanswered: u64,
    /// Sends that named an attachment (`--attachment-share`).
    #[serde(default)]
    pub attachments: u64,
    /// Attachment uploads done, and their bytes.
    #[serde(default)]
    pub uploads: u64,
    #[serde(default)]
    pub upload_bytes: u64,
    /// Uploads that failed (their sends do not happen), or were not started
    /// because this worker already had `MAX_UPLOADS` in flight (sent as text).
    #[serde(default)]
    pub upload_errors: u64,
    #[serde(default)]
    pub uploads_skipped: u64,
    /// Attachments received and fetched as a client shows them: a download URL
    /// from the gateway, then the bytes from that URL.
    #[serde(default)]
    pub downloads: u64,
    #[serde(default)]
    pub download_errors: u64,
    #[serde(default)]
    pub downloads_skipped: u64,
    /// The worker's resident memory (bytes): before its first connection; once
    /// every connection was set up; one second into sending (every connection's
    /// task running: what holding them costs); and its peak (VmHWM) at the end.
    #[serde(default)]
    pub rss_before_bytes: u64,
    #[serde(default)]
    pub rss_ready_bytes: u64,
    #[serde(default)]
    pub rss_held_bytes: u64,
    #[serde(default)]
    pub rss_peak_bytes: u64,
}

impl Counters {
    pub fn add(&mut self, o: &Counters) {
        self.connections += o.connections;
        self.connected += o.connected;
        self.connect_errors += o.connect_errors;
        self.sent += o.sent;
        self.acked += o.acked;
        self.send_errors += o.send_errors;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.disconnects += o.disconnects;
        self.reconnects += o.reconnects;
        self.redelivered += o.redelivered;
        self.resent += o.resent;
        self.unanswered += o.unanswered;
        self.attachments += o.attachments;
        self.uploads += o.uploads;
        self.upload_bytes += o.upload_bytes;
        self.upload_errors += o.upload_errors;
        self.uploads_skipped += o.uploads_skipped;
        self.downloads += o.downloads;
        self.download_errors += o.download_errors;
        self.downloads_skipped += o.downloads_skipped;
        self.rss_before_bytes += o.rss_before_bytes;
        self.rss_ready_bytes += o.rss_ready_bytes;
        self.rss_held_bytes += o.rss_held_bytes;
        self.rss_peak_bytes += o.rss_peak_bytes;
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum FromWorker {
    /// Once a second while connecting: connections opened and synced so far, and
    /// those that failed.
    Connecting {
        done: u64,
        failed: u64,
    },
    /// Connected, synced and conversations set up; waiting for `Go`.
    Ready(Counters),
    /// Once a second while sending: totals so far, and the latency histogram so far
    /// (base64 HdrHistogram V2) for live percentiles.
    Progress {
        counters: Counters,
        latency: String,
    },
    Result(Box<WorkerResult>),
    Failed(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerResult {
    pub counters: Counters,
    /// base64 HdrHistogram V2, microseconds.
    pub latency: String,
    pub ack_latency: String,
    /// Scheduled send time to the moment the frame was written, microseconds.
    #[serde(default)]
    pub send_lag: String,
    /// send→deliver by the number of node-to-node hops on the message's way
    /// (0: sender, owner and recipient on one node; 1; 2), base64 HdrHistogram V2, µs.
    #[serde(default)]
    pub latency_by_hops: Vec<String>,
    /// Per second since `Go`: (sent, delivered).
    pub timeline: Vec<(u64, u64)>,
    /// With --reconnect: from a connection's drop to its `sync` done on a new one,
    /// base64 HdrHistogram V2, µs.
    #[serde(default)]
    pub reconnect_time: String,
    /// The longest any recipient waited for a message (scheduled send to first
    /// sight, warm-up included): the longest gap a client saw in a conversation, µs.
    #[serde(default)]
    pub longest_delivery_us: u64,
    /// With `split_ms`: send→deliver of messages scheduled before the split, base64 HdrHistogram V2, µs.
    #[serde(default)]
    pub latency_before_split: String,
}

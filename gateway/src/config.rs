//! The gateway's one config struct: a TOML file (optional), then command-line
//! flags on top. Every field has a documented default and unit.

use anyhow::{Context, bail};
use clap::Parser;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum IoDriver {
    /// io_uring when the kernel allows it, else epoll.
    Auto,
    /// io_uring or fail to start.
    IoUring,
    /// epoll, even where io_uring works.
    Epoll,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Log filter (`tracing` directives, e.g. `info` or `info,gateway::fleet=debug`).
    /// The `SWITCHBOARD_LOG` environment variable, when set, wins over it. Reloads on SIGHUP.
    pub log: String,
    /// Address for HTTP and WebSocket (one listener per shard, SO_REUSEPORT). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Where `/metrics` is served (with `/healthz` and `/readyz`), e.g. `127.0.0.1:9090`
    /// on a management network. Unset: `/metrics` is served on `listen`, open to every client.
    pub metrics_listen: Option<SocketAddr>,
    /// Directory of the embedded store and the generated token key.
    pub data_dir: PathBuf,
    /// Number of shards (threads, one per core). Default: the number of CPUs.
    pub shards: Option<NonZeroUsize>,
    pub io_driver: IoDriver,
    /// This node's id in generated ids (0..=1023). Unique per node in a fleet.
    pub node_id: u16,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub storage: StorageConfig,
    pub presence: PresenceSettings,
    pub push: PushConfig,
    pub fleet: FleetSettings,
    pub attachments: AttachmentsConfig,
}

/// Attachments: files kept beside the chat store and moved by presigned URLs
/// (docs/protocol.md, "Attachments").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AttachmentsConfig {
    /// Directory of the embedded blob backend (objects and partial uploads). Default: `<data_dir>/blobs`.
    pub dir: Option<PathBuf>,
    /// Largest attachment, bytes.
    pub max_bytes: NonZeroU64,
    /// Media types accepted (exact, lowercase `type/subtype`).
    pub media_types: Vec<String>,
    /// How long a presigned upload or download URL works, seconds.
    pub url_ttl_secs: NonZeroU64,
    /// Upload bytes one user may reserve per hour (slots asked for, on this node).
    pub upload_bytes_per_hour: NonZeroU64,
    /// Threads that write and read blob files (never a shard: a disk stall must not stall connections).
    pub io_threads: NonZeroUsize,
    /// Blob file operations waiting for those threads; beyond: 503 `overloaded`.
    pub io_queue: NonZeroUsize,
    /// An uploaded object that no message names is removed once it is this old, seconds.
    pub orphan_grace_secs: NonZeroU64,
    /// How often the sweeper looks for such objects, seconds.
    pub sweep_interval_secs: NonZeroU64,
    /// Keep the bytes in an S3-compatible bucket instead of `dir` (for fleets:
    /// every node sees every object). Unset: the embedded backend.
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket for attachments (`[attachments.s3]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Where the gateway reaches the store, e.g. `https://s3.eu-west-1.amazonaws.com`.
    pub endpoint: String,
    /// Where clients reach it, if not at `endpoint` (the host signed into the URLs handed out).
    #[serde(default)]
    pub public_endpoint: Option<String>,
    pub bucket: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Credentials; unset, `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` from the environment.
    #[serde(default)]
    pub access_key: Option<String>,
    #[serde(default)]
    pub secret_key: Option<String>,
    /// `https://endpoint/bucket/key` (true) or `https://bucket.endpoint/key` (false).
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Longest wait for one request of the gateway's own to the store, milliseconds.
    #[serde(default = "default_s3_timeout")]
    pub timeout_ms: NonZeroU64,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn yes() -> bool {
    true
}

fn default_s3_timeout() -> NonZeroU64 {
    nz64(10_000)
}

impl Default for AttachmentsConfig {
    fn default() -> Self {
        AttachmentsConfig {
            dir: None,
            max_bytes: nz64(100 << 20),
            media_types: [
                "image/jpeg",
                "image/png",
                "image/gif",
                "image/webp",
                "audio/mpeg",
                "audio/ogg",
                "audio/mp4",
                "video/mp4",
                "application/pdf",
                "application/zip",
                "text/plain",
            ]
            .map(String::from)
            .to_vec(),
            url_ttl_secs: nz64(900),
            upload_bytes_per_hour: nz64(1 << 30),
            io_threads: nzu(2),
            io_queue: nzu(1024),
            orphan_grace_secs: nz64(24 * 3600),
            sweep_interval_secs: nz64(3600),
            s3: None,
        }
    }
}

/// Running as one node of a fleet (docs/architecture.md, "the fleet path").
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSettings {
    /// Redis holding the fleet's membership, users' locations and every node's
    /// inbound stream, e.g. `redis://127.0.0.1:6379`; for a Redis Cluster, its seed
    /// nodes separated by commas. Unset: this node runs alone and owns everything.
    pub redis_url: Option<String>,
    /// `redis_url` names a Redis Cluster.
    pub redis_cluster: bool,
    /// Ignore `node_id` and take the first id (1..=1023, from a random start) that
    /// no live node holds, for nodes that are all alike (a Kubernetes Deployment).
    pub auto_node_id: bool,
    /// Prefix of every Redis key the fleet uses (several fleets can share a Redis).
    pub redis_prefix: String,
    /// Redis connect, read and write timeout, milliseconds.
    pub redis_timeout_ms: NonZeroU64,
    /// How often a node renews its membership, milliseconds.
    pub heartbeat_ms: NonZeroU64,
    /// A node missing its renewals this long is dead, milliseconds (at least 3 heartbeats).
    pub ttl_ms: NonZeroU64,
    /// Items (forwarded commands, batches' events) waiting to be sent to other
    /// nodes; beyond: commands refused with 1020, events dropped and resynced.
    pub out_queue: NonZeroUsize,
    /// Arrivals and departures waiting to be recorded; beyond: an arrival proceeds unrecorded
    /// (and is retried), a departure's record stays.
    pub loc_queue: NonZeroUsize,
    /// How long a failing send to another node is retried before its commands are
    /// refused with 1022 and its events resynced, milliseconds.
    pub send_retry_ms: NonZeroU64,
    /// Entries kept in a node's inbound stream (approximately, `MAXLEN ~`).
    pub stream_max_len: NonZeroUsize,
}

impl Default for FleetSettings {
    fn default() -> Self {
        FleetSettings {
            redis_url: None,
            redis_cluster: false,
            auto_node_id: false,
            redis_prefix: "sb".into(),
            redis_timeout_ms: nz64(1000),
            heartbeat_ms: nz64(1000),
            ttl_ms: nz64(5000),
            out_queue: nzu(65536),
            loc_queue: nzu(65536),
            send_retry_ms: nz64(2000),
            stream_max_len: nzu(100_000),
        }
    }
}

impl FleetSettings {
    pub fn threads(&self) -> crate::fleet::FleetConfig {
        crate::fleet::FleetConfig {
            out_queue: self.out_queue.get(),
            loc_queue: self.loc_queue.get(),
            send_retry: std::time::Duration::from_millis(self.send_retry_ms.get()),
            ttl: std::time::Duration::from_millis(self.ttl_ms.get()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceSettings {
    /// How long a user with no device connected still counts as online, milliseconds
    /// (a phone that reconnects within it does not flap offline).
    pub grace_ms: NonZeroU64,
    /// Groups larger than this do not hear their members' presence changes (direct conversations always do).
    pub max_group_size: NonZeroUsize,
    /// Presence notices and requests waiting for the presence thread; beyond: notices dropped, requests 1020.
    pub queue: NonZeroUsize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushBackend {
    /// One log line per notification.
    Log,
    /// HTTP POST of each notification as JSON to `webhook_url`.
    Webhook,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    pub backend: PushBackend,
    /// Where the webhook backend POSTs (http:// or https://). Required with `backend = "webhook"`.
    pub webhook_url: Option<String>,
    /// A user's notifications within this window become one, milliseconds.
    pub coalesce_ms: NonZeroU64,
    /// Jobs (and, for the webhook, notifications) queued; beyond: dropped and counted.
    pub queue: NonZeroUsize,
    /// Webhook tries per notification (retrying transport errors, 429 and 5xx).
    pub max_attempts: NonZeroU32,
    /// Webhook wait before the first retry, milliseconds; doubles with each retry (at most 60 s).
    pub backoff_ms: NonZeroU64,
    /// Webhook request timeout, milliseconds.
    pub timeout_ms: NonZeroU64,
    /// Webhook sending threads.
    pub workers: NonZeroUsize,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        PresenceSettings { grace_ms: nz64(10_000), max_group_size: nzu(256), queue: nzu(65536) }
    }
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            backend: PushBackend::Log,
            webhook_url: None,
            coalesce_ms: nz64(3000),
            queue: nzu(65536),
            max_attempts: nz32(6),
            backoff_ms: nz64(200),
            timeout_ms: nz64(5000),
            workers: nzu(2),
        }
    }
}

/// Who may add a user to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAdds {
    /// Only someone the user has chatted with: the user has sent or read a message in
    /// their direct conversation with the adder. Anyone else gets 1015 `not_a_contact`.
    Contacts,
    /// Anyone (capacity tests, closed deployments where every account is trusted).
    Anyone,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest WebSocket frame or message a client may send, bytes. Larger closes with 1009.
    pub max_frame_bytes: NonZeroU32,
    /// Largest message body, bytes (UTF-8). Larger gets error 1005.
    pub max_body_bytes: NonZeroU32,
    /// Most members a group may have.
    pub group_member_cap: NonZeroU32,
    /// Who may add a user to a group: `contacts` (consent shown by chatting) or `anyone`.
    pub group_adds: GroupAdds,
    /// Bytes queued for one connection before it is closed as a slow consumer (4008).
    /// Must hold one sequencer batch of events (up to 1024 frames) with room to spare.
    pub max_out_bytes: NonZeroUsize,
    /// Conversation events held for a connection that has not sent `sync` yet; beyond it, close 4009.
    pub max_pending_events: NonZeroUsize,
    /// Events queued in one user's mailbox on one shard before that user's connections there close (4008).
    pub mailbox_capacity: NonZeroUsize,
    /// Time a client has to send a complete HTTP request head, seconds.
    pub http_header_timeout_secs: NonZeroU64,
    /// Most sockets (HTTP exchanges and WebSocket connections) held at once; past it a
    /// new one is answered 503 and closed. Default: the open-files limit minus `fd_reserve`.
    pub max_connections: Option<NonZeroUsize>,
    /// File descriptors kept out of the sockets' reach, for the store (the embedded
    /// store caches up to 256 open files), its connections, the webhook and logs.
    pub fd_reserve: NonZeroUsize,
    /// Most WebSocket connections (devices) one user may hold on this node; past it an
    /// upgrade is answered 429 `too_many_connections`.
    pub max_connections_per_user: NonZeroU32,
    /// Time a new WebSocket connection has to send `sync`, seconds; past it, close 4010.
    pub sync_deadline_secs: NonZeroU64,
    /// TCP keepalive, which reaps peers that vanished without a FIN with no timer
    /// per connection: the first probe after this long idle, seconds.
    pub keepalive_idle_secs: NonZeroU64,
    /// Seconds between unanswered probes.
    pub keepalive_interval_secs: NonZeroU64,
    /// Unanswered probes before the connection is dropped.
    pub keepalive_probes: NonZeroU32,
    /// On SIGTERM or SIGINT: the deadline for the whole drain (readiness notice,
    /// 1001 closes, leaving the fleet), seconds; the process exits by then whatever is left.
    pub shutdown_grace_secs: NonZeroU64,
    /// On SIGTERM or SIGINT: how long `/readyz` fails while the node still serves,
    /// before it closes its connections, milliseconds: long enough for the balancer's
    /// health checks to take it out (HAProxy `inter` x `fall`), so reconnecting
    /// clients go to other nodes.
    pub drain_notice_ms: u64,
    /// Sends one connection may make per second, sustained. Beyond it: error 1021.
    pub send_per_sec: NonZeroU32,
    /// Sends one connection may make at once before `send_per_sec` applies.
    pub send_burst: NonZeroU32,
    /// Typing updates one connection may send per second, sustained. Beyond it: error 1021.
    pub typing_per_sec: NonZeroU32,
    /// Typing updates one connection may send at once before `typing_per_sec` applies.
    pub typing_burst: NonZeroU32,
    /// Delivered/read receipts one connection may send per second, sustained. Beyond it: error 1021.
    pub receipts_per_sec: NonZeroU32,
    /// Receipts one connection may send at once before `receipts_per_sec` applies.
    pub receipts_burst: NonZeroU32,
    /// Edits and deletes one connection may make per second, sustained. Beyond it: error 1021.
    pub edits_per_sec: NonZeroU32,
    /// Edits and deletes one connection may make at once.
    pub edits_burst: NonZeroU32,
    /// Conversation and membership changes (create, add, remove, set role, leave) per
    /// connection per second, sustained. Beyond it: error 1021.
    pub groups_per_sec: NonZeroU32,
    /// Conversation and membership changes one connection may make at once.
    pub groups_burst: NonZeroU32,
    /// `mute` and `set_privacy` per connection per second, sustained. Beyond it: error 1021.
    pub settings_per_sec: NonZeroU32,
    /// `mute` and `set_privacy` one connection may send at once.
    pub settings_burst: NonZeroU32,
    /// Reads (`history`, `list_conversations`, `get_*`, `sync`) per connection per second,
    /// sustained. Beyond it: error 1021.
    pub reads_per_sec: NonZeroU32,
    /// Reads one connection may make at once.
    pub reads_burst: NonZeroU32,
    /// Pings per connection per second, sustained. Beyond it: error 1021.
    pub pings_per_sec: NonZeroU32,
    /// Pings one connection may send at once.
    pub pings_burst: NonZeroU32,
    /// Rate-limited requests a connection may make (refilled at its limits' own
    /// rates) before it is closed with 1008: a client that keeps hammering after
    /// being told to slow down is cut off; one that overshoots briefly is not.
    pub abuse_budget: NonZeroU32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HMAC key for tokens (at least 32 characters). Unset: generated once into `<data_dir>/token.key`.
    /// Every node of a fleet must share it.
    pub token_secret: Option<String>,
    /// Token lifetime, seconds.
    pub token_ttl_secs: NonZeroU64,
    /// Bearer secret for `POST /v1/admin/users` (bulk test users for capacity tests; at least
    /// 32 characters). Unset: the endpoint answers 404.
    pub admin_secret: Option<String>,
    /// argon2id memory cost, KiB (OWASP: 19456).
    pub argon2_memory_kib: NonZeroU32,
    /// argon2id iterations (OWASP: 2).
    pub argon2_iterations: NonZeroU32,
    /// Threads that hash passwords, off the shards.
    pub hash_threads: NonZeroUsize,
    /// Logins and registrations waiting for a hashing thread; beyond: 503.
    pub hash_queue: NonZeroUsize,
    /// Of those, most from one client address (queued or hashing); beyond: 429. The queue is
    /// served round-robin by address, so a flood from one address waits behind itself.
    pub hash_queue_per_address: NonZeroUsize,
    /// Failed logins an account may have before it is locked out (per node).
    pub login_free_failures_per_account: u32,
    /// Failed logins one client address may have before it is locked out (per node).
    pub login_free_failures_per_address: u32,
    /// First lockout, milliseconds; doubles with each further failure.
    pub login_backoff_ms: NonZeroU64,
    /// Longest lockout, seconds.
    pub login_backoff_max_secs: NonZeroU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageBackend {
    /// fjall under `<data_dir>/store`: one node, no server to run.
    Embedded,
    /// PostgreSQL (`[storage.postgres]`): shared by every node of a small fleet.
    Postgres,
    /// Apache Cassandra or ScyllaDB (`[storage.cassandra]`): the store for large fleets.
    Cassandra,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CassandraSettings {
    /// `host:port` of a few nodes of the local datacenter; the driver finds the rest.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// This node's datacenter: requests go to its replicas only. Empty: any datacenter.
    pub local_dc: String,
    /// `local_quorum` (default), `quorum`, `each_quorum`, `local_one`, `one` or `all`.
    pub consistency: String,
    /// Replication factor per datacenter of the keyspace `gateway migrate` creates.
    pub replication: std::collections::BTreeMap<String, u32>,
    /// Password authentication (both or neither).
    pub username: Option<String>,
    pub password: Option<String>,
    pub connect_timeout_ms: NonZeroU64,
    /// Client-side timeout of one request, retries included; past it the client is told "try again".
    pub request_timeout_ms: NonZeroU64,
    /// How long a client_msg_id is remembered for resend deduplication, seconds.
    pub idempotency_ttl_s: NonZeroU64,
}

impl Default for CassandraSettings {
    fn default() -> Self {
        CassandraSettings {
            contact_points: vec!["127.0.0.1:9042".into()],
            keyspace: "switchboard".into(),
            local_dc: "datacenter1".into(),
            consistency: "local_quorum".into(),
            replication: [("datacenter1".to_owned(), 3)].into(),
            username: None,
            password: None,
            connect_timeout_ms: nz64(5000),
            request_timeout_ms: nz64(5000),
            idempotency_ttl_s: nz64(7 * 86_400),
        }
    }
}

impl CassandraSettings {
    pub fn options(&self) -> storage::CassandraOptions {
        storage::CassandraOptions {
            contact_points: self.contact_points.clone(),
            keyspace: self.keyspace.clone(),
            local_dc: Some(self.local_dc.clone()).filter(|d| !d.is_empty()),
            consistency: self.consistency.clone(),
            replication: self.replication.clone(),
            username: self.username.clone(),
            password: self.password.clone(),
            connect_timeout: std::time::Duration::from_millis(self.connect_timeout_ms.get()),
            request_timeout: std::time::Duration::from_millis(self.request_timeout_ms.get()),
            idempotency_ttl: std::time::Duration::from_secs(self.idempotency_ttl_s.get()),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresSettings {
    /// `postgres://user:password@host:port/database`.
    pub url: String,
    /// Most connections this node opens.
    pub pool_size: NonZeroUsize,
    /// Connecting, and waiting for a free pooled connection, milliseconds.
    pub connect_timeout_ms: NonZeroU64,
    /// Server-side statement timeout, milliseconds; a statement past it fails as "try again".
    pub statement_timeout_ms: NonZeroU64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Which store holds history and chat state: `embedded`, `postgres` or `cassandra`.
    pub backend: StorageBackend,
    /// Apply missing schema migrations at start-up (postgres, cassandra). Off: start only if
    /// `gateway migrate` has already brought the schema up to date.
    pub migrate_on_start: bool,
    pub postgres: PostgresSettings,
    pub cassandra: CassandraSettings,
    /// Most writes sharing one durable commit (one fsync).
    pub commit_batch_max: NonZeroUsize,
    /// Under load, how long a commit may wait for more commands to share its fsync
    /// (microseconds). Only a batch that follows a batch of two or more waits, so a
    /// lone message never does. Default: none (a batch is what queued during the last commit).
    pub commit_window_us: Option<NonZeroU32>,
    /// Sequencer partitions (threads, each ordering and committing its share of the
    /// conversations). Default: one per shard.
    pub sequencers: Option<NonZeroUsize>,
    /// Commands waiting for one sequencer partition before new ones get error 1020 (overloaded).
    pub sequencer_queue: NonZeroUsize,
    /// Threads serving history and list reads, off the shards.
    pub reader_threads: NonZeroUsize,
    /// Read jobs waiting for a reader thread before new ones get error 1020.
    pub reader_queue: NonZeroUsize,
}

fn nz32(v: u32) -> NonZeroU32 {
    NonZeroU32::new(v).expect("non-zero default")
}
fn nz64(v: u64) -> NonZeroU64 {
    NonZeroU64::new(v).expect("non-zero default")
}
fn nzu(v: usize) -> NonZeroUsize {
    NonZeroUsize::new(v).expect("non-zero default")
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:8080".parse().expect("valid default"),
            log: "info".into(),
            metrics_listen: None,
            data_dir: PathBuf::from("./data"),
            shards: None,
            io_driver: IoDriver::Auto,
            node_id: 0,
            limits: Limits::default(),
            auth: AuthConfig::default(),
            storage: StorageConfig::default(),
            presence: PresenceSettings::default(),
            push: PushConfig::default(),
            fleet: FleetSettings::default(),
            attachments: AttachmentsConfig::default(),
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: nz32(64 * 1024),
            max_body_bytes: nz32(16 * 1024),
            group_member_cap: nz32(1024),
            group_adds: GroupAdds::Contacts,
            max_out_bytes: nzu(4 * 1024 * 1024),
            max_pending_events: nzu(8192),
            mailbox_capacity: nzu(16384),
            http_header_timeout_secs: nz64(10),
            max_connections: None,
            fd_reserve: nzu(512),
            max_connections_per_user: nz32(16),
            sync_deadline_secs: nz64(30),
            keepalive_idle_secs: nz64(120),
            keepalive_interval_secs: nz64(20),
            keepalive_probes: nz32(6),
            shutdown_grace_secs: nz64(10),
            drain_notice_ms: 3000,
            send_per_sec: nz32(20),
            send_burst: nz32(100),
            typing_per_sec: nz32(2),
            typing_burst: nz32(10),
            receipts_per_sec: nz32(10),
            receipts_burst: nz32(50),
            edits_per_sec: nz32(5),
            edits_burst: nz32(20),
            groups_per_sec: nz32(1),
            groups_burst: nz32(10),
            settings_per_sec: nz32(1),
            settings_burst: nz32(10),
            reads_per_sec: nz32(20),
            reads_burst: nz32(100),
            pings_per_sec: nz32(1),
            pings_burst: nz32(10),
            abuse_budget: nz32(500),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            token_secret: None,
            admin_secret: None,
            token_ttl_secs: nz64(24 * 3600),
            argon2_memory_kib: nz32(19456),
            argon2_iterations: nz32(2),
            hash_threads: nzu(1),
            hash_queue: nzu(256),
            hash_queue_per_address: nzu(4),
            login_free_failures_per_account: 5,
            login_free_failures_per_address: 20,
            login_backoff_ms: nz64(1000),
            login_backoff_max_secs: nz64(900),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            backend: StorageBackend::Embedded,
            migrate_on_start: false,
            postgres: PostgresSettings::default(),
            cassandra: CassandraSettings::default(),
            commit_batch_max: nzu(1024),
            commit_window_us: None,
            sequencers: None,
            sequencer_queue: nzu(65536),
            reader_threads: nzu(2),
            reader_queue: nzu(4096),
        }
    }
}

impl Default for PostgresSettings {
    fn default() -> Self {
        PostgresSettings {
            url: "postgres://switchboard@127.0.0.1:5432/switchboard".into(),
            pool_size: nzu(16),
            connect_timeout_ms: nz64(5000),
            statement_timeout_ms: nz64(5000),
        }
    }
}

impl Config {
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.node_id > 1023 {
            bail!("node_id must be 0..=1023, got {}", self.node_id);
        }
        if let Some(s) = &self.auth.token_secret
            && s.len() < 32
        {
            bail!("auth.token_secret must be at least 32 characters");
        }
        if let Some(s) = &self.auth.admin_secret
            && s.len() < 32
        {
            bail!("auth.admin_secret must be at least 32 characters");
        }
        if self.limits.drain_notice_ms >= self.limits.shutdown_grace_secs.get().saturating_mul(1000) {
            bail!(
                "limits.drain_notice_ms must be shorter than limits.shutdown_grace_secs (the whole drain's deadline)"
            );
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log) {
            bail!("log: not a log filter ({e}); e.g. \"info\" or \"info,gateway::fleet=debug\"");
        }
        if self.limits.max_body_bytes.get() >= self.limits.max_frame_bytes.get() {
            bail!("limits.max_body_bytes must be smaller than limits.max_frame_bytes");
        }
        if self.limits.max_frame_bytes.get() > 16 * 1024 * 1024 {
            bail!("limits.max_frame_bytes is capped at 16 MiB");
        }
        if self.limits.max_out_bytes.get() < 4 * self.limits.max_frame_bytes.get() as usize {
            bail!("limits.max_out_bytes must be at least 4 x limits.max_frame_bytes");
        }
        if self.storage.backend == StorageBackend::Postgres {
            storage::PostgresOptions::check_url(&self.storage.postgres.url)
                .map_err(|e| anyhow::anyhow!("storage.postgres.url is not a PostgreSQL URL: {e}"))?;
        }
        if self.storage.backend == StorageBackend::Cassandra {
            self.storage
                .cassandra
                .options()
                .check()
                .map_err(|e| anyhow::anyhow!("storage.cassandra: {e}"))?;
        }
        if self.fleet.redis_url.is_some() {
            crate::fleet::redis::options(self).check().map_err(|e| {
                anyhow::anyhow!("fleet: {e} (fleet.heartbeat_ms, fleet.ttl_ms, fleet.redis_timeout_ms)")
            })?;
        }
        match (&self.push.backend, &self.push.webhook_url) {
            (PushBackend::Webhook, None) => bail!("push.backend = \"webhook\" needs push.webhook_url"),
            (PushBackend::Webhook, Some(u)) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                bail!("push.webhook_url must be an http:// or https:// URL, got {u:?}")
            }
            _ => {}
        }
        Ok(())
    }

    pub fn sequencer_count(&self) -> usize {
        self.storage.sequencers.map_or_else(|| self.shard_count(), NonZeroUsize::get)
    }

    pub fn shard_count(&self) -> usize {
        self.shards
            .map(NonZeroUsize::get)
            .unwrap_or_else(|| std::thread::available_parallelism().map(NonZeroUsize::get).unwrap_or(1))
    }
}

/// Switchboard gateway: WebSocket chat server.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// TOML config file; flags override it. Repeat it to layer files: each is
    /// merged over the ones before, table by table (e.g. a secrets file with
    /// `[auth] token_secret` over a shared config, as a Kubernetes Secret over a ConfigMap).
    #[arg(long, short = 'c', global = true)]
    pub config: Vec<PathBuf>,
    /// Listen address, e.g. 127.0.0.1:8080 (port 0: any free port).
    #[arg(long, global = true)]
    pub listen: Option<SocketAddr>,
    /// Data directory of the embedded store.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Number of shards (default: one per CPU).
    #[arg(long, global = true)]
    pub shards: Option<NonZeroUsize>,
    #[arg(long, value_enum, global = true)]
    pub io_driver: Option<IoDriver>,
    /// Validate the configuration, print it, and exit.
    #[arg(long, global = true)]
    pub check_config: bool,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Apply the configured store's schema migrations, then exit.
    Migrate,
    /// Remove deleted messages' keys from the configured store's files, then exit
    /// (PostgreSQL: rewrites message_keys and the WAL; Cassandra: recycles every
    /// node's commit log; run it on a schedule, see docs/protocol.md, "edit and delete").
    Erase,
}

impl Cli {
    pub fn load(&self) -> anyhow::Result<Config> {
        let mut merged = toml::Table::new();
        for path in &self.config {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            let table: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
            merge(&mut merged, table);
        }
        let mut cfg: Config = merged.try_into().with_context(|| {
            let names: Vec<String> = self.config.iter().map(|p| p.display().to_string()).collect();
            format!("parsing {}", names.join(" + "))
        })?;
        if let Some(v) = self.listen {
            cfg.listen = v;
        }
        if let Some(v) = &self.data_dir {
            cfg.data_dir = v.clone();
        }
        if let Some(v) = self.shards {
            cfg.shards = Some(v);
        }
        if let Some(v) = self.io_driver {
            cfg.io_driver = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// `over` merged into `base`: tables key by key, any other value replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layered_files_merge_table_by_table() {
        let mut base: toml::Table = toml::from_str(
            "node_id = 1\n[auth]\ntoken_ttl_secs = 60\n[storage.postgres]\nurl = \"a\"\npool_size = 3",
        )
        .unwrap();
        let over: toml::Table =
            toml::from_str("[auth]\ntoken_secret = \"s\"\n[storage.postgres]\nurl = \"b\"").unwrap();
        merge(&mut base, over);
        let want: toml::Table = toml::from_str(
            "node_id = 1\n[auth]\ntoken_ttl_secs = 60\ntoken_secret = \"s\"\n[storage.postgres]\nurl = \"b\"\npool_size = 3",
        )
        .unwrap();
        assert_eq!(base, want);
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<Config>("listn = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
        assert!(toml::from_str::<Config>("[limits]\nmax_frame_bytes = 0").is_err(), "zero is not a size");
    }

    #[test]
    fn defaults_validate_and_round_trip() {
        let c = Config::default();
        c.validate().unwrap();
        let text = toml::to_string(&c).unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        back.validate().unwrap();
        assert_eq!(back.listen, c.listen);
    }

    #[test]
    fn the_shipped_example_config_is_valid_and_complete() {
        let text = include_str!("../../deploy/gateway.toml");
        let c: Config = toml::from_str(text).unwrap();
        c.validate().unwrap();
        // Every default field appears in the example (commented or not).
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(text.contains(&format!("{key} =")), "deploy/gateway.toml lacks {key}");
        }
    }

    #[test]
    fn short_secret_is_rejected() {
        let c: Config = toml::from_str("[auth]\ntoken_secret = \"short\"").unwrap();
        assert!(c.validate().is_err());
    }
}

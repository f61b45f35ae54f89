//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Counters and histograms are the `prometheus` crate's lock-free atomics, shared
//! by every thread. Process CPU and RSS are read at scrape time under the
//! standard names (`process_cpu_seconds_total`, `process_resident_memory_bytes`):
//! CPU from `getrusage` (microseconds; the crate's own process collector rounds it
//! to whole seconds, too coarse for CPU-per-message figures), RSS from
//! `/proc/self/statm`.

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    /// Unprefixed: the standard `process_*` names.
    process: Registry,
    cpu_seconds: Gauge,
    rss_bytes: IntGauge,
    pub connections: IntGauge,
    /// Open connections by shard (how evenly the kernel's SO_REUSEPORT spreads them).
    pub shard_connections: prometheus::IntGaugeVec,
    pub connections_total: IntCounter,
    pub frames_in: IntCounter,
    pub frames_out: IntCounter,
    /// Sends accepted into the sequencer's queue.
    pub sends: IntCounter,
    /// Messages made durable (membership events included).
    pub messages_stored: IntCounter,
    /// Message frames queued to recipient connections (acks excluded).
    pub deliveries: IntCounter,
    pub acks: IntCounter,
    pub errors: IntCounterVec,
    pub commit_seconds: Histogram,
    pub commit_batch: Histogram,
    /// From a send entering the sequencer's queue to its frame queued on a recipient's connection.
    pub delivery_seconds: Histogram,
    pub slow_consumers: IntCounter,
    pub sync_backlogs: IntCounter,
    /// Connections closed with 4008 because a conversation's next event skipped a position.
    pub order_gaps: IntCounter,
    pub mailbox_overflows: IntCounter,
    pub rejected: IntCounterVec,
    /// Attachment bytes through the embedded backend, by direction (`uploaded`, `downloaded`).
    pub attachment_bytes: IntCounterVec,
    /// Notifications handed to the push backend.
    pub push_notifications: IntCounter,
    /// Notifications not sent because the user came back within the window.
    pub push_suppressed: IntCounter,
    pub push_sent: IntCounter,
    pub push_retries: IntCounter,
    pub push_failed: IntCounter,
    /// Stream entries this node appended to other nodes' streams (each an envelope:
    /// a forwarded command, one batch's events for one node, a resync notice).
    pub fleet_entries: IntCounter,
    /// Stream entries this node read from its own stream.
    pub fleet_received: IntCounter,
    /// Live nodes in this node's ring (1 when alone).
    pub fleet_nodes: IntGauge,
    /// From an entry's append to another node's stream (its Redis-assigned id's
    /// time) to its read by that node's `fleet-in`.
    pub fleet_stream_lag_seconds: Histogram,
    /// SIGHUP reloads, by result (`applied`, `failed`).
    pub config_reloads: IntCounterVec,
    /// Settings the config file changes that take effect only on a restart.
    pub config_restart_pending: IntGauge,
    /// 1 from SIGTERM/SIGINT on (readiness fails), else 0.
    pub draining: IntGauge,
}

fn gauge(r: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric");
    r.register(Box::new(g.clone())).expect("unique metric");
    g
}

fn counter(r: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(r: &Registry, name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new_custom(Some("switchboard".into()), None).expect("valid registry");
        let fleet_nodes = gauge(&r, "fleet_nodes", "Live nodes in this node's ring");
        fleet_nodes.set(1);
        let latency = prometheus::exponential_buckets(0.000_025, 2.0, 16).expect("valid buckets");
        let connections = gauge(&r, "connections", "Open WebSocket connections");
        let errors = IntCounterVec::new(Opts::new("errors_total", "Error replies by code name"), &["code"])
            .expect("valid metric");
        r.register(Box::new(errors.clone())).expect("unique metric");
        // Every label value from the start, at 0: a rate over a series that appears
        // only with its first error would miss that error.
        for code in protocol::ErrorCode::ALL {
            errors.with_label_values(&[code.name()]);
        }
        for code in ["commit_fenced", "commit_failed"] {
            errors.with_label_values(&[code]);
        }
        let shard_connections = prometheus::IntGaugeVec::new(
            Opts::new("shard_connections", "Open WebSocket connections by shard"),
            &["shard"],
        )
        .expect("valid metric");
        r.register(Box::new(shard_connections.clone())).expect("unique metric");
        let rejected = IntCounterVec::new(
            Opts::new("queue_rejections_total", "Work refused by a full queue"),
            &["queue"],
        )
        .expect("valid metric");
        r.register(Box::new(rejected.clone())).expect("unique metric");
        let attachment_bytes = IntCounterVec::new(
            Opts::new("attachment_bytes_total", "Attachment bytes through the embedded blob backend"),
            &["direction"],
        )
        .expect("valid metric");
        r.register(Box::new(attachment_bytes.clone())).expect("unique metric");
        let config_reloads = IntCounterVec::new(
            Opts::new("config_reloads_total", "SIGHUP config reloads by result"),
            &["result"],
        )
        .expect("valid metric");
        r.register(Box::new(config_reloads.clone())).expect("unique metric");
        for result in ["applied", "failed"] {
            config_reloads.with_label_values(&[result]);
        }
        let process = Registry::new();
        // A counter in meaning; exposed through a gauge because it is read, not incremented.
        let cpu_seconds = Gauge::new("process_cpu_seconds_total", "User and system CPU time, seconds")
            .expect("valid metric");
        let rss_bytes =
            IntGauge::new("process_resident_memory_bytes", "Resident memory, bytes").expect("valid metric");
        process.register(Box::new(cpu_seconds.clone())).expect("unique metric");
        process.register(Box::new(rss_bytes.clone())).expect("unique metric");
        Metrics {
            process,
            cpu_seconds,
            rss_bytes,
            connections,
            shard_connections,
            connections_total: counter(&r, "connections_total", "WebSocket connections accepted"),
            frames_in: counter(&r, "frames_in_total", "Data frames received"),
            frames_out: counter(&r, "frames_out_total", "Frames queued to sockets"),
            sends: counter(&r, "sends_total", "Sends accepted into the sequencer queue"),
            messages_stored: counter(&r, "messages_stored_total", "Messages made durable"),
            deliveries: counter(&r, "deliveries_total", "Message frames queued to recipient connections"),
            acks: counter(&r, "acks_total", "Acks queued to senders"),
            errors,
            commit_seconds: histogram(&r, "commit_seconds", "Durable store commit time", latency.clone()),
            commit_batch: histogram(
                &r,
                "commit_batch_size",
                "Commands per commit",
                prometheus::exponential_buckets(1.0, 2.0, 12).expect("valid buckets"),
            ),
            delivery_seconds: histogram(
                &r,
                "delivery_seconds",
                "Send queued to the sequencer until its frame is queued on a recipient connection",
                latency.clone(),
            ),
            slow_consumers: counter(&r, "slow_consumers_total", "Connections closed with 4008"),
            sync_backlogs: counter(&r, "sync_backlogs_total", "Connections closed with 4009"),
            order_gaps: counter(
                &r,
                "order_gaps_total",
                "Connections resynced (4008) because an event skipped a position (a fail-over's lost events)",
            ),
            mailbox_overflows: counter(&r, "mailbox_overflows_total", "Events dropped by a full mailbox"),
            rejected,
            attachment_bytes,
            push_notifications: counter(
                &r,
                "push_notifications_total",
                "Notifications handed to the push backend",
            ),
            push_suppressed: counter(
                &r,
                "push_suppressed_total",
                "Notifications dropped: the user came back",
            ),
            push_sent: counter(&r, "push_webhook_sent_total", "Notifications the webhook accepted"),
            push_retries: counter(&r, "push_webhook_retries_total", "Webhook attempts retried"),
            push_failed: counter(&r, "push_webhook_failed_total", "Notifications dropped after failing"),
            fleet_entries: counter(&r, "fleet_entries_sent_total", "Stream entries sent to other nodes"),
            fleet_received: counter(
                &r,
                "fleet_entries_received_total",
                "Stream entries read from this node's stream",
            ),
            fleet_nodes,
            fleet_stream_lag_seconds: histogram(
                &r,
                "fleet_stream_lag_seconds",
                "Entry appended to this node's Redis stream until read here (Redis clock vs this node's)",
                latency.clone(),
            ),
            config_reloads,
            config_restart_pending: gauge(
                &r,
                "config_restart_pending",
                "Settings changed in the config file that take effect only on a restart",
            ),
            draining: gauge(&r, "draining", "1 while the node drains for shutdown"),
            registry: r,
        }
    }

    /// The text exposition of every metric, process metrics included.
    pub fn render(&self) -> String {
        self.cpu_seconds.set(cpu_seconds());
        self.rss_bytes.set(rss_bytes());
        let mut families = self.registry.gather();
        families.extend(self.process.gather());
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

/// User + system CPU of this process, seconds (microsecond resolution).
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the zeroed struct we pass; RUSAGE_SELF is always valid.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Current resident set size, bytes.
fn rss_bytes() -> i64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<i64>().ok()))
        .unwrap_or(0);
    // SAFETY: sysconf with a valid name has no preconditions.
    pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

//! Prometheus metrics, served at `GET /metrics` in the text exposition format.
//!
//! Counters and histograms are the `prometheus` crate's lock-free atomics, shared
//! by every thread. Process CPU and RSS come from its process collector
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
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
    pub mailbox_overflows: IntCounter,
    pub rejected: IntCounterVec,
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
        let latency = prometheus::exponential_buckets(0.000_025, 2.0, 16).expect("valid buckets");
        let connections = IntGauge::new("connections", "Open WebSocket connections").expect("valid metric");
        r.register(Box::new(connections.clone())).expect("unique metric");
        let errors = IntCounterVec::new(Opts::new("errors_total", "Error replies by code name"), &["code"])
            .expect("valid metric");
        r.register(Box::new(errors.clone())).expect("unique metric");
        let rejected = IntCounterVec::new(
            Opts::new("queue_rejections_total", "Work refused by a full queue"),
            &["queue"],
        )
        .expect("valid metric");
        r.register(Box::new(rejected.clone())).expect("unique metric");
        let process = prometheus::process_collector::ProcessCollector::for_self();
        // Registered without the prefix, under the standard process_* names.
        let _ = prometheus::default_registry().register(Box::new(process));
        Metrics {
            connections,
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
                latency,
            ),
            slow_consumers: counter(&r, "slow_consumers_total", "Connections closed with 4008"),
            sync_backlogs: counter(&r, "sync_backlogs_total", "Connections closed with 4009"),
            mailbox_overflows: counter(&r, "mailbox_overflows_total", "Events dropped by a full mailbox"),
            rejected,
            registry: r,
        }
    }

    /// The text exposition of every metric, process metrics included.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        families.extend(prometheus::default_registry().gather());
        let mut out = Vec::new();
        TextEncoder::new().encode(&families, &mut out).expect("text encoding cannot fail");
        String::from_utf8(out).expect("text exposition is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

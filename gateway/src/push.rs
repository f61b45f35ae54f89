//! Push fallback: notifications for members with no connected device.
//!
//! After a commit, the sequencer hands [`Push::submit`] a job for every
//! recipient of a stored text message who has no device connected to this node
//! and has not muted the conversation. The push thread coalesces: a user's first
//! job opens a window of `coalesce_ms`; every job until it closes joins the same
//! [`Notification`] (a count per conversation and the newest message). When the
//! window closes, a user who has come back meanwhile gets nothing (the messages
//! reached a device); anyone else's notification goes to the [`Notifier`].
//!
//! Backends ([`Notifier`]):
//! - `log` (default): one log line per notification.
//! - `webhook`: an HTTP POST of the notification as JSON to `webhook_url`, the
//!   shape a bridge to FCM or APNs consumes. `workers` threads send; a
//!   transport error, 429 or 5xx is retried with exponential backoff
//!   (`backoff_ms`, doubling, at most `max_attempts` tries), other statuses are
//!   final. Every attempt carries the same `Idempotency-Key` (the notification's
//!   `id`), so a receiver can drop repeats.
//!
//! Overflow policy: the job queue and the webhook queue each hold `queue`
//! entries; a job or notification that finds its queue full is dropped, counted
//! (`queue_rejections_total{queue="push"|"webhook"}`) and logged once. Push is
//! best effort: the messages themselves are stored and reach the user's devices
//! on their next `sync`.

use crate::config::{PushBackend, PushConfig};
use crate::mailbox::Registry;
use crate::metrics::Metrics;
use crate::vocab::clock::now_ms;
use protocol::{ConversationId, Message, Seq, UserId, id_str};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Longest message preview carried in a notification, in characters.
pub const PREVIEW_CHARS: usize = 120;

/// What a push bridge receives: one per user per coalescing window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// Unique; the same on every delivery attempt (also sent as `Idempotency-Key`).
    pub id: String,
    #[serde(with = "id_str")]
    pub user_id: UserId,
    /// Messages this notification stands for.
    pub count: u32,
    /// Per conversation, newest activity first.
    pub conversations: Vec<ConversationCount>,
    /// The newest message, for the notification's text.
    pub latest: Latest,
    pub created_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationCount {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub count: u32,
    pub last_seq: Seq,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Latest {
    #[serde(with = "id_str")]
    pub conversation_id: ConversationId,
    pub seq: Seq,
    #[serde(with = "id_str")]
    pub sender_id: UserId,
    pub ts_ms: u64,
    /// The body's first `PREVIEW_CHARS` characters.
    pub preview: String,
}

/// Where finished notifications go.
pub trait Notifier: Send + Sync {
    /// Takes one notification. Must not block: the coalescing thread calls it.
    fn notify(&self, n: Notification);
}

/// Writes each notification as one log line (target `push`).
pub struct LogNotifier;

impl Notifier for LogNotifier {
    fn notify(&self, n: Notification) {
        tracing::info!(
            target: "push",
            id = %n.id,
            user = n.user_id,
            count = n.count,
            conversations = n.conversations.len(),
            "push notification"
        );
    }
}

/// POSTs notifications to a URL from its own threads, with retries.
pub struct WebhookNotifier {
    tx: crate::queue::Sender<Notification>,
    rejected: prometheus::IntCounter,
}

impl WebhookNotifier {
    pub fn start(cfg: &PushConfig, url: String, metrics: &Arc<Metrics>) -> WebhookNotifier {
        let (tx, rx) = crate::queue::bounded::<Notification>(cfg.queue.get());
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_millis(cfg.timeout_ms.get())))
            .http_status_as_error(false)
            .build()
            .into();
        for i in 0..cfg.workers.get() {
            let (rx, agent, url, metrics) = (rx.clone(), agent.clone(), url.clone(), metrics.clone());
            let (attempts, backoff) = (cfg.max_attempts.get(), Duration::from_millis(cfg.backoff_ms.get()));
            std::thread::Builder::new()
                .name(format!("webhook-{i}"))
                .spawn(move || {
                    for n in rx {
                        post(&agent, &url, &n, attempts, backoff, &metrics);
                    }
                })
                .expect("spawning a webhook thread");
        }
        WebhookNotifier { tx, rejected: metrics.rejected.with_label_values(&["webhook"]) }
    }
}

impl Notifier for WebhookNotifier {
    fn notify(&self, n: Notification) {
        if self.tx.try_send(n).is_err() {
            if self.rejected.get() == 0 {
                tracing::warn!("webhook queue full; dropping notifications (logged once)");
            }
            self.rejected.inc();
        }
    }
}

/// Delivers one notification, retrying what may succeed later.
///
/// Runs on: a webhook thread.
fn post(agent: &ureq::Agent, url: &str, n: &Notification, attempts: u32, backoff: Duration, m: &Metrics) {
    let body = serde_json::to_vec(n).expect("a notification serialises");
    for attempt in 1..=attempts {
        let outcome = agent
            .post(url)
            .header("content-type", "application/json")
            .header("idempotency-key", &n.id)
            .send(&body[..]);
        let retry = match outcome {
            Ok(r) if r.status().is_success() => {
                m.push_sent.inc();
                return;
            }
            Ok(r) if r.status().as_u16() == 429 || r.status().is_server_error() => {
                format!("status {}", r.status())
            }
            Ok(r) => {
                m.push_failed.inc();
                tracing::warn!(id = %n.id, status = %r.status(), "webhook refused a notification; dropped");
                return;
            }
            Err(e) => e.to_string(),
        };
        if attempt == attempts {
            m.push_failed.inc();
            tracing::warn!(id = %n.id, attempts, last = %retry, "webhook failed; notification dropped");
            return;
        }
        m.push_retries.inc();
        std::thread::sleep(backoff.saturating_mul(1 << (attempt - 1).min(16)).min(Duration::from_secs(60)));
    }
}

#[derive(Debug)]
struct Job {
    user: UserId,
    latest: Latest,
}

/// The sequencer's handle on the push thread.
pub struct Push {
    tx: crate::queue::Sender<Job>,
    rejected: prometheus::IntCounter,
}

impl Push {
    /// Starts the coalescing thread and the configured backend.
    pub fn start(cfg: &PushConfig, registry: Arc<Registry>, metrics: Arc<Metrics>) -> Arc<Push> {
        let notifier: Box<dyn Notifier> = match (&cfg.backend, &cfg.webhook_url) {
            (PushBackend::Webhook, Some(url)) => Box::new(WebhookNotifier::start(cfg, url.clone(), &metrics)),
            _ => Box::new(LogNotifier),
        };
        let (tx, rx) = crate::queue::bounded(cfg.queue.get());
        let window = Duration::from_millis(cfg.coalesce_ms.get());
        let rejected = metrics.rejected.with_label_values(&["push"]);
        let mut c =
            Coalescer { window, registry, metrics, notifier, pending: HashMap::new(), due: VecDeque::new() };
        std::thread::Builder::new()
            .name("push".into())
            .spawn(move || c.run(rx))
            .expect("spawning the push thread");
        Arc::new(Push { tx, rejected })
    }

    /// Queues a notification job: `user` has no device connected and `m` is for them.
    ///
    /// Runs on: the sequencer thread. Never blocks.
    pub fn submit(&self, user: UserId, m: &Message) {
        let latest = Latest {
            conversation_id: m.conversation_id,
            seq: m.seq,
            sender_id: m.sender_id,
            ts_ms: m.ts_ms,
            preview: m.body.chars().take(PREVIEW_CHARS).collect(),
        };
        if self.tx.try_send(Job { user, latest }).is_err() {
            if self.rejected.get() == 0 {
                tracing::warn!("push queue full; dropping notification jobs (logged once)");
            }
            self.rejected.inc();
        }
    }
}

/// One user's open window.
struct Pending {
    count: u32,
    conversations: BTreeMap<ConversationId, (u32, Seq, u64)>,
    latest: Latest,
}

struct Coalescer {
    window: Duration,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    notifier: Box<dyn Notifier>,
    pending: HashMap<UserId, Pending>,
    /// Windows in the order they close (all are equally long).
    due: VecDeque<(Instant, UserId)>,
}

impl Coalescer {
    // Runs on: the push thread.
    fn run(&mut self, rx: crossbeam_channel::Receiver<Job>) {
        loop {
            let r = match self.due.front() {
                Some(&(t, _)) => rx.recv_deadline(t),
                None => rx.recv().map_err(|_| crossbeam_channel::RecvTimeoutError::Disconnected),
            };
            match r {
                Ok(job) => self.add(job),
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            while let Some(&(t, user)) = self.due.front() {
                if t > now {
                    break;
                }
                self.due.pop_front();
                if let Some(p) = self.pending.remove(&user) {
                    self.close(user, p);
                }
            }
        }
    }

    fn add(&mut self, job: Job) {
        let p = self.pending.entry(job.user).or_insert_with(|| {
            self.due.push_back((Instant::now() + self.window, job.user));
            Pending { count: 0, conversations: BTreeMap::new(), latest: job.latest.clone() }
        });
        p.count += 1;
        let c = p.conversations.entry(job.latest.conversation_id).or_default();
        *c = (c.0 + 1, job.latest.seq, job.latest.ts_ms);
        p.latest = job.latest;
    }

    fn close(&self, user: UserId, p: Pending) {
        if self.registry.is_connected(user) {
            // Back online: the messages reached a device.
            self.metrics.push_suppressed.inc();
            return;
        }
        let mut conversations: Vec<_> = p
            .conversations
            .into_iter()
            .map(|(conversation_id, (count, last_seq, ts))| {
                (ts, ConversationCount { conversation_id, count, last_seq })
            })
            .collect();
        conversations.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.conversation_id.cmp(&b.1.conversation_id)));
        let n = Notification {
            id: format!("{}-{}-{}", user, p.latest.conversation_id, p.latest.seq),
            user_id: user,
            count: p.count,
            conversations: conversations.into_iter().map(|(_, c)| c).collect(),
            latest: p.latest,
            created_ms: now_ms(),
        };
        self.metrics.push_notifications.inc();
        self.notifier.notify(n);
    }
}

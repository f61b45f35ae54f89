//! `loadgen run`: provisions users, starts (or waits for) workers, drives the
//! phases, merges their results, scrapes the gateway, and reports.

use crate::plan::{Assignment, Counters, FromWorker, Scenario, ToWorker, User, WorkerResult};
use crate::report::{self, Summary};
use crate::worker::{decode_hist, histogram};
use anyhow::{Context, anyhow, bail};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Gateway (or load balancer) to test. Several gateway nodes of a fleet:
    /// comma-separated or repeated; users start spread over them in turn.
    #[arg(long, default_value = "ws://127.0.0.1:8080", value_delimiter = ',', num_args = 1..)]
    pub target: Vec<String>,
    /// Lay the users out by conversation: this share of conversations (0 to 1; the
    /// bare flag means 1) has its members on different nodes, so each message crosses
    /// one node boundary; the others' members sit together on the node that owns the
    /// conversation. Needs each node as a --target. Without it users stay where they
    /// landed (spread over the targets in turn, as a balancer would). Latency is
    /// reported by node-to-node hops either way.
    #[arg(long, default_missing_value = "1", num_args = 0..=1)]
    pub cross_node: Option<f64>,
    /// A dropped client reconnects (to another target, at random, with backoff), syncs from the
    /// positions it holds, sends again what was not acknowledged, and goes on; messages
    /// seen again are dropped by position (`redelivered`), as a client does. Node kills
    /// are then judged by acknowledged messages only.
    #[arg(long)]
    pub reconnect: bool,
    /// With --reconnect: a dropped client waits a random time up to this before
    /// its first attempt (then backs off with jitter), so the clients of a dead
    /// node come back spread out rather than all at once, e.g. 10s.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub reconnect_spread: Duration,
    /// Total connections (one user each).
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,
    /// Total messages per second, across all senders.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// How long to send, e.g. 30s, 2m.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Send for this long first, outside the measured window: cold caches (every
    /// conversation's first message loads it) stay out of the latency figures and the
    /// gateway CPU per message. Its messages are still checked for loss, duplicates and order.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// Also report, on their own, the latency of messages scheduled before this
    /// point of the sending (from its start, warm-up included) and the gateway
    /// CPU per message from the end of the warm-up to it: the steady state before
    /// a fault injected at that time (`before_split` in the report).
    #[arg(long, value_parser = parse_duration)]
    pub split_at: Option<Duration>,
    #[arg(long, value_enum, default_value = "pairs")]
    pub scenario: Scenario,
    /// Members per group (groups and mix scenarios).
    #[arg(long, default_value_t = 10)]
    pub group_size: usize,
    /// Share of active users in groups (mix scenario).
    #[arg(long, default_value_t = 0.5)]
    pub group_fraction: f64,
    /// Message body size, bytes.
    #[arg(long, default_value_t = 100)]
    pub message_size: usize,
    /// Share of sends (0 to 1) that carry a file: each is uploaded when its send
    /// is due (an upload slot, then a `PUT` to the presigned URL, on the gateway
    /// or the object store), and the message naming it is sent once the upload
    /// is done. Its latency counts from that send.
    #[arg(long, default_value_t = 0.0)]
    pub attachment_share: f64,
    /// Size of each attached file, bytes.
    #[arg(long, default_value_t = 64 * 1024)]
    pub attachment_size: usize,
    /// Media type of the attached files (must be in the gateway's `attachments.media_types`).
    #[arg(long, default_value = "image/jpeg")]
    pub attachment_type: String,
    /// Recipients do not fetch the files (no download URL, no bytes): with a run
    /// that does, this splits the gateway's cost of a file between its upload
    /// and its download.
    #[arg(long)]
    pub attachment_no_fetch: bool,
    /// Share of connections that stay idle (connected, synced, silent).
    #[arg(long, default_value_t = 0.0)]
    pub idle_fraction: f64,
    /// Connections opened per second, in total.
    #[arg(long, default_value_t = 2000.0)]
    pub ramp: f64,
    /// How long to wait after the run for acked messages to arrive before calling them lost.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub grace: Duration,
    /// Worker processes to start here (each holds at most ~19k sockets: the fd limit).
    /// Default: enough for the connections, at least one.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Workers on other hosts (`loadgen worker --coordinator HOST:PORT`) to wait for, in addition.
    #[arg(long, default_value_t = 0)]
    pub external_workers: usize,
    /// Where workers connect to this coordinator.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: String,
    /// Source addresses for local workers: worker W binds its sockets to `PREFIX.W.1` ..
    /// `PREFIX.W.250` in turn (loopback targets). `none` binds no source address.
    #[arg(long, default_value = "127.1")]
    pub source_prefix: String,
    /// Use the JSON subprotocol instead of FlatBuffers.
    #[arg(long)]
    pub json_protocol: bool,
    /// The gateway's admin secret (`auth.admin_secret`), to mint test users quickly.
    #[arg(long, env = "SWITCHBOARD_ADMIN_SECRET")]
    pub admin_secret: String,
    /// Username prefix of the test users.
    #[arg(long, default_value = "lg")]
    pub user_prefix: String,
    /// Token cache: users minted once are reused while their tokens are fresh.
    #[arg(long, default_value = "loadgen-users.json")]
    pub user_cache: PathBuf,
    /// Prometheus endpoints of the gateway nodes (comma-separated; their figures are
    /// summed). Default: `/metrics` of every --target.
    #[arg(long, value_delimiter = ',')]
    pub metrics_url: Vec<String>,
    /// Write the JSON summary here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the HdrHistogram percentile distribution (.hgrm) here.
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write an SVG plot (latency percentiles, rates over time) here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) =
        s.trim().split_at(s.trim().find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len()));
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "" | "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// Most connections one worker process takes (the hard fd limit here is 20000).
pub const PER_WORKER_MAX: usize = 18_000;

pub fn http_base(target: &str) -> anyhow::Result<String> {
    Ok(format!(
        "http://{}",
        target.strip_prefix("ws://").ok_or_else(|| anyhow!("--target must be ws://host:port"))?
    ))
}

/// Every node's figures summed (one failed scrape: none).
fn scrape_all(urls: &[String]) -> Option<crate::scrape::Sample> {
    let mut sum = crate::scrape::Sample::new();
    for u in urls {
        for (k, v) in crate::scrape::scrape(u).ok()? {
            *sum.entry(k).or_default() += v;
        }
    }
    Some(sum)
}

pub fn run(args: RunArgs) -> anyhow::Result<i32> {
    if args.cross_node.is_some_and(|c| !(0.0..=1.0).contains(&c)) {
        bail!("--cross-node takes a share between 0 and 1");
    }
    if !(0.0..=1.0).contains(&args.attachment_share) || args.attachment_size == 0 {
        bail!("--attachment-share takes a share between 0 and 1, --attachment-size at least 1 byte");
    }
    let bases = args.target.iter().map(|t| http_base(t)).collect::<anyhow::Result<Vec<_>>>()?;
    if bases.is_empty() {
        bail!("no --target");
    }
    let metrics_url: Vec<String> = if args.metrics_url.is_empty() {
        bases.iter().map(|b| format!("{b}/metrics")).collect()
    } else {
        args.metrics_url.clone()
    };
    let local = args.workers.unwrap_or_else(|| {
        if args.external_workers > 0 { 0 } else { args.connections.div_ceil(PER_WORKER_MAX).max(1) }
    });
    let total_workers = local + args.external_workers;
    if total_workers == 0 {
        bail!("no workers: use --workers or --external-workers");
    }
    if args.connections.div_ceil(total_workers) > PER_WORKER_MAX {
        bail!(
            "{} connections need at least {} workers",
            args.connections,
            args.connections.div_ceil(PER_WORKER_MAX)
        );
    }

    eprintln!("loadgen: provisioning {} users", args.connections);
    let users = crate::provision::users(
        &bases,
        &args.admin_secret,
        &args.user_prefix,
        args.connections,
        &args.user_cache,
    )?;

    let listener = TcpListener::bind(&args.listen).context("binding the coordinator")?;
    let addr = listener.local_addr()?;
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..local {
        children.push(
            std::process::Command::new(&exe)
                .args(["worker", "--coordinator", &addr.to_string()])
                .stdin(std::process::Stdio::null())
                .spawn()
                .context("starting a worker")?,
        );
    }
    if args.external_workers > 0 {
        eprintln!("loadgen: waiting for {} external workers on {addr}", args.external_workers);
    }

    let before = scrape_all(&metrics_url);
    // From here to every worker's Ready: connecting (paced by --ramp), each
    // connection's sync, and the workers' conversations set up.
    let connecting = std::time::Instant::now();
    // Assign contiguous slices of users; each worker runs whole conversations.
    let mut workers = Vec::new();
    let per = args.connections.div_ceil(total_workers);
    for w in 0..total_workers {
        let (stream, _) = listener.accept()?;
        let slice: Vec<User> = users.iter().skip(w * per).take(per).cloned().collect();
        let idle = (slice.len() as f64 * args.idle_fraction).round() as usize;
        let a = Assignment {
            worker: w,
            targets: args.target.clone(),
            cross_node: args.cross_node,
            reconnect: args.reconnect,
            reconnect_spread_ms: args.reconnect_spread.as_millis() as u64,
            split_ms: args.split_at.map(|d| d.as_millis() as u64),
            rate: args.rate * (slice.len() - idle) as f64
                / (args.connections as f64 * (1.0 - args.idle_fraction)).max(1.0),
            users: slice,
            scenario: args.scenario,
            group_size: args.group_size,
            group_fraction: args.group_fraction,
            idle,
            message_size: args.message_size,
            duration_ms: args.duration.as_millis() as u64,
            warmup_ms: args.warmup.as_millis() as u64,
            grace_ms: args.grace.as_millis() as u64,
            ramp: args.ramp / total_workers as f64,
            source_prefix: (args.source_prefix != "none" && w < local)
                .then(|| format!("{}.{}.", args.source_prefix, w)),
            json_protocol: args.json_protocol,
            attachment_share: args.attachment_share,
            attachment_size: args.attachment_size,
            attachment_type: args.attachment_type.clone(),
            attachment_fetch: !args.attachment_no_fetch,
        };
        let mut s = stream;
        writeln!(s, "{}", serde_json::to_string(&ToWorker::Assign(Box::new(a)))?)?;
        workers.push(s);
    }

    // Every worker's reports, read by a thread each, arrive here in one queue.
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, s) in workers.iter().enumerate() {
        let tx = tx.clone();
        let mut r = BufReader::new(s.try_clone()?);
        std::thread::spawn(move || {
            loop {
                match read(&mut r) {
                    Ok(m) => {
                        let end = matches!(m, FromWorker::Result(_) | FromWorker::Failed(_));
                        let _ = tx.send((i, m));
                        if end {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send((i, FromWorker::Failed(format!("{e:#}"))));
                        return;
                    }
                }
            }
        });
    }
    drop(tx);

    // Ready: every worker connected and set up; meanwhile, how far the connects got.
    let mut setup = Counters::default();
    let mut connects = vec![(0u64, 0u64); total_workers];
    let mut ready = vec![false; total_workers];
    let mut meter = ConnectMeter::new(args.connections);
    while ready.iter().any(|r| !r) {
        let Ok((i, m)) = rx.recv() else { bail!("a worker vanished") };
        match m {
            FromWorker::Connecting { done, failed } => {
                connects[i] = (done, failed);
                meter.show(&connects, false);
            }
            FromWorker::Ready(c) => {
                connects[i] = (c.connected, c.connect_errors);
                setup.add(&c);
                ready[i] = true;
            }
            FromWorker::Failed(e) => bail!("worker {i} failed during set-up: {e}"),
            other => bail!("unexpected {other:?}"),
        }
    }
    meter.show(&connects, true);
    let connect_secs = connecting.elapsed().as_secs_f64();
    eprintln!(
        "loadgen: {}/{} connected ({} errors) in {connect_secs:.1} s ({:.0}/s, synced and set up); sending {} msg/s for {:?}",
        setup.connected,
        setup.connections,
        setup.connect_errors,
        setup.connected as f64 / connect_secs.max(1e-3),
        args.rate,
        args.duration
    );
    let mine = LoadgenMemory::of(&setup, setup.rss_ready_bytes);
    eprintln!(
        "loadgen: own memory, connected: {} workers {:.1} MB resident, {} bytes per connection; coordinator {:.1} MB",
        total_workers,
        mine.workers_rss_bytes as f64 / 1e6,
        mine.per_connection_bytes.map_or("?".into(), |b| format!("{b:.0}")),
        mine.coordinator_rss_bytes as f64 / 1e6,
    );
    let connected_scrape = scrape_all(&metrics_url);
    let start_unix_ms = (crate::worker::now_us() / 1000) + 500;
    // The gateway's cost is measured from the end of the warm-up.
    let warm_scrape = (!args.warmup.is_zero()).then(|| {
        let (url, at_ms) = (metrics_url.clone(), start_unix_ms + args.warmup.as_millis() as u64);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(at_ms.saturating_sub(crate::worker::now_us() / 1000)));
            scrape_all(&url)
        })
    });
    let split_scrape = args.split_at.map(|at| {
        let (url, at_ms) = (metrics_url.clone(), start_unix_ms + at.as_millis() as u64);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(at_ms.saturating_sub(crate::worker::now_us() / 1000)));
            scrape_all(&url)
        })
    });
    for s in &mut workers {
        writeln!(s, "{}", serde_json::to_string(&ToWorker::Go { start_unix_ms })?)?;
    }

    // Progress until every worker reports its result.
    let t0 = Instant::now();
    let mut progress: Vec<(Counters, Option<hdrhistogram::Histogram<u64>>)> =
        vec![Default::default(); total_workers];
    let mut results: Vec<Option<WorkerResult>> = vec![None; total_workers];
    let mut last = (0u64, 0u64, Instant::now());
    let mut traffic_end = None;
    while results.iter().any(Option::is_none) {
        let Ok((i, m)) = rx.recv() else { bail!("a worker vanished") };
        match m {
            FromWorker::Progress { counters, latency } => {
                progress[i] = (counters, decode_hist(&latency).ok());
                let mut c = Counters::default();
                let mut h = histogram();
                for (pc, ph) in &progress {
                    c.add(pc);
                    if let Some(ph) = ph {
                        let _ = h.add(ph);
                    }
                }
                let dt = last.2.elapsed().as_secs_f64().max(1e-3);
                if dt >= 0.9 {
                    eprintln!(
                        "[{:>4.0}s] conns {}/{}  send {:.0}/s  deliver {:.0}/s  p50 {:.2}ms  p95 {:.2}ms  errors {}",
                        t0.elapsed().as_secs_f64(),
                        setup.connected,
                        setup.connections,
                        (c.sent - last.0) as f64 / dt,
                        (c.delivered - last.1) as f64 / dt,
                        h.value_at_quantile(0.5) as f64 / 1000.0,
                        h.value_at_quantile(0.95) as f64 / 1000.0,
                        c.send_errors + c.connect_errors + c.disconnects,
                    );
                    last = (c.sent, c.delivered, Instant::now());
                }
            }
            FromWorker::Result(r) => {
                traffic_end.get_or_insert_with(Instant::now);
                results[i] = Some(*r);
            }
            FromWorker::Failed(e) => bail!("worker {i} failed: {e}"),
            FromWorker::Ready(_) | FromWorker::Connecting { .. } => {}
        }
    }
    let after = scrape_all(&metrics_url);
    let warm = warm_scrape.and_then(|t| t.join().ok().flatten());
    let split = split_scrape.and_then(|t| t.join().ok().flatten());
    for mut c in children {
        let _ = c.wait();
    }

    let results: Vec<WorkerResult> = results.into_iter().flatten().collect();
    let mut summary = Summary::build(
        &args,
        &results,
        before.as_ref(),
        connected_scrape.as_ref(),
        warm.as_ref(),
        after.as_ref(),
    )?;
    summary.json["connect_seconds"] = serde_json::json!((connect_secs * 10.0).round() / 10.0);
    if let Some(at) = args.split_at {
        let mut h = histogram();
        for r in &results {
            if !r.latency_before_split.is_empty() {
                h.add(decode_hist(&r.latency_before_split)?)?;
            }
        }
        let from = if args.warmup.is_zero() { connected_scrape.as_ref() } else { warm.as_ref() };
        let cpu = report::delta(from, split.as_ref(), "process_cpu_seconds_total");
        let stored = report::delta(from, split.as_ref(), "switchboard_messages_stored_total");
        summary.json["before_split"] = serde_json::json!({
            "at_s": at.as_secs_f64(),
            "latency_us": report::percentiles(&h),
            "gateway_cpu_us_per_message": match (cpu, stored) {
                (Some(c), Some(n)) if n > 0.0 => serde_json::json!((c * 1e6 / n * 100.0).round() / 100.0),
                _ => serde_json::Value::Null,
            },
        });
    }
    // Holding the connections with every task running (one second into sending).
    let held = LoadgenMemory::of(&summary.counters, summary.counters.rss_held_bytes);
    summary.json["loadgen"] = serde_json::json!({
        "workers": total_workers,
        "workers_rss_bytes": held.workers_rss_bytes,
        "rss_per_connection_bytes": held.per_connection_bytes.map(f64::round),
        "rss_per_connection_bytes_connected": mine.per_connection_bytes.map(f64::round),
        "workers_peak_rss_bytes": summary.counters.rss_peak_bytes,
        "coordinator_rss_bytes": held.coordinator_rss_bytes,
    });
    report::print_table(&summary);
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_string_pretty(&summary.json)?)?;
    }
    if let Some(p) = &args.hgrm {
        std::fs::write(p, report::hgrm(&summary.latency))?;
    }
    if let Some(p) = &args.svg {
        report::svg(p, &summary)?;
    }
    let c = &summary.counters;
    let bad = c.lost + c.duplicates + c.out_of_order;
    if bad > 0 {
        eprintln!(
            "loadgen: FAILED: {} lost, {} duplicates, {} out of order",
            c.lost, c.duplicates, c.out_of_order
        );
        return Ok(1);
    }
    Ok(0)
}

/// loadgen's own memory: every worker's resident memory, their growth per
/// connection (from before connecting to `at`), and the coordinator's (which
/// holds every user's token).
struct LoadgenMemory {
    workers_rss_bytes: u64,
    per_connection_bytes: Option<f64>,
    coordinator_rss_bytes: u64,
}

impl LoadgenMemory {
    fn of(c: &Counters, at: u64) -> LoadgenMemory {
        let per_connection_bytes = (c.connected > 0 && c.rss_before_bytes > 0 && at > 0)
            .then(|| at.saturating_sub(c.rss_before_bytes) as f64 / c.connected as f64);
        LoadgenMemory {
            workers_rss_bytes: at,
            per_connection_bytes,
            coordinator_rss_bytes: crate::worker::rss_bytes(),
        }
    }
}

/// The connect phase's progress on stderr: a bar redrawn in place on a
/// terminal, a line every 5 s otherwise (logs).
struct ConnectMeter {
    total: usize,
    started: Instant,
    shown: Instant,
    tty: bool,
}

impl ConnectMeter {
    fn new(total: usize) -> ConnectMeter {
        use std::io::IsTerminal;
        let now = Instant::now();
        ConnectMeter { total, started: now, shown: now, tty: std::io::stderr().is_terminal() }
    }

    fn show(&mut self, per_worker: &[(u64, u64)], last: bool) {
        let every = if self.tty { Duration::from_millis(250) } else { Duration::from_secs(5) };
        if !last && self.shown.elapsed() < every {
            return;
        }
        self.shown = Instant::now();
        let done: u64 = per_worker.iter().map(|w| w.0).sum();
        let failed: u64 = per_worker.iter().map(|w| w.1).sum();
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let share = done as f64 / self.total.max(1) as f64;
        let line = format!(
            "loadgen: connecting {done}/{} ({:.0}/s, {failed} failed)",
            self.total,
            done as f64 / secs
        );
        if self.tty {
            let filled = (share * 30.0).round() as usize;
            eprint!("\r[{}{}] {line}", "#".repeat(filled.min(30)), ".".repeat(30 - filled.min(30)));
            if last {
                eprintln!();
            }
        } else if !last {
            eprintln!("{line}");
        }
    }
}

fn read(r: &mut BufReader<TcpStream>) -> anyhow::Result<FromWorker> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        bail!("worker closed its connection");
    }
    Ok(serde_json::from_str(&line)?)
}

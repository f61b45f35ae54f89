//! `loadgen burst`: many conversations' first messages at once against a
//! gateway whose caches are cold (just restarted), the moment every
//! conversation must be loaded before its message can be ordered.
//!
//! Two steps around a restart (`scripts/cold-burst` runs them):
//! 1. `loadgen burst --prepare`: mints `2 × --conversations` users, has each
//!    of the first half open a direct conversation with its partner in the
//!    second half, and writes users and conversation ids to `--state`. Sends
//!    nothing.
//! 2. Restart the gateway on the same data directory.
//! 3. `loadgen burst`: connects and syncs every user, then every sender sends
//!    one message at once. Reports send→ack and send→delivery latency (each
//!    from that message's own send time, carried in its body) and how many of
//!    each arrived.

use crate::plan::User;
use crate::worker::{Conn, histogram, now_us, open_with};
use anyhow::{Context, bail};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use protocol::{ClientMsg, ServerMsg};
use serde::{Deserialize, Serialize};
use std::cell::RefCell;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct BurstArgs {
    /// The gateway.
    #[arg(long, default_value = "ws://127.0.0.1:8080")]
    target: String,
    /// The gateway's admin secret (`auth.admin_secret`), to mint users (with --prepare).
    #[arg(long, env = "SWITCHBOARD_ADMIN_SECRET", default_value = "")]
    admin_secret: String,
    /// Conversations, each with two users of its own (with --prepare).
    #[arg(long, default_value_t = 5000)]
    conversations: usize,
    /// Create the users and conversations and write them to --state; send nothing.
    #[arg(long)]
    prepare: bool,
    /// Users and conversations, written by --prepare and read by the burst.
    #[arg(long, default_value = "loadgen-burst.json")]
    state: PathBuf,
    /// Username prefix of the minted users (with --prepare).
    #[arg(long, default_value = "lgburst")]
    user_prefix: String,
    /// Source addresses (`PREFIX.0.1` .. `PREFIX.0.250`), or `none`.
    #[arg(long, default_value = "127.1")]
    source_prefix: String,
    /// Give up on acks and deliveries still missing after this long.
    #[arg(long, default_value = "30s", value_parser = crate::coordinator::parse_duration)]
    timeout: Duration,
    /// Write the summary here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Serialize, Deserialize)]
struct State {
    users: Vec<User>,
    conversations: Vec<u64>,
}

/// Connections opened at once while setting up.
const SETUP_PARALLEL: usize = 128;

pub fn run(args: &BurstArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let local = tokio::task::LocalSet::new();
    if args.prepare { local.block_on(&rt, prepare(args)) } else { local.block_on(&rt, burst(args)) }
}

fn prefix(args: &BurstArgs) -> Option<String> {
    (args.source_prefix != "none").then(|| format!("{}.0.", args.source_prefix))
}

async fn prepare(args: &BurstArgs) -> anyhow::Result<()> {
    if args.admin_secret.is_empty() {
        bail!("--prepare mints users: give --admin-secret (or SWITCHBOARD_ADMIN_SECRET)");
    }
    let n = args.conversations;
    let base = crate::coordinator::http_base(&args.target)?;
    let users_cache = args.state.with_extension("users.json");
    let users = crate::provision::users(&[base], &args.admin_secret, &args.user_prefix, 2 * n, &users_cache)?;
    let src = prefix(args);
    let made: Vec<anyhow::Result<u64>> = futures_util::stream::iter(0..n)
        .map(|i| {
            let (src, users) = (src.clone(), &users);
            async move {
                let mut c = open_with(src.as_deref(), false, &args.target, &users[i].token, i).await?;
                let peer: u64 = users[n + i].user_id.parse().context("a user id")?;
                match c.request(ClientMsg::CreateDirect { user_id: peer }).await? {
                    ServerMsg::Conversation { conversation } => Ok(conversation.conversation_id),
                    other => bail!("expected a conversation, got {other:?}"),
                }
            }
        })
        .buffered(SETUP_PARALLEL)
        .collect()
        .await;
    let conversations = made.into_iter().collect::<anyhow::Result<Vec<u64>>>()?;
    let state = State { users, conversations };
    std::fs::write(&args.state, serde_json::to_string(&state)?)
        .with_context(|| format!("writing {}", args.state.display()))?;
    eprintln!("loadgen burst: {n} conversations ready in {}", args.state.display());
    Ok(())
}

struct Tally {
    acks: Histogram<u64>,
    deliveries: Histogram<u64>,
    errors: u64,
}

async fn connect(src: Option<&str>, target: &str, token: &str, index: usize) -> anyhow::Result<Conn> {
    let mut c = open_with(src, false, target, token, index).await?;
    match c.request(ClientMsg::Sync { positions: vec![] }).await? {
        ServerMsg::SyncDone { .. } => Ok(c),
        other => bail!("expected sync_done, got {other:?}"),
    }
}

async fn burst(args: &BurstArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.state)
        .with_context(|| format!("reading {} (run with --prepare first)", args.state.display()))?;
    let State { users, conversations } = serde_json::from_str(&text).context("reading the state file")?;
    let n = conversations.len();
    let src = prefix(args);
    let opened: Vec<anyhow::Result<Conn>> = futures_util::stream::iter(0..2 * n)
        .map(|i| connect(src.as_deref(), &args.target, &users[i].token, i))
        .buffered(SETUP_PARALLEL)
        .collect()
        .await;
    let mut conns = opened.into_iter().collect::<anyhow::Result<Vec<Conn>>>()?;
    eprintln!("loadgen burst: {} users connected and synced; sending {n} messages at once", 2 * n);
    let tally = Rc::new(RefCell::new(Tally { acks: histogram(), deliveries: histogram(), errors: 0 }));
    let recipients = conns.split_off(n);
    let mut tasks = Vec::with_capacity(2 * n);
    for (mut c, &conv) in recipients.into_iter().zip(&conversations) {
        let tally = tally.clone();
        tasks.push(tokio::task::spawn_local(async move {
            loop {
                let f = c.recv().await?;
                if let ServerMsg::Message { message } = f.body
                    && message.conversation_id == conv
                {
                    let sent: u64 = message.body.parse().context("a burst message's body")?;
                    let mut t = tally.borrow_mut();
                    t.deliveries.record(now_us().saturating_sub(sent).max(1))?;
                    return anyhow::Ok(());
                }
            }
        }));
    }
    // Each sender sends from its own task when the start is given, and reads its
    // ack there: replies are read while later sends still go out, as they arrive.
    let (go, start) = tokio::sync::watch::channel(false);
    for (i, (mut c, conv)) in conns.into_iter().zip(conversations.iter().copied()).enumerate() {
        let (tally, mut start) = (tally.clone(), start.clone());
        tasks.push(tokio::task::spawn_local(async move {
            start.wait_for(|&go| go).await?;
            let at = now_us();
            let send = ClientMsg::Send {
                conversation_id: conv,
                client_msg_id: format!("burst-{i}"),
                body: at.to_string(),
                attachment: None,
            };
            c.send_frame(send).await?;
            loop {
                match c.recv().await?.body {
                    ServerMsg::Ack { conversation_id, .. } if conversation_id == conv => {
                        let mut t = tally.borrow_mut();
                        t.acks.record(now_us().saturating_sub(at).max(1))?;
                        return anyhow::Ok(());
                    }
                    ServerMsg::Error { name, .. } => {
                        tally.borrow_mut().errors += 1;
                        bail!("a burst send failed: {name}");
                    }
                    _ => {}
                }
            }
        }));
    }
    drop(start);
    // A task first polled after this sees the start given and sends at once.
    go.send(true)?;
    let all = futures_util::future::join_all(tasks);
    let timed_out = tokio::time::timeout(args.timeout, all).await.is_err();
    let t = tally.borrow();
    let (acks, deliveries) = (&t.acks, &t.deliveries);
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1e3;
    let row = |h: &Histogram<u64>| {
        format!(
            "{:>6} of {n}  p50 {:.2} ms  p95 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
            h.len(),
            ms(h, 0.5),
            ms(h, 0.95),
            ms(h, 0.99),
            h.max() as f64 / 1e3
        )
    };
    println!("burst: {n} conversations' first messages at once");
    println!("  acks       {}", row(acks));
    println!("  deliveries {}", row(deliveries));
    if t.errors > 0 || timed_out {
        println!("  errors {}, timed out: {timed_out}", t.errors);
    }
    if let Some(path) = &args.json {
        let q = |h: &Histogram<u64>| {
            serde_json::json!({"count": h.len(), "p50": h.value_at_quantile(0.5), "p95": h.value_at_quantile(0.95),
                "p99": h.value_at_quantile(0.99), "max": h.max()})
        };
        let j = serde_json::json!({"conversations": n, "acks_us": q(acks), "deliveries_us": q(deliveries),
            "errors": t.errors, "timed_out": timed_out});
        std::fs::write(path, j.to_string()).with_context(|| format!("writing {}", path.display()))?;
    }
    if acks.len() < n as u64 || deliveries.len() < n as u64 {
        bail!("{} acks and {} deliveries of {n} arrived", acks.len(), deliveries.len());
    }
    Ok(())
}

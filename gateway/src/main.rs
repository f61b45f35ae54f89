use clap::Parser;
use gateway::config::Cli;
use gateway::shutdown::Signal;
use sd_notify::NotifyState;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    // The filter is `SWITCHBOARD_LOG` if set, else the config's `log` once it is read
    // (and again on each SIGHUP); `info` until then.
    let from_env = std::env::var(gateway::LOG_ENV).ok().and_then(|v| EnvFilter::try_new(v).ok());
    let env_wins = from_env.is_some();
    let (filter, filter_handle) =
        tracing_subscriber::reload::Layer::new(from_env.unwrap_or_else(|| EnvFilter::new("info")));
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                // Colour codes only on a terminal, never in journald or log files.
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
        )
        .init();
    let cli = Cli::parse();
    let cfg = cli.load()?;
    let set_log: gateway::reload::SetLog = Box::new(move |directives: &str| {
        let f = EnvFilter::try_new(directives)?;
        filter_handle.reload(f)?;
        Ok(())
    });
    if !env_wins {
        set_log(&cfg.log)?;
    }
    match cli.command {
        Some(gateway::config::Command::Migrate) => {
            println!("{}", gateway::server::migrate(&cfg)?);
            return Ok(());
        }
        Some(gateway::config::Command::Erase) => {
            println!("{}", gateway::server::erase(&cfg)?);
            return Ok(());
        }
        None => {}
    }
    if cli.check_config {
        print!("{}", toml::to_string(&cfg)?);
        eprintln!("configuration ok");
        eprintln!(
            "reloaded on SIGHUP, no restart: {}; every other setting takes effect only on a restart",
            gateway::reload::RELOADABLE.join(", ")
        );
        return Ok(());
    }
    // SIGTERM, SIGINT and SIGHUP are taken by this thread alone (blocked here before
    // the shards start, so every thread inherits the mask).
    let signals = gateway::shutdown::block_signals()?;
    let notice = std::time::Duration::from_millis(cfg.limits.drain_notice_ms);
    let grace = std::time::Duration::from_secs(cfg.limits.shutdown_grace_secs.get());
    let mut reloader = gateway::reload::Reloader::new(cli, &cfg, set_log);
    let running = gateway::server::start(cfg)?;
    tracing::info!(
        addr = %running.addr,
        io_driver = running.io_driver,
        shards = running.shards,
        "switchboard gateway ready"
    );
    // One JSON line on stdout: the readiness signal scripts and tests wait for.
    println!(
        "{}",
        serde_json::json!({
            "ready": true,
            "addr": running.addr.to_string(),
            "io_driver": running.io_driver,
            "shards": running.shards,
            "metrics_addr": running.metrics_addr.map(|a| a.to_string()),
        })
    );
    // Under systemd (`Type=notify`): ready now; reloading and stopping as they happen.
    notify(&[NotifyState::Ready]);
    let sig = loop {
        match gateway::shutdown::wait(&signals)? {
            Signal::Reload => {
                if let Ok(now) = NotifyState::monotonic_usec_now() {
                    notify(&[NotifyState::Reloading, now]);
                }
                reloader.reload_and_report(&running.shared);
                notify(&[NotifyState::Ready]);
            }
            Signal::Stop(name) => break name,
        }
    };
    tracing::info!(signal = sig, "shutting down: draining");
    notify(&[NotifyState::Stopping]);
    let left = gateway::shutdown::drain(&running.shared, notice, grace);
    tracing::info!(connections_left = left, "shut down");
    Ok(())
}

/// Tells systemd (when `NOTIFY_SOCKET` names it; else nothing).
fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        tracing::warn!(error = %e, "telling systemd our state failed");
    }
}

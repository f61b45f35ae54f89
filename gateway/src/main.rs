use clap::Parser;
use gateway::config::Cli;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SWITCHBOARD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal, never in journald or log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let cfg = cli.load()?;
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
        return Ok(());
    }
    // SIGTERM and SIGINT are taken by this thread alone (blocked here before the
    // shards start, so every thread inherits the mask), for a graceful shutdown.
    let signals = gateway::shutdown::block_signals()?;
    let grace = std::time::Duration::from_secs(cfg.limits.shutdown_grace_secs.get());
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
    let sig = gateway::shutdown::wait(&signals)?;
    tracing::info!(signal = sig, "shutting down: closing connections with 1001");
    let left = gateway::shutdown::drain(&running.shared, grace);
    // In a fleet: leave now, so the others take this node's conversations over at
    // their next heartbeat rather than after its registration expires.
    running.shared.router.leave(std::time::Duration::from_secs(2));
    tracing::info!(connections_left = left, "shut down");
    Ok(())
}

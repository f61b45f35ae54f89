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
    if let Some(gateway::config::Command::Migrate) = cli.command {
        println!("{}", gateway::server::migrate(&cfg)?);
        return Ok(());
    }
    if cli.check_config {
        print!("{}", toml::to_string(&cfg)?);
        eprintln!("configuration ok");
        return Ok(());
    }
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
        })
    );
    running.join();
    Ok(())
}

//! loadgen: the capacity-test tool for Switchboard.
//!
//! - `loadgen run --target ws://HOST:PORT ...`: the coordinator; starts local worker
//!   processes (and/or waits for remote ones), merges their results, reports.
//! - `loadgen worker --coordinator HOST:PORT`: one worker process.
//! - `loadgen burst`: many conversations' first messages at once after a gateway
//!   restart (cold caches); `scripts/cold-burst` runs it.
//! - `loadgen floor`: this host's kernel cost of one message (sockets, fsync), to
//!   read a run's gateway CPU per message against.
//!
//! See README.md "Capacity tests" for a walkthrough.

mod burst;
mod clock;
mod coordinator;
mod floor;
mod plan;
mod provision;
mod report;
mod scrape;
mod worker;

use clap::{Parser, Subcommand};

#[cfg_attr(not(feature = "probe_system_alloc"), global_allocator)]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Switchboard capacity-test tool")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a capacity test against a gateway (or a load balancer in front of a fleet).
    Run(Box<coordinator::RunArgs>),
    /// Serve a coordinator as one worker process (started by `run`, or by hand on other hosts).
    Worker {
        #[arg(long)]
        coordinator: String,
    },
    /// Send many conversations' first messages at once (after `--prepare` and a gateway restart).
    Burst(Box<burst::BurstArgs>),
    /// Measure this host's kernel floor for one 1:1 message (loopback sockets, fdatasync).
    Floor(floor::FloorArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(args) => match coordinator::run(*args) {
            Ok(code) => code,
            Err(e) => {
                eprintln!("loadgen: {e:#}");
                2
            }
        },
        Cmd::Worker { coordinator } => {
            let rt =
                tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
            match rt.block_on(worker::run(&coordinator)) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("loadgen worker: {e:#}");
                    2
                }
            }
        }
        Cmd::Burst(args) => match burst::run(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("loadgen burst: {e:#}");
                2
            }
        },
        Cmd::Floor(args) => match floor::run(&args) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("loadgen floor: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}

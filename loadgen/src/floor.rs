//! `loadgen floor`: what this host's kernel charges for one 1:1 message before any
//! gateway code runs, so a capacity test's "gateway CPU per message" can be read
//! against it.
//!
//! A gateway that delivers a 1:1 message does at least: one `recv` of the send, one
//! `send` of the ack, one `send` of the delivery (loopback TCP, where the sending
//! thread also runs the receiver's softirq work), and its share of one durable
//! commit (a journal append and an `fdatasync`). This measures exactly that with
//! plain blocking sockets and a file, as the CPU time of the thread doing it
//! (`getrusage(RUSAGE_THREAD)`), with no framing, parsing, storage engine or
//! scheduling of ours in the way. The client threads' CPU is the least a load
//! generator on the same host pays for the same messages.

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::time::Instant;

/// A delivery frame of a ~100-byte text message, and an ack.
const DELIVERY: usize = 160;
const ACK: usize = 48;
/// A commit's journal append: a couple of messages with their index rows.
const JOURNAL_APPEND: usize = 450;

#[derive(clap::Args)]
pub struct FloorArgs {
    /// Messages per socket measurement.
    #[arg(long, default_value_t = 100_000)]
    pub messages: usize,
    /// Durable commits to time.
    #[arg(long, default_value_t = 3_000)]
    pub commits: usize,
    /// Directory for the commit measurement: the gateway's data disk (a temporary
    /// file is created in it and removed).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Also write the figures as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Floor {
    /// Gateway side: recv + ack + delivery, one message at a time (threads sleep
    /// between messages, as a gateway's do at chat rates).
    socket_us_per_message: f64,
    /// The same with messages queued back to back (no sleeping).
    socket_us_per_message_pipelined: f64,
    /// Client side of the same messages (the sender's send and ack read, the
    /// recipient's read): what a load generator on the same host pays at least.
    client_us_per_message: f64,
    client_us_per_message_pipelined: f64,
    /// CPU of one journal append + fdatasync.
    commit_cpu_us: f64,
    /// Wall time of one journal append + fdatasync.
    commit_wall_us: f64,
    /// CPUs this process may use.
    cpus: usize,
    /// `cpus` divided by the back-to-back gateway + client socket cost: the most 1:1
    /// messages a second one host can carry with its own load generator, before any
    /// application code or commit.
    max_msgs_per_s_with_loadgen: f64,
}

pub fn run(args: &FloorArgs) -> Result<()> {
    let n = args.messages.max(1);
    let (socket_us_per_message, client_us_per_message) = sockets(n, false)?;
    let (socket_us_per_message_pipelined, client_us_per_message_pipelined) = sockets(n, true)?;
    let (commit_cpu_us, commit_wall_us) = commits(&args.dir, args.commits.max(1))?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let f = Floor {
        socket_us_per_message,
        socket_us_per_message_pipelined,
        client_us_per_message,
        client_us_per_message_pipelined,
        commit_cpu_us,
        commit_wall_us,
        cpus,
        max_msgs_per_s_with_loadgen: cpus as f64 * 1e6
            / (socket_us_per_message_pipelined + client_us_per_message_pipelined),
    };
    println!("kernel floor of one 1:1 message on this host (CPU of the threads doing the work):");
    println!("                                          gateway side   client side");
    println!(
        "  send, ack, delivery: one at a time     {:8.2} µs    {:8.2} µs",
        f.socket_us_per_message, f.client_us_per_message
    );
    println!(
        "  send, ack, delivery: back to back      {:8.2} µs    {:8.2} µs",
        f.socket_us_per_message_pipelined, f.client_us_per_message_pipelined
    );
    println!(
        "  durable commit (append + fdatasync)    {:8.2} µs CPU, {:.1} µs wall, in {}",
        f.commit_cpu_us,
        f.commit_wall_us,
        args.dir.display()
    );
    println!(
        "  a gateway message costs at least {:.1} µs + {:.1} µs / B, B = messages per commit (switchboard_commit_batch_size)",
        f.socket_us_per_message_pipelined, f.commit_cpu_us
    );
    println!(
        "  with loadgen on this host too: at most {:.0} msgs/s on {} CPUs, before any application code",
        f.max_msgs_per_s_with_loadgen, f.cpus
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&f)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// CPU time of the calling thread, in microseconds.
fn thread_cpu_us() -> f64 {
    // SAFETY: getrusage writes one rusage into the zeroed struct we own.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut r) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(r.ru_utime) + us(r.ru_stime)
}

/// A connected loopback pair with Nagle off, as the gateway's sockets are.
fn pair() -> Result<(TcpStream, TcpStream)> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback listener")?;
    let a = TcpStream::connect(l.local_addr()?)?;
    let (b, _) = l.accept()?;
    a.set_nodelay(true)?;
    b.set_nodelay(true)?;
    Ok((a, b))
}

/// CPU per message of the "gateway" thread (read a send from the sender, write an
/// ack back, write the delivery to the recipient) and of the client threads.
fn sockets(n: usize, pipelined: bool) -> Result<(f64, f64)> {
    let (mut sender, mut gw_from_sender) = pair()?;
    let (mut gw_to_recipient, mut recipient) = pair()?;
    let mut ack_reader = sender.try_clone()?;
    let recv_thread = std::thread::spawn(move || {
        let (mut b, start) = ([0u8; DELIVERY], thread_cpu_us());
        (0..n).try_for_each(|_| recipient.read_exact(&mut b)).map(|()| thread_cpu_us() - start)
    });
    // Back to back: acks are drained by their own thread, so the sender never waits.
    let acks = pipelined.then(|| {
        std::thread::spawn(move || {
            let (mut b, start) = ([0u8; ACK], thread_cpu_us());
            (0..n).try_for_each(|_| ack_reader.read_exact(&mut b)).map(|()| thread_cpu_us() - start)
        })
    });
    let send_thread = std::thread::spawn(move || -> std::io::Result<f64> {
        let (msg, mut ack, start) = ([1u8; DELIVERY], [0u8; ACK], thread_cpu_us());
        for _ in 0..n {
            sender.write_all(&msg)?;
            if !pipelined {
                sender.read_exact(&mut ack)?;
            }
        }
        Ok(thread_cpu_us() - start)
    });
    let (mut b, ack) = ([0u8; DELIVERY], [2u8; ACK]);
    let start = thread_cpu_us();
    for _ in 0..n {
        gw_from_sender.read_exact(&mut b)?;
        gw_from_sender.write_all(&ack)?;
        gw_to_recipient.write_all(&b)?;
    }
    let cpu = thread_cpu_us() - start;
    let joined = |r: std::thread::Result<std::io::Result<f64>>| -> Result<f64> {
        r.map_err(|_| anyhow::anyhow!("a socket thread panicked"))?.context("loopback socket")
    };
    let mut client = joined(send_thread.join())? + joined(recv_thread.join())?;
    if let Some(t) = acks {
        client += joined(t.join())?;
    }
    Ok((cpu / n as f64, client / n as f64))
}

/// CPU and wall time of one append + `fdatasync` in `dir`.
fn commits(dir: &std::path::Path, n: usize) -> Result<(f64, f64)> {
    let path = dir.join(format!(".loadgen-floor-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let rec = [3u8; JOURNAL_APPEND];
    let (cpu0, wall0) = (thread_cpu_us(), Instant::now());
    let r = (0..n).try_for_each(|_| {
        f.write_all(&rec)?;
        f.sync_data()
    });
    let (cpu, wall) = (thread_cpu_us() - cpu0, wall0.elapsed().as_secs_f64() * 1e6);
    let _ = std::fs::remove_file(&path);
    r.with_context(|| format!("appending to {}", path.display()))?;
    Ok((cpu / n as f64, wall / n as f64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_socket_measurements_finish_and_count_cpu() {
        for pipelined in [false, true] {
            let (gateway, client) = sockets(2_000, pipelined).unwrap();
            for us in [gateway, client] {
                assert!(us.is_finite() && us > 0.0, "pipelined={pipelined}: {gateway} {client}");
            }
        }
    }

    #[test]
    fn the_commit_measurement_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (cpu, wall) = commits(dir.path(), 20).unwrap();
        assert!(cpu > 0.0 && wall > 0.0, "{cpu} {wall}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_missing_directory_is_a_clear_error() {
        let e = commits(std::path::Path::new("/nonexistent/switchboard"), 1).unwrap_err();
        assert!(format!("{e:#}").contains("creating /nonexistent/switchboard"), "{e:#}");
    }
}

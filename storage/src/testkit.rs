//! Test support (feature `testkit`): a real PostgreSQL server from Debian's
//! `postgresql` package, on a free loopback port in a temporary directory; and
//! the Cassandra cluster the environment names, if any ([`cassandra_from_env`]).
//!
//! One server per test process ([`TestPostgres::shared`]); each test takes a
//! fresh database from it ([`TestPostgres::fresh_database`]). The server runs as
//! the `postgres` user when the tests run as root (PostgreSQL refuses root), dies
//! with the test process (immediate shutdown at exit, and `PR_SET_PDEATHSIG`
//! from a thread that never exits if the process is killed), and
//! its directory is removed at exit.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

pub struct TestPostgres {
    pub port: u16,
    bin: PathBuf,
    dir: PathBuf,
    user: Option<(u32, u32)>,
}

static SHARED: OnceLock<TestPostgres> = OnceLock::new();
static CHILD_PID: AtomicU32 = AtomicU32::new(0);
static DIR: OnceLock<PathBuf> = OnceLock::new();

extern "C" fn cleanup_at_exit() {
    let pid = CHILD_PID.load(Ordering::SeqCst);
    if pid != 0 {
        // SIGQUIT is PostgreSQL's immediate shutdown: the postmaster stops its
        // children and reaps them before it exits, so nothing is left behind.
        // SAFETY: signalling and reaping our own child; a stale pid is at worst ESRCH/ECHILD.
        unsafe {
            libc::kill(pid as libc::pid_t, libc::SIGQUIT);
            libc::waitpid(pid as libc::pid_t, std::ptr::null_mut(), 0);
        }
    }
    if let Some(d) = DIR.get() {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// The newest `postgres` binary directory Debian installed (or `SWITCHBOARD_PG_BIN`).
fn bin_dir() -> PathBuf {
    if let Ok(p) = std::env::var("SWITCHBOARD_PG_BIN") {
        return PathBuf::from(p);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, p)| p.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, p)| p).unwrap_or_else(|| {
        panic!("no PostgreSQL server found: run ./scripts/test (it installs Debian's postgresql) or set SWITCHBOARD_PG_BIN")
    })
}

/// The `postgres` account's uid/gid when we are root (PostgreSQL will not run as root).
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let name = std::ffi::CString::new("postgres").expect("no nul");
    // SAFETY: getpwnam returns a pointer to static storage or null; read at once.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "running as root needs the `postgres` account (Debian's postgresql package creates it)"
    );
    // SAFETY: checked non-null above.
    Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl TestPostgres {
    /// The process's server, started on first use.
    pub fn shared() -> &'static TestPostgres {
        SHARED.get_or_init(|| {
            // The child is spawned (and its death signal tied to) a thread that lives
            // as long as the process.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name("test-postgres".into())
                .spawn(move || {
                    tx.send(TestPostgres::start()).expect("receiver waits");
                    loop {
                        std::thread::park();
                    }
                })
                .expect("spawning the postgres keeper");
            let pg = rx.recv().expect("postgres keeper answered");
            // SAFETY: registering a plain extern "C" fn.
            unsafe { libc::atexit(cleanup_at_exit) };
            pg
        })
    }

    fn start() -> TestPostgres {
        let bin = bin_dir();
        let user = run_as();
        let dir = std::env::temp_dir().join(format!("switchboard-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the postgres dir");
        DIR.set(dir.clone()).expect("one server per process");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown to postgres");
        }
        let data = dir.join("data");
        let out = Self::command(&bin, "initdb", user)
            .args(["-D"])
            .arg(&data)
            .args(["-U", "switchboard", "--auth=trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .output()
            .expect("running initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        // A port picked free can be taken before the server binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Self::command(&bin, "postgres", user)
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
                .arg(format!("unix_socket_directories={}", dir.display()))
                .args(["-c", "max_connections=300", "-c", "shared_buffers=64MB"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting postgres");
            CHILD_PID.store(child.id(), Ordering::SeqCst);
            if Self::wait_ready(&mut child) {
                return TestPostgres { port, bin, dir, user };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("postgres did not start; its log is above");
    }

    fn command(bin: &Path, tool: &str, user: Option<(u32, u32)>) -> Command {
        let mut c = Command::new(bin.join(tool));
        if let Some((uid, gid)) = user {
            c.uid(uid).gid(gid);
        }
        c.env("LC_ALL", "C.UTF-8");
        // SAFETY: prctl is async-signal-safe; it only ties the child's life to this thread's.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        c
    }

    /// Reads the server's log until it is ready (true) or has exited (false).
    fn wait_ready(child: &mut Child) -> bool {
        let stderr = child.stderr.take().expect("piped");
        let mut lines = BufReader::new(stderr).lines();
        let ready = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if l.contains("database system is ready to accept connections") {
                        break true;
                    }
                    if l.contains("FATAL") {
                        eprintln!("postgres: {l}");
                    }
                }
                _ => break false,
            }
        };
        // Keep draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ready
    }

    /// A new, empty database; returns its URL.
    pub fn fresh_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!("t{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst));
        // Concurrent CREATE DATABASE calls fail while another copies template1.
        static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
        let out = Self::command(&self.bin, "createdb", self.user)
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "switchboard", &name])
            .output()
            .expect("running createdb");
        assert!(out.status.success(), "createdb failed: {}", String::from_utf8_lossy(&out.stderr));
        self.url(&name)
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://switchboard@127.0.0.1:{}/{database}", self.port)
    }

    /// Where the server keeps its files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// Options for the Cassandra or ScyllaDB cluster in `SWITCHBOARD_CASSANDRA`
/// (`host:port[,host:port...]`), with its local datacenter from
/// `SWITCHBOARD_CASSANDRA_DC` (default `datacenter1`, a stock Cassandra's) and
/// optional `SWITCHBOARD_CASSANDRA_USER`/`_PASSWORD`, for a test keyspace
/// (replication factor 1). `None` when no cluster is configured: none can be
/// installed on the machines this repo is built on.
pub fn cassandra_from_env(keyspace: &str) -> Option<crate::CassandraOptions> {
    let nodes = std::env::var("SWITCHBOARD_CASSANDRA").ok().filter(|v| !v.trim().is_empty())?;
    let dc = std::env::var("SWITCHBOARD_CASSANDRA_DC").unwrap_or_else(|_| "datacenter1".into());
    Some(crate::CassandraOptions {
        contact_points: nodes.split(',').map(|n| n.trim().to_owned()).collect(),
        keyspace: keyspace.to_owned(),
        local_dc: Some(dc.clone()),
        consistency: "local_quorum".into(),
        replication: [(dc, 1)].into(),
        username: std::env::var("SWITCHBOARD_CASSANDRA_USER").ok(),
        password: std::env::var("SWITCHBOARD_CASSANDRA_PASSWORD").ok(),
        connect_timeout: std::time::Duration::from_secs(10),
        request_timeout: std::time::Duration::from_secs(10),
        idempotency_ttl: std::time::Duration::from_secs(3600),
    })
}

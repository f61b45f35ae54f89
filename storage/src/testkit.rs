//! Test support (feature `testkit`): a real PostgreSQL server from Debian's
//! `postgresql` package, on a free loopback port in a temporary directory; and
//! the Cassandra cluster the environment names ([`cassandra_from_env`]), which
//! `scripts/cassandra` starts from Cassandra's Maven Central jars.
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
                // As docs/protocol.md asks of deployments, so that erasure can be checked.
                .args(["-c", "wal_recycle=off"])
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

    /// The key of message `(conv, seq)` in `message_keys` of the database at `url`
    /// (the erasure tests search the server's files for it).
    pub fn message_key(&self, url: &str, conv: u64, seq: u64) -> Vec<u8> {
        let sql = format!(
            "SELECT encode(key, 'hex') FROM message_keys WHERE conversation_id = {conv} AND seq = {seq}"
        );
        let hex = self.psql(url, &sql);
        let hex = hex.trim();
        assert_eq!(hex.len(), 64, "message {seq} has one 32-byte key");
        (0..32).map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex")).collect()
    }

    /// Runs `sql` with psql on `url`; its rows, unaligned, `|`-separated.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Self::command(&self.bin, "psql", self.user)
            .args([url, "-XAtq", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("running psql");
        assert!(out.status.success(), "psql failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

/// Options for the Cassandra or ScyllaDB cluster in `SWITCHBOARD_CASSANDRA`
/// (`host:port[,host:port...]`), with its local datacenter from
/// `SWITCHBOARD_CASSANDRA_DC` (default `datacenter1`, a stock Cassandra's) and
/// optional `SWITCHBOARD_CASSANDRA_USER`/`_PASSWORD`, for a test keyspace
/// (replication factor `SWITCHBOARD_CASSANDRA_RF`, default 1). `None` when no
/// cluster is configured (`scripts/cassandra start` runs one and prints the
/// variable; `scripts/test` does so itself).
///
/// Test keyspaces are named `sb_<suite>_<pid>[_<n>]`. The first call in a
/// process drops those of test processes that have ended, so a cluster that
/// serves many test runs (or one run's many test binaries) holds only the live
/// ones: every table costs a Cassandra node heap, whether used or not.
pub fn cassandra_from_env(keyspace: &str) -> Option<crate::CassandraOptions> {
    let nodes = std::env::var("SWITCHBOARD_CASSANDRA").ok().filter(|v| !v.trim().is_empty())?;
    let opts = cassandra_options(&nodes, keyspace);
    static SWEPT: std::sync::Once = std::sync::Once::new();
    SWEPT.call_once(|| drop_dead_runs_keyspaces(&opts));
    Some(opts)
}

/// A Cassandra node of a test's own, which it may kill and restart: started by
/// `scripts/cassandra` (jars from Maven Central, OpenJDK 17) in a temp dir, and
/// stopped (its processes ended, its dir removed) when dropped.
pub struct TestCassandra {
    /// `host:port` of its native transport.
    pub contact: String,
    state: tempfile_dir::Dir,
}

/// A directory removed on drop (the testkit has no tempfile dependency).
mod tempfile_dir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl TestCassandra {
    fn script(&self, args: &[&str]) -> String {
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cassandra"))
            .args(args)
            .arg("--state")
            .arg(self.state.0.join("state"))
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/cassandra");
        assert!(out.status.success(), "scripts/cassandra {args:?} failed (its output is above)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a single node and waits until it answers CQL.
    pub fn start() -> TestCassandra {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-test-cassandra-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("creating the node's state dir");
        let mut node = TestCassandra { contact: String::new(), state: tempfile_dir::Dir(dir) };
        let out = node.script(&["start"]);
        node.contact = out
            .lines()
            .find_map(|l| l.strip_prefix("SWITCHBOARD_CASSANDRA="))
            .expect("scripts/cassandra prints the contact point")
            .to_owned();
        node
    }

    /// SIGKILL: no drain, no flush; the data dir stays.
    pub fn kill9(&self) {
        self.script(&["kill9", "1"]);
    }

    /// Starts the killed node again on its data and port; returns once it answers CQL.
    pub fn restart(&self) {
        self.script(&["restart", "1"]);
    }

    /// Runs `nodetool args` against the node (over JMX on loopback); returns its output.
    pub fn nodetool(&self, args: &[&str]) -> String {
        let mut all = vec!["nodetool", "1", "--state"];
        let state = self.state.0.join("state");
        all.push(state.to_str().expect("a utf-8 temp path"));
        all.push("--");
        all.extend_from_slice(args);
        let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cassandra"))
            .args(&all)
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/cassandra nodetool");
        assert!(out.status.success(), "nodetool {args:?} failed (its output is above)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node's directory: `data/` (SSTables, commit log, hints, caches) and `logs/`.
    pub fn node_dir(&self) -> PathBuf {
        let state =
            std::fs::read_to_string(self.state.0.join("state")).expect("reading the node's state file");
        let root =
            state.lines().find_map(|l| l.strip_prefix("root=")).expect("the state names the node's root");
        PathBuf::from(root).join("node1")
    }

    /// Options for `keyspace` on this node (replication factor 1).
    pub fn options(&self, keyspace: &str) -> crate::CassandraOptions {
        let mut opts = cassandra_options(&self.contact, keyspace);
        opts.replication.values_mut().for_each(|rf| *rf = 1);
        opts
    }
}

impl Drop for TestCassandra {
    fn drop(&mut self) {
        if !self.contact.is_empty() {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/cassandra"))
                .args(["stop", "--state"])
                .arg(self.state.0.join("state"))
                .status();
        }
    }
}

/// The process id in a test keyspace's name (`sb_<suite>_<pid>[_<n>]`).
fn test_keyspace_pid(name: &str) -> Option<u32> {
    let mut parts = name.strip_prefix("sb_")?.split('_');
    parts.next()?;
    parts.next()?.parse().ok()
}

fn drop_dead_runs_keyspaces(opts: &crate::CassandraOptions) {
    let Ok(store) = crate::CassandraStore::connect(opts) else { return };
    let alive = |pid: u32| Path::new(&format!("/proc/{pid}")).exists();
    for ks in store.keyspaces().unwrap_or_default() {
        if test_keyspace_pid(&ks).is_some_and(|pid| !alive(pid)) {
            let _ = store.drop_other_keyspace(&ks);
        }
    }
}

fn cassandra_options(nodes: &str, keyspace: &str) -> crate::CassandraOptions {
    let dc = std::env::var("SWITCHBOARD_CASSANDRA_DC").unwrap_or_else(|_| "datacenter1".into());
    crate::CassandraOptions {
        contact_points: nodes.split(',').map(|n| n.trim().to_owned()).collect(),
        keyspace: keyspace.to_owned(),
        local_dc: Some(dc.clone()),
        consistency: "local_quorum".into(),
        replication: [(
            dc,
            std::env::var("SWITCHBOARD_CASSANDRA_RF").ok().and_then(|r| r.parse().ok()).unwrap_or(1),
        )]
        .into(),
        username: std::env::var("SWITCHBOARD_CASSANDRA_USER").ok(),
        password: std::env::var("SWITCHBOARD_CASSANDRA_PASSWORD").ok(),
        connect_timeout: std::time::Duration::from_secs(10),
        request_timeout: std::time::Duration::from_secs(10),
        idempotency_ttl: std::time::Duration::from_secs(3600),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn test_keyspaces_name_their_process() {
        assert_eq!(super::test_keyspace_pid("sb_e2e_4242_7"), Some(4242));
        assert_eq!(super::test_keyspace_pid("sb_gateway_99"), Some(99));
        assert_eq!(super::test_keyspace_pid("switchboard"), None);
        assert_eq!(super::test_keyspace_pid("sb_chat"), None);
        assert_eq!(super::test_keyspace_pid("system_auth"), None);
    }
}

//! Real Redis for tests: Debian's redis-server, on free loopback ports, in a
//! temp dir of its own, no persistence; stopped and removed on drop. One
//! server ([`TestRedis::start`]) or a Redis Cluster of three masters
//! ([`TestRedis::start_cluster`], created with `redis-cli --cluster create`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    /// `redis://127.0.0.1:PORT`, comma-separated for a cluster's nodes.
    pub url: String,
    pub cluster: bool,
    servers: Vec<Server>,
    dir: PathBuf,
}

struct Server {
    port: u16,
    dir: PathBuf,
    cluster: bool,
    child: Option<Child>,
}

const READY: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port()
}

impl Server {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts redis-server; `false` if it exited (its port was taken meanwhile).
    fn launch(&mut self) -> bool {
        std::fs::create_dir_all(&self.dir).expect("creating the redis dir");
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("creating the redis log");
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--bind",
            "127.0.0.1",
            "--port",
            &self.port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&self.dir);
        if self.cluster {
            // A restarted node finds the cluster again in its dir's nodes.conf;
            // node timeout short, so failures show fast.
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", "2000"]);
        }
        let child = cmd
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .expect("starting redis-server (apt-get install redis-server; scripts/test does)");
        self.child = Some(child);
        let deadline = Instant::now() + READY;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                eprintln!("redis-server exited ({status}) on port {}", self.port);
                self.child = None;
                return false;
            }
            if ping(&self.url()) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING within {READY:?}", self.port);
    }

    fn start(dir: PathBuf, cluster: bool) -> Server {
        for _ in 0..5 {
            let mut s = Server { port: free_port(), dir: dir.clone(), cluster, child: None };
            if s.launch() {
                return s;
            }
        }
        panic!("redis-server did not start on five free ports; see {}", dir.display());
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn ping(url: &str) -> bool {
    let Ok(client) = redis::Client::open(url) else { return false };
    let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) else { return false };
    redis::cmd("PING").query::<String>(&mut c).is_ok_and(|p| p == "PONG")
}

/// Waits until every server reports `cluster_state:ok`.
fn cluster_ok(servers: &[Server]) {
    let deadline = Instant::now() + READY;
    for s in servers {
        loop {
            let info: Option<String> = redis::Client::open(s.url())
                .ok()
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)).ok())
                .and_then(|mut c| redis::cmd("CLUSTER").arg("INFO").query(&mut c).ok());
            if info.is_some_and(|i| i.contains("cluster_state:ok")) {
                break;
            }
            assert!(Instant::now() < deadline, "node {} never reported cluster_state:ok", s.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn temp_dir(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "switchboard-test-{what}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
    ))
}

impl TestRedis {
    /// Starts one server and waits until it answers PING.
    pub fn start() -> TestRedis {
        let dir = temp_dir("redis");
        let server = Server::start(dir.clone(), false);
        TestRedis { url: server.url(), cluster: false, servers: vec![server], dir }
    }

    /// Starts three cluster-enabled servers, makes them a cluster of three
    /// masters (no replicas) and waits until every node reports `cluster_state:ok`.
    pub fn start_cluster() -> TestRedis {
        let dir = temp_dir("redis-cluster");
        let servers: Vec<Server> =
            (0..3).map(|i| Server::start(dir.join(format!("node{i}")), true)).collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(servers.iter().map(|s| format!("127.0.0.1:{}", s.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("running redis-cli --cluster create");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        cluster_ok(&servers);
        let url = servers.iter().map(Server::url).collect::<Vec<_>>().join(",");
        TestRedis { url, cluster: true, servers, dir }
    }

    /// Options for this Redis: its URL(s), cluster or not, a short timeout.
    pub fn options(&self) -> crate::RedisOptions {
        crate::RedisOptions {
            cluster: self.cluster,
            timeout: Duration::from_millis(500),
            ..crate::RedisOptions::new(&self.url)
        }
    }

    /// Whether every server answers PING now.
    pub fn ping(&self) -> bool {
        self.servers.iter().all(|s| ping(&s.url()))
    }

    /// SIGKILL every server: they and everything they held are gone.
    pub fn kill(&mut self) {
        assert!(!self.cluster, "a cluster's nodes are not restarted here");
        self.servers.iter_mut().for_each(Server::kill);
    }

    /// Kills master `i` of the cluster and starts it again on its port: it rejoins
    /// with its slots (its `nodes.conf` is kept) and without its data (no
    /// persistence). Returns once every node reports `cluster_state:ok`.
    pub fn restart_master(&mut self, i: usize) {
        assert!(self.cluster, "restart_master is for a cluster");
        self.servers[i].kill();
        assert!(self.servers[i].launch(), "redis-server did not come back on port {}", self.servers[i].port);
        cluster_ok(&self.servers);
    }

    /// Freezes every server (SIGSTOP): connections stay open and nothing is
    /// answered, as a stuck or swapping Redis looks to its clients.
    pub fn pause(&mut self) {
        self.signal("-STOP");
    }

    /// Thaws them (SIGCONT), with everything they held.
    pub fn resume(&mut self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        for s in &self.servers {
            if let Some(c) = &s.child {
                let sent = Command::new("kill").arg(sig).arg(c.id().to_string()).status();
                assert!(sent.is_ok_and(|st| st.success()), "kill {sig} redis-server on port {}", s.port);
            }
        }
    }

    /// Starts the servers again after [`kill`](Self::kill), on the same ports (empty).
    pub fn revive(&mut self) {
        for s in &mut self.servers {
            assert!(s.launch(), "redis-server did not come back on port {}", s.port);
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        for s in &mut self.servers {
            assert!(s.launch(), "redis-server did not come back on port {}", s.port);
        }
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.servers.iter_mut().for_each(Server::kill);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

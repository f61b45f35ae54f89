//! A real redis-server for tests: Debian's binary, on a free loopback port, in
//! a temp dir of its own, no persistence; stopped and removed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct TestRedis {
    /// `redis://127.0.0.1:PORT`.
    pub url: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

const READY: Duration = Duration::from_secs(20);

impl TestRedis {
    /// Starts a server and waits until it answers PING.
    pub fn start() -> TestRedis {
        let dir = std::env::temp_dir().join(format!(
            "switchboard-test-redis-{}-{}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("creating the redis dir");
        // A port the kernel just handed out; should another process take it
        // before redis binds, start fails and the next port is tried.
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut r =
                TestRedis { url: format!("redis://127.0.0.1:{port}"), port, dir: dir.clone(), child: None };
            if r.launch() {
                return r;
            }
        }
        panic!("redis-server did not start on five free ports; see {}", dir.display());
    }

    fn launch(&mut self) -> bool {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("creating the redis log");
        let child = Command::new("redis-server")
            .args([
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
            .arg(&self.dir)
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
            if self.ping() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING within {READY:?}", self.port);
    }

    /// Whether the server answers PING now.
    pub fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url.as_str()) else { return false };
        let Ok(mut c) = client.get_connection_with_timeout(Duration::from_millis(200)) else { return false };
        redis::cmd("PING").query::<String>(&mut c).is_ok_and(|p| p == "PONG")
    }

    /// SIGKILL: the server and everything it held are gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port (empty: no persistence).
    pub fn restart(&mut self) {
        self.kill();
        assert!(self.launch(), "redis-server did not come back on port {}", self.port);
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

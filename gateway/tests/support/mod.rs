//! Shared harness: starts the real gateway binary on port 0 and waits for its
//! readiness line; a blocking WebSocket client that speaks both subprotocols.
#![allow(dead_code)]

use protocol::{ClientFrame, ClientMsg, ServerFrame, ServerMsg, Subprotocol};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tungstenite::client::IntoClientRequest;
use tungstenite::{Message, WebSocket};

/// Every wait in these tests is bounded by this: a hung gateway fails the test instead of hanging CI.
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub const SECRET: &str = "test-secret-test-secret-test-secret!";
pub const ADMIN: &str = "admin-secret-admin-secret-admin-secret";

/// With `SWITCHBOARD_TEST_STORE=postgres` every gateway runs on PostgreSQL: a
/// real server (one per test process) and a fresh database per gateway directory,
/// kept across restarts on that directory. With `SWITCHBOARD_TEST_STORE=cassandra`
/// (and `SWITCHBOARD_CASSANDRA=host:port`, `SWITCHBOARD_CASSANDRA_DC`) the same on a
/// fresh keyspace per directory. Unset: the embedded store.
fn test_store(dir: &Path) -> Option<toml::Table> {
    let mut t = toml::Table::new();
    match std::env::var("SWITCHBOARD_TEST_STORE").as_deref() {
        Err(_) | Ok("") | Ok("embedded") => return None,
        Ok("postgres") => {
            let marker = dir.join("postgres-url");
            let url = std::fs::read_to_string(&marker).unwrap_or_else(|_| {
                let url = storage::testkit::TestPostgres::shared().fresh_database();
                std::fs::write(&marker, &url).unwrap();
                url
            });
            let mut pg = toml::Table::new();
            pg.insert("url".into(), url.into());
            pg.insert("pool_size".into(), 4.into());
            t.insert("backend".into(), "postgres".into());
            t.insert("postgres".into(), toml::Value::Table(pg));
        }
        Ok("cassandra") => {
            let c =
                cassandra_options(dir).expect("SWITCHBOARD_TEST_STORE=cassandra needs SWITCHBOARD_CASSANDRA");
            let mut cs = toml::Table::new();
            cs.insert("contact_points".into(), c.contact_points.into());
            cs.insert("keyspace".into(), c.keyspace.into());
            cs.insert("local_dc".into(), c.local_dc.unwrap_or_default().into());
            let replication: toml::Table =
                c.replication.into_iter().map(|(dc, rf)| (dc, i64::from(rf).into())).collect();
            cs.insert("replication".into(), toml::Value::Table(replication));
            t.insert("backend".into(), "cassandra".into());
            t.insert("cassandra".into(), toml::Value::Table(cs));
        }
        Ok(other) => panic!("SWITCHBOARD_TEST_STORE={other}: expected embedded, postgres or cassandra"),
    }
    t.insert("migrate_on_start".into(), true.into());
    Some(t)
}

/// The test cluster's options with this directory's keyspace (from `SWITCHBOARD_CASSANDRA`).
fn cassandra_options(dir: &Path) -> Option<storage::CassandraOptions> {
    let marker = dir.join("cassandra-keyspace");
    let keyspace = std::fs::read_to_string(&marker).unwrap_or_else(|_| {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("sb_e2e_{}_{n}", std::process::id())
    });
    let opts = storage::testkit::cassandra_from_env(&keyspace)?;
    std::fs::write(&marker, &keyspace).unwrap();
    Some(opts)
}

/// A `[storage]` section for Cassandra at `nodes`, replication factor 1 in `dc`.
#[allow(dead_code)]
pub fn storage_toml(
    nodes: &[String],
    dc: &str,
    keyspace: &str,
    migrate_on_start: bool,
    extra: &str,
) -> String {
    let nodes: Vec<String> = nodes.iter().map(|n| format!("{n:?}")).collect();
    format!(
        "[storage]\nbackend = \"cassandra\"\nmigrate_on_start = {migrate_on_start}\n[storage.cassandra]\n\
         contact_points = [{}]\nkeyspace = \"{keyspace}\"\nlocal_dc = \"{dc}\"\nreplication = {{ \"{dc}\" = 1 }}\n\
         connect_timeout_ms = 3000\n{extra}",
        nodes.join(", ")
    )
}

/// Runs `gateway <args>` (e.g. `migrate`, `--check-config`) with `config` on `dir`;
/// returns (success, stdout, stderr).
#[allow(dead_code)]
pub fn gateway_cmd(dir: &Path, config: &str, args: &[&str]) -> (bool, String, String) {
    let path = dir.join("cmd.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gateway"))
        .args(args)
        .arg("--config")
        .arg(&path)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .output()
        .unwrap();
    let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), s(&out.stdout), s(&out.stderr))
}

/// Node A (on `config`, a shared store) stores 120 messages and is killed; node
/// B, another process on another data directory and the same config, serves
/// the accounts, the history and the idempotency keys, and continues the
/// positions. Returns node B.
#[allow(dead_code)]
pub fn second_node_serves_the_history(config: &str) -> TestGateway {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = TestGateway::start_in(dir_a.path(), config);
    let (_, tz) = a.user("zoe");
    let (y, _) = a.user("yuri");
    let mut c = a.connect(&tz, Subprotocol::FlatBuffers);
    c.sync(vec![]);
    let conv = conversation_id(&c.request(ClientMsg::CreateDirect { user_id: y }));
    for i in 0..120 {
        c.send_text(conv, &format!("m{i}"), &format!("body {i}"));
    }
    for i in 0..120 {
        c.wait_ack(&format!("m{i}"));
    }
    a.kill9();

    let b = TestGateway::start_in(dir_b.path(), config);
    let (status, l) = b.login("zoe", "password123");
    assert_eq!(status, 200, "accounts are shared: {l}");
    let mut c = b.connect(l["token"].as_str().unwrap(), Subprotocol::Json);
    c.sync(vec![protocol::Position { conversation_id: conv, seq: 120 }]);
    let ServerMsg::History { messages, has_more, .. } =
        c.request(ClientMsg::History { conversation_id: conv, before: None, after: None, limit: Some(100) })
    else {
        panic!("expected history")
    };
    assert!(has_more);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (21..=120).rev().collect::<Vec<_>>());
    assert_eq!(messages[0].body, "body 119");
    // Idempotency keys are shared too: a resend of m5 is acked with its old position.
    c.send_text(conv, "m5", "body 5");
    assert_eq!(c.wait_ack("m5"), 6);
    c.send_text(conv, "new", "after the move");
    assert_eq!(c.wait_ack("new"), 121, "positions continue where node A stopped");
    let mut b = b;
    b._tmp = Some(dir_b);
    b
}

/// Opens the store a stopped gateway on `dir` used (embedded, or its PostgreSQL database).
#[allow(dead_code)]
pub fn open_store(dir: &Path) -> std::sync::Arc<dyn storage::Store> {
    if dir.join("cassandra-keyspace").exists() {
        let opts = cassandra_options(dir).expect("SWITCHBOARD_CASSANDRA is set");
        return std::sync::Arc::new(
            storage::CassandraStore::connect(&opts).expect("connect to the test cluster"),
        );
    }
    match std::fs::read_to_string(dir.join("postgres-url")) {
        Ok(url) => std::sync::Arc::new(
            storage::PostgresStore::connect(&storage::PostgresOptions {
                url,
                pool_size: 2,
                connect_timeout: std::time::Duration::from_secs(10),
                statement_timeout: std::time::Duration::from_secs(10),
            })
            .expect("connect to the test database"),
        ),
        Err(_) => {
            std::sync::Arc::new(storage::FjallStore::open(&dir.join("data/store")).expect("open the store"))
        }
    }
}

pub struct TestGateway {
    child: Child,
    pub addr: SocketAddr,
    /// Where `/metrics` is served, when `metrics_listen` is configured.
    pub metrics_addr: Option<SocketAddr>,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl TestGateway {
    pub fn start() -> TestGateway {
        let tmp = tempfile::tempdir().unwrap();
        let mut g = Self::start_in(tmp.path(), "");
        g._tmp = Some(tmp);
        g
    }

    /// Starts on `dir` (reused across restarts) with extra TOML appended to the test config.
    pub fn start_in(dir: &Path, extra: &str) -> TestGateway {
        Self::start_with_args(dir, extra, &[])
    }

    /// `extra` is merged over the test config, table by table.
    pub fn start_with_args(dir: &Path, extra: &str, args: &[&str]) -> TestGateway {
        let text = Self::config_text(dir, extra);
        Self::start_with_config(dir, &text, args)
    }

    /// The test config with `extra` merged over it, table by table.
    fn config_text(dir: &Path, extra: &str) -> String {
        // Cheap hashing keeps registration fast in tests; production uses the OWASP defaults.
        // Send and group limits are lifted, and anyone may add anyone to a group, because
        // many tests pipeline hundreds of sends or set groups up with fresh users;
        // tests/rate_limits.rs and tests/hardening.rs check those rules themselves.
        let base = format!(
            "shards = 2\n[auth]\ntoken_secret = \"{SECRET}\"\nadmin_secret = \"{ADMIN}\"\nargon2_memory_kib = 256\nargon2_iterations = 1\n[limits]\nsend_per_sec = 1000000\nsend_burst = 1000000\ngroup_adds = \"anyone\"\ngroups_burst = 1000000\ndrain_notice_ms = 0\n"
        );
        let mut config: toml::Table = base.parse().unwrap();
        for (k, v) in extra.parse::<toml::Table>().expect("extra config is TOML") {
            match (config.get_mut(&k), v) {
                (Some(toml::Value::Table(t)), toml::Value::Table(over)) => t.extend(over),
                (_, v) => {
                    config.insert(k, v);
                }
            }
        }
        // A test that configures its own storage keeps it.
        if !config.contains_key("storage")
            && let Some(storage) = test_store(dir)
        {
            config.insert("storage".into(), toml::Value::Table(storage));
        }
        toml::to_string(&config).unwrap()
    }

    /// Starts with exactly this config file text.
    pub fn start_with_config(dir: &Path, config: &str, args: &[&str]) -> TestGateway {
        Self::spawn(dir, config, args, None, &[])
    }

    /// Like [`start_in`](Self::start_in), with these environment variables set.
    pub fn start_with_env(dir: &Path, extra: &str, env: &[(&str, &str)]) -> TestGateway {
        let text = Self::config_text(dir, extra);
        Self::spawn(dir, &text, &[], None, env)
    }

    /// Like [`start_in`](Self::start_in), with the process's open-files limit (soft and
    /// hard) set to `nofile`, as an operator's `LimitNOFILE` would.
    pub fn start_with_nofile(dir: &Path, extra: &str, nofile: u64) -> TestGateway {
        let text = Self::config_text(dir, extra);
        Self::spawn(dir, &text, &[], Some(nofile), &[])
    }

    fn spawn(
        dir: &Path,
        config: &str,
        args: &[&str],
        nofile: Option<u64>,
        env: &[(&str, &str)],
    ) -> TestGateway {
        let cfg = dir.join("gateway.toml");
        std::fs::write(&cfg, config).unwrap();
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(dir.join("gateway.log")).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd
            .envs(env.iter().copied())
            .arg("--config")
            .arg(&cfg)
            .arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start gateway");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("readiness line");
        let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "gateway did not become ready: {line:?}\n{}",
                std::fs::read_to_string(dir.join("gateway.log")).unwrap_or_default()
            )
        });
        assert_eq!(ready["ready"], true);
        let addr = ready["addr"].as_str().unwrap().parse().unwrap();
        let metrics_addr = ready["metrics_addr"].as_str().map(|a| a.parse().unwrap());
        TestGateway { child, addr, metrics_addr, dir: dir.to_owned(), _tmp: None }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM (the shutdown an orchestrator asks for) and waits for the exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        self.child.wait().unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("gateway.log")).unwrap_or_default()
    }

    /// Sends `sig` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) and returns at once.
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }

    /// Waits for the process to end by itself.
    pub fn wait_exit(mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }

    /// `/readyz`: the status and the reason it gives when failing ("" when ready).
    pub fn readyz(&self) -> (u16, String) {
        let (status, body) = self.http("GET", "/readyz", None);
        (status, body["reason"].as_str().unwrap_or_default().to_owned())
    }

    /// SIGKILL, no shutdown path at all.
    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// One HTTP request; returns status and parsed JSON body.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
        let (status, body) = http_raw(self.addr, method, path, &[], body);
        (status, serde_json::from_str(&body).unwrap_or(serde_json::Value::Null))
    }

    pub fn register(&self, username: &str, password: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"username": username, "password": password}).to_string();
        self.http("POST", "/v1/register", Some(&body))
    }

    pub fn login(&self, username: &str, password: &str) -> (u16, serde_json::Value) {
        let body = serde_json::json!({"username": username, "password": password}).to_string();
        self.http("POST", "/v1/login", Some(&body))
    }

    /// Registers and logs in; returns (user id, token).
    pub fn user(&self, username: &str) -> (u64, String) {
        let (s, r) = self.register(username, "password123");
        assert_eq!(s, 201, "{r}");
        let (s, l) = self.login(username, "password123");
        assert_eq!(s, 200, "{l}");
        (l["user_id"].as_str().unwrap().parse().unwrap(), l["token"].as_str().unwrap().to_owned())
    }

    pub fn connect(&self, token: &str, proto: Subprotocol) -> Client {
        Client::connect(self.addr, token, proto)
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    let body = body.unwrap_or("");
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\n", body.len());
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("connection")) {
        req.push_str("connection: close\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).unwrap();
    // Read the head, then exactly content-length bytes (a 101 leaves the socket open).
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).unwrap() == 0 {
            break;
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let len = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub struct Client {
    pub ws: WebSocket<TcpStream>,
    pub proto: Subprotocol,
    next_id: u64,
    /// Frames received while waiting for something else.
    backlog: VecDeque<ServerFrame>,
    pub user_id: u64,
}

impl Client {
    pub fn connect(addr: SocketAddr, token: &str, proto: Subprotocol) -> Client {
        Client::try_connect(addr, token, proto).expect("connected")
    }

    /// Like `connect`, but `None` when the node refuses the socket or closes it
    /// before its welcome (a node going down, or a fleet fail-over's resync).
    pub fn try_connect(addr: SocketAddr, token: &str, proto: Subprotocol) -> Option<Client> {
        let mut req = format!("ws://{addr}/v1/ws").into_client_request().unwrap();
        req.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        req.headers_mut().insert("sec-websocket-protocol", proto.name().parse().unwrap());
        let stream = TcpStream::connect(addr).ok()?;
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let (ws, resp) = tungstenite::client(req, stream).ok()?;
        assert_eq!(
            resp.headers().get("sec-websocket-protocol").map(|v| v.to_str().unwrap()),
            Some(proto.name()),
            "server picked our subprotocol"
        );
        let mut c = Client { ws, proto, next_id: 1, backlog: VecDeque::new(), user_id: 0 };
        let welcome = match c.ws.read().ok()? {
            Message::Text(t) => proto.decode_server(t.as_bytes()),
            Message::Binary(b) => proto.decode_server(&b),
            Message::Close(_) => return None,
            other => panic!("expected welcome, got {other:?}"),
        };
        match welcome.expect("valid server frame").body {
            ServerMsg::Welcome { user_id, .. } => c.user_id = user_id,
            other => panic!("expected welcome, got {other:?}"),
        }
        Some(c)
    }

    pub fn send_raw(&mut self, msg: Message) {
        self.ws.send(msg).unwrap();
    }

    /// Sends a frame with a fresh request id; returns the id.
    /// Like `send`, but reports a failed write (the server closed) instead of panicking.
    pub fn try_send(&mut self, body: ClientMsg) -> bool {
        let bytes = self.proto.encode_client(&ClientFrame { id: self.next_id, body });
        self.next_id += 1;
        let msg = match self.proto {
            Subprotocol::Json => Message::text(String::from_utf8(bytes).unwrap()),
            Subprotocol::FlatBuffers => Message::binary(bytes),
        };
        self.ws.send(msg).is_ok()
    }

    pub fn send(&mut self, body: ClientMsg) -> u64 {
        let id = self.next_id;
        assert!(self.try_send(body), "write to gateway failed");
        id
    }

    pub fn recv(&mut self) -> ServerFrame {
        if let Some(f) = self.backlog.pop_front() {
            return f;
        }
        self.recv_wire()
    }

    fn recv_wire(&mut self) -> ServerFrame {
        loop {
            match self.ws.read().expect("read from gateway") {
                Message::Text(t) => {
                    assert_eq!(self.proto, Subprotocol::Json, "text frame on the binary subprotocol");
                    return self.proto.decode_server(t.as_bytes()).expect("valid server frame");
                }
                Message::Binary(b) => {
                    assert_eq!(self.proto, Subprotocol::FlatBuffers, "binary frame on the JSON subprotocol");
                    return self.proto.decode_server(&b).expect("valid server frame");
                }
                Message::Close(c) => panic!("connection closed: {c:?}"),
                _ => {}
            }
        }
    }

    /// Sends a request and returns its reply, keeping other frames for later.
    pub fn request(&mut self, body: ClientMsg) -> ServerMsg {
        let id = self.send(body);
        self.wait_reply(id)
    }

    pub fn wait_reply(&mut self, id: u64) -> ServerMsg {
        if let Some(i) = self.backlog.iter().position(|f| f.id == id) {
            return self.backlog.remove(i).unwrap().body;
        }
        loop {
            let f = self.recv_wire();
            if f.id == id {
                return f.body;
            }
            self.backlog.push_back(f);
        }
    }

    /// Waits for the first frame matching `pred`, keeping the others.
    pub fn wait_for(&mut self, mut pred: impl FnMut(&ServerMsg) -> bool) -> ServerMsg {
        if let Some(i) = self.backlog.iter().position(|f| pred(&f.body)) {
            return self.backlog.remove(i).unwrap().body;
        }
        loop {
            let f = self.recv_wire();
            if pred(&f.body) {
                return f.body;
            }
            self.backlog.push_back(f);
        }
    }

    /// Sends `sync` and collects every message replayed before `sync_done`.
    pub fn sync(&mut self, positions: Vec<protocol::Position>) -> Vec<protocol::Message> {
        let id = self.send(ClientMsg::Sync { positions });
        let mut out = Vec::new();
        loop {
            // From the wire: what waits in the backlog came before this sync.
            let f = self.recv_wire();
            match f.body {
                ServerMsg::Message { message } if f.id == 0 => out.push(message),
                ServerMsg::SyncDone { .. } if f.id == id => return out,
                ServerMsg::Error { .. } if f.id == id => panic!("sync refused: {:?}", f.body),
                _ => self.backlog.push_back(f),
            }
        }
    }

    pub fn send_text(&mut self, conversation_id: u64, client_msg_id: &str, body: &str) {
        self.send(ClientMsg::Send {
            conversation_id,
            client_msg_id: client_msg_id.into(),
            body: body.into(),
            attachment: None,
        });
    }

    /// Waits for the ack of `client_msg_id`; returns its seq. Panics on an error for it.
    pub fn wait_ack(&mut self, client_msg_id: &str) -> u64 {
        self.ack_or_error(client_msg_id)
            .unwrap_or_else(|code| panic!("send {client_msg_id} failed with code {code}"))
    }

    /// Waits for the answer to the send of `client_msg_id`: its seq, or the error code.
    pub fn ack_or_error(&mut self, client_msg_id: &str) -> Result<u64, u16> {
        let cmid = client_msg_id.to_owned();
        match self.wait_for(|m| match m {
            ServerMsg::Ack { client_msg_id, .. } => *client_msg_id == cmid,
            ServerMsg::Error { client_msg_id: Some(c), .. } => *c == cmid,
            _ => false,
        }) {
            ServerMsg::Ack { seq, .. } => Ok(seq),
            ServerMsg::Error { code, .. } => Err(code),
            _ => unreachable!(),
        }
    }

    /// Waits for the next `message` event.
    pub fn next_message(&mut self) -> protocol::Message {
        match self.wait_for(|m| matches!(m, ServerMsg::Message { .. })) {
            ServerMsg::Message { message } => message,
            _ => unreachable!(),
        }
    }
}

/// The next `presence` event.
pub fn presence(c: &mut Client) -> protocol::PresenceInfo {
    match c.wait_for(|m| matches!(m, ServerMsg::Presence { .. })) {
        ServerMsg::Presence { presence } => presence,
        _ => unreachable!(),
    }
}

/// `get_presence` of `users`.
pub fn query_presence(c: &mut Client, users: Vec<u64>) -> Vec<protocol::PresenceInfo> {
    match c.request(ClientMsg::GetPresence { user_ids: users }) {
        ServerMsg::PresenceList { users } => users,
        other => panic!("expected presence_list, got {other:?}"),
    }
}

/// Online, as presence shows it.
pub fn online(user_id: u64) -> protocol::PresenceInfo {
    protocol::PresenceInfo { user_id, online: true, last_seen_ms: None }
}

/// Reads until the server's close frame; returns the frames before it and its code.
pub fn close_code(c: &mut Client) -> (Vec<ServerMsg>, u16) {
    let (before, code, _) = close_frame(c);
    (before, code)
}

/// Reads until the server's close frame; returns the frames before it, its code and its reason.
pub fn close_frame(c: &mut Client) -> (Vec<ServerMsg>, u16, String) {
    let mut before = Vec::new();
    loop {
        match c.ws.read() {
            Ok(Message::Close(Some(f))) => return (before, f.code.into(), f.reason.to_string()),
            Ok(Message::Text(t)) => before.push(c.proto.decode_server(t.as_bytes()).unwrap().body),
            Ok(Message::Binary(b)) => before.push(c.proto.decode_server(&b).unwrap().body),
            Ok(_) => {}
            Err(e) => panic!("no close frame (after {} frames): {e}", before.len()),
        }
    }
}

/// A WebSocket upgrade with a bearer token, by raw HTTP: the status and body the
/// server answers (101 and an empty body when it upgrades).
pub fn upgrade_raw(addr: SocketAddr, token: &str) -> (u16, String) {
    let auth = format!("Bearer {token}");
    http_raw(
        addr,
        "GET",
        "/v1/ws",
        &[
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("authorization", &auth),
        ],
        None,
    )
}

/// The code of an `error` reply (panics on anything else).
pub fn error_code(m: ServerMsg) -> u16 {
    match m {
        ServerMsg::Error { code, .. } => code,
        other => panic!("expected an error, got {other:?}"),
    }
}

pub fn conversation_id(m: &ServerMsg) -> u64 {
    match m {
        ServerMsg::Conversation { conversation } => conversation.conversation_id,
        other => panic!("expected a conversation, got {other:?}"),
    }
}

/// Polls `check` until it holds, for state only visible from outside (a log file,
/// a metric); fails after `TIMEOUT` with `what`.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn both() -> [Subprotocol; 2] {
    [Subprotocol::Json, Subprotocol::FlatBuffers]
}

/// The erasure tests' scenario (docs/protocol.md, "edit and delete"): in a new
/// group with bob, alice sends a text and edits it, then sends one more that is
/// kept. Each text carries a random tag, so a search of the disk finds only these.
#[allow(dead_code)]
pub struct Erasure {
    pub alice: Client,
    pub conv: u64,
    /// The message that will be deleted.
    pub seq: u64,
    pub kept_seq: u64,
    /// Every text the deleted message ever had, then the kept one.
    pub doomed: String,
    pub edited: String,
    pub kept: String,
}

#[allow(dead_code)]
impl Erasure {
    pub fn start(g: &TestGateway) -> Erasure {
        let (_, ta) = g.user("alice");
        let (b, _) = g.user("bob");
        let mut alice = g.connect(&ta, Subprotocol::Json);
        alice.sync(vec![]);
        let conv = match alice.request(ClientMsg::CreateGroup { title: "t".into(), members: vec![b] }) {
            ServerMsg::Conversation { conversation } => conversation.conversation_id,
            other => panic!("{other:?}"),
        };
        let tag: u64 = rand::random();
        let (doomed, edited, kept) =
            (format!("doomed-{tag:x}"), format!("edited-{tag:x}"), format!("kept-{tag:x}"));
        alice.send_text(conv, "d", &doomed);
        let seq = alice.wait_ack("d");
        let r = alice.request(ClientMsg::Edit { conversation_id: conv, seq, body: edited.clone() });
        assert!(matches!(r, ServerMsg::Ok), "{r:?}");
        alice.send_text(conv, "k", &kept);
        let kept_seq = alice.wait_ack("k");
        Erasure { alice, conv, seq, kept_seq, doomed, edited, kept }
    }

    pub fn delete(&mut self) {
        let r = self.alice.request(ClientMsg::Delete { conversation_id: self.conv, seq: self.seq });
        assert!(matches!(r, ServerMsg::Ok), "{r:?}");
    }

    pub fn texts(&self) -> [&str; 3] {
        [&self.doomed, &self.edited, &self.kept]
    }

    /// Connects alice again (to `g`, after a restart).
    pub fn reconnect(&mut self, g: &TestGateway) {
        let (s, l) = g.login("alice", "password123");
        assert_eq!(s, 200, "{l}");
        self.alice = g.connect(l["token"].as_str().unwrap(), Subprotocol::Json);
        self.alice.sync(vec![]);
    }

    /// What alice reads back: a tombstone, an `edit` event without its text,
    /// and the kept message whole.
    pub fn check_history(&mut self) {
        let h = match self.alice.request(ClientMsg::History {
            conversation_id: self.conv,
            before: None,
            after: Some(0),
            limit: Some(100),
        }) {
            ServerMsg::History { messages, .. } => messages,
            other => panic!("{other:?}"),
        };
        let find = |s| h.iter().find(|m| m.seq == s).unwrap();
        assert_eq!((find(self.seq).kind, find(self.seq).body.as_str()), (protocol::MessageKind::Deleted, ""));
        assert_eq!(find(self.kept_seq).body, self.kept, "the message that was not deleted reads back");
        let edit = h.iter().find(|m| m.kind == protocol::MessageKind::Edit).unwrap();
        assert_eq!(
            (edit.target_seq, edit.body.as_str()),
            (Some(self.seq), ""),
            "the edit event lost its text too"
        );
    }
}

/// A real S3-compatible server (`s3s-fs`, from `SWITCHBOARD_S3S_FS`; scripts/test
/// installs it) on a free loopback port, its data in a temp dir, with the bucket
/// `switchboard` made. `stop` and `start` take it down and bring it back on the
/// same port and data.
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    bin: PathBuf,
    dir: tempfile::TempDir,
}

pub const S3_ACCESS_KEY: &str = "switchboard-test";
pub const S3_SECRET_KEY: &str = "switchboard-test-secret";

impl S3Server {
    /// `None` (the S3 tests are skipped, and say so) without `SWITCHBOARD_S3S_FS`.
    pub fn from_env() -> Option<S3Server> {
        let Some(bin) = std::env::var_os("SWITCHBOARD_S3S_FS").filter(|v| !v.is_empty()) else {
            eprintln!("SKIPPED: set SWITCHBOARD_S3S_FS to an s3s-fs binary (scripts/test installs one)");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("switchboard")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut s = S3Server { child: None, port, bin: PathBuf::from(bin), dir };
        s.start();
        Some(s)
    }

    pub fn start(&mut self) {
        let child = Command::new(&self.bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting s3s-fs");
        self.child = Some(child);
        eventually("s3s-fs to listen", || TcpStream::connect(("127.0.0.1", self.port)).is_ok());
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The gateway's `[attachments.s3]` section for this server.
    pub fn toml(&self) -> String {
        format!(
            "[attachments.s3]\nendpoint = \"{}\"\nbucket = \"switchboard\"\naccess_key = \"{S3_ACCESS_KEY}\"\nsecret_key = \"{S3_SECRET_KEY}\"\ntimeout_ms = 5000\n",
            self.endpoint()
        )
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

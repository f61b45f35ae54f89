//! One connection to Redis: a single server, or a Redis Cluster (the driver
//! routes each command by its key's slot and follows MOVED/ASK redirects).
//!
//! `redis_url` lists one URL, or several comma-separated seed nodes of a
//! cluster; `cluster` says which. Every key the router uses carries a hash tag,
//! and every script and pipeline touches keys of one tag, so each runs on one
//! node of a cluster.

use redis::{ConnectionLike, RedisResult};
use std::time::Duration;

/// Which Redis the router uses, shared by membership, the transport and
/// location.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`, or several comma-separated seed nodes of a
    /// Redis Cluster.
    pub redis_url: String,
    /// `redis_url` names a Redis Cluster.
    pub cluster: bool,
    /// Key prefix, one per fleet sharing a Redis (it goes into hash tags).
    pub prefix: String,
    /// Connect, write and read timeout of one request (a blocking read waits
    /// this much beyond its own wait).
    pub timeout: Duration,
}

impl RedisOptions {
    pub fn new(redis_url: impl Into<String>) -> RedisOptions {
        RedisOptions {
            redis_url: redis_url.into(),
            cluster: false,
            prefix: "sb".into(),
            timeout: Duration::from_secs(1),
        }
    }

    pub fn check(&self) -> Result<(), String> {
        if self.prefix.is_empty()
            || !self.prefix.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(format!("prefix {:?}: letters, digits, _ - . only", self.prefix));
        }
        if self.timeout.is_zero() {
            return Err("timeout must be non-zero".into());
        }
        Ok(())
    }

    pub(crate) fn connect(&self) -> RedisResult<Link> {
        Link::connect(&self.redis_url, self.cluster, self.timeout)
    }
}

pub(crate) enum Link {
    One(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Link {
    /// Connects with `timeout` for connecting, writing and (unless changed with
    /// [`Link::set_read_timeout`]) reading.
    pub(crate) fn connect(redis_url: &str, cluster: bool, timeout: Duration) -> RedisResult<Link> {
        let urls: Vec<&str> = redis_url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        if cluster {
            let c = redis::cluster::ClusterClient::builder(urls)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .build()?
                .get_connection()?;
            c.set_write_timeout(Some(timeout))?;
            c.set_read_timeout(Some(timeout))?;
            Ok(Link::Cluster(Box::new(c)))
        } else {
            let [url] = urls[..] else {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "several redis URLs name a cluster: set cluster = true",
                )));
            };
            let c = redis::Client::open(url)?.get_connection_with_timeout(timeout)?;
            c.set_write_timeout(Some(timeout))?;
            c.set_read_timeout(Some(timeout))?;
            Ok(Link::One(c))
        }
    }

    pub(crate) fn set_read_timeout(&self, d: Duration) -> RedisResult<()> {
        match self {
            Link::One(c) => c.set_read_timeout(Some(d)),
            Link::Cluster(c) => c.set_read_timeout(Some(d)),
        }
    }

    /// Runs `cmds` as one pipeline and returns their replies, in order (one
    /// round trip to each node concerned).
    pub(crate) fn pipeline<T: redis::FromRedisValue>(&mut self, cmds: Vec<redis::Cmd>) -> RedisResult<T> {
        match self {
            Link::One(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c)
            }
            Link::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd);
                }
                p.query(c.as_mut())
            }
        }
    }

    /// Every Redis server's `run_id` (each master's, for a cluster), sorted. A
    /// server restarted, or a replica promoted, shows as a new one.
    pub(crate) fn run_ids(&mut self) -> RedisResult<Vec<String>> {
        let mut info = redis::cmd("INFO");
        info.arg("server");
        let reply = match self {
            Link::One(c) => info.query::<redis::Value>(c)?,
            Link::Cluster(c) => c.route_command(
                &info,
                redis::cluster_routing::RoutingInfo::MultiNode((
                    redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                    None,
                )),
            )?,
        };
        let mut ids = Vec::new();
        collect_run_ids(&reply, &mut ids);
        ids.sort();
        Ok(ids)
    }

    pub(crate) fn conn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Link::One(c) => c,
            Link::Cluster(c) => c.as_mut(),
        }
    }
}

/// The `run_id:` lines of every INFO text in `v` (one server's, or a map of them).
fn collect_run_ids(v: &redis::Value, out: &mut Vec<String>) {
    match v {
        redis::Value::BulkString(b) => out.extend(
            String::from_utf8_lossy(b)
                .lines()
                .filter_map(|l| l.strip_prefix("run_id:"))
                .map(|s| s.trim().to_owned()),
        ),
        redis::Value::VerbatimString { text, .. } => {
            out.extend(text.lines().filter_map(|l| l.strip_prefix("run_id:")).map(|s| s.trim().to_owned()))
        }
        redis::Value::SimpleString(t) => {
            out.extend(t.lines().filter_map(|l| l.strip_prefix("run_id:")).map(|s| s.trim().to_owned()))
        }
        redis::Value::Array(items) | redis::Value::Set(items) => {
            items.iter().for_each(|i| collect_run_ids(i, out))
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_run_ids(v, out)),
        _ => {}
    }
}

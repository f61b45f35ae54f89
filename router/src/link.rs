//! One connection to Redis: a single server, or a Redis Cluster (the driver
//! routes each command by its key's slot and follows MOVED/ASK redirects).
//!
//! `redis_url` lists one URL, or several comma-separated seed nodes of a
//! cluster; `cluster` says which. Every key the router uses carries a hash tag,
//! and every script and pipeline touches keys of one tag, so each runs on one
//! node of a cluster.

use redis::{ConnectionLike, RedisResult};
use std::time::Duration;

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

    /// Runs `cmds` as one pipeline (one round trip; on a cluster, their keys
    /// share a slot).
    pub(crate) fn pipeline(&mut self, cmds: Vec<redis::Cmd>) -> RedisResult<()> {
        match self {
            Link::One(c) => {
                let mut p = redis::pipe();
                for cmd in cmds {
                    p.add_command(cmd).ignore();
                }
                p.query(c)
            }
            Link::Cluster(c) => {
                let mut p = redis::cluster::cluster_pipe();
                for cmd in cmds {
                    p.add_command(cmd).ignore();
                }
                p.query(c.as_mut())
            }
        }
    }

    pub(crate) fn conn(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Link::One(c) => c,
            Link::Cluster(c) => c.as_mut(),
        }
    }
}

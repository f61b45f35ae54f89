//! Start-up: open the store, start the sequencer and pools, bind one listener
//! per shard on the same port, start the shards, and report readiness.

use crate::auth::Auth;
use crate::capacity::Capacity;
use crate::config::{Config, StorageBackend};
use crate::health::Health;
use crate::ids::IdGen;
use crate::mailbox::Registry;
use crate::metrics::Metrics;
use crate::node::{LoginThrottles, Shared};
use crate::pool::{FairPool, Pool};
use crate::presence::{FleetPresence, Presence, PresenceConfig};
use crate::push::Push;
use crate::sequencer::{Sequencer, SequencerConfig};
use crate::throttle::Throttle;
use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;
use storage::{CassandraStore, FjallStore, PostgresOptions, PostgresStore, Store};

pub struct Running {
    pub addr: SocketAddr,
    /// Where `/metrics` is served when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    pub io_driver: &'static str,
    pub shards: usize,
    pub shared: Arc<Shared>,
}

fn listener(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    s.listen(4096)?;
    Ok(s.into())
}

fn postgres_options(cfg: &Config) -> PostgresOptions {
    let p = &cfg.storage.postgres;
    PostgresOptions {
        url: p.url.clone(),
        pool_size: p.pool_size.get(),
        connect_timeout: Duration::from_millis(p.connect_timeout_ms.get()),
        statement_timeout: Duration::from_millis(p.statement_timeout_ms.get()),
    }
}

/// Opens the configured store. PostgreSQL: applies missing migrations if `migrate`,
/// else refuses a schema older than this build's.
fn open_store(cfg: &Config, migrate: bool) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match cfg.storage.backend {
        StorageBackend::Embedded => {
            Arc::new(FjallStore::open(&cfg.data_dir.join("store")).context("opening the embedded store")?)
        }
        StorageBackend::Postgres => {
            let pg = PostgresStore::connect(&postgres_options(cfg)).context("connecting to PostgreSQL")?;
            if migrate {
                let applied = pg.migrate().context("applying PostgreSQL migrations")?;
                tracing::info!(?applied, "postgres schema up to date");
            }
            let have = pg.schema_version().context("reading the PostgreSQL schema version")?;
            let want = storage::POSTGRES_MIGRATIONS.last().map_or(0, |m| m.0);
            if have != want {
                anyhow::bail!(
                    "the PostgreSQL schema is at version {have}, this build needs {want}: run `gateway migrate` \
                     (or set storage.migrate_on_start = true)"
                );
            }
            Arc::new(pg)
        }
        StorageBackend::Cassandra => {
            let c = CassandraStore::connect(&cfg.storage.cassandra.options())
                .context("connecting to Cassandra")?;
            if migrate && c.migrate().context("applying the Cassandra schema")? {
                tracing::info!(keyspace = %cfg.storage.cassandra.keyspace, "cassandra schema applied");
            }
            let have = c.schema_version().context("reading the Cassandra schema version")?;
            let want = storage::CASSANDRA_SCHEMA_VERSION;
            if have != want {
                anyhow::bail!(
                    "the Cassandra keyspace {:?} is at schema version {have}, this build needs {want}: run \
                     `gateway migrate` (or set storage.migrate_on_start = true)",
                    cfg.storage.cassandra.keyspace
                );
            }
            Arc::new(c)
        }
    })
}

/// `gateway migrate`: brings the configured store's schema up to date.
pub fn migrate(cfg: &Config) -> anyhow::Result<String> {
    match cfg.storage.backend {
        StorageBackend::Embedded => Ok("embedded store: no schema to migrate".into()),
        StorageBackend::Postgres => {
            let pg = PostgresStore::connect(&postgres_options(cfg)).context("connecting to PostgreSQL")?;
            let applied = pg.migrate().context("applying PostgreSQL migrations")?;
            Ok(format!(
                "postgres: applied {applied:?}; schema at version {}",
                pg.schema_version().context("reading the schema version")?
            ))
        }
        StorageBackend::Cassandra => {
            let c = CassandraStore::connect(&cfg.storage.cassandra.options())
                .context("connecting to Cassandra")?;
            let changed = c.migrate().context("applying the Cassandra schema")?;
            Ok(format!(
                "cassandra: keyspace {} {}; schema at version {}",
                cfg.storage.cassandra.keyspace,
                if changed { "created or updated" } else { "already up to date" },
                c.schema_version().context("reading the schema version")?
            ))
        }
    }
}

/// `gateway erase`: removes deleted messages' keys from the store's files.
pub fn erase(cfg: &Config) -> anyhow::Result<String> {
    match cfg.storage.backend {
        StorageBackend::Embedded => {
            Ok("embedded store: nothing to do, a delete overwrites the key in place".into())
        }
        StorageBackend::Postgres => {
            let pg = PostgresStore::connect(&postgres_options(cfg)).context("connecting to PostgreSQL")?;
            Ok(format!("postgres: {}", pg.erase_deleted().context("erasing deleted keys")?))
        }
        StorageBackend::Cassandra => {
            let c = CassandraStore::connect(&cfg.storage.cassandra.options())
                .context("connecting to Cassandra")?;
            Ok(format!("cassandra: {}", c.erase_deleted().context("recycling commit logs")?))
        }
    }
}

/// The socket cap: configured, or the open-files limit less the reserve.
fn socket_cap(cfg: &Config) -> anyhow::Result<usize> {
    let nofile = crate::capacity::open_files_limit().context("reading the open-files limit")?;
    let reserve = cfg.limits.fd_reserve.get();
    let room = nofile.checked_sub(reserve).filter(|r| *r > 0).with_context(|| {
        format!("the open-files limit ({nofile}) leaves nothing beyond limits.fd_reserve ({reserve})")
    })?;
    match cfg.limits.max_connections {
        None => Ok(room),
        Some(n) if n.get() <= room => Ok(n.get()),
        Some(n) => anyhow::bail!(
            "limits.max_connections ({n}) + limits.fd_reserve ({reserve}) exceeds the open-files limit ({nofile}): \
             lower max_connections, or run more gateway processes"
        ),
    }
}

/// What [`start_with`] is given instead of building it from the config.
#[derive(Default)]
pub struct Parts {
    /// The store (else the configured one is opened). Several instances in one
    /// process can share one this way.
    pub store: Option<Arc<dyn Store>>,
    /// This node's links to a fleet (else from `[fleet]`; none there: alone).
    pub links: Option<crate::fleet::Links>,
}

pub fn start(cfg: Config) -> anyhow::Result<Running> {
    start_with(cfg, Parts::default())
}

pub fn start_with(mut cfg: Config, parts: Parts) -> anyhow::Result<Running> {
    std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("creating {}", cfg.data_dir.display()))?;
    let max_sockets = socket_cap(&cfg)?;
    tracing::info!(max_sockets, "socket cap");
    let health = Arc::new(Health::default());
    let store = match parts.store {
        Some(s) => s,
        None => open_store(&cfg, cfg.storage.migrate_on_start)?,
    };
    // Every store call, from every thread, reports to the health record.
    let store: Arc<dyn Store> = Arc::new(crate::health::Observed::new(store, health.clone()));
    let shards = cfg.shard_count();
    let metrics = Arc::new(Metrics::new());
    let registry = Arc::new(Registry::new(shards, metrics.mailbox_overflows.clone()));
    let push = Push::start(&cfg.push, registry.clone(), metrics.clone());
    let mut links = match parts.links {
        Some(l) => Some(l),
        None => match crate::fleet::redis::links(&cfg)? {
            Some((links, me)) => {
                cfg.node_id = me;
                Some(links)
            }
            None => None,
        },
    };
    // After the fleet's links: `fleet.auto_node_id` picks the id there.
    let ids = Arc::new(IdGen::new(cfg.node_id));
    let (router, fleet_rx) = match &links {
        Some(_) => {
            let (r, rx) = crate::fleet::Router::member(cfg.node_id, &cfg.fleet.threads(), &metrics);
            (Arc::new(r), Some(rx))
        }
        None => (Arc::new(crate::fleet::Router::alone(cfg.node_id, &metrics)), None),
    };
    let presence = Presence::start(
        PresenceConfig {
            grace: std::time::Duration::from_millis(cfg.presence.grace_ms.get()),
            queue: cfg.presence.queue.get(),
            max_group_size: cfg.presence.max_group_size.get(),
        },
        store.clone(),
        registry.clone(),
        links
            .as_mut()
            .and_then(|l| l.locate_presence.take())
            .map(|locate| FleetPresence { locate, router: router.clone() }),
        metrics.rejected.with_label_values(&["presence"]),
    );
    let auth = Auth::new(&cfg.auth, &cfg.data_dir)?;
    let blob_io = Pool::new(
        "blob-io",
        cfg.attachments.io_threads.get(),
        cfg.attachments.io_queue.get(),
        metrics.rejected.with_label_values(&["blob-io"]),
    );
    let attachments = Arc::new(
        crate::attachments::Attachments::open(
            &cfg.attachments,
            &cfg.data_dir,
            &auth.derive(b"switchboard blob url v1"),
            blob_io,
        )
        .context("opening the attachments directory")?,
    );
    if cfg.fleet.redis_url.is_some() && cfg.attachments.s3.is_none() {
        // Each node would see only the files uploaded to it: a send or download
        // balanced to another node finds nothing.
        tracing::warn!(
            "attachments use the embedded backend on a fleet node: each node sees only its own uploads; \
             configure [attachments.s3] so every node shares one bucket"
        );
    }
    crate::attachments::start_sweeper(attachments.clone());
    let sequencer = Sequencer::start(
        SequencerConfig {
            parts: cfg.sequencer_count(),
            queue: cfg.storage.sequencer_queue.get(),
            batch_max: cfg.storage.commit_batch_max.get(),
            window: cfg.storage.commit_window_us.map(|us| std::time::Duration::from_micros(us.get().into())),
            member_cap: cfg.limits.group_member_cap.get() as usize,
            attachments: Arc::new(attachments.clone()),
        },
        store.clone(),
        registry.clone(),
        ids.clone(),
        metrics.clone(),
        push.clone(),
        router.clone(),
    );
    if let (Some(links), Some(rx)) = (links, fleet_rx) {
        crate::fleet::start(
            links,
            rx,
            cfg.fleet.threads(),
            router.clone(),
            sequencer.clone(),
            registry.clone(),
            push,
            metrics.clone(),
            store.clone(),
            presence.on_node_gone(),
        )
        .context("joining the fleet")?;
    }
    let readers = Pool::new(
        "reader",
        cfg.storage.reader_threads.get(),
        cfg.storage.reader_queue.get(),
        metrics.rejected.with_label_values(&["reader"]),
    );
    let hashers = FairPool::new(
        "hasher",
        cfg.auth.hash_threads.get(),
        cfg.auth.hash_queue.get(),
        cfg.auth.hash_queue_per_address.get(),
        metrics.rejected.with_label_values(&["hasher"]),
    );
    let logins = {
        let a = &cfg.auth;
        let (base, max) = (
            Duration::from_millis(a.login_backoff_ms.get()),
            Duration::from_secs(a.login_backoff_max_secs.get()),
        );
        LoginThrottles {
            account: Throttle::new(a.login_free_failures_per_account, base, max, 100_000),
            address: Throttle::new(a.login_free_failures_per_address, base, max, 100_000),
        }
    };

    // The first listener fixes the port (port 0 picks one); the others share it.
    let first = listener(cfg.listen)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..shards {
        listeners.push(listener(addr)?);
    }
    let mut management = cfg.metrics_listen.map(listener).transpose()?;
    let metrics_addr = management.as_ref().map(|m| m.local_addr()).transpose()?;
    let driver = cfg.io_driver;
    let node_id = cfg.node_id;
    let cfg_per_user = cfg.limits.max_connections_per_user.get();
    let rates = crate::ratelimit::Rates::new(&cfg.limits);
    let shared = Arc::new(Shared {
        cfg,
        auth,
        attachments,
        store,
        sequencer,
        router,
        presence,
        registry,
        readers,
        hashers,
        logins,
        ids,
        next_conn: AtomicU64::new(crate::vocab::event::conn_ids(node_id)),
        metrics,
        capacity: Capacity::new(max_sockets, cfg_per_user),
        health,
        rates,
    });
    let (tx, rx) = std::sync::mpsc::channel();
    // The shard threads run until the process exits (main waits for a signal, then drains).
    for (i, l) in listeners.into_iter().enumerate() {
        let m = if i == 0 { management.take() } else { None };
        crate::shard::spawn(i as u16, shared.clone(), l, m, driver, tx.clone());
    }
    let mut io_driver = "";
    for _ in 0..shards {
        io_driver = rx.recv().context("a shard died while starting")??;
    }
    Ok(Running { addr, metrics_addr, io_driver, shards, shared })
}

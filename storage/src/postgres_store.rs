//! The PostgreSQL backend: for small fleets, and the shared store this repo's
//! multi-node tests run on.
//!
//! Same data model as the other backends (`migrations/postgres/`). The driver is
//! tokio-postgres with a deadpool pool, on a current-thread tokio runtime this
//! store owns and no thread of its own: each [`Store`] method blocks the calling
//! storage thread in `block_on`, and whichever caller is in there drives every
//! connection's I/O for all of them (the others are woken when their answer is
//! in). A commit therefore runs on the sequencer's own thread without a hand-off
//! to a runtime worker and back, which a two-thread runtime cost: 0.81-0.90× the
//! gateway CPU per message in a 3-node fleet (benches/RESULTS.md). Gateway shards
//! never call the store.
//!
//! A commit is one transaction: every table's rows go in one multi-row statement
//! (`INSERT … SELECT * FROM UNNEST($1, $2, …)`), all statements pipelined on the
//! connection, then `COMMIT`, which returns once the WAL is flushed
//! (`synchronous_commit` is left at its default, `on`). Every statement is
//! prepared once per connection.

use crate::codec::{
    conv_kind_from_i16, conv_kind_to_i16, i, kind_to_u8, message_from_columns, role_from_u8, role_to_u8,
    small, u,
};
use crate::rows::Rows;
use crate::seal::{self, Key, Sealing};
use crate::{
    BucketRef, ConversationId, ConversationRecord, ErrorKind, Message, MessageKind, Mutation, Order,
    Positions, PresenceRecord, Result, Seq, StorageError, Store, UserId, UserRecord, pair,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

/// Schema migrations, applied in order by [`PostgresStore::migrate`]; never edit one
/// that has shipped, add the next.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (2, include_str!("../migrations/postgres/0002_sealed_bodies.sql")),
    (3, include_str!("../migrations/postgres/0003_owner_epoch.sql")),
    (4, include_str!("../migrations/postgres/0004_owner_node.sql")),
];

/// How long `erase_deleted` waits for transactions older than the deletes.
const ERASE_WAIT: Duration = Duration::from_secs(60);

/// What holds back the removal of rows deleted before transaction id `$1` (a
/// 32-bit xid, as text): backends whose transaction id or snapshot is as old,
/// replication slots and prepared transactions likewise. Answers the blocking
/// backends' pids (0 for a slot or a prepared transaction).
const ERASE_BLOCKERS: &str = "SELECT COALESCE(array_agg(pid), '{}') FROM ( \
       SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
         AND (age(backend_xid) >= age($1::text::xid) OR age(backend_xmin) >= age($1::text::xid)) \
       UNION ALL SELECT 0 FROM pg_replication_slots \
         WHERE age(xmin) >= age($1::text::xid) OR age(catalog_xmin) >= age($1::text::xid) \
       UNION ALL SELECT 0 FROM pg_prepared_xacts WHERE age(transaction) >= age($1::text::xid)) b";

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// `postgres://user:password@host:port/database` (or a key=value string).
    pub url: String,
    /// Most connections the pool opens.
    pub pool_size: usize,
    /// Connecting, and waiting for a free pooled connection.
    pub connect_timeout: Duration,
    /// Server-side `statement_timeout` of every connection.
    pub statement_timeout: Duration,
}

impl PostgresOptions {
    /// Whether `url` is a connection string the driver accepts (for config validation).
    pub fn check_url(url: &str) -> std::result::Result<(), String> {
        url.parse::<tokio_postgres::Config>().map(drop).map_err(|e| e.to_string())
    }
}

pub struct PostgresStore {
    rt: tokio::runtime::Runtime,
    pool: Pool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore").finish_non_exhaustive()
    }
}

/// Maps a driver error: connection loss, overload and serialization failures are
/// retryable ([`ErrorKind::Io`]); a cancelled statement is [`ErrorKind::Timeout`];
/// anything else the server refused is [`ErrorKind::Rejected`].
fn pg(context: &'static str) -> impl FnOnce(tokio_postgres::Error) -> StorageError {
    move |e| {
        let kind = match e.code() {
            Some(c) if *c == SqlState::QUERY_CANCELED => ErrorKind::Timeout,
            Some(c) if ["08", "40", "53", "57", "58"].iter().any(|class| c.code().starts_with(class)) => {
                ErrorKind::Io
            }
            Some(_) => ErrorKind::Rejected,
            None => ErrorKind::Io,
        };
        StorageError::new(kind, context, e)
    }
}

fn pool_err(e: PoolError) -> StorageError {
    match e {
        PoolError::Timeout(_) => {
            StorageError::new(ErrorKind::Timeout, "waiting for a database connection", e)
        }
        PoolError::Backend(e) => pg("connecting to the database")(e),
        e => StorageError::new(ErrorKind::Io, "getting a database connection", e),
    }
}

const USER_COLS: &str = "id, username, password_hash, created_ms";

fn user_row(r: &Row) -> UserRecord {
    UserRecord { id: u(r.get(0)), username: r.get(1), password_hash: r.get(2), created_ms: u(r.get(3)) }
}

/// A message row: its columns, then `sealed` and the key that opens it (absent
/// once erased, which leaves the body empty).
fn message_row(conv: ConversationId, r: &Row) -> Result<Message> {
    let columns =
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5), r.get(6), r.get(7), r.get(8), r.get(9));
    let mut m = message_from_columns(conv, columns)?;
    let (sealed, key): (Option<Vec<u8>>, Option<Vec<u8>>) = (r.get(10), r.get(11));
    if let (Some(sealed), Some(key)) = (sealed, key) {
        seal::open_into(&mut m, &seal::key_from_bytes(key)?, &sealed)?;
    }
    Ok(m)
}

/// A statement and its array parameters, one array per column.
type Statement = (&'static str, Vec<Box<dyn ToSql + Sync + Send>>);

fn col<T: ToSql + Sync + Send + 'static>(v: Vec<T>) -> Box<dyn ToSql + Sync + Send> {
    Box::new(v)
}

impl Rows<'_> {
    /// The multi-row statements of this commit (only tables it touches).
    /// The first statement of a fenced commit: locks the fenced conversations' rows
    /// that still carry the epochs the commit names (a concurrent `claim` waits for
    /// the commit to end). It must return every one of them, else the commit is
    /// rolled back as fenced.
    fn fence(&self) -> Option<Statement> {
        (!self.fences.is_empty()).then(|| -> Statement {
            (
                // Locked in id order, so two commits never wait for each other in a circle.
                "SELECT 1 FROM conversations c JOIN UNNEST($1::bigint[], $2::bigint[]) AS f(id, epoch) \
                 ON c.id = f.id AND c.owner_epoch = f.epoch ORDER BY c.id FOR UPDATE OF c",
                vec![
                    col(self.fences.keys().map(|k| i(*k)).collect::<Vec<_>>()),
                    col(self.fences.values().map(|e| i(*e)).collect::<Vec<_>>()),
                ],
            )
        })
    }

    fn statements(&self, sealing: Sealing) -> Vec<Statement> {
        let mut out: Vec<Statement> = self.fence().into_iter().collect();
        if !self.messages.is_empty() {
            let m: Vec<&Message> = self.messages.values().copied().collect();
            let sealed: Vec<Option<Vec<u8>>> =
                m.iter().map(|m| sealing.sealed.get(&(m.conversation_id, m.seq)).cloned()).collect();
            // Text is only ever stored sealed; a deleted message's `edit` rows keep none.
            let body = |m: &&Message| match m.kind {
                MessageKind::Text | MessageKind::Edit | MessageKind::Deleted => String::new(),
                _ => m.body.clone(),
            };
            out.push((
                "INSERT INTO messages (conversation_id, bucket, seq, ts_ms, sender_id, client_msg_id, kind, body, \
                 target_user_id, role, target_seq, edited_ms, sealed) \
                 SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::bigint[], $4::bigint[], $5::bigint[], $6::text[], \
                 $7::smallint[], $8::text[], $9::bigint[], $10::smallint[], $11::bigint[], $12::bigint[], \
                 $13::bytea[]) \
                 ON CONFLICT (conversation_id, bucket, seq) DO UPDATE SET ts_ms = EXCLUDED.ts_ms, \
                 sender_id = EXCLUDED.sender_id, client_msg_id = EXCLUDED.client_msg_id, kind = EXCLUDED.kind, \
                 body = EXCLUDED.body, target_user_id = EXCLUDED.target_user_id, role = EXCLUDED.role, \
                 target_seq = EXCLUDED.target_seq, edited_ms = EXCLUDED.edited_ms, sealed = EXCLUDED.sealed",
                vec![
                    col(self.messages.keys().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(self.messages.keys().map(|k| k.1 as i32).collect::<Vec<_>>()),
                    col(self.messages.keys().map(|k| i(k.2)).collect::<Vec<_>>()),
                    col(m.iter().map(|m| i(m.ts_ms)).collect::<Vec<_>>()),
                    col(m.iter().map(|m| i(m.sender_id)).collect::<Vec<_>>()),
                    col(m.iter().map(|m| m.client_msg_id.clone()).collect::<Vec<_>>()),
                    col(m.iter().map(|m| i16::from(kind_to_u8(m.kind))).collect::<Vec<_>>()),
                    col(m.iter().map(body).collect::<Vec<_>>()),
                    col(m.iter().map(|m| m.target_user_id.map(i)).collect::<Vec<_>>()),
                    col(m.iter().map(|m| m.role.map(|r| i16::from(role_to_u8(r)))).collect::<Vec<_>>()),
                    col(m.iter().map(|m| m.target_seq.map(i)).collect::<Vec<_>>()),
                    col(m.iter().map(|m| m.edited_ms.map(i)).collect::<Vec<_>>()),
                    col(sealed),
                ],
            ));
        }
        if !sealing.put_keys.is_empty() {
            out.push((
                "INSERT INTO message_keys (conversation_id, seq, key) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bytea[]) \
                 ON CONFLICT (conversation_id, seq) DO UPDATE SET key = EXCLUDED.key",
                vec![
                    col(sealing.put_keys.iter().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(sealing.put_keys.iter().map(|k| i(k.1)).collect::<Vec<_>>()),
                    col(sealing.put_keys.iter().map(|k| k.2.to_vec()).collect::<Vec<_>>()),
                ],
            ));
        }
        if !sealing.drop_keys.is_empty() {
            out.push((
                "DELETE FROM message_keys WHERE (conversation_id, seq) IN \
                 (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]))",
                vec![
                    col(sealing.drop_keys.iter().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(sealing.drop_keys.iter().map(|k| i(k.1)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.idempotency.is_empty() {
            out.push((
                "INSERT INTO idempotency (conversation_id, sender_id, client_msg_id, seq) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::bigint[]) \
                 ON CONFLICT (conversation_id, sender_id, client_msg_id) DO UPDATE SET seq = EXCLUDED.seq",
                vec![
                    col(self.idempotency.keys().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(self.idempotency.keys().map(|k| i(k.1)).collect::<Vec<_>>()),
                    col(self.idempotency.keys().map(|k| k.2.to_owned()).collect::<Vec<_>>()),
                    col(self.idempotency.values().map(|v| i(*v)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.buckets.is_empty() {
            out.push((
                "INSERT INTO message_buckets (conversation_id, bucket, first_seq) \
                 SELECT * FROM UNNEST($1::bigint[], $2::int[], $3::bigint[]) \
                 ON CONFLICT (conversation_id, bucket) DO UPDATE SET first_seq = EXCLUDED.first_seq",
                vec![
                    col(self.buckets.keys().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(self.buckets.keys().map(|k| k.1 as i32).collect::<Vec<_>>()),
                    col(self.buckets.values().map(|v| i(*v)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.conversations.is_empty() {
            let c: Vec<&ConversationRecord> = self.conversations.values().copied().collect();
            out.push((
                "INSERT INTO conversations (id, kind, title, created_ms, created_by, last_seq, last_ts_ms) \
                 SELECT * FROM UNNEST($1::bigint[], $2::smallint[], $3::text[], $4::bigint[], $5::bigint[], \
                 $6::bigint[], $7::bigint[]) \
                 ON CONFLICT (id) DO UPDATE SET kind = EXCLUDED.kind, title = EXCLUDED.title, \
                 created_ms = EXCLUDED.created_ms, created_by = EXCLUDED.created_by, \
                 last_seq = EXCLUDED.last_seq, last_ts_ms = EXCLUDED.last_ts_ms",
                vec![
                    col(c.iter().map(|c| i(c.id)).collect::<Vec<_>>()),
                    col(c.iter().map(|c| conv_kind_to_i16(c.kind)).collect::<Vec<_>>()),
                    col(c.iter().map(|c| c.title.clone()).collect::<Vec<_>>()),
                    col(c.iter().map(|c| i(c.created_ms)).collect::<Vec<_>>()),
                    col(c.iter().map(|c| i(c.created_by)).collect::<Vec<_>>()),
                    col(c.iter().map(|c| i(c.last_seq)).collect::<Vec<_>>()),
                    col(c.iter().map(|c| i(c.last_ts_ms)).collect::<Vec<_>>()),
                ],
            ));
        }
        let (put, del): (Vec<_>, Vec<_>) = self.members.iter().partition(|(_, role)| role.is_some());
        if !put.is_empty() {
            out.push((
                "INSERT INTO members (conversation_id, user_id, role) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::smallint[]) \
                 ON CONFLICT (conversation_id, user_id) DO UPDATE SET role = EXCLUDED.role",
                vec![
                    col(put.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(put.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                    col(put.iter().map(|(_, r)| r.unwrap_or_default()).collect::<Vec<_>>()),
                ],
            ));
        }
        if !del.is_empty() {
            out.push((
                "DELETE FROM members WHERE (conversation_id, user_id) IN \
                 (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]))",
                vec![
                    col(del.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(del.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.direct.is_empty() {
            out.push((
                "INSERT INTO direct_pairs (user_lo, user_hi, conversation_id) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]) \
                 ON CONFLICT (user_lo, user_hi) DO UPDATE SET conversation_id = EXCLUDED.conversation_id",
                vec![
                    col(self.direct.keys().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(self.direct.keys().map(|k| i(k.1)).collect::<Vec<_>>()),
                    col(self.direct.values().map(|v| i(*v)).collect::<Vec<_>>()),
                ],
            ));
        }
        let (mute, unmute): (Vec<_>, Vec<_>) = self.mutes.iter().partition(|(_, m)| **m);
        if !mute.is_empty() {
            out.push((
                "INSERT INTO mutes (conversation_id, user_id) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[]) ON CONFLICT DO NOTHING",
                vec![
                    col(mute.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(mute.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !unmute.is_empty() {
            out.push((
                "DELETE FROM mutes WHERE (conversation_id, user_id) IN \
                 (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]))",
                vec![
                    col(unmute.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(unmute.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.positions.is_empty() {
            // Positions only move forward, whoever writes them.
            out.push((
                "INSERT INTO positions (conversation_id, user_id, delivered, read) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) \
                 ON CONFLICT (conversation_id, user_id) DO UPDATE SET \
                 delivered = GREATEST(positions.delivered, EXCLUDED.delivered), \
                 read = GREATEST(positions.read, EXCLUDED.read)",
                vec![
                    col(self.positions.keys().map(|k| i(k.0)).collect::<Vec<_>>()),
                    col(self.positions.keys().map(|k| i(k.1)).collect::<Vec<_>>()),
                    col(self.positions.values().map(|p| i(p.delivered)).collect::<Vec<_>>()),
                    col(self.positions.values().map(|p| i(p.read)).collect::<Vec<_>>()),
                ],
            ));
        }
        let (react, unreact): (Vec<_>, Vec<_>) = self.reactions.iter().partition(|(_, e)| !e.is_empty());
        if !react.is_empty() {
            out.push((
                "INSERT INTO reactions (conversation_id, seq, user_id, emoji) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[], $4::text[]) \
                 ON CONFLICT (conversation_id, seq, user_id) DO UPDATE SET emoji = EXCLUDED.emoji",
                vec![
                    col(react.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(react.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                    col(react.iter().map(|(k, _)| i(k.2)).collect::<Vec<_>>()),
                    col(react.iter().map(|(_, e)| (**e).to_owned()).collect::<Vec<_>>()),
                ],
            ));
        }
        if !unreact.is_empty() {
            out.push((
                "DELETE FROM reactions WHERE (conversation_id, seq, user_id) IN \
                 (SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::bigint[]))",
                vec![
                    col(unreact.iter().map(|(k, _)| i(k.0)).collect::<Vec<_>>()),
                    col(unreact.iter().map(|(k, _)| i(k.1)).collect::<Vec<_>>()),
                    col(unreact.iter().map(|(k, _)| i(k.2)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.last_seen.is_empty() {
            out.push((
                "INSERT INTO presence (user_id, last_seen_ms) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bigint[]) \
                 ON CONFLICT (user_id) DO UPDATE SET last_seen_ms = EXCLUDED.last_seen_ms",
                vec![
                    col(self.last_seen.keys().map(|k| i(*k)).collect::<Vec<_>>()),
                    col(self.last_seen.values().map(|v| i(*v)).collect::<Vec<_>>()),
                ],
            ));
        }
        if !self.hide.is_empty() {
            out.push((
                "INSERT INTO presence (user_id, hide_last_seen) \
                 SELECT * FROM UNNEST($1::bigint[], $2::bool[]) \
                 ON CONFLICT (user_id) DO UPDATE SET hide_last_seen = EXCLUDED.hide_last_seen",
                vec![
                    col(self.hide.keys().map(|k| i(*k)).collect::<Vec<_>>()),
                    col(self.hide.values().copied().collect::<Vec<_>>()),
                ],
            ));
        }
        out
    }
}

impl PostgresStore {
    /// Builds the pool (connections open lazily, on first use) and checks that
    /// the database answers.
    pub fn connect(opts: &PostgresOptions) -> Result<Self> {
        let mut cfg: tokio_postgres::Config = opts
            .url
            .parse()
            .map_err(|e| StorageError::new(ErrorKind::Rejected, "parsing storage.postgres.url", e))?;
        cfg.connect_timeout(opts.connect_timeout);
        cfg.options(format!("-c statement_timeout={}", opts.statement_timeout.as_millis()));
        if cfg.get_application_name().is_none() {
            cfg.application_name("switchboard");
        }
        let mgr = Manager::from_config(cfg, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::new(ErrorKind::Io, "starting the database runtime", e))?;
        let pool = Pool::builder(mgr)
            .max_size(opts.pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(opts.connect_timeout))
            .create_timeout(Some(opts.connect_timeout))
            .recycle_timeout(Some(opts.connect_timeout))
            .build()
            .map_err(|e| StorageError::new(ErrorKind::Rejected, "building the database pool", e))?;
        let store = PostgresStore { rt, pool };
        store.rt.block_on(async {
            let c = store.pool.get().await.map_err(pool_err)?;
            c.simple_query("SELECT 1").await.map_err(pg("checking the database"))?;
            Ok::<_, StorageError>(())
        })?;
        Ok(store)
    }

    /// Removes deleted messages' keys from the database's files (`gateway erase`,
    /// run on a schedule). A delete only marks a key's row dead: its bytes stay in
    /// the table's pages until they are rewritten, and in the WAL. This rewrites
    /// `message_keys` (`VACUUM FULL`: a short exclusive lock on that table, which
    /// stalls sends and history reads for as long as it takes, about a second per
    /// million keys), once every transaction that began before the deletes has
    /// ended (up to a minute; a dead row a running transaction may still see
    /// would be copied, so it fails rather than claim success), then switches to a new WAL segment and checkpoints, so the
    /// segments that held the keys are removed (with `wal_recycle = off`; recycled
    /// segments keep their old bytes). The last two need a superuser, or
    /// `pg_checkpoint` and EXECUTE on `pg_switch_wal()`: without them the pass
    /// does what it may and the returned report says what it could not.
    pub fn erase_deleted(&self) -> Result<String> {
        self.rt.block_on(async {
            let c = self.pool.get().await.map_err(pool_err)?;
            // VACUUM FULL keeps a dead row that a running transaction may still see:
            // wait until every transaction as old as the deletes has ended (any
            // database's: a running xid holds every database's horizon back). "As
            // old" is against one id taken now, newer than every committed delete,
            // so the transactions of a busy fleet, always some in flight, never block it.
            let x: String = c
                .query_one("SELECT (txid_current() % 4294967296)::text", &[])
                .await
                .map_err(pg("taking a transaction id"))?
                .get(0);
            let (before, waited) = (Instant::now(), ERASE_WAIT);
            loop {
                let r =
                    c.query_one(ERASE_BLOCKERS, &[&x]).await.map_err(pg("waiting for old transactions"))?;
                let pids: Vec<i32> = r.get(0);
                if pids.is_empty() {
                    break;
                }
                if before.elapsed() > waited {
                    return Err(StorageError::new(
                        ErrorKind::Timeout,
                        "erasing deleted keys",
                        format!(
                            "transactions older than the deletes still run after {}s (backend pids {pids:?}, \
                             or a replication slot or prepared transaction holds them): nothing erased",
                            waited.as_secs()
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            c.batch_execute("VACUUM FULL message_keys").await.map_err(pg("rewriting message_keys"))?;
            let mut report = vec!["message_keys rewritten".to_string()];
            match c.batch_execute("SELECT pg_switch_wal(); CHECKPOINT").await {
                Ok(()) => report.push("WAL switched and checkpointed".into()),
                Err(e) => report.push(format!(
                    "could not switch the WAL and checkpoint ({e}): deleted keys stay in WAL segments until \
                     normal checkpoints remove them; grant pg_checkpoint and EXECUTE on pg_switch_wal()"
                )),
            }
            let recycle = c
                .query_one("SHOW wal_recycle", &[])
                .await
                .map(|r| r.get::<_, String>(0))
                .map_err(pg("reading wal_recycle"))?;
            if recycle == "on" {
                report.push("wal_recycle is on: recycled WAL segments keep old bytes; set it off".into());
            }
            Ok(report.join("; "))
        })
    }

    /// Applies the migrations this build knows and the database lacks, each in its
    /// own transaction, under an advisory lock so that nodes starting together
    /// apply each exactly once. Returns the versions applied.
    pub fn migrate(&self) -> Result<Vec<i32>> {
        self.rt.block_on(async {
            let mut c = self.pool.get().await.map_err(pool_err)?;
            c.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations \
                 (version INTEGER PRIMARY KEY, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())",
            )
            .await
            .map_err(pg("creating schema_migrations"))?;
            let mut applied = Vec::new();
            for (version, sql) in MIGRATIONS {
                let tx = c.transaction().await.map_err(pg("starting a migration"))?;
                // An arbitrary constant: "switchboard migrations".
                tx.execute("SELECT pg_advisory_xact_lock(7318245902)", &[])
                    .await
                    .map_err(pg("locking for migrations"))?;
                let done = tx
                    .query_opt("SELECT 1 FROM schema_migrations WHERE version = $1", &[version])
                    .await
                    .map_err(pg("reading schema_migrations"))?
                    .is_some();
                if !done {
                    tx.batch_execute(sql).await.map_err(pg("applying a migration"))?;
                    tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[version])
                        .await
                        .map_err(pg("recording a migration"))?;
                    applied.push(*version);
                }
                tx.commit().await.map_err(pg("committing a migration"))?;
            }
            Ok(applied)
        })
    }

    /// The newest migration applied to the database (0: none).
    pub fn schema_version(&self) -> Result<i32> {
        self.rt.block_on(async {
            let c = self.pool.get().await.map_err(pool_err)?;
            let exists: bool = c
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])
                .await
                .map_err(pg("reading the schema version"))?
                .get(0);
            if !exists {
                return Ok(0);
            }
            let row = c
                .query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[])
                .await
                .map_err(pg("reading the schema version"))?;
            Ok(row.get(0))
        })
    }

    /// Seals this commit's text and `edit` rows (see `seal`): a new text message
    /// gets a new key; an edited one, and an `edit` row, the stored key of the
    /// message concerned (read here, before the transaction: one writer per
    /// conversation); a deleted message's key is removed.
    fn sealing(&self, rows: &Rows<'_>) -> Result<Sealing> {
        let wanted = Sealing::wanted(rows);
        let mut keys: HashMap<(ConversationId, Seq), Key> = HashMap::new();
        if !wanted.is_empty() {
            let convs: Vec<i64> = wanted.iter().map(|w| i(w.0)).collect();
            let seqs: Vec<i64> = wanted.iter().map(|w| i(w.1)).collect();
            for r in self.query(
                "reading message keys",
                "SELECT conversation_id, seq, key FROM message_keys WHERE (conversation_id, seq) IN \
                 (SELECT * FROM UNNEST($1::bigint[], $2::bigint[]))",
                &[&convs, &seqs],
            )? {
                keys.insert((u(r.get(0)), u(r.get(1))), seal::key_from_bytes(r.get(2))?);
            }
        }
        Ok(Sealing::of(rows, keys))
    }

    /// Runs one prepared query on a pooled connection.
    fn query(&self, context: &'static str, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.rt.block_on(async {
            let c = self.pool.get().await.map_err(pool_err)?;
            let stmt = c.prepare_cached(sql).await.map_err(pg(context))?;
            c.query(&stmt, params).await.map_err(pg(context))
        })
    }

    fn query_opt(
        &self,
        context: &'static str,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>> {
        Ok(self.query(context, sql, params)?.into_iter().next())
    }
}

impl Store for PostgresStore {
    fn commit(&self, batch: &[Mutation]) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        let rows = Rows::of(batch);
        let sealing = self.sealing(&rows)?;
        let statements = rows.statements(sealing);
        self.rt.block_on(async {
            let mut c = self.pool.get().await.map_err(pool_err)?;
            let tx = c.transaction().await.map_err(pg("starting a commit"))?;
            let mut prepared = Vec::with_capacity(statements.len());
            for (sql, _) in &statements {
                prepared.push(tx.prepare_cached(sql).await.map_err(pg("preparing a commit"))?);
            }
            // Issued together, the statements are pipelined on the connection.
            let runs = statements.iter().zip(&prepared).map(|((_, params), stmt)| {
                let params: Vec<&(dyn ToSql + Sync)> =
                    params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                let tx = &tx;
                async move { tx.execute(stmt, &params).await }
            });
            let counts = futures_util::future::try_join_all(runs).await.map_err(pg("writing a commit"))?;
            if !rows.fences.is_empty() && counts.first().copied() != Some(rows.fences.len() as u64) {
                // Dropping the transaction rolls it back.
                return Err(StorageError::new(
                    ErrorKind::Fenced,
                    "committing",
                    "a conversation was claimed by another owner",
                ));
            }
            tx.commit().await.map_err(pg("committing"))
        })
    }

    fn claim(&self, conv: ConversationId, node: u16) -> Result<u64> {
        let row = self.query_opt(
            "claiming a conversation",
            "UPDATE conversations SET owner_epoch = owner_epoch + 1, owner_node = $2 WHERE id = $1 \
             RETURNING owner_epoch",
            &[&i(conv), &i32::from(node)],
        )?;
        Ok(row.map_or(0, |r| u(r.get(0))))
    }

    fn claimed_by(&self, node: u16, since_ms: u64) -> Result<Vec<ConversationId>> {
        let rows = self.query(
            "listing a node's conversations",
            "SELECT id FROM conversations WHERE owner_node = $1 AND last_ts_ms >= $2",
            &[&i32::from(node), &i(since_ms)],
        )?;
        Ok(rows.iter().map(|r| u(r.get(0))).collect())
    }

    fn create_user(&self, user: &UserRecord) -> Result<()> {
        let r = self.query(
            "registering",
            "INSERT INTO users (id, username, username_lower, password_hash, created_ms) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                &i(user.id),
                &user.username,
                &user.username.to_lowercase(),
                &user.password_hash,
                &i(user.created_ms),
            ],
        );
        match r {
            Err(e) if is_unique_violation(&e, "users_username_lower_key") => {
                Err(StorageError::new(ErrorKind::UsernameTaken, "registering", "username taken"))
            }
            r => r.map(drop),
        }
    }

    fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE id = $1");
        Ok(self.query_opt("reading a user", &sql, &[&i(id)])?.as_ref().map(user_row))
    }

    fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        let sql = format!("SELECT {USER_COLS} FROM users WHERE username_lower = $1");
        Ok(self.query_opt("reading a username", &sql, &[&username.to_lowercase()])?.as_ref().map(user_row))
    }

    fn conversation(&self, id: ConversationId) -> Result<Option<ConversationRecord>> {
        self.query_opt(
            "reading a conversation",
            "SELECT id, kind, title, created_ms, created_by, last_seq, last_ts_ms FROM conversations WHERE id = $1",
            &[&i(id)],
        )?
        .map(|r| {
            Ok(ConversationRecord {
                id: u(r.get(0)),
                kind: conv_kind_from_i16(r.get(1))?,
                title: r.get(2),
                created_ms: u(r.get(3)),
                created_by: u(r.get(4)),
                last_seq: u(r.get(5)),
                last_ts_ms: u(r.get(6)),
            })
        })
        .transpose()
    }

    fn members(&self, id: ConversationId) -> Result<Vec<(UserId, crate::Role)>> {
        self.query(
            "reading members",
            "SELECT user_id, role FROM members WHERE conversation_id = $1 ORDER BY user_id",
            &[&i(id)],
        )?
        .iter()
        .map(|r| Ok((u(r.get(0)), role_from_u8(small(r.get(1))?)?)))
        .collect()
    }

    fn member_role(&self, id: ConversationId, user: UserId) -> Result<Option<crate::Role>> {
        self.query_opt(
            "reading a member",
            "SELECT role FROM members WHERE conversation_id = $1 AND user_id = $2",
            &[&i(id), &i(user)],
        )?
        .map(|r| role_from_u8(small(r.get(0))?))
        .transpose()
    }

    fn user_conversations(&self, user: UserId) -> Result<Vec<ConversationId>> {
        Ok(self
            .query(
                "reading a user's conversations",
                "SELECT conversation_id FROM members WHERE user_id = $1",
                &[&i(user)],
            )?
            .iter()
            .map(|r| u(r.get(0)))
            .collect())
    }

    fn direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>> {
        let (x, y) = pair(a, b);
        Ok(self
            .query_opt(
                "reading a direct pair",
                "SELECT conversation_id FROM direct_pairs WHERE user_lo = $1 AND user_hi = $2",
                &[&i(x), &i(y)],
            )?
            .map(|r| u(r.get(0))))
    }

    fn idempotent_seq(
        &self,
        conv: ConversationId,
        sender: UserId,
        client_msg_id: &str,
    ) -> Result<Option<Seq>> {
        Ok(self
            .query_opt(
                "reading an idempotency key",
                "SELECT seq FROM idempotency WHERE conversation_id = $1 AND sender_id = $2 AND client_msg_id = $3",
                &[&i(conv), &i(sender), &client_msg_id],
            )?
            .map(|r| u(r.get(0))))
    }

    fn muted(&self, conv: ConversationId, user: UserId) -> Result<bool> {
        Ok(self
            .query_opt(
                "reading a mute",
                "SELECT 1 FROM mutes WHERE conversation_id = $1 AND user_id = $2",
                &[&i(conv), &i(user)],
            )?
            .is_some())
    }

    fn positions(&self, conv: ConversationId, user: UserId) -> Result<Positions> {
        Ok(self
            .query_opt(
                "reading positions",
                "SELECT delivered, read FROM positions WHERE conversation_id = $1 AND user_id = $2",
                &[&i(conv), &i(user)],
            )?
            .map(|r| Positions { delivered: u(r.get(0)), read: u(r.get(1)) })
            .unwrap_or_default())
    }

    fn all_positions(&self, conv: ConversationId) -> Result<Vec<(UserId, Positions)>> {
        Ok(self
            .query(
                "reading positions",
                "SELECT user_id, delivered, read FROM positions WHERE conversation_id = $1 ORDER BY user_id",
                &[&i(conv)],
            )?
            .iter()
            .map(|r| (u(r.get(0)), Positions { delivered: u(r.get(1)), read: u(r.get(2)) }))
            .collect())
    }

    fn reactions(&self, conv: ConversationId, lo: Seq, hi: Seq) -> Result<Vec<(Seq, UserId, String)>> {
        if lo > hi {
            return Ok(Vec::new());
        }
        Ok(self
            .query(
                "reading reactions",
                "SELECT seq, user_id, emoji FROM reactions WHERE conversation_id = $1 AND seq BETWEEN $2 AND $3 \
                 ORDER BY seq, user_id",
                &[&i(conv), &i(lo), &i(hi)],
            )?
            .iter()
            .map(|r| (u(r.get(0)), u(r.get(1)), r.get(2)))
            .collect())
    }

    fn presence(&self, user: UserId) -> Result<PresenceRecord> {
        Ok(self
            .query_opt(
                "reading presence",
                "SELECT last_seen_ms, hide_last_seen FROM presence WHERE user_id = $1",
                &[&i(user)],
            )?
            .map(|r| PresenceRecord {
                last_seen_ms: r.get::<_, Option<i64>>(0).map(u),
                hide_last_seen: r.get(1),
            })
            .unwrap_or_default())
    }

    fn buckets(&self, conv: ConversationId) -> Result<Vec<BucketRef>> {
        self.query(
            "reading buckets",
            "SELECT bucket, first_seq FROM message_buckets WHERE conversation_id = $1 ORDER BY bucket",
            &[&i(conv)],
        )?
        .iter()
        .map(|r| {
            let bucket: i32 = r.get(0);
            Ok(BucketRef {
                bucket: u32::try_from(bucket).map_err(|_| crate::codec::corrupt("negative bucket"))?,
                first_seq: u(r.get(1)),
            })
        })
        .collect()
    }

    fn read_bucket(
        &self,
        conv: ConversationId,
        bucket: u32,
        lo: Seq,
        hi: Seq,
        order: Order,
        limit: usize,
    ) -> Result<Vec<Message>> {
        if lo > hi || limit == 0 {
            return Ok(Vec::new());
        }
        // Two fixed statements, so each is prepared once per connection and no SQL is built per call.
        let sql = match order {
            Order::Ascending => {
                "SELECT m.seq, m.ts_ms, m.sender_id, m.client_msg_id, m.kind, m.body, m.target_user_id, m.role, \
                 m.target_seq, m.edited_ms, m.sealed, k.key FROM messages m LEFT JOIN message_keys k \
                 ON m.sealed IS NOT NULL AND k.conversation_id = m.conversation_id \
                 AND k.seq = COALESCE(m.target_seq, m.seq) \
                 WHERE m.conversation_id = $1 AND m.bucket = $2 AND m.seq BETWEEN $3 AND $4 \
                 ORDER BY m.seq ASC LIMIT $5"
            }
            Order::Descending => {
                "SELECT m.seq, m.ts_ms, m.sender_id, m.client_msg_id, m.kind, m.body, m.target_user_id, m.role, \
                 m.target_seq, m.edited_ms, m.sealed, k.key FROM messages m LEFT JOIN message_keys k \
                 ON m.sealed IS NOT NULL AND k.conversation_id = m.conversation_id \
                 AND k.seq = COALESCE(m.target_seq, m.seq) \
                 WHERE m.conversation_id = $1 AND m.bucket = $2 AND m.seq BETWEEN $3 AND $4 \
                 ORDER BY m.seq DESC LIMIT $5"
            }
        };
        let bucket = i32::try_from(bucket).unwrap_or(i32::MAX);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.query("reading a bucket", sql, &[&i(conv), &bucket, &i(lo), &i(hi), &limit])?
            .iter()
            .map(|r| message_row(conv, r))
            .collect()
    }
}

fn is_unique_violation(e: &StorageError, constraint: &str) -> bool {
    let Some(pg) = e.source.downcast_ref::<tokio_postgres::Error>() else { return false };
    pg.code() == Some(&SqlState::UNIQUE_VIOLATION)
        && pg.as_db_error().and_then(|d| d.constraint()) == Some(constraint)
}

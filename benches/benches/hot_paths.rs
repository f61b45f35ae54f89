//! Hot paths, one concern per group. Inputs are built outside the timed loop.
//! Quick mode for CI: `cargo bench -p switchboard-benches -- --quick`.

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use gateway::mailbox::{Mailbox, Registry};
use gateway::vocab::event::{Event, EventKind};
use protocol::{ClientFrame, ClientMsg, Message, MessageKind, ServerFrame, ServerMsg, Subprotocol};
use std::hint::black_box;
use storage::{BucketRef, FjallStore, Mutation, Store};

fn message(seq: u64, body_len: usize) -> Message {
    Message {
        conversation_id: 250_583_497_679_306_752,
        seq,
        ts_ms: 1_795_433_361_481,
        sender_id: 250_582_937_072_828_416,
        client_msg_id: format!("c-{seq}"),
        kind: MessageKind::Text,
        body: "x".repeat(body_len),
        target_user_id: None,
        role: None,
        target_seq: None,
        edited_ms: None,
        reactions: Vec::new(),
        my_reaction: None,
        attachment: None,
    }
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("codec");
    let send = ClientFrame {
        id: 0,
        body: ClientMsg::Send {
            conversation_id: 250_583_497_679_306_752,
            client_msg_id: "3f2a9c1e-0d4b-4c55-9e61-1b2c3d4e5f60".into(),
            body: "x".repeat(100),
            attachment: None,
        },
    };
    let event = ServerFrame { id: 0, body: ServerMsg::Message { message: message(42, 100) } };
    for p in [Subprotocol::FlatBuffers, Subprotocol::Json] {
        let bytes = p.encode_client(&send);
        g.bench_with_input(BenchmarkId::new("decode_send", format!("{p:?}")), &bytes, |b, bytes| {
            b.iter(|| p.decode_client(black_box(bytes)).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("encode_message_event", format!("{p:?}")), &event, |b, ev| {
            b.iter(|| gateway::vocab::frame::server_frame(p, black_box(ev)))
        });
    }
    g.finish();
}

fn mailbox(c: &mut Criterion) {
    let mut g = c.benchmark_group("mailbox");
    let ev = Event::new(EventKind::Message { message: message(1, 100), origin: None, to_others: true });
    // Push from another thread, drain on this one: the cross-shard path.
    g.throughput(Throughput::Elements(1024));
    g.bench_function("cross_thread_push_drain_1024", |b| {
        let (mb, mut drain) = Mailbox::new(4096);
        b.iter(|| {
            let (mb2, ev2) = (mb.clone(), ev.clone());
            let t = std::thread::spawn(move || {
                for _ in 0..1024 {
                    while mb2.push(ev2.clone()).is_err() {}
                }
            });
            let mut n = 0;
            while n < 1024 {
                if drain.pop().is_some() {
                    n += 1;
                }
            }
            t.join().unwrap();
        })
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for members in [100u64, 1000] {
        let reg = Registry::new(2, gateway::metrics::Metrics::new().mailbox_overflows.clone());
        let mut drains: Vec<_> = (0..members)
            .map(|u| {
                let (mb, drain) = Mailbox::new(1 << 16);
                reg.insert(u, (u % 2) as u16, mb);
                drain
            })
            .collect();
        g.throughput(Throughput::Elements(members));
        // One group message: encode once per subprotocol, push to every member, drain every mailbox.
        g.bench_function(BenchmarkId::new("group_message", members), |b| {
            b.iter_batched(
                || Event::new(EventKind::Message { message: message(7, 100), origin: None, to_others: true }),
                |ev| {
                    let mut d = reg.delivery();
                    for u in 0..members {
                        d.deliver(u, &ev);
                    }
                    drop(d);
                    for s in 0..2 {
                        while let Some((_, mb)) = reg.inbox(s).pop() {
                            mb.unschedule();
                        }
                    }
                    for d in &mut drains {
                        while let Some(e) = d.pop() {
                            black_box(e.broadcast_frame(Subprotocol::FlatBuffers));
                        }
                    }
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

/// The stores under test: the embedded one, PostgreSQL on a real local server
/// (the same one the tests start; `./scripts/test` installs it), and Cassandra
/// when `SWITCHBOARD_CASSANDRA` names a node or cluster (`scripts/cassandra start`).
type Opened = (Box<dyn Store>, Option<tempfile::TempDir>);
type Opener = Box<dyn Fn() -> Opened>;

fn stores() -> Vec<(&'static str, Opener)> {
    let mut all = stores_always();
    if storage::testkit::cassandra_from_env("unused").is_some() {
        all.push((
            "cassandra",
            Box::new(|| {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let ks = format!("sb_bench_{}_{n}", std::process::id());
                let opts = storage::testkit::cassandra_from_env(&ks).expect("checked above");
                let cs = storage::CassandraStore::connect(&opts).unwrap();
                cs.migrate().unwrap();
                (Box::new(cs) as Box<dyn Store>, None)
            }),
        ));
    }
    all
}

fn stores_always() -> Vec<(&'static str, Opener)> {
    vec![
        (
            "embedded",
            Box::new(|| {
                let dir = tempfile::tempdir().unwrap();
                (Box::new(FjallStore::open(dir.path()).unwrap()) as Box<dyn Store>, Some(dir))
            }),
        ),
        (
            "postgres",
            Box::new(|| {
                let url = storage::testkit::TestPostgres::shared().fresh_database();
                let pg = storage::PostgresStore::connect(&storage::PostgresOptions {
                    url,
                    pool_size: 4,
                    connect_timeout: std::time::Duration::from_secs(10),
                    statement_timeout: std::time::Duration::from_secs(30),
                })
                .unwrap();
                pg.migrate().unwrap();
                (Box::new(pg) as Box<dyn Store>, None)
            }),
        ),
    ]
}

fn store(c: &mut Criterion) {
    let mut g = c.benchmark_group("storage");
    g.sample_size(20);
    for (name, open) in stores() {
        for batch in [64usize, 512] {
            let (s, _dir) = open();
            let mut seq = 0u64;
            g.throughput(Throughput::Elements(batch as u64));
            g.bench_function(BenchmarkId::new(format!("durable_append_batch/{name}"), batch), |b| {
                b.iter_batched(
                    || {
                        let mut muts = Vec::with_capacity(batch + 1);
                        if seq == 0 {
                            muts.push(Mutation::PutBucket {
                                conversation: 1,
                                bucket: BucketRef {
                                    bucket: storage::bucket_of(1_795_433_361_481),
                                    first_seq: 1,
                                },
                            });
                        }
                        for _ in 0..batch {
                            seq += 1;
                            muts.push(Mutation::PutMessage(Message {
                                conversation_id: 1,
                                ..message(seq, 100)
                            }));
                        }
                        muts
                    },
                    |muts| s.commit(&muts).unwrap(),
                    BatchSize::SmallInput,
                )
            });
            g.throughput(Throughput::Elements(50));
            g.bench_function(BenchmarkId::new(format!("newest_page_50/{name}"), batch), |b| {
                b.iter(|| storage::page(&*s, 1, storage::Anchor::Latest, 50).unwrap())
            });
        }
        // A commit as the sequencer makes it in a fleet: a batch of 64 sends to one
        // conversation with its head, unfenced and fenced (the owner epoch checked
        // and, on Cassandra, the head moved by a lightweight transaction), side by
        // side in one run.
        let (s, _dir) = open();
        for fenced in [false, true] {
            let conv = if fenced { 3 } else { 2 };
            let mut rec = storage::ConversationRecord {
                id: conv,
                kind: protocol::ConversationKind::Group,
                title: "bench".into(),
                created_ms: 1,
                created_by: 1,
                last_seq: 0,
                last_ts_ms: 1_795_433_361_481,
            };
            s.commit(&[
                Mutation::PutConversation(rec.clone()),
                Mutation::PutBucket {
                    conversation: conv,
                    bucket: BucketRef { bucket: storage::bucket_of(1_795_433_361_481), first_seq: 1 },
                },
            ])
            .unwrap();
            let epoch = s.claim(conv, 1).unwrap();
            g.throughput(Throughput::Elements(64));
            let what = if fenced { "fenced_send_batch" } else { "unfenced_send_batch" };
            g.bench_function(BenchmarkId::new(format!("{what}/{name}"), 64), |b| {
                b.iter_batched(
                    || {
                        let mut muts = Vec::with_capacity(66);
                        for _ in 0..64 {
                            rec.last_seq += 1;
                            muts.push(Mutation::PutMessage(Message {
                                conversation_id: conv,
                                ..message(rec.last_seq, 100)
                            }));
                        }
                        muts.push(Mutation::PutConversation(rec.clone()));
                        if fenced {
                            muts.push(Mutation::Fence { conversation: conv, epoch });
                        }
                        muts
                    },
                    |muts| s.commit(&muts).unwrap(),
                    BatchSize::SmallInput,
                )
            });
        }
    }
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let cfg = gateway::config::AuthConfig { token_secret: Some("k".repeat(40)), ..Default::default() };
    let auth = gateway::auth::Auth::new(&cfg, std::path::Path::new("/nonexistent")).unwrap();
    let token = auth.issue(250_582_937_072_828_416);
    c.bench_function("token_verify", |b| b.iter(|| auth.verify(black_box(&token)).unwrap()));
}

/// What an upload slot and a download URL cost the gateway in CPU: signing a
/// presigned URL, and verifying one when it is used (the bytes themselves go to
/// the blob store, not through this path).
fn attachments(c: &mut Criterion) {
    use gateway::attachments::{Attachments, BlobMeta, ObjectKey};
    let dir = tempfile::tempdir().unwrap();
    let io = gateway::pool::Pool::new("bench-io", 1, 16, prometheus::IntCounter::new("x", "x").unwrap());
    let a = Attachments::open(&Default::default(), dir.path(), &[7u8; 32], io).unwrap();
    let key = ObjectKey {
        conversation: 250_583_497_679_306_752,
        uploader: 250_582_937_072_828_416,
        nonce: 0x9f3c_2b1a_0000_0001,
    };
    let meta = BlobMeta {
        size: 48_213,
        media_type: "image/jpeg".into(),
        sha256: "ab".repeat(32),
        file_name: "IMG_2041 beach.jpg".into(),
    };
    let exp = 4_000_000_000_000;
    let mut g = c.benchmark_group("attachments");
    g.bench_function("upload_slot_sign", |b| {
        b.iter(|| {
            a.check(black_box(&meta)).unwrap();
            black_box(a.upload(black_box(&key), &meta, exp))
        })
    });
    let put = a.upload(&key, &meta, exp).url;
    let (path, query) = put.split_once('?').unwrap();
    let embedded = a.embedded().unwrap();
    g.bench_function("upload_url_verify", |b| {
        b.iter(|| black_box(embedded.verify("PUT", black_box(path), black_box(query), 1).unwrap()))
    });
    g.bench_function("download_url_sign", |b| {
        b.iter(|| black_box(a.download_url(black_box(&key), &meta, exp)))
    });
    // The S3 backend signs with AWS Signature V4 (rusty-s3) instead; no request
    // is made here (the store named is not there: the start only warns).
    let cfg = gateway::config::AttachmentsConfig {
        s3: Some(gateway::config::S3Config {
            endpoint: "http://127.0.0.1:9".into(),
            public_endpoint: Some("https://files.example.com".into()),
            bucket: "switchboard".into(),
            region: "eu-west-1".into(),
            access_key: Some("AKIAIOSFODNN7EXAMPLE".into()),
            secret_key: Some("wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into()),
            path_style: true,
            timeout_ms: std::num::NonZeroU64::new(100).unwrap(),
        }),
        ..Default::default()
    };
    let io = gateway::pool::Pool::new("bench-io-s3", 1, 16, prometheus::IntCounter::new("y", "y").unwrap());
    let s3 = Attachments::open(&cfg, dir.path(), &[7u8; 32], io).unwrap();
    g.bench_function("upload_slot_sign_s3", |b| {
        b.iter(|| {
            s3.check(black_box(&meta)).unwrap();
            black_box(s3.upload(black_box(&key), &meta, exp))
        })
    });
    g.bench_function("download_url_sign_s3", |b| {
        b.iter(|| black_box(s3.download_url(black_box(&key), &meta, exp)))
    });
    g.finish();
}

/// One request's rate-limit check (GCRA on the connection's budget), as every
/// client request pays it.
fn rate_limit(c: &mut Criterion) {
    let limits = gateway::config::Config::default().limits;
    let rates = gateway::ratelimit::Rates::new(&limits);
    let conn = gateway::ratelimit::ConnLimits::default();
    let mut now = 0u64;
    c.bench_function("rate_limit_check", |b| {
        b.iter(|| {
            // A send every 100 ms: within the default 20/s, so every check allows.
            now += 100_000_000;
            black_box(conn.check(&rates, gateway::ratelimit::Budget::Send, black_box(now)))
        })
    });
}

/// Who owns a conversation, on fleets of 3 and 32 live nodes (rendezvous: one
/// hash per node).
fn ring(c: &mut Criterion) {
    let mut g = c.benchmark_group("ring_owner");
    for n in [3u16, 32] {
        let ring = router::Ring::new(0..n);
        let mut conv = 0u64;
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                conv += 1;
                black_box(ring.owner(router::Key::Conversation(black_box(conv))))
            })
        });
    }
    g.finish();
}

/// One cross-node hop's floor through Redis Streams on loopback (a real
/// redis-server the bench starts, when one is installed): a batch of 200-byte
/// payloads appended to a node's stream (one pipelined round trip), read back
/// through its consumer group and acknowledged.
fn transport(c: &mut Criterion) {
    if std::process::Command::new("redis-server").arg("--version").output().is_err() {
        eprintln!("SKIPPED transport: no redis-server (apt-get install redis-server; scripts/test does)");
        return;
    }
    let redis = router::testkit::TestRedis::start();
    let opts = router::TransportOptions::new(redis.options());
    let mut out = router::Outbound::new(opts.clone(), 1);
    let mut inbound = router::Inbound::open(opts, 2).unwrap();
    let payload = vec![7u8; 200];
    let mut g = c.benchmark_group("transport_hop");
    for batch in [1usize, 64] {
        let payloads: Vec<&[u8]> = vec![payload.as_slice(); batch];
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(BenchmarkId::from_parameter(batch), |b| {
            b.iter(|| {
                out.send(2, &payloads).unwrap();
                let mut ids = Vec::with_capacity(batch);
                while ids.len() < batch {
                    for d in inbound.read(batch, std::time::Duration::from_secs(1)).unwrap() {
                        if let router::Delivery::Entry(e) = d {
                            ids.push(e.id);
                        }
                    }
                }
                inbound.ack(&ids.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
            })
        });
    }
    g.finish();
}

/// Sequencer partitions committing at once on the embedded store: `lanes`
/// threads, each committing batches of 8 sends (with the head, the sender's
/// positions and idempotency keys, as the sequencer does) to its own
/// conversation through its own lane. One lane is the old serial commit; with
/// more, each lane's log syncs on its own. Throughput is messages committed.
fn lanes(c: &mut Criterion) {
    let mut g = c.benchmark_group("commit_lanes");
    g.sample_size(10);
    for lanes in [1usize, 2] {
        let dir = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(FjallStore::open(dir.path()).unwrap());
        let heads: Vec<std::sync::atomic::AtomicU64> = (0..lanes).map(|_| Default::default()).collect();
        let per = 8u64;
        g.throughput(Throughput::Elements(per * lanes as u64));
        g.bench_function(BenchmarkId::new("embedded_8_sends", lanes), |b| {
            b.iter_custom(|iters| {
                let start = std::time::Instant::now();
                std::thread::scope(|scope| {
                    for (lane, head) in heads.iter().enumerate() {
                        let s = s.clone();
                        scope.spawn(move || {
                            let conv = 10 + lane as u64;
                            for _ in 0..iters {
                                let first = head.fetch_add(per, std::sync::atomic::Ordering::Relaxed) + 1;
                                let mut muts = Vec::with_capacity(3 * per as usize + 2);
                                for seq in first..first + per {
                                    let m = Message { conversation_id: conv, ..message(seq, 100) };
                                    muts.push(Mutation::PutIdempotency {
                                        conversation: conv,
                                        sender: m.sender_id,
                                        client_msg_id: m.client_msg_id.clone(),
                                        seq,
                                    });
                                    muts.push(Mutation::PutMessage(m));
                                }
                                if first == 1 {
                                    muts.push(Mutation::PutBucket {
                                        conversation: conv,
                                        bucket: BucketRef {
                                            bucket: storage::bucket_of(1_795_433_361_481),
                                            first_seq: 1,
                                        },
                                    });
                                }
                                let last = first + per - 1;
                                muts.push(Mutation::PutConversation(storage::ConversationRecord {
                                    id: conv,
                                    kind: protocol::ConversationKind::Direct,
                                    title: String::new(),
                                    created_ms: 1,
                                    created_by: 1,
                                    last_seq: last,
                                    last_ts_ms: 1_795_433_361_481,
                                }));
                                muts.push(Mutation::PutPositions {
                                    conversation: conv,
                                    user: 250_582_937_072_828_416,
                                    positions: storage::Positions { delivered: last, read: last },
                                });
                                s.commit_lane(lane, &muts).unwrap();
                            }
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    codec,
    mailbox,
    fanout,
    store,
    lanes,
    tokens,
    attachments,
    rate_limit,
    ring,
    transport
);
criterion_main!(benches);

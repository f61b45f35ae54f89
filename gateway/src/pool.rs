//! Named blocking-thread pools: where shards send work that may block (store
//! reads, password hashing) so that no io_uring shard thread ever waits on disk.
//!
//! The queue is bounded. Overflow policy: [`Pool::run`] fails at once with
//! [`Full`] and the caller answers the client "overloaded, retry" (1020/503);
//! the `rejected` counter records it.

use futures_channel::oneshot;
use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Condvar, Mutex};

type Job = Box<dyn FnOnce() + Send>;

pub struct Pool {
    name: &'static str,
    tx: crossbeam_channel::Sender<Job>,
    rejected: prometheus::IntCounter,
}

/// The pool's queue was full (or the pool is gone); the job was not run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

impl Pool {
    pub fn new(
        name: &'static str,
        threads: usize,
        queue: usize,
        rejected: prometheus::IntCounter,
    ) -> Arc<Pool> {
        let (tx, rx) = crossbeam_channel::bounded::<Job>(queue);
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || {
                    for job in rx {
                        job();
                    }
                })
                .expect("spawning a pool thread");
        }
        Arc::new(Pool { name, tx, rejected })
    }

    /// Queues `f` for a pool thread without waiting for it (callable from any
    /// thread, never blocks); `Err(Full)` when the queue is full (`f` is dropped).
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) -> Result<(), Full> {
        if self.tx.try_send(Box::new(f)).is_err() {
            if self.rejected.get() == 0 {
                tracing::warn!(pool = self.name, "pool queue full; rejecting work (logged once)");
            }
            self.rejected.inc();
            return Err(Full);
        }
        Ok(())
    }

    /// Runs `f` on a pool thread and resolves with its result.
    ///
    /// # Cancel safety
    /// Dropping the returned future does not stop the job; its result is discarded.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, Full> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        if self.tx.try_send(job).is_err() {
            if self.rejected.get() == 0 {
                tracing::warn!(pool = self.name, "pool queue full; rejecting work (logged once)");
            }
            self.rejected.inc();
            return Err(Full);
        }
        rx.await.map_err(|_| Full)
    }
}

/// Why a [`FairPool`] did not take a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The whole queue is full: the server is busy (503).
    Full,
    /// This source already has its share queued or running (429).
    SourceBusy,
}

struct FairState<K> {
    /// Each source's waiting jobs, FIFO.
    queues: HashMap<K, VecDeque<Job>>,
    /// Sources with waiting jobs, served round-robin: one job each per turn.
    ring: VecDeque<K>,
    /// Each source's jobs queued or running.
    held: HashMap<K, usize>,
    queued: usize,
}

/// A blocking pool whose queue is shared fairly between sources (client
/// addresses): jobs are taken round-robin by source, and one source holds at most
/// `per_source` places (queued or running). A flood from one address waits behind
/// itself; everyone else's job waits at most one turn per active source.
///
/// Overflow policy: past `queue` jobs in all, [`Refused::Full`] (503); past
/// `per_source` for one source, [`Refused::SourceBusy`] (429). Both count in
/// `rejected`; the first of each is logged.
pub struct FairPool<K> {
    name: &'static str,
    state: Mutex<FairState<K>>,
    ready: Condvar,
    queue: usize,
    per_source: usize,
    rejected: prometheus::IntCounter,
}

impl<K: Hash + Eq + Clone + Send + 'static> FairPool<K> {
    pub fn new(
        name: &'static str,
        threads: usize,
        queue: usize,
        per_source: usize,
        rejected: prometheus::IntCounter,
    ) -> Arc<FairPool<K>> {
        let pool = Arc::new(FairPool {
            name,
            state: Mutex::new(FairState {
                queues: HashMap::new(),
                ring: VecDeque::new(),
                held: HashMap::new(),
                queued: 0,
            }),
            ready: Condvar::new(),
            queue,
            per_source,
            rejected,
        });
        for i in 0..threads {
            let p = pool.clone();
            std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || p.work())
                .expect("spawning a pool thread");
        }
        pool
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FairState<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn work(&self) {
        loop {
            let (source, job) = {
                let mut s = self.lock();
                loop {
                    if let Some(k) = s.ring.pop_front() {
                        let q = s.queues.get_mut(&k).expect("a ringed source has a queue");
                        let job = q.pop_front().expect("a ringed source has a job");
                        if q.is_empty() {
                            s.queues.remove(&k);
                        } else {
                            s.ring.push_back(k.clone());
                        }
                        s.queued -= 1;
                        break (k, job);
                    }
                    s = self.ready.wait(s).unwrap_or_else(|p| p.into_inner());
                }
            };
            job();
            let mut s = self.lock();
            if let Some(n) = s.held.get_mut(&source) {
                *n -= 1;
                if *n == 0 {
                    s.held.remove(&source);
                }
            }
        }
    }

    fn refuse(&self, why: Refused) -> Refused {
        if self.rejected.get() == 0 {
            tracing::warn!(pool = self.name, ?why, "pool refusing work (logged once)");
        }
        self.rejected.inc();
        why
    }

    /// Queues `f` for a pool thread in `source`'s turn (at once, not when first
    /// polled) and resolves with its result.
    ///
    /// # Cancel safety
    /// Dropping the returned future does not stop the job; its result is discarded.
    pub fn run<T: Send + 'static, F: FnOnce() -> T + Send + 'static>(
        &self,
        source: K,
        f: F,
    ) -> impl std::future::Future<Output = Result<T, Refused>> + use<T, F, K> {
        let queued = self.enqueue(source, f);
        async move { queued?.await.map_err(|_| Refused::Full) }
    }

    fn enqueue<T: Send + 'static>(
        &self,
        source: K,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<oneshot::Receiver<T>, Refused> {
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.lock();
            if s.queued >= self.queue {
                drop(s);
                return Err(self.refuse(Refused::Full));
            }
            let held = s.held.entry(source.clone()).or_insert(0);
            if *held >= self.per_source {
                drop(s);
                return Err(self.refuse(Refused::SourceBusy));
            }
            *held += 1;
            s.queued += 1;
            let job: Job = Box::new(move || {
                let _ = tx.send(f());
            });
            match s.queues.get_mut(&source) {
                Some(q) => q.push_back(job),
                None => {
                    s.queues.insert(source.clone(), VecDeque::from([job]));
                    s.ring.push_back(source);
                }
            }
        }
        self.ready.notify_one();
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal executor for the test: the pool's futures only wait on a oneshot.
    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        use std::task::{Context, Poll, Wake, Waker};
        struct Unpark(std::thread::Thread);
        impl Wake for Unpark {
            fn wake(self: Arc<Self>) {
                self.0.unpark();
            }
        }
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut f = std::pin::pin!(f);
        loop {
            if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
                return v;
            }
            std::thread::park();
        }
    }

    #[test]
    fn one_source_cannot_take_the_queue_and_turns_alternate() {
        let pool = FairPool::new("t", 1, 8, 3, prometheus::IntCounter::new("r", "r").unwrap());
        // Hold the only thread so jobs queue up.
        let (gate_tx, gate_rx) = std::sync::mpsc::channel::<()>();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut futs = Vec::new();
        futs.push(Box::pin(pool.run("flood", move || {
            gate_rx.recv().unwrap();
        })) as std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), Refused>>>>);
        // The gate job holds one of flood's 3 places while it runs.
        // Let the worker pick the gate job up.
        while pool.lock().queued > 0 {
            std::thread::yield_now();
        }
        for (src, tag) in [("flood", "f1"), ("flood", "f2"), ("alice", "a1")] {
            let o = order.clone();
            futs.push(Box::pin(pool.run(src, move || o.lock().unwrap().push(tag))));
        }
        let o = order.clone();
        let fourth = block_on(pool.run("flood", move || o.lock().unwrap().push("f3")));
        assert_eq!(fourth, Err(Refused::SourceBusy), "a source holds at most 3 places");
        gate_tx.send(()).unwrap();
        for f in futs {
            block_on(f).unwrap();
        }
        let got = order.lock().unwrap().clone();
        assert_eq!(got, ["f1", "a1", "f2"], "round-robin by source, not arrival");
    }
}

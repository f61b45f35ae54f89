//! Named blocking-thread pools: where shards send work that may block (store
//! reads, password hashing) so that no io_uring shard thread ever waits on disk.
//!
//! The queue is bounded. Overflow policy: [`Pool::run`] fails at once with
//! [`Full`] and the caller answers the client "overloaded, retry" (1020/503);
//! the `rejected` counter records it.

use futures_channel::oneshot;
use std::sync::Arc;

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

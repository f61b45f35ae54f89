//! What `/healthz` (liveness) and `/readyz` (readiness) report.
//!
//! - Live: the process can do its job. Fails, saying why, once the store refuses
//!   every write until a restart (a poisoned embedded store): restarting is the fix.
//! - Ready: it should get new clients. Also fails while the last store write failed
//!   (even a retryable one, until a write succeeds), while the socket cap is
//!   reached, and while the process is draining for shutdown.

use crate::capacity::Capacity;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Default)]
pub struct Health {
    /// Fast check for the write path: is there a failure to clear?
    failing: AtomicBool,
    /// The last store write failure since the last success, and whether it is permanent.
    store: Mutex<Option<(String, bool)>>,
    draining: AtomicBool,
}

impl Health {
    /// Runs on: a thread that writes to the store (sequencer, presence, hashers).
    pub fn write_ok(&self) {
        if self.failing.load(Ordering::Relaxed) {
            let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
            // A permanent failure is not undone by a write that happened to pass.
            if s.as_ref().is_some_and(|(_, permanent)| !permanent) {
                *s = None;
                self.failing.store(false, Ordering::Relaxed);
            }
        }
    }

    /// Runs on: a thread that writes to the store.
    pub fn write_failed(&self, e: &storage::StorageError) {
        let permanent = e.kind == storage::ErrorKind::Poisoned;
        let mut s = self.store.lock().unwrap_or_else(|p| p.into_inner());
        if !s.as_ref().is_some_and(|(_, p)| *p) {
            *s = Some((e.to_string(), permanent));
        }
        self.failing.store(true, Ordering::Relaxed);
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// `Err(why)`: the process should be restarted.
    pub fn live(&self) -> Result<(), String> {
        match &*self.store.lock().unwrap_or_else(|p| p.into_inner()) {
            Some((why, true)) => Err(format!("the store refuses writes until a restart: {why}")),
            _ => Ok(()),
        }
    }

    /// `Err(why)`: send new clients elsewhere for now.
    pub fn ready(&self, capacity: &Capacity) -> Result<(), String> {
        self.live()?;
        if let Some((why, _)) = &*self.store.lock().unwrap_or_else(|p| p.into_inner()) {
            return Err(format!("the last store write failed: {why}"));
        }
        if self.draining() {
            return Err("shutting down".into());
        }
        if capacity.full() {
            return Err(format!("at the socket cap ({})", capacity.max_sockets()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(kind: storage::ErrorKind) -> storage::StorageError {
        storage::StorageError::new(kind, "committing a batch", "boom")
    }

    #[test]
    fn transient_failures_cost_readiness_until_a_write_passes() {
        let h = Health::default();
        let c = Capacity::new(10, 1);
        assert!(h.ready(&c).is_ok());
        h.write_failed(&err(storage::ErrorKind::Timeout));
        assert!(h.live().is_ok());
        assert!(h.ready(&c).unwrap_err().contains("boom"));
        h.write_ok();
        assert!(h.ready(&c).is_ok());
    }

    #[test]
    fn a_poisoned_store_fails_liveness_for_good() {
        let h = Health::default();
        h.write_failed(&err(storage::ErrorKind::Poisoned));
        h.write_failed(&err(storage::ErrorKind::Io));
        h.write_ok();
        let why = h.live().unwrap_err();
        assert!(why.contains("until a restart") && why.contains("boom"), "{why}");
    }
}

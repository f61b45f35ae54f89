//! How many sockets the process may hold, and how many connections one user may.
//!
//! ## Why a socket cap below the open-files limit
//! Every accepted socket is a file descriptor, and so is every file the store
//! opens (journal, tables) and every connection it makes (PostgreSQL, Cassandra,
//! the webhook). Accepting until `accept` fails with EMFILE leaves the store
//! without descriptors, and an embedded store whose write fails is poisoned for
//! good. So the gateway keeps `limits.fd_reserve` descriptors out of the
//! sockets' reach: past `max_connections` a new socket is answered 503 and
//! closed at once, which the reserve pays for.

use protocol::UserId;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Raises the soft open-files limit to the hard one (always allowed) and returns it.
pub fn open_files_limit() -> std::io::Result<usize> {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit { rlim_cur: lim.rlim_max, rlim_max: lim.rlim_max };
        // SAFETY: `raised` is a valid rlimit; raising the soft limit to the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    Ok(usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX))
}

/// Sockets held by the process (HTTP exchanges and WebSocket connections), and
/// each user's WebSocket connections.
pub struct Capacity {
    max_sockets: usize,
    sockets: AtomicUsize,
    max_per_user: u32,
    /// Touched on upgrade and disconnect only, never per message.
    per_user: Mutex<HashMap<UserId, u32>>,
}

/// One socket's place under the cap; freed on drop.
pub struct SocketSlot(Arc<Capacity>);

impl Drop for SocketSlot {
    fn drop(&mut self) {
        self.0.sockets.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One of a user's connections under the per-user cap; freed on drop.
pub struct UserSlot {
    capacity: Arc<Capacity>,
    user: UserId,
}

impl Drop for UserSlot {
    fn drop(&mut self) {
        let mut m = self.capacity.per_user.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.user);
            }
        }
    }
}

impl Capacity {
    pub fn new(max_sockets: usize, max_per_user: u32) -> Arc<Capacity> {
        Arc::new(Capacity {
            max_sockets,
            sockets: AtomicUsize::new(0),
            max_per_user,
            per_user: Mutex::new(HashMap::new()),
        })
    }

    /// A place for a just-accepted socket, or `None` at the cap.
    ///
    /// Runs on: any shard.
    pub fn admit_socket(self: &Arc<Self>) -> Option<SocketSlot> {
        let before = self.sockets.fetch_add(1, Ordering::Relaxed);
        let slot = SocketSlot(self.clone());
        (before < self.max_sockets).then_some(slot)
    }

    /// A place for one more connection of `user`, or `None` if they have the most allowed.
    ///
    /// Runs on: any shard.
    pub fn admit_user(self: &Arc<Self>, user: UserId) -> Option<UserSlot> {
        let mut m = self.per_user.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(user).or_insert(0);
        if *n >= self.max_per_user {
            return None;
        }
        *n += 1;
        Some(UserSlot { capacity: self.clone(), user })
    }

    pub fn sockets(&self) -> usize {
        self.sockets.load(Ordering::Relaxed)
    }

    pub fn max_sockets(&self) -> usize {
        self.max_sockets
    }

    /// Whether the process is at its socket cap (not ready for more clients).
    pub fn full(&self) -> bool {
        self.sockets() >= self.max_sockets
    }
}

/// A log line that repeats at most once per `every`, saying how many it stood for.
pub struct LogEvery {
    every: Duration,
    last: std::cell::Cell<Option<Instant>>,
    suppressed: std::cell::Cell<u64>,
}

impl LogEvery {
    pub fn new(every: Duration) -> LogEvery {
        LogEvery { every, last: std::cell::Cell::new(None), suppressed: std::cell::Cell::new(0) }
    }

    /// `Some(n)`: log now, standing for `n` occurrences (this one included).
    pub fn tick(&self) -> Option<u64> {
        let now = Instant::now();
        match self.last.get() {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed.set(self.suppressed.get() + 1);
                None
            }
            _ => {
                self.last.set(Some(now));
                Some(self.suppressed.replace(0) + 1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_and_users_are_capped_and_freed() {
        let c = Capacity::new(2, 1);
        let a = c.admit_socket().unwrap();
        let _b = c.admit_socket().unwrap();
        assert!(c.admit_socket().is_none());
        assert_eq!(c.sockets(), 2, "a refused socket holds no place");
        drop(a);
        assert!(c.admit_socket().is_some());
        let u = c.admit_user(7).unwrap();
        assert!(c.admit_user(7).is_none());
        assert!(c.admit_user(8).is_some());
        drop(u);
        assert!(c.admit_user(7).is_some());
    }

    #[test]
    fn log_every_stands_for_the_suppressed() {
        let l = LogEvery::new(Duration::from_secs(3600));
        assert_eq!(l.tick(), Some(1));
        assert_eq!(l.tick(), None);
        assert_eq!(l.tick(), None);
        let l2 = LogEvery::new(Duration::ZERO);
        assert_eq!(l2.tick(), Some(1));
    }
}

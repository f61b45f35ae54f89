//! Bounded queues whose memory follows what is queued.
//!
//! crossbeam's `bounded(n)` allocates and writes all `n` slots up front. The
//! gateway's default queues (65,536 commands per sequencer partition, the
//! fleet's outgoing and location queues, the presence and push queues) held
//! about 20 MB of an idle node's 55 MB that way, and a box of 55 nodes (issue
//! 20) pays it 55 times. These are crossbeam's unbounded (linked blocks of 31)
//! channels with the bound checked at the send: the same overflow policy
//! (`try_send` answers `Full` at the bound, and each caller's policy applies),
//! memory only for what is queued. Producers racing past the check together can
//! overshoot the bound by one message each.

pub use crossbeam_channel::{Receiver, TrySendError};

/// A queue of at most `cap` messages (see the module's note on racing producers).
pub fn bounded<T>(cap: usize) -> (Sender<T>, Receiver<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    (Sender { tx, cap }, rx)
}

/// The sending side of [`bounded`].
pub struct Sender<T> {
    tx: crossbeam_channel::Sender<T>,
    cap: usize,
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        Sender { tx: self.tx.clone(), cap: self.cap }
    }
}

impl<T> Sender<T> {
    /// Queues `msg`, or gives it back: `Full` at the bound, `Disconnected` when
    /// the receiver is gone.
    pub fn try_send(&self, msg: T) -> Result<(), TrySendError<T>> {
        if self.tx.len() >= self.cap {
            return Err(TrySendError::Full(msg));
        }
        self.tx.try_send(msg)
    }

    /// Messages queued now.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_at_the_bound_and_takes_again_once_drained() {
        let (tx, rx) = bounded(3);
        for i in 0..3 {
            tx.try_send(i).unwrap();
        }
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!(rx.recv().unwrap(), 0);
        tx.try_send(4).unwrap();
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![1, 2, 4]);
        drop(rx);
        assert!(matches!(tx.try_send(5), Err(TrySendError::Disconnected(5))));
    }
}

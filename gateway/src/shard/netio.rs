//! Socket I/O by readiness, with shard-owned buffers.
//!
//! ## Why not monoio's owned-buffer reads
//! An io_uring read holds its buffer for as long as it is pending, so every idle
//! connection would pin a read buffer. Instead a connection waits for readiness
//! (a PollAdd, no buffer) and then reads with `MSG_DONTWAIT` into its shard's one
//! scratch buffer. Idle connections hold no I/O buffers at all.

use bytes::Bytes;
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{Poll, Waker};

/// One non-blocking `recv`. `Ok(None)`: nothing to read right now.
pub fn try_recv(stream: &TcpStream, buf: &mut [u8]) -> io::Result<Option<usize>> {
    loop {
        // SAFETY: `buf` is a valid, writable region of `buf.len()` bytes for the call.
        let n =
            unsafe { libc::recv(stream.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(None),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Writes as much of `frames` (starting `offset` bytes into the first) as the
/// socket takes now. Returns the bytes written; `Ok(0)` with data left means "would block".
pub fn try_send(stream: &TcpStream, frames: &VecDeque<Bytes>, offset: usize) -> io::Result<usize> {
    const MAX_IOV: usize = 64;
    let mut iov: [libc::iovec; MAX_IOV] =
        [libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_IOV];
    let mut n = 0;
    for (i, f) in frames.iter().take(MAX_IOV).enumerate() {
        let s = if i == 0 { &f[offset..] } else { &f[..] };
        iov[i] = libc::iovec { iov_base: s.as_ptr() as *mut _, iov_len: s.len() };
        n += 1;
    }
    if n == 0 {
        return Ok(0);
    }
    // SAFETY: a zeroed msghdr is valid; we point it at `n` initialised iovecs that
    // borrow from `frames`, which outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iov.as_mut_ptr();
    msg.msg_iovlen = n;
    loop {
        // SAFETY: `msg` is fully initialised above.
        let w = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
        if w >= 0 {
            return Ok(w as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock => return Ok(0),
            io::ErrorKind::Interrupted => continue,
            _ => return Err(e),
        }
    }
}

/// Writes all of `data`, waiting for writability as needed.
pub async fn send_all(stream: &TcpStream, data: Bytes) -> io::Result<()> {
    let q = VecDeque::from([data]);
    let mut off = 0;
    while off < q[0].len() {
        match try_send(stream, &q, off)? {
            0 => stream.writable(false).await?,
            w => off += w,
        }
    }
    Ok(())
}

/// Reads at least one byte more into `buf` (growing it by up to `chunk`).
/// `Ok(0)`: the peer closed.
pub async fn recv_into(stream: &TcpStream, buf: &mut Vec<u8>, chunk: usize) -> io::Result<usize> {
    let start = buf.len();
    buf.resize(start + chunk, 0);
    let r = loop {
        match try_recv(stream, &mut buf[start..]) {
            Ok(Some(n)) => break Ok(n),
            Ok(None) => {
                if let Err(e) = stream.readable(false).await {
                    break Err(e);
                }
            }
            Err(e) => break Err(e),
        }
    };
    buf.truncate(start + *r.as_ref().unwrap_or(&0));
    r
}

/// Shuts the socket down both ways, which wakes any task waiting on it.
pub fn shutdown(stream: &TcpStream) {
    // SAFETY: plain syscall on a file descriptor we own.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_RDWR);
    }
}

/// Shuts our sending side only: the peer sees EOF after what we sent, and may still
/// send (its close frame) and read.
pub fn shutdown_write(stream: &TcpStream) {
    // SAFETY: plain syscall on a file descriptor we own.
    unsafe {
        libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR);
    }
}

/// A single-thread wake-up flag: `notify` from any task on the shard, `wait` in one.
#[derive(Default)]
pub struct Signal {
    flag: Cell<bool>,
    waker: RefCell<Option<Waker>>,
}

impl Signal {
    pub fn notify(&self) {
        self.flag.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// # Cancel safety: safe; a notification not consumed stays set.
    pub async fn wait(&self) {
        poll_fn(|cx| {
            if self.flag.replace(false) {
                Poll::Ready(())
            } else {
                *self.waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }
}

/// Lets other tasks on the shard run once.
pub async fn yield_now() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            Poll::Ready(())
        } else {
            yielded = true;
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    })
    .await
}

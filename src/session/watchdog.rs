//! Cuts off a connection whose session actor cannot run.
//!
//! actix-web-actors drives a session actor from inside its response body:
//! when a client stops reading and the socket's buffers are full, the HTTP
//! layer stops polling the body, and the actor (its heartbeat included)
//! stops running. Rooms then evict the session (its bounded mailbox fills),
//! but nothing would ever close the socket. The watchdog runs beside the
//! connection on the same worker thread: a live session writes at least a
//! ping every `heartbeat.interval_ms`, so if nothing has been written for
//! `heartbeat.timeout_ms` it shuts the TCP socket down, which ends the
//! connection and drops the actor. It also covers a session that has stopped
//! but whose last bytes the peer never reads.

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// One TCP connection, recorded by `HttpServer::on_connect` in the
/// connection's data, so it lives exactly as long as the connection: its
/// `alive` flag turns false, and what it holds is dropped, only when the HTTP
/// layer has finished with the socket (all bytes written or the peer gone).
pub struct Connection {
    fd: RawFd,
    alive: Rc<Cell<bool>>,
    held: RefCell<Vec<Box<dyn Any>>>,
}

impl Connection {
    pub fn new(fd: RawFd) -> Self {
        Self {
            fd,
            alive: Rc::new(Cell::new(true)),
            held: RefCell::default(),
        }
    }

    /// Keeps `thing` until the connection ends (e.g. the drain's socket count).
    pub fn hold(&self, thing: impl Any) {
        self.held.borrow_mut().push(Box::new(thing));
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.alive.set(false);
    }
}

/// Watches `progress` (bytes the session has written) until the connection
/// ends; returns true if it had to cut the socket. It holds only the flag and
/// the fd, never the connection, so it cannot keep the connection alive.
pub fn watch(
    connection: &Connection,
    progress: Rc<Cell<u64>>,
    interval: Duration,
    timeout: Duration,
) -> impl std::future::Future<Output = bool> {
    watch_fd(
        connection.fd,
        connection.alive.clone(),
        progress,
        interval,
        timeout,
    )
}

async fn watch_fd(
    fd: RawFd,
    alive: Rc<Cell<bool>>,
    progress: Rc<Cell<u64>>,
    interval: Duration,
    timeout: Duration,
) -> bool {
    let mut last = progress.get();
    let mut since = Instant::now();
    loop {
        tokio::time::sleep(interval).await;
        if !alive.get() {
            return false;
        }
        let now = progress.get();
        if now != last {
            last = now;
            since = Instant::now();
        } else if since.elapsed() >= timeout {
            // Safe: this task runs on the thread that owns the socket, and
            // `alive` is still true, so the fd has not been closed or reused.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
            return true;
        }
    }
}

//! The WebSocket connection a session owns once the handshake is done: the
//! TCP socket, the [`FrameReader`] that decodes what it reads, and the
//! [`Outbox`] that rooms write into too. No HTTP layer stays in between.
//!
//! Inbound bytes are read through one buffer per worker thread and only
//! what is left of a partial frame is kept (see `super::frames`), so an idle
//! connection holds no read buffer. Outbound buffering is the [`Outbox`]'s.

use super::frames::{FrameReader, Inbound, Violation};
use super::outbox::Outbox;
use actix_http::ws::{CloseReason, OpCode};
use bytes::{Buf, BytesMut};
use prometheus::IntCounter;
use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The most one read takes from a socket.
const READ_CHUNK: usize = 64 * 1024;

/// How long a closed connection waits for the peer to close its side, so
/// that bytes it sends meanwhile (its close reply) do not turn our close
/// into a reset that could destroy data it has not read yet.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

thread_local! {
    /// Every socket on a worker thread reads through this buffer.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
}

/// A connection cut off because its peer took nothing for the whole timeout.
#[derive(Debug)]
pub struct Stalled;

pub struct WsSocket {
    io: Arc<TcpStream>,
    reader: FrameReader,
    outbox: Arc<Outbox>,
}

impl WsSocket {
    /// `leftover`: bytes the HTTP layer read after the handshake request (a
    /// client may send its first frame without waiting for the 101).
    /// `deflate`: permessage-deflate was negotiated (compressed frames are
    /// counted there).
    pub fn new(
        io: TcpStream,
        leftover: &[u8],
        max_frame_bytes: usize,
        outbound_queue: usize,
        deflate: Option<IntCounter>,
    ) -> Self {
        let io = Arc::new(io);
        Self {
            reader: FrameReader::new(max_frame_bytes, leftover).with_deflate(deflate.is_some()),
            outbox: Arc::new(Outbox::new(io.clone(), outbound_queue, deflate)),
            io,
        }
    }

    /// Where rooms write this connection's frames.
    pub fn outbox(&self) -> Arc<Outbox> {
        self.outbox.clone()
    }

    /// The next whole message or control frame among the bytes read so
    /// far; `Err`: the connection is to be failed with the violation's code.
    pub fn next_frame(&mut self) -> Result<Option<Inbound>, Violation> {
        self.reader.next_inbound()
    }

    /// Reads what the socket has (at most [`READ_CHUNK`] bytes) into the
    /// frame reader; `Ok(0)` is the end of the stream. Call only once
    /// [`Self::next_frame`] yields nothing: the reader refuses an oversized
    /// frame on its header, so what it holds stays within the limit.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let read = self.io.try_read(&mut scratch);
                if let Ok(n) = read {
                    self.reader.feed(&scratch[..n]);
                }
                read
            });
            match read {
                // Readiness was stale; `try_read` cleared it, so the next
                // `poll_read_ready` registers for the next wake-up.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    /// Queues a text frame; `false` (and nothing queued) if the outbound
    /// queue is full.
    pub fn push_text(&self, payload: &str) -> bool {
        self.outbox.push_text(payload)
    }

    /// Queues a ping or pong, which is never refused.
    pub fn push_control(&self, op: OpCode, payload: &[u8]) {
        self.outbox.push_control(op, payload)
    }

    /// Queues a close frame, which is never refused.
    pub fn push_close(&self, reason: Option<CloseReason>) {
        self.outbox.push_close(reason)
    }

    /// Sends what is queued, as far as the socket takes it. `Pending`: the
    /// rest goes when the socket is writable again (the task is woken).
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbox.poll_flush(cx)
    }

    /// How long bytes have been waiting without the socket taking any.
    pub fn stalled_for(&self) -> Option<Duration> {
        self.outbox.stalled_for()
    }

    /// The session ended without lingering (the socket broke or was cut):
    /// rooms stop writing to it.
    pub fn end(&self) {
        self.outbox.end();
    }

    /// Shuts the socket down in both directions, whatever is still queued.
    pub fn cut(&self) {
        // SAFETY: the fd belongs to `self.io`, which is open while `self` lives.
        unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_RDWR) };
    }

    /// Bytes the peer has not acknowledged yet (sent or not), per the kernel.
    fn unacked(&self) -> usize {
        let mut queued: libc::c_int = 0;
        // SAFETY: the fd is open (see `cut`); TIOCOUTQ (SIOCOUTQ) writes one int.
        let rc = unsafe { libc::ioctl(self.io.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if rc == 0 {
            queued.max(0) as usize
        } else {
            0
        }
    }

    /// Reads and drops what the peer sent; `true` at its end of stream (or
    /// an error): the peer is gone.
    fn discard_input(&self) -> bool {
        let read = SCRATCH.with(|scratch| self.io.try_read(&mut scratch.borrow_mut()));
        match read {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
        }
    }

    /// After the session has ended: sends what is left and closes our side,
    /// cutting the connection if the peer acknowledges nothing for `stall`
    /// (it stopped reading), then gives the peer [`CLOSE_WAIT`] to close its
    /// own. Progress is what the peer's TCP acknowledges, so a peer that
    /// stopped reading is found even when the kernel took every byte.
    pub async fn linger(self, stall: Duration) -> Result<(), Stalled> {
        let mut outbound = self.outbox.end();
        let check = (stall / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        // Bytes written here minus bytes unacknowledged: rises with every ack.
        let mut written = 0i64;
        let mut acked = None;
        let mut since = Instant::now();
        let mut fin = false;
        loop {
            while !outbound.is_empty() {
                match self.io.try_write(&outbound) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        outbound.advance(n);
                        written += n as i64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Ok(()),
                }
            }
            if outbound.is_empty() && !fin {
                outbound = BytesMut::new();
                // SAFETY: as in `cut`.
                unsafe { libc::shutdown(self.io.as_raw_fd(), libc::SHUT_WR) };
                fin = true;
            }
            let unacked = self.unacked();
            if fin && unacked == 0 {
                break;
            }
            let now_acked = written - unacked as i64;
            if acked != Some(now_acked) {
                acked = Some(now_acked);
                since = Instant::now();
            } else if since.elapsed() >= stall {
                self.cut();
                return Err(Stalled);
            }
            tokio::select! {
                ready = self.io.writable(), if !outbound.is_empty() => {
                    if ready.is_err() {
                        return Ok(());
                    }
                }
                ready = self.io.readable() => {
                    if ready.is_err() || self.discard_input() {
                        return Ok(());
                    }
                }
                _ = tokio::time::sleep(check) => {}
            }
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, async {
            while self.io.readable().await.is_ok() {
                if self.discard_input() {
                    return;
                }
            }
        })
        .await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{FrameSink as _, Taken, WireFrames};
    use tokio::io::AsyncReadExt;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        (accepted.unwrap().0, client.unwrap())
    }

    fn masked_text(text: &str) -> Vec<u8> {
        let mask = [1u8, 2, 3, 4];
        let mut frame = vec![0x81, 0x80 | text.len() as u8];
        frame.extend_from_slice(&mask);
        frame.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        frame
    }

    #[tokio::test]
    async fn frames_queued_together_leave_together_and_no_buffer_stays() {
        let (server, mut client) = pair().await;
        let socket = WsSocket::new(server, &[], 1024, 8, None);
        assert!(socket.push_text("one"));
        assert!(socket.push_text("two"));
        socket.push_control(OpCode::Ping, b"");
        std::future::poll_fn(|cx| socket.poll_flush(cx))
            .await
            .unwrap();
        assert_eq!(
            socket.outbox.buffer_capacity(),
            0,
            "an idle socket keeps no buffer"
        );
        assert_eq!(socket.outbox.queued(), 0);
        assert_eq!(socket.stalled_for(), None);
        let mut wire = [0u8; 12];
        client.read_exact(&mut wire).await.unwrap();
        assert_eq!(&wire, b"\x81\x03one\x81\x03two\x89\x00");
    }

    #[tokio::test]
    async fn bytes_read_with_the_handshake_are_decoded_first() {
        let (server, _client) = pair().await;
        let mut leftover = masked_text("early");
        leftover.extend(&masked_text("late")[..3]); // and part of the next frame
        let mut socket = WsSocket::new(server, &leftover, 1024, 8, None);
        match socket.next_frame().unwrap() {
            Some(Inbound::Text(text)) => assert_eq!(text, "early"),
            other => panic!("{other:?}"),
        }
        assert!(socket.next_frame().unwrap().is_none(), "incomplete");
        assert_eq!(socket.reader.pending_bytes(), 3);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_frames_and_a_frame_over_the_limit_is_an_overflow() {
        let (server, _client) = pair().await;
        let mut socket = WsSocket::new(server, &masked_text(&"x".repeat(100)), 50, 2, None);
        assert!(socket.push_text("a") && socket.push_text("b"));
        assert!(!socket.push_text("c"), "two frames queued, none sent");
        assert_eq!(
            socket.outbox.take(&WireFrames::text("d")),
            Taken::Full,
            "rooms are refused too"
        );
        assert_eq!(socket.next_frame(), Err(Violation::TooBig(50)));
        socket.end();
        assert_eq!(socket.outbox.take(&WireFrames::text("e")), Taken::Closed);
    }

    #[tokio::test]
    async fn offered_frames_go_straight_out_or_after_what_waits() {
        let (server, mut client) = pair().await;
        let socket = WsSocket::new(server, &[], 1024, 8, None);
        assert!(socket.push_text("mine"));
        assert_eq!(socket.outbox.take(&WireFrames::text("room")), Taken::All);
        std::future::poll_fn(|cx| socket.poll_flush(cx))
            .await
            .unwrap();
        let mut wire = [0u8; 12];
        client.read_exact(&mut wire).await.unwrap();
        assert_eq!(&wire, b"\x81\x04mine\x81\x04room", "in the order taken");
        // Nothing waiting: sent at once, no flush needed.
        let group = WireFrames::texts(["a", "bc"]);
        assert_eq!(socket.outbox.take(&group), Taken::All);
        let mut wire = [0u8; 7];
        client.read_exact(&mut wire).await.unwrap();
        assert_eq!(&wire, b"\x81\x01a\x81\x02bc");
        assert_eq!(socket.outbox.queued(), 0);
        assert_eq!(socket.outbox.buffer_capacity(), 0);
    }

    #[tokio::test]
    async fn what_the_socket_cannot_take_at_once_waits_and_the_session_sends_it() {
        let (server, mut client) = pair().await;
        let socket = WsSocket::new(server, &[], 8 << 20, 8, None);
        // Registers the session's task.
        std::future::poll_fn(|cx| socket.poll_flush(cx))
            .await
            .unwrap();
        let big = "x".repeat(4 << 20);
        assert_eq!(socket.outbox.take(&WireFrames::text(&big)), Taken::All);
        assert!(socket.stalled_for().is_some(), "the rest waits");
        assert_eq!(socket.outbox.queued(), 1);
        let read = async {
            let mut wire = vec![0u8; 10 + big.len()];
            client.read_exact(&mut wire).await.unwrap();
            wire
        };
        let (wire, flushed) = tokio::join!(read, std::future::poll_fn(|cx| socket.poll_flush(cx)));
        flushed.unwrap();
        assert_eq!(&wire[..2], b"\x81\x7f");
        assert!(wire[10..].iter().all(|&b| b == b'x'));
        assert_eq!(socket.outbox.queued(), 0);
    }
}

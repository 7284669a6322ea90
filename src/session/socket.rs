//! The WebSocket connection a session owns once the handshake is done: the
//! TCP socket, the bytes read but not yet decoded, and the frames written but
//! not yet sent. No HTTP layer stays in between.
//!
//! Framing is actix-http's (`ws::Codec` decodes and enforces the frame size
//! limit, `ws::Parser` encodes). What is owned here is buffering:
//! - Inbound bytes are read through one buffer per worker thread and only
//!   what is left of a partial frame is kept, so an idle connection holds no
//!   read buffer.
//! - Outbound frames are appended to one buffer that grows on demand and is
//!   given back once the socket has taken all of it (to a few spares per
//!   worker thread, so busy sessions do not allocate per wake-up and idle
//!   ones hold none). The session sends it once per wake-up, so frames that
//!   arrive together (a room's group, or several mailbox messages) leave in
//!   one write.
//! - Every frame is counted in the [`OutboundLedger`] until the socket has
//!   taken its last byte.

use super::ledger::OutboundLedger;
use actix_codec::Decoder as _;
use actix_http::ws::{CloseReason, Codec, Frame, OpCode, Parser, ProtocolError};
use bytes::{Buf, BytesMut};
use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// The most one read takes from a socket.
const READ_CHUNK: usize = 64 * 1024;

/// How long a closed connection waits for the peer to close its side, so
/// that bytes it sends meanwhile (its close reply) do not turn our close
/// into a reset that could destroy data it has not read yet.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Spare outbound buffers kept per worker thread, and the largest kept.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX_BYTES: usize = 256 * 1024;

thread_local! {
    /// Every socket on a worker thread reads through this buffer.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_CHUNK].into_boxed_slice());
    static SPARE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

fn spare_buffer() -> BytesMut {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_default()
}

fn give_back(mut buffer: BytesMut) {
    buffer.clear();
    // An empty buffer reclaims the space before its read position.
    buffer.reserve(1);
    if buffer.capacity() <= SPARE_MAX_BYTES {
        SPARE.with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < SPARE_BUFFERS {
                spare.push(buffer);
            }
        });
    }
}

/// A connection cut off because its peer took nothing for the whole timeout.
#[derive(Debug)]
pub struct Stalled;

pub struct WsSocket {
    io: TcpStream,
    codec: Codec,
    inbound: BytesMut,
    outbound: BytesMut,
    ledger: OutboundLedger,
    /// When the socket last took bytes, or when bytes started waiting if
    /// none were waiting before.
    progress_at: Instant,
}

impl WsSocket {
    /// `leftover`: bytes the HTTP layer read after the handshake request (a
    /// client may send its first frame without waiting for the 101).
    pub fn new(
        io: TcpStream,
        leftover: &[u8],
        max_frame_bytes: usize,
        outbound_queue: usize,
    ) -> Self {
        Self {
            io,
            codec: Codec::new().max_size(max_frame_bytes),
            inbound: BytesMut::from(leftover),
            outbound: BytesMut::new(),
            ledger: OutboundLedger::new(outbound_queue),
            progress_at: Instant::now(),
        }
    }

    /// The next complete frame among the bytes read so far.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let frame = self.codec.decode(&mut self.inbound);
        if self.inbound.is_empty() {
            // Decoded frames share the buffer's memory; let it go with them.
            self.inbound = BytesMut::new();
        }
        frame
    }

    /// Reads what the socket has (at most [`READ_CHUNK`] bytes) into the
    /// inbound buffer; `Ok(0)` is the end of the stream.
    pub fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.io.poll_read_ready(cx))?;
            let read = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let read = self.io.try_read(&mut scratch);
                if let Ok(n) = read {
                    self.inbound.extend_from_slice(&scratch[..n]);
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

    /// Makes room for `bytes` more outbound bytes at once.
    pub fn reserve(&mut self, bytes: usize) {
        self.waiting();
        self.outbound.reserve(bytes);
    }

    /// Queues a text frame; `false` (and nothing queued) if the outbound
    /// queue is full.
    pub fn push_text(&mut self, payload: &str) -> bool {
        if !self.ledger.try_push(payload.len()) {
            return false;
        }
        self.waiting();
        Parser::write_message(&mut self.outbound, payload, OpCode::Text, true, false);
        true
    }

    /// Queues a ping or pong, which is never refused.
    pub fn push_control(&mut self, op: OpCode, payload: &[u8]) {
        self.ledger.record(payload.len());
        self.waiting();
        Parser::write_message(&mut self.outbound, payload, op, true, false);
    }

    /// Queues a close frame, which is never refused.
    pub fn push_close(&mut self, reason: Option<CloseReason>) {
        let len = reason
            .as_ref()
            .map_or(0, |r| 2 + r.description.as_ref().map_or(0, String::len));
        self.ledger.record(len);
        self.waiting();
        Parser::write_close(&mut self.outbound, reason, false);
    }

    /// Before queuing: nothing was waiting, the clock of "no progress"
    /// starts now, and the buffer comes from the spares.
    fn waiting(&mut self) {
        if self.outbound.is_empty() {
            self.progress_at = Instant::now();
            if self.outbound.capacity() == 0 {
                self.outbound = spare_buffer();
            }
        }
    }

    /// Sends what is queued, as far as the socket takes it. `Pending`: the
    /// rest goes when the socket is writable again (the task is woken).
    pub fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.outbound.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !self.outbound.is_empty() {
            ready!(self.io.poll_write_ready(cx))?;
            match self.io.try_write(&self.outbound) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    self.outbound.advance(n);
                    self.ledger.sent(n);
                    self.progress_at = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        // All sent: an idle connection keeps no outbound buffer.
        give_back(std::mem::take(&mut self.outbound));
        Poll::Ready(Ok(()))
    }

    /// How long bytes have been waiting without the socket taking any.
    pub fn stalled_for(&self) -> Option<Duration> {
        (!self.outbound.is_empty()).then(|| self.progress_at.elapsed())
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
    pub async fn linger(mut self, stall: Duration) -> Result<(), Stalled> {
        let check = (stall / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
        // Bytes written here minus bytes unacknowledged: rises with every ack.
        let mut written = 0i64;
        let mut acked = None;
        let mut since = Instant::now();
        let mut fin = false;
        loop {
            while !self.outbound.is_empty() {
                match self.io.try_write(&self.outbound) {
                    Ok(0) => return Ok(()),
                    Ok(n) => {
                        self.outbound.advance(n);
                        written += n as i64;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return Ok(()),
                }
            }
            if self.outbound.is_empty() && !fin {
                self.outbound = BytesMut::new();
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
                ready = self.io.writable(), if !self.outbound.is_empty() => {
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
        let mut socket = WsSocket::new(server, &[], 1024, 8);
        assert!(socket.push_text("one"));
        assert!(socket.push_text("two"));
        socket.push_control(OpCode::Ping, b"");
        std::future::poll_fn(|cx| socket.poll_flush(cx))
            .await
            .unwrap();
        assert_eq!(
            socket.outbound.capacity(),
            0,
            "an idle socket keeps no buffer"
        );
        assert_eq!(socket.ledger.queued(), 0);
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
        let mut socket = WsSocket::new(server, &leftover, 1024, 8);
        match socket.next_frame().unwrap() {
            Some(Frame::Text(text)) => assert_eq!(&text[..], b"early"),
            other => panic!("{other:?}"),
        }
        assert!(socket.next_frame().unwrap().is_none(), "incomplete");
        assert_eq!(socket.inbound.len(), 3);
    }

    #[tokio::test]
    async fn a_full_queue_refuses_frames_and_a_frame_over_the_limit_is_an_overflow() {
        let (server, _client) = pair().await;
        let mut socket = WsSocket::new(server, &masked_text(&"x".repeat(100)), 50, 2);
        assert!(socket.push_text("a") && socket.push_text("b"));
        assert!(!socket.push_text("c"), "two frames queued, none sent");
        assert!(matches!(socket.next_frame(), Err(ProtocolError::Overflow)));
    }
}

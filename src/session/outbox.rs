//! The outbound side of a connection, shared by the session with the rooms
//! it joined and the directory ([`FrameSink`]).
//!
//! Whoever has frames for the client writes them here, on its own thread:
//! if nothing is waiting, straight to the socket (one `send` of bytes encoded
//! once for every recipient); otherwise after what is waiting, and the
//! session sends that when the socket can take it. Frames are appended whole
//! under one lock, so writers never interleave inside a frame and every
//! writer's frames keep their order.
//!
//! The session's own frames (acks, errors, pings) are appended and sent when
//! its wake-up ends, so what it writes while handling several client frames
//! leaves in one write.
//!
//! Invariant: bytes waiting always have a send coming: the session appended
//! them and flushes before it sleeps, or its last flush is waiting for the
//! socket to be writable, or a writer left them after a short write and woke
//! the session.
//!
//! Every frame is counted in the [`OutboundLedger`] until the socket has
//! taken its last byte; a full ledger refuses frames (the session is too slow).

use super::ledger::OutboundLedger;
use crate::outbound::{deflate, Encoded, FrameSink, Taken, WireFrames};
use actix_http::ws::{CloseReason, OpCode, Parser};
use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use prometheus::IntCounter;
use std::cell::RefCell;
use std::io;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Spare outbound buffers kept per thread, and the largest kept.
const SPARE_BUFFERS: usize = 32;
const SPARE_MAX_BYTES: usize = 256 * 1024;

thread_local! {
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

/// Encodes a server text frame (unmasked) at the end of `buffer`.
pub fn encode_text(buffer: &mut BytesMut, payload: &str) {
    Parser::write_message(buffer, payload, OpCode::Text, true, false);
}

pub struct Outbox {
    io: Arc<TcpStream>,
    state: Mutex<State>,
    /// With permessage-deflate negotiated: where compressed frames are
    /// counted (`roomhub_messages_delivered_compressed_total`).
    deflate: Option<IntCounter>,
}

struct State {
    /// Bytes waiting for the socket: whole frames, in order. Holds no
    /// memory while nothing waits (the buffer goes back to the spares).
    waiting: BytesMut,
    ledger: OutboundLedger,
    /// When the socket last took bytes, or when bytes started waiting if
    /// none were waiting before.
    progress_at: Instant,
    /// The session's task, woken when a writer leaves bytes waiting.
    session: Option<Waker>,
    /// The session has ended: frames are refused.
    ended: bool,
    /// A write failed: the connection is broken.
    failed: Option<io::ErrorKind>,
}

impl State {
    /// Before appending: if nothing was waiting, the clock of "no progress"
    /// starts now and the buffer comes from the spares.
    fn start_waiting(&mut self) {
        if self.waiting.is_empty() {
            self.progress_at = Instant::now();
            if self.waiting.capacity() == 0 {
                self.waiting = spare_buffer();
            }
        }
    }

    fn took(&mut self, bytes: usize) {
        self.ledger.sent(bytes);
        self.progress_at = Instant::now();
    }
}

impl Outbox {
    /// `deflate`: permessage-deflate was negotiated; compressed frames are
    /// counted there.
    pub fn new(io: Arc<TcpStream>, outbound_queue: usize, deflate: Option<IntCounter>) -> Self {
        Self {
            io,
            deflate,
            state: Mutex::new(State {
                waiting: BytesMut::new(),
                ledger: OutboundLedger::new(outbound_queue),
                progress_at: Instant::now(),
                session: None,
                ended: false,
                failed: None,
            }),
        }
    }

    /// Queues one of the session's text frames; `false` (and nothing
    /// queued) if the outbound queue is full.
    pub fn push_text(&self, payload: &str) -> bool {
        let mut state = self.state.lock();
        if !state.ledger.has_room_for(1) {
            return false;
        }
        state.start_waiting();
        let before = state.waiting.len();
        // The session's own frames go to this connection only: compressed
        // here (with the thread's compressor), if large enough.
        match &self.deflate {
            Some(compressed) if deflate::write_text(&mut state.waiting, payload.as_bytes()) => {
                compressed.inc();
            }
            _ => encode_text(&mut state.waiting, payload),
        }
        let wire = state.waiting.len() - before;
        state.ledger.record_wire(wire);
        true
    }

    /// Queues a ping or pong, which is never refused.
    pub fn push_control(&self, op: OpCode, payload: &[u8]) {
        let mut state = self.state.lock();
        state.ledger.record(payload.len());
        state.start_waiting();
        Parser::write_message(&mut state.waiting, payload, op, true, false);
    }

    /// Queues a close frame, which is never refused; nothing is taken after it.
    pub fn push_close(&self, reason: Option<CloseReason>) {
        let len = reason
            .as_ref()
            .map_or(0, |r| 2 + r.description.as_ref().map_or(0, String::len));
        let mut state = self.state.lock();
        state.ledger.record(len);
        state.start_waiting();
        Parser::write_close(&mut state.waiting, reason, false);
        state.ended = true;
    }

    /// Sends what is waiting, as far as the socket takes it. `Pending`: the
    /// rest goes when the socket is writable again (the task is woken).
    /// Remembers the task so writers that leave bytes waiting can wake it.
    pub fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.state.lock();
        if let Some(kind) = state.failed {
            return Poll::Ready(Err(kind.into()));
        }
        if !state
            .session
            .as_ref()
            .is_some_and(|w| w.will_wake(cx.waker()))
        {
            state.session = Some(cx.waker().clone());
        }
        if state.waiting.is_empty() {
            return Poll::Ready(Ok(()));
        }
        while !state.waiting.is_empty() {
            ready!(self.io.poll_write_ready(cx))?;
            match self.io.try_write(&state.waiting) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    state.waiting.advance(n);
                    state.took(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    state.failed = Some(e.kind());
                    return Poll::Ready(Err(e));
                }
            }
        }
        // All sent: an idle connection keeps no outbound buffer.
        give_back(std::mem::take(&mut state.waiting));
        Poll::Ready(Ok(()))
    }

    /// How long bytes have been waiting without the socket taking any.
    pub fn stalled_for(&self) -> Option<Duration> {
        let state = self.state.lock();
        (!state.waiting.is_empty()).then(|| state.progress_at.elapsed())
    }

    /// The session ended: refuses frames from now on and hands over what is
    /// still waiting (to be sent while the connection lingers).
    pub fn end(&self) -> BytesMut {
        let mut state = self.state.lock();
        state.ended = true;
        state.session = None;
        std::mem::take(&mut state.waiting)
    }

    #[cfg(test)]
    pub fn queued(&self) -> usize {
        self.state.lock().ledger.queued()
    }

    #[cfg(test)]
    pub fn buffer_capacity(&self) -> usize {
        self.state.lock().waiting.capacity()
    }
}

impl Outbox {
    fn count_compressed(&self, encoded: &Encoded) {
        if let (Some(counter), compressed @ 1..) = (&self.deflate, encoded.compressed) {
            counter.inc_by(compressed as u64);
        }
    }
}

impl FrameSink for Outbox {
    fn take(&self, frames: &WireFrames) -> Taken {
        // Compressed (once per broadcast, by whichever member comes first)
        // before the lock, so other writers do not wait for it.
        let encoded = match self.deflate {
            Some(_) => frames.deflated(),
            None => frames.plain(),
        };
        let mut state = self.state.lock();
        if state.ended || state.failed.is_some() {
            return Taken::Closed;
        }
        if !state.ledger.has_room_for(frames.count()) {
            return Taken::Full;
        }
        let bytes = &encoded.bytes[..];
        if !state.waiting.is_empty() {
            // A send is coming (see the invariant); these go after.
            for &len in encoded.lens.iter() {
                state.ledger.record_wire(len);
            }
            state.waiting.extend_from_slice(bytes);
            self.count_compressed(encoded);
            return Taken::All;
        }
        let sent = match self.io.try_write(bytes) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                // The session finds out at its next flush.
                state.failed = Some(e.kind());
                if let Some(session) = &state.session {
                    session.wake_by_ref();
                }
                return Taken::Closed;
            }
        };
        self.count_compressed(encoded);
        if sent == bytes.len() {
            // The common case: nothing was queued, so nothing to count.
            return Taken::All;
        }
        for &len in encoded.lens.iter() {
            state.ledger.record_wire(len);
        }
        if sent > 0 {
            state.took(sent);
        }
        state.start_waiting();
        state.waiting.extend_from_slice(&bytes[sent..]);
        // Nobody else is about to send these: the session waits for the
        // socket to be writable, then sends them.
        if let Some(session) = &state.session {
            session.wake_by_ref();
        }
        Taken::All
    }
}

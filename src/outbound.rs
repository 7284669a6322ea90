//! What rooms and the directory send to sessions, and the one way they send it.
//!
//! Frames go through a [`SessionLink`] straight into the session's
//! [`FrameSink`] (its socket, or the bytes already waiting for it), from
//! whichever actor produces them: no mailbox message and no wake-up of the
//! session per delivery, so a broadcast costs one socket write per recipient
//! and nothing else. The frames are encoded for the wire once
//! ([`WireFrames`]) and every recipient is handed the same bytes.
//!
//! Nothing here waits: a session whose outbound queue is full refuses the
//! frames and is told (through its mailbox, with the other [`Outbound`]
//! notices) to close with 1013 (too slow), so one slow reader can never hold
//! up a room or grow the hub's memory.

use crate::protocol::{CloseCode, RoomName};
use actix::{Message, Recipient};
use bytes::{Bytes, BytesMut};
use std::sync::{Arc, OnceLock};

pub mod deflate;

/// Notices for a session's mailbox (frames take the [`FrameSink`]).
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Outbound {
    /// Close the connection with this code.
    Close(CloseCode),
    /// The room dropped this session (it failed and restarts); the session
    /// forgets the room and tells the client with an `error`.
    RoomClosed(RoomName),
    /// The node drains: send `shutdown`, then close with 1001.
    Drain,
}

/// Text frames encoded once for the wire (WebSocket header and payload, back
/// to back): cloning shares the bytes. For members that negotiated
/// permessage-deflate they are compressed once too, on first use, and those
/// bytes are shared the same way (see [`deflate`]).
#[derive(Debug, Clone)]
pub struct WireFrames(Arc<Encodings>);

#[derive(Debug)]
struct Encodings {
    plain: Encoded,
    /// Made by the first member that takes compressed frames.
    deflated: OnceLock<Encoded>,
}

/// Frames on the wire, one encoding.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub bytes: Bytes,
    /// Each frame's length on the wire, in order.
    pub lens: Arc<[usize]>,
    /// How many of them are compressed (RSV1 set).
    pub compressed: usize,
}

impl WireFrames {
    pub fn text(payload: &str) -> Self {
        Self::texts([payload])
    }

    pub fn texts<'a>(payloads: impl IntoIterator<Item = &'a str>) -> Self {
        let mut buffer = BytesMut::new();
        let mut lens = Vec::new();
        for payload in payloads {
            let before = buffer.len();
            crate::session::encode_text(&mut buffer, payload);
            lens.push(buffer.len() - before);
        }
        Self(Arc::new(Encodings {
            plain: Encoded {
                bytes: buffer.freeze(),
                lens: lens.into(),
                compressed: 0,
            },
            deflated: OnceLock::new(),
        }))
    }

    /// The frames as sent to a member without compression.
    pub fn plain(&self) -> &Encoded {
        &self.0.plain
    }

    /// The frames as sent to a member with permessage-deflate: compressed
    /// by the first such member's writer, shared by all the others.
    pub fn deflated(&self) -> &Encoded {
        self.0
            .deflated
            .get_or_init(|| deflate::encode(&self.0.plain))
    }

    /// The plain frames' bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0.plain.bytes
    }

    pub fn lens(&self) -> &[usize] {
        &self.0.plain.lens
    }

    /// How many frames.
    pub fn count(&self) -> usize {
        self.0.plain.lens.len()
    }
}

/// Where a session's frames go: it takes all of the offered frames, in order
/// after everything taken before, or none. Never waits.
pub trait FrameSink: Send + Sync {
    fn take(&self, frames: &WireFrames) -> Taken;
}

/// What a [`FrameSink`] did with offered frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    All,
    /// The outbound queue is full: the session cannot keep up.
    Full,
    /// The session has ended.
    Closed,
}

/// What became of one offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Delivered,
    /// The session could not keep up and was told to close with 1013.
    Evicted,
    /// The session is gone.
    Gone,
}

/// How rooms and the directory reach one session.
#[derive(Clone)]
pub struct SessionLink {
    frames: Arc<dyn FrameSink>,
    notices: Recipient<Outbound>,
}

impl SessionLink {
    pub fn new(frames: Arc<dyn FrameSink>, notices: Recipient<Outbound>) -> Self {
        Self { frames, notices }
    }

    /// Hands `frames` to the session; one that cannot keep up is told to close.
    pub fn offer(&self, frames: &WireFrames) -> Offer {
        match self.frames.take(frames) {
            Taken::All => Offer::Delivered,
            Taken::Full => {
                self.notices.do_send(Outbound::Close(CloseCode::TooSlow));
                Offer::Evicted
            }
            Taken::Closed => Offer::Gone,
        }
    }

    /// Encodes one text frame and offers it.
    pub fn offer_text(&self, payload: &str) -> Offer {
        self.offer(&WireFrames::text(payload))
    }

    /// Puts a notice in the session's mailbox (never refused).
    pub fn tell(&self, notice: Outbound) {
        self.notices.do_send(notice);
    }
}

/// Encodes an `error` frame and counts it in `roomhub_errors_total`.
pub fn error_frame(
    metrics: &crate::metrics::Metrics,
    reference: Option<&str>,
    code: crate::protocol::ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> String {
    metrics.error(code);
    crate::protocol::encode(&crate::protocol::ServerFrame::Error {
        reference,
        code,
        message,
        retry_after_ms,
        room: None,
    })
}

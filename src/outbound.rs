//! What rooms and the directory send to sessions, and the one way they send it.
//!
//! Every frame bound for a client goes through [`offer`], which never waits:
//! a session whose mailbox is full is told to close with 1013 (too slow), so
//! one slow reader can never hold up a room or grow the hub's memory.

use crate::protocol::{CloseCode, RoomName};
use actix::{Message, Recipient};
use bytestring::ByteString;
use std::sync::Arc;

impl From<ByteString> for Outbound {
    fn from(frame: ByteString) -> Self {
        Outbound::Frame(frame)
    }
}

#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Outbound {
    /// An encoded frame to write as-is. The bytes are shared by every recipient.
    Frame(ByteString),
    /// Several frames to write in order (a room's group of newly durable
    /// messages): one mailbox message instead of one per frame.
    Frames(Arc<[ByteString]>),
    /// Close the connection with this code.
    Close(CloseCode),
    /// The room dropped this session (it failed and restarts); the session
    /// forgets the room and tells the client with an `error`.
    RoomClosed(RoomName),
    /// The node drains: send `shutdown`, then close with 1001.
    Drain,
}

/// What became of one offered frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offer {
    Delivered,
    /// The session could not keep up and was told to close with 1013.
    Evicted,
    /// The session is gone.
    Gone,
}

pub fn offer(outbox: &Recipient<Outbound>, message: Outbound) -> Offer {
    match outbox.try_send(message) {
        Ok(()) => Offer::Delivered,
        Err(actix::prelude::SendError::Full(_)) => {
            // `do_send` bypasses the full mailbox so the close still arrives.
            outbox.do_send(Outbound::Close(CloseCode::TooSlow));
            Offer::Evicted
        }
        Err(actix::prelude::SendError::Closed(_)) => Offer::Gone,
    }
}

/// Encodes an `error` frame and counts it in `roomhub_errors_total`.
pub fn error_frame(
    metrics: &crate::metrics::Metrics,
    reference: Option<&str>,
    code: crate::protocol::ErrorCode,
    message: &str,
    retry_after_ms: Option<u64>,
) -> ByteString {
    metrics.error(code);
    ByteString::from(crate::protocol::encode(
        &crate::protocol::ServerFrame::Error {
            reference,
            code,
            message,
            retry_after_ms,
            room: None,
        },
    ))
}

//! The messages a room actor accepts. Fields are named and documented; this
//! is the whole session ↔ room interface.

use crate::metrics::Metrics;
use crate::outbound::{error_frame, SessionLink};
use crate::protocol::{encode, ServerFrame};
use crate::protocol::{EncodedMessage, ErrorCode, SessionId, Since, UserId};
use crate::storage::StoreError;
use actix::Message;
use serde_json::value::RawValue;
use tokio::sync::oneshot;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RoomError {
    #[error("join the room first")]
    NotJoined,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the room is restarting; try again")]
    Restarting,
    /// `unavailable` means nothing was committed, unless the message says
    /// the outcome is unknown or names the offset it was committed at.
    #[error("{}", unavailable_text(.0))]
    Unavailable(#[from] crate::cluster::ClusterError),
}

fn unavailable_text(error: &crate::cluster::ClusterError) -> String {
    if error.not_committed() {
        format!("not committed: {error}")
    } else {
        error.to_string()
    }
}

impl RoomError {
    pub fn code(&self) -> ErrorCode {
        match self {
            RoomError::NotJoined => ErrorCode::NotJoined,
            RoomError::Store(e) if e.is_unavailable() => ErrorCode::Unavailable,
            RoomError::Store(_) | RoomError::Restarting => ErrorCode::Internal,
            RoomError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }
}

/// Adds a session to the room (or refreshes it if already there). The room
/// writes `joined` (history included) to the session itself, before any
/// later message of the room; the answer says whether it did.
#[derive(Message, Clone)]
#[rtype(result = "Result<(), RoomError>")]
pub struct Join {
    pub session: SessionId,
    pub user: UserId,
    pub link: SessionLink,
    /// Resume point: replay exactly what came after it, if still retained.
    pub since: Option<Since>,
    /// How many recent messages to replay without (a usable) `since`.
    pub history: usize,
    /// The client's `ref`, echoed in `joined`.
    pub reference: Option<String>,
}

/// Removes a session (a `leave`, a closed connection or an eviction).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Leave {
    pub session: SessionId,
}

/// Who to tell about a publish's outcome.
pub enum PublishReply {
    /// A WebSocket session: an `ack` (or `error`) frame echoing `reference`.
    Session {
        session: SessionId,
        link: SessionLink,
        reference: Option<String>,
    },
    /// The HTTP API: the offset once durable.
    Api(oneshot::Sender<Result<u64, RoomError>>),
}

impl PublishReply {
    /// The publishing session, if a session published.
    pub fn session(&self) -> Option<SessionId> {
        match self {
            PublishReply::Session { session, .. } => Some(*session),
            PublishReply::Api(_) => None,
        }
    }

    pub fn ack(self, offset: u64) {
        match self {
            PublishReply::Session {
                link, reference, ..
            } => {
                let frame = encode(&ServerFrame::Ack {
                    reference: reference.as_deref(),
                    offset: Some(offset),
                });
                link.offer_text(&frame);
            }
            PublishReply::Api(tx) => {
                let _ = tx.send(Ok(offset));
            }
        }
    }

    pub fn fail(self, metrics: &Metrics, error: RoomError) {
        match self {
            PublishReply::Session {
                link, reference, ..
            } => {
                let frame = error_frame(
                    metrics,
                    reference.as_deref(),
                    error.code(),
                    &error.to_string(),
                    None,
                );
                link.offer_text(&frame);
            }
            PublishReply::Api(tx) => {
                let _ = tx.send(Err(error));
            }
        }
    }
}

/// Stores and fans out one message. Sessions must be members.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Publish {
    /// The author shown in the message.
    pub user: UserId,
    pub data: Box<RawValue>,
    /// Idempotency key: a repeat within the window is acked with the first offset.
    pub key: Option<String>,
    pub reply: PublishReply,
}

/// A member's typing indicator, relayed to the other users in the room.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Typing {
    pub session: SessionId,
    pub active: bool,
}

/// Asks for the `presence` frame, sent to the member's session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct PresenceQuery {
    pub session: SessionId,
    pub reference: Option<String>,
}

/// A page of history. `after` pages forward (the oldest `limit` messages after
/// it); otherwise the newest `limit` below `before` (or overall).
#[derive(Message, Debug, Clone, Copy)]
#[rtype(result = "Result<HistoryPage, RoomError>")]
pub struct HistoryQuery {
    pub after: Option<u64>,
    pub before: Option<u64>,
    pub limit: usize,
}

#[derive(Debug, Clone)]
pub struct HistoryPage {
    pub epoch: u64,
    pub messages: Vec<EncodedMessage>,
}

/// The store has made more of the room's offsets durable (see the room's
/// `DurableSignal`), or a write failed.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct Persisted {
    pub result: Result<(), WriteFailure>,
}

/// A failed write, with the store generation it was made against: a room
/// ignores failures of writes from before its last reload.
#[derive(Debug)]
pub(crate) struct WriteFailure {
    pub generation: u64,
    pub error: StoreError,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ClusterError;

    #[test]
    fn unavailable_says_whether_anything_was_committed() {
        let refused = RoomError::Unavailable(ClusterError::LinkDown);
        assert!(
            refused.to_string().starts_with("not committed"),
            "{refused}"
        );
        let unknown = RoomError::Unavailable(ClusterError::OutcomeUnknown("timed out".into()));
        let text = unknown.to_string();
        assert!(
            text.contains("outcome is unknown") && text.contains("same key"),
            "{text}"
        );
        assert!(!text.contains("not committed"), "{text}");
        let no_leader = RoomError::Unavailable(ClusterError::NoResponders);
        let text = no_leader.to_string();
        assert!(
            text.starts_with("not committed") && text.contains("no responders"),
            "{text}"
        );
        for error in [refused, unknown, no_leader] {
            assert_eq!(error.code(), ErrorCode::Unavailable);
        }
    }
}

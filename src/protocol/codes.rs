//! The error codes of `error` frames and the WebSocket close codes: one table
//! each, so the session and the docs cannot drift apart.

use serde::Serialize;

/// The `code` of an `error` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not JSON, or JSON but not an object.
    InvalidJson,
    /// A known frame with missing or ill-typed fields, or an invalid name.
    BadRequest,
    /// An object whose `type` the hub does not know.
    UnknownType,
    /// `publish`, `typing` or `presence` for a room the session has not joined.
    NotJoined,
    /// The session's credentials do not allow this room.
    Forbidden,
    /// A `data` larger than `limits.max_message_bytes`.
    TooLarge,
    /// The connection's bucket for publish/typing/direct is empty.
    RateLimited,
    /// More joins than `limits.max_rooms_per_connection`.
    RoomLimit,
    /// The cluster link (or the store) is down: nothing was committed,
    /// unless the message says the outcome is unknown or names the offset.
    Unavailable,
    /// The hub failed (storage error); the request had no effect.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::InvalidJson,
        ErrorCode::BadRequest,
        ErrorCode::UnknownType,
        ErrorCode::NotJoined,
        ErrorCode::Forbidden,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::RoomLimit,
        ErrorCode::Unavailable,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::RoomLimit => "room_limit",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Why the hub closes a WebSocket, with the code it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client asked to close.
    Normal,
    /// 1001: the node drains; reconnect elsewhere and resume with `since`.
    Draining,
    /// 1002: the client broke the WebSocket framing rules (RFC 6455).
    ProtocolError,
    /// 1007: text (or a close reason) that is not UTF-8.
    InvalidData,
    /// 1008: repeated abuse, or the token expired.
    Policy,
    /// 1009: a frame over `limits.max_frame_bytes`.
    FrameTooBig,
    /// 1011: the hub failed.
    Internal,
    /// 1013: the outbound queue overflowed; reconnect and resume with `since`.
    TooSlow,
}

impl CloseCode {
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::Draining => 1001,
            CloseCode::ProtocolError => 1002,
            CloseCode::InvalidData => 1007,
            CloseCode::Policy => 1008,
            CloseCode::FrameTooBig => 1009,
            CloseCode::Internal => 1011,
            CloseCode::TooSlow => 1013,
        }
    }

    /// The reason text sent in the close frame and written to the log.
    pub fn reason(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::Draining => "node draining",
            CloseCode::ProtocolError => "protocol error",
            CloseCode::InvalidData => "invalid UTF-8",
            CloseCode::Policy => "policy violation",
            CloseCode::FrameTooBig => "frame too big",
            CloseCode::Internal => "internal error",
            CloseCode::TooSlow => "too slow to keep up",
        }
    }
}

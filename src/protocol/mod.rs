//! The wire protocol, version 1 (`../shared/design/PROTOCOL.md` is the contract).
//!
//! PURE: no actix, sled, NATS or I/O lives here, so the codec can be unit
//! tested, benchmarked and fuzzed on its own. Everything that crosses the
//! WebSocket is defined in this module: the names clients may use
//! ([`names`]), what clients send ([`client`]), what the hub sends
//! ([`server`]) and the error and close codes ([`codes`]).

pub mod client;
pub mod codes;
pub mod names;
pub mod server;

/// The protocol version announced in `welcome`.
pub const PROTOCOL_VERSION: u32 = 1;

/// The most history a single `join` or `history` request may ask for.
pub const MAX_HISTORY_PAGE: usize = 200;

/// The longest `ref` or idempotency `key` a client may send.
pub const MAX_REF_CHARS: usize = 64;

pub use client::{decode, ClientFrame, ClientRequest, DecodeError, Since};
pub use codes::{CloseCode, ErrorCode};
pub use names::{NameError, RoomName, SessionId, UserId};
pub use server::{encode, EncodedMessage, Message, PresenceEntry, ServerFrame};

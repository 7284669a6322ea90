//! The wire protocol, version 1 (`docs/protocol.md` is its reference).
//!
//! PURE: no actix, sled, NATS or I/O lives here, so the codec can be unit
//! tested, benchmarked and fuzzed on its own. Everything that crosses the
//! WebSocket is defined in this module: the names clients may use
//! ([`names`]), what clients send ([`client`]), what the hub sends
//! ([`server`]), the error and close codes ([`codes`]) and what `data` may
//! hold ([`data`]).

pub mod client;
pub mod codes;
pub mod data;
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
pub use data::{check_data, DataError, MAX_DATA_DEPTH};
pub use names::{NameError, RoomName, SessionId, UserId};
pub use server::{encode, EncodedMessage, Message, PresenceEntry, ServerFrame};

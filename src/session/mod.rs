//! The WebSocket session: one actor per connection.
//!
//! Owns the connection's lifecycle (welcome, heartbeat, close with a code),
//! decodes client frames and turns them into room messages, and writes what
//! rooms and the directory hand it. After the handshake the session owns the
//! TCP socket itself (`socket`): no HTTP dispatcher or response body stays
//! in between. `frames` decodes and checks client frames (RFC 6455, memory
//! bounded by the frame limit) without touching a socket, so the fuzz
//! target drives the very code a session runs. Nothing outside this module
//! knows how the socket is driven. `deflate` negotiates permessage-deflate
//! (RFC 7692) at the upgrade on terms that keep idle connections free of
//! deflate state.

mod actor;
mod deflate;
pub mod frames;
mod ledger;
mod outbox;
mod socket;
mod upgrade;

pub use outbox::encode_text;
pub use upgrade::{serve_upgrade, ws_route};

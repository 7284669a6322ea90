//! The WebSocket session: one actor per connection.
//!
//! Owns the connection's lifecycle (welcome, heartbeat, close with a code),
//! decodes client frames and turns them into room messages, and writes what
//! rooms and the directory hand it. After the handshake the session owns the
//! TCP socket itself (`socket`): no HTTP dispatcher or response body stays
//! in between, and framing is actix-http's `ws` codec. Nothing outside this
//! module knows how the socket is driven.

mod actor;
mod ledger;
mod outbox;
mod socket;
mod upgrade;

pub use outbox::encode_text;
pub use upgrade::{serve_upgrade, ws_route};

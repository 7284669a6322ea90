//! The WebSocket session: one actor per connection.
//!
//! Owns the connection's lifecycle (welcome, heartbeat, close with a code),
//! decodes client frames and turns them into room messages, and writes what
//! rooms and the directory hand it. This module is the only user of
//! actix-web-actors: swapping the WebSocket layer (e.g. for actix-ws) touches
//! nothing outside it.

mod actor;
mod ledger;
mod upgrade;
mod watchdog;

pub use upgrade::ws_route;
pub use watchdog::Connection;

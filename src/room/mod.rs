//! Rooms: one [`RoomActor`] per room per node, the only writer of its log.
//!
//! - [`messages`]: what sessions and the HTTP API ask of a room.
//! - [`actor`]: assigns offsets, appends through the store, fans out each
//!   message encoded once, tracks membership and presence.
//! - [`registry`]: maps names to room actors, starts them on first use; idle
//!   empty rooms stop themselves and leave the registry.
//! - [`expiry_sweep`]: starts rooms that are not running but hold messages
//!   past `history.ttl_secs`, so they prune them (rooms prune only themselves).
//!
//! A room never sees a socket: it hands frames encoded once to its members'
//! [`crate::outbound::SessionLink`]s, which write them to the sessions'
//! connections without waking the sessions.

pub mod actor;
pub mod expiry_sweep;
pub mod messages;
mod presence;
pub mod registry;
mod replica;

pub use actor::RoomActor;
pub use messages::*;
pub use registry::{RoomContext, RoomRegistry, RoomSummary};

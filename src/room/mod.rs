//! Rooms: one [`RoomActor`] per room per node, the only writer of its log.
//!
//! - [`messages`]: what sessions and the HTTP API ask of a room.
//! - [`actor`]: assigns offsets, appends through the store, fans out each
//!   message encoded once, tracks membership and presence.
//! - [`registry`]: maps names to room actors, starts them on first use; idle
//!   empty rooms stop themselves and leave the registry.
//!
//! A room never touches a socket: it hands encoded frames to sessions'
//! mailboxes through [`crate::outbound::offer`].

pub mod actor;
pub mod messages;
mod presence;
pub mod registry;
mod replica;

pub use actor::RoomActor;
pub use messages::*;
pub use registry::{RoomContext, RoomRegistry, RoomSummary};

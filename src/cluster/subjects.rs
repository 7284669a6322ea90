//! NATS names for a room. Room names may hold characters NATS forbids in
//! subjects and stream names (`.`, `*`, `>`, spaces, any Unicode), so a room
//! is named by a hash of its name: 128 bits of SHA-256, hex.

use crate::protocol::RoomName;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
}

impl Subjects {
    /// `prefix` is `cluster.subject_prefix`, already validated as `[A-Za-z0-9_-]+`.
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    fn token(room: &RoomName) -> String {
        let digest = Sha256::digest(room.as_str().as_bytes());
        digest[..16].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The JetStream stream that is the room's cluster log (one per room, so
    /// its sequence numbers are the room's offsets, without gaps).
    pub fn stream(&self, room: &RoomName) -> String {
        format!("{}_room_{}", self.prefix, Self::token(room))
    }

    /// The one subject that stream holds.
    pub fn log(&self, room: &RoomName) -> String {
        format!("{}.log.{}", self.prefix, Self::token(room))
    }

    /// Core NATS: presence and typing between the nodes serving the room.
    pub fn events(&self, room: &RoomName) -> String {
        format!("{}.room.{}", self.prefix, Self::token(room))
    }

    /// Core NATS: direct messages, seen by every node.
    pub fn direct(&self) -> String {
        format!("{}.direct", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_nats_safe_and_distinct() {
        let s = Subjects::new("roomhub");
        let a = RoomName::parse("team.a:b").unwrap();
        let b = RoomName::parse("team-a").unwrap();
        assert_ne!(s.stream(&a), s.stream(&b));
        for name in [s.stream(&a), s.log(&a), s.events(&a)] {
            assert!(!name.contains(['*', '>', ' ', ':']));
        }
        assert!(!s.stream(&a).contains('.'));
        assert_eq!(s.log(&a).split('.').count(), 3);
    }
}

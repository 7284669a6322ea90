//! NATS names. Room names may hold characters NATS forbids in subjects and
//! stream names (`.`, `*`, `>`, spaces, any Unicode), so a room is named by a
//! hash of its name: 128 bits of SHA-256, hex. The same hash picks the
//! room's partition: the one of `cluster.partitions` JetStream streams that
//! holds its log, as one subject of its own.

use crate::protocol::RoomName;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone)]
pub struct Subjects {
    prefix: String,
    partitions: u32,
}

/// Where a room's log lives: its partition's stream and its own subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoomLog {
    pub partition: u32,
    pub stream: String,
    /// The subject the room's records are stored under.
    pub subject: String,
    /// Where JetStream republishes each record once stored (core NATS):
    /// the live feed of the nodes serving the room.
    pub live: String,
}

impl Subjects {
    /// `prefix` is `cluster.subject_prefix`, already validated as
    /// `[A-Za-z0-9_-]+`; `partitions` is `cluster.partitions` (≥ 1).
    pub fn new(prefix: &str, partitions: u32) -> Self {
        Self {
            prefix: prefix.to_owned(),
            partitions: partitions.max(1),
        }
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    fn digest(room: &RoomName) -> [u8; 16] {
        let digest = Sha256::digest(room.as_str().as_bytes());
        let mut out = [0; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }

    fn token(room: &RoomName) -> String {
        Self::digest(room)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    pub fn partition_of(&self, room: &RoomName) -> u32 {
        let digest = Self::digest(room);
        u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]) % self.partitions
    }

    pub fn room_log(&self, room: &RoomName) -> RoomLog {
        let partition = self.partition_of(room);
        let token = Self::token(room);
        RoomLog {
            partition,
            stream: self.partition_stream(partition),
            subject: format!("{}.log.{partition}.{token}", self.prefix),
            live: format!("{}.live.{partition}.{token}", self.prefix),
        }
    }

    /// The JetStream stream of partition `p`.
    pub fn partition_stream(&self, partition: u32) -> String {
        format!("{}_log_{partition}", self.prefix)
    }

    /// Every room subject of partition `p` (the stream's subjects).
    pub fn partition_subjects(&self, partition: u32) -> String {
        format!("{}.log.{partition}.*", self.prefix)
    }

    /// The republish mapping of partition `p`: stored `log.p.<room>` →
    /// live `live.p.<room>`.
    pub fn partition_live_mapping(&self, partition: u32) -> String {
        format!("{}.live.{partition}.{{{{wildcard(1)}}}}", self.prefix)
    }

    /// The stream-per-room layout of roomhub before partitions (store
    /// format of the cluster 1): the streams' name prefix, to find them.
    pub fn legacy_stream_prefix(&self) -> String {
        format!("{}_room_", self.prefix)
    }

    /// The stream the stream-per-room layout kept `room`'s log in.
    pub fn legacy_stream(&self, room: &RoomName) -> String {
        format!("{}{}", self.legacy_stream_prefix(), Self::token(room))
    }

    /// The one subject of that stream.
    pub fn legacy_subject(&self, room: &RoomName) -> String {
        format!("{}.log.{}", self.prefix, Self::token(room))
    }

    /// Core NATS: presence and typing between the nodes serving the room.
    pub fn events(&self, room: &RoomName) -> String {
        format!("{}.room.{}", self.prefix, Self::token(room))
    }

    /// Core NATS: each node's heartbeat and goodbye, seen by every node.
    pub fn nodes_alive(&self) -> String {
        format!("{}.nodes.alive", self.prefix)
    }

    /// Core NATS: requests for every node's counts (`?scope=cluster`).
    pub fn nodes_query(&self) -> String {
        format!("{}.nodes.query", self.prefix)
    }

    /// Core NATS: "who serves this room?" (payload: the room's name), asked
    /// by a room that starts being served; a node not serving it answers
    /// at once that nobody is there (a node serving it answers on the
    /// room's events subject with its presence).
    pub fn nodes_serving(&self) -> String {
        format!("{}.nodes.serving", self.prefix)
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
        let s = Subjects::new("roomhub", 8);
        let a = RoomName::parse("team.a:b").unwrap();
        let b = RoomName::parse("team-a").unwrap();
        assert_ne!(s.room_log(&a).subject, s.room_log(&b).subject);
        let log = s.room_log(&a);
        for name in [&log.stream, &log.subject, &log.live, &s.events(&a)] {
            assert!(!name.contains(['*', '>', ' ', ':']), "{name}");
        }
        assert!(!log.stream.contains('.'));
        assert_eq!(log.subject.split('.').count(), 4);
        assert!(log.partition < 8);
        assert_eq!(log.stream, s.partition_stream(log.partition));
    }

    /// A room's subject falls in its partition's stream and nowhere else,
    /// and the stream-per-room layout's subjects (three tokens) never
    /// overlap the partitions' (four), so both can live during a migration.
    #[test]
    fn rooms_spread_over_partitions() {
        let s = Subjects::new("p", 8);
        let mut used = [0u32; 8];
        for i in 0..800 {
            let room = RoomName::parse(&format!("room-{i}")).unwrap();
            used[s.partition_of(&room) as usize] += 1;
        }
        assert!(used.iter().all(|&n| n > 50), "{used:?}");
        assert_eq!(s.partition_subjects(3), "p.log.3.*");
        assert_eq!(s.partition_live_mapping(3), "p.live.3.{{wildcard(1)}}");
    }
}

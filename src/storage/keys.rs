//! The key layout of the store (format v5): every room in one sled tree.
//!
//! ```text
//! tree "meta":  "format_version" → u32 BE    "node_id" → utf-8
//!               "incarnation"    → u64 BE: the run that has the store open
//!               "clean_close"    → u64 BE: the last run that closed cleanly
//!               "acks_unflushed" → 1 byte: that run acked before flushing (batched)
//! tree "log":   0x00 "seq"       → u64 BE: write groups ever applied
//!               'r' room          → epoch | last offset | incarnation | first
//!                                   retained offset | ring size (u64 BE each)
//!               's' room 0x00 slot → the encoded `message` frame (JSON) whose
//!                                   offset % ring size is `slot` (u64 BE), or
//!                                   {"offset":N,"lost":true} in place of one
//!                                   found unreadable (never served)
//!               'k' room 0x00 key  → offset u64 BE | ts u64 BE
//! ```
//! A room's messages live in a ring of slots, so appending to a room at its
//! retention limit overwrites the oldest message's slot instead of creating
//! one key and deleting another: sled's tree keeps its shape, which keeps
//! its log, its memory and its writes small (BENCHMARKS.md, "Storage soak").
//! Every message carries its own offset, which readers check, so a slot that
//! holds another offset than the one asked for is simply not that message.
//! Since v5 a header's `last` may trail the ring by a few appends (it is
//! written only when readers could not follow the ring to the newest offset;
//! [`super::headers`]). Room names never contain 0x00, so `'s' room 0x00` is an exact prefix of one
//! room's slots. Formats v2/v3 keyed messages by offset (`'m' room 0x00
//! offset`); the v4 step moves them into rings.

pub const META_TREE: &str = "meta";
pub const LOG_TREE: &str = "log";
pub const FORMAT_VERSION_KEY: &[u8] = b"format_version";
pub const NODE_ID_KEY: &[u8] = b"node_id";
pub const INCARNATION_KEY: &[u8] = b"incarnation";
pub const CLEAN_CLOSE_KEY: &[u8] = b"clean_close";
pub const ACKS_UNFLUSHED_KEY: &[u8] = b"acks_unflushed";
/// In the log tree, so it is written in the same sled batches as the rooms.
pub const SEQ_KEY: &[u8] = b"\x00seq";

const ROOM: u8 = b'r';
/// Formats v2 and v3: messages keyed by offset (read only by the v4 step).
const MESSAGE: u8 = b'm';
const SLOT: u8 = b's';
const DEDUP: u8 = b'k';

fn prefixed(tag: u8, room: &[u8], extra: usize) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + room.len() + extra);
    key.push(tag);
    key.extend_from_slice(room);
    key
}

pub fn room_meta_key(room: &[u8]) -> Vec<u8> {
    prefixed(ROOM, room, 0)
}

/// Every room header's key starts with this.
pub const ROOM_HEADER_PREFIX: &[u8] = &[ROOM];

/// The room name in a header key.
pub fn room_of_header(key: &[u8]) -> Option<&[u8]> {
    key.strip_prefix(ROOM_HEADER_PREFIX)
}

/// A room log's header: its epoch, the newest offset ever assigned (as
/// written: [`super::headers::exact`] follows the ring past it), the run
/// (incarnation) that last wrote it (which tells after an unclean stop which
/// rooms may have lost writes acked before a flush), the oldest offset still
/// retained (`last + 1` when none is) and the size of its ring of slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub epoch: u64,
    pub last: u64,
    pub incarnation: u64,
    pub first: u64,
    /// 0 in a v2/v3 header: its messages are still keyed by offset.
    pub ring: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; 40] {
        let mut out = [0u8; 40];
        for (i, word) in [
            self.epoch,
            self.last,
            self.incarnation,
            self.first,
            self.ring,
        ]
        .iter()
        .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&word.to_be_bytes());
        }
        out
    }

    /// Reads a v4 header, or a v3 (24 bytes) or v2 (16 bytes) one: no ring.
    pub fn decode(bytes: &[u8]) -> Option<Header> {
        let word = |i: usize| Some(u64::from_be_bytes(bytes.get(i..i + 8)?.try_into().ok()?));
        match bytes.len() {
            16 | 24 | 40 => Some(Header {
                epoch: word(0)?,
                last: word(8)?,
                incarnation: if bytes.len() >= 24 { word(16)? } else { 0 },
                first: if bytes.len() == 40 { word(24)? } else { 0 },
                ring: if bytes.len() == 40 { word(32)? } else { 0 },
            }),
            _ => None,
        }
    }

    /// Offsets retained: `first..=last` (empty when `first > last`).
    pub fn retained(&self) -> std::ops::RangeInclusive<u64> {
        self.first..=self.last
    }
}

/// Formats v2/v3: the prefix of a room's offset-keyed messages.
pub fn message_prefix(room: &[u8]) -> Vec<u8> {
    let mut key = prefixed(MESSAGE, room, 8);
    key.push(0);
    key
}

/// Formats v2/v3: a message's key by offset.
pub fn message_key(room: &[u8], offset: u64) -> Vec<u8> {
    let mut key = message_prefix(room);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The number at the end of a message or slot key.
pub fn offset_of(message_key: &[u8]) -> Option<u64> {
    let tail = message_key
        .len()
        .checked_sub(8)
        .map(|i| &message_key[i..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
}

pub fn slot_prefix(room: &[u8]) -> Vec<u8> {
    let mut key = prefixed(SLOT, room, 8);
    key.push(0);
    key
}

/// What a slot holds in place of a message found unreadable (format v5):
/// it keeps the offset's place in the room's run of offsets, so the log
/// stays consistent, and is never served. JSON with the offset, so the
/// walk past a trailing header ([`super::headers::exact`]) reads it as any
/// other slot.
pub fn lost_marker(offset: u64) -> Vec<u8> {
    format!(r#"{{"offset":{offset},"lost":true}}"#).into_bytes()
}

/// Whether a slot holds a [`lost_marker`].
pub fn is_lost_marker(value: &[u8]) -> bool {
    value.starts_with(br#"{"offset":"#) && value.ends_with(br#","lost":true}"#)
}

/// The key of the slot that holds `offset` in a ring of `ring` slots.
pub fn slot_key(room: &[u8], offset: u64, ring: u64) -> Vec<u8> {
    let mut key = slot_prefix(room);
    key.extend_from_slice(&(offset % ring.max(1)).to_be_bytes());
    key
}

pub fn dedup_prefix(room: &[u8]) -> Vec<u8> {
    let mut key = prefixed(DEDUP, room, 16);
    key.push(0);
    key
}

pub fn dedup_key(room: &[u8], idempotency_key: &str) -> Vec<u8> {
    let mut key = dedup_prefix(room);
    key.extend_from_slice(idempotency_key.as_bytes());
    key
}

/// Two big-endian u64s: (epoch, last offset) or (offset, ts).
pub fn pair(a: u64, b: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&a.to_be_bytes());
    out[8..].copy_from_slice(&b.to_be_bytes());
    out
}

pub fn unpair(bytes: &[u8]) -> Option<(u64, u64)> {
    if bytes.len() != 16 {
        return None;
    }
    let a = u64::from_be_bytes(bytes[..8].try_into().ok()?);
    let b = u64::from_be_bytes(bytes[8..].try_into().ok()?);
    Some((a, b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_keys_sort_by_offset_within_a_room() {
        let a = message_key(b"room", 2);
        let b = message_key(b"room", 256);
        assert!(a < b);
        assert!(a.starts_with(&message_prefix(b"room")));
        // A room whose name extends another's is not inside its prefix.
        assert!(!message_key(b"room2", 1).starts_with(&message_prefix(b"room")));
        assert_eq!(offset_of(&b), Some(256));
        assert_eq!(unpair(&pair(7, 9)), Some((7, 9)));
    }

    #[test]
    fn headers_round_trip_and_v2_headers_read_as_incarnation_zero() {
        let h = Header {
            epoch: 5,
            last: 9,
            incarnation: 3,
            first: 2,
            ring: 100,
        };
        assert_eq!(Header::decode(&h.encode()), Some(h));
        let v2 = Header::decode(&pair(5, 9)).unwrap();
        assert_eq!((v2.epoch, v2.last, v2.incarnation, v2.ring), (5, 9, 0, 0));
        assert_eq!(slot_key(b"r", 205, 100), slot_key(b"r", 5, 100));
        assert!(slot_key(b"r", 5, 100).starts_with(&slot_prefix(b"r")));
        assert_eq!(Header::decode(b"short"), None);
        assert_eq!(
            room_of_header(&room_meta_key(b"lobby")),
            Some(&b"lobby"[..])
        );
    }
}

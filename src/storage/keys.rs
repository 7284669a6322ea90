//! The key layout of store format v2: every room in one sled tree.
//!
//! ```text
//! tree "meta":  "format_version" → u32 BE    "node_id" → utf-8
//! tree "log":   'r' room            → epoch u64 BE | last offset u64 BE
//!               'm' room 0x00 offset → the encoded `message` frame (JSON)
//!               'k' room 0x00 key    → offset u64 BE | ts u64 BE
//! ```
//! Room names never contain 0x00, so `'m' room 0x00` is an exact prefix of one
//! room's messages, and big-endian offsets sort numerically.

pub const META_TREE: &str = "meta";
pub const LOG_TREE: &str = "log";
pub const FORMAT_VERSION_KEY: &[u8] = b"format_version";
pub const NODE_ID_KEY: &[u8] = b"node_id";

const ROOM: u8 = b'r';
const MESSAGE: u8 = b'm';
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

pub fn message_prefix(room: &[u8]) -> Vec<u8> {
    let mut key = prefixed(MESSAGE, room, 8);
    key.push(0);
    key
}

pub fn message_key(room: &[u8], offset: u64) -> Vec<u8> {
    let mut key = message_prefix(room);
    key.extend_from_slice(&offset.to_be_bytes());
    key
}

/// The offset at the end of a message key.
pub fn offset_of(message_key: &[u8]) -> Option<u64> {
    let tail = message_key
        .len()
        .checked_sub(8)
        .map(|i| &message_key[i..])?;
    Some(u64::from_be_bytes(tail.try_into().ok()?))
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
}

//! Room headers written lazily (format v5): how far a stored header may lag
//! behind its room's ring, how readers find the exact header, and the
//! writer's memory of the headers it has not written yet.
//!
//! Why: rewriting a room's header with every write group made two sled
//! inserts of every message (in scenario B, 100 rooms at 100 messages/s,
//! nearly every group touches every room), and sled's insert is most of the
//! store's cost on the hub's core (BENCHMARKS.md, "where the hub's core goes
//! in B"). A plain append changes only the header's `last` (and, once the
//! ring is full, `first`, which follows from `last`), and both can be read
//! back from the ring: the slot of `last + 1` holds offset `last + 1` exactly
//! when that message was appended after the header was written. So the
//! header is written only when something cannot be read back that way:
//!
//! - the room's log is new, or its epoch, run (incarnation) or ring changes
//!   (the lifecycle's crash rules need the run of every room written);
//! - an append is not the next offset, or a prune, truncate or re-layout
//!   moved `first` or `last` other than a full ring would;
//! - `last` would lag the stored one by [`lag_limit`] or more (at most 63
//!   appends, and always less than the ring, so the slots after the stored
//!   `last` cannot have wrapped around onto it).
//!
//! A batch writes its slots and (when due) its header atomically, and sled
//! recovers a prefix of its batches after a crash, so the slots after a
//! stored header are always a run of consecutive offsets.

use super::keys::{self, Header};
use std::collections::HashMap;

/// The most appends a stored header may be behind (for large rings).
const MAX_LAG: u64 = 64;

/// How many rooms the writer remembers unwritten headers for; past this, at
/// the end of a group, it writes them all and forgets them (each entry is a
/// room name and two headers, so this bounds the memory at a few MB).
const MAX_REMEMBERED: usize = 16_384;

/// A header is rewritten once `last` has moved this far from the stored one:
/// at most [`MAX_LAG`], and less than half the ring, so readers can find the
/// newest offset by looking at the slots after the stored `last`.
pub fn lag_limit(ring: u64) -> u64 {
    (ring.max(1) / 2).clamp(1, MAX_LAG)
}

/// The offset stored in a slot (a `message` frame), without decoding the rest.
pub fn offset_in(value: &[u8]) -> Option<u64> {
    #[derive(serde::Deserialize)]
    struct Head {
        offset: u64,
    }
    serde_json::from_slice::<Head>(value).ok().map(|h| h.offset)
}

/// The room's header as its ring has it: the stored one, moved on past every
/// slot after the stored `last` that holds its own offset.
pub fn exact(log: &sled::Tree, room: &[u8], stored: Header) -> sled::Result<Header> {
    let ring = stored.ring.max(1);
    let mut header = stored;
    // A lag is always below the ring (module docs); the bound only keeps a
    // damaged log from being walked round and round.
    for _ in 1..ring {
        let next = header.last + 1;
        let Some(value) = log.get(keys::slot_key(room, next, ring))? else {
            break;
        };
        if offset_in(&value) != Some(next) {
            break;
        }
        if header.first > header.last {
            header.first = next;
        }
        header.last = next;
    }
    header.first = header.first.max((header.last + 1).saturating_sub(ring));
    Ok(header)
}

/// Whether `now` must be written over `stored` for readers to find it again.
pub fn must_write(stored: Option<&Header>, now: &Header) -> bool {
    let Some(stored) = stored else { return true };
    let ring = now.ring.max(1);
    let derived_first = stored.first.max((now.last + 1).saturating_sub(ring));
    stored.epoch != now.epoch
        || stored.incarnation != now.incarnation
        || stored.ring != now.ring
        || now.last < stored.last
        || now.last - stored.last >= lag_limit(ring)
        || derived_first != now.first
}

/// What the writer knows of a room: the header in the tree (once the group's
/// batches are applied) and the exact one.
#[derive(Debug, Clone, Copy)]
pub struct Known {
    pub stored: Option<Header>,
    pub exact: Header,
}

/// The writer's memory of room headers, kept across groups so an append
/// needs neither a header write nor a look at the ring. Entries are dropped
/// only between groups (within one, the tree may not hold the group's
/// earlier batches yet), and all of them after a failed write.
#[derive(Default)]
pub struct Remembered {
    rooms: HashMap<Vec<u8>, Known>,
}

impl Remembered {
    /// The room's header (by its key) as the writer left it, else as the tree
    /// and its ring have it; `None` for a room with no log.
    pub fn get(&self, log: &sled::Tree, room: &[u8], key: &[u8]) -> sled::Result<Option<Known>> {
        if let Some(known) = self.rooms.get(key) {
            return Ok(Some(*known));
        }
        let Some(stored) = log.get(key)?.and_then(|v| Header::decode(&v)) else {
            return Ok(None);
        };
        Ok(Some(Known {
            stored: Some(stored),
            exact: exact(log, room, stored)?,
        }))
    }

    pub fn remember(&mut self, key: Vec<u8>, known: Known) {
        self.rooms.insert(key, known);
    }

    /// After a group: forgets the rooms whose stored header is exact and, if
    /// still too many are remembered, returns the others' headers to write
    /// (then forgets them too, so only call it when the write follows).
    pub fn settle(&mut self, all: bool) -> Vec<(Vec<u8>, Header)> {
        if !all && self.rooms.len() <= MAX_REMEMBERED {
            return Vec::new();
        }
        self.rooms.retain(|_, k| k.stored != Some(k.exact));
        if !all && self.rooms.len() <= MAX_REMEMBERED / 2 {
            return Vec::new();
        }
        let due = self.rooms.drain().map(|(key, k)| (key, k.exact)).collect();
        self.rooms.shrink_to(MAX_REMEMBERED / 2);
        due
    }

    /// A write failed: the tree may hold less than remembered.
    pub fn forget_all(&mut self) {
        self.rooms.clear();
        self.rooms.shrink_to(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(last: u64, first: u64, ring: u64) -> Header {
        Header {
            epoch: 1,
            last,
            incarnation: 1,
            first,
            ring,
        }
    }

    #[test]
    fn appends_within_the_lag_need_no_header_and_others_do() {
        let stored = header(10, 1, 100);
        assert!(!must_write(Some(&stored), &header(40, 1, 100)));
        assert!(must_write(Some(&stored), &header(74, 1, 100)), "lag 64");
        assert!(must_write(Some(&stored), &header(40, 5, 100)), "a prune");
        assert!(must_write(Some(&stored), &header(9, 1, 100)), "a truncate");
        assert!(must_write(None, &stored), "a new log");
        // A full ring moves `first` with `last`: derivable.
        let full = header(100, 1, 100);
        assert!(!must_write(Some(&full), &header(110, 11, 100)));
        // A tiny ring is rewritten every time (a lag must stay below it).
        assert_eq!(lag_limit(1), 1);
        assert_eq!(lag_limit(3), 1);
        assert!(must_write(Some(&header(5, 5, 1)), &header(6, 6, 1)));
    }

    #[test]
    fn the_exact_header_is_read_back_from_the_ring() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let log = db.open_tree(keys::LOG_TREE).unwrap();
        let ring = 8;
        let put = |offset: u64| {
            let frame = format!(r#"{{"type":"message","offset":{offset},"ts":1}}"#);
            log.insert(keys::slot_key(b"r", offset, ring), frame.as_bytes())
                .unwrap();
        };
        for offset in 1..=11 {
            put(offset);
        }
        // Stored at 9 (offsets 4..=11 in the ring of 8).
        let found = exact(&log, b"r", header(9, 2, ring)).unwrap();
        assert_eq!((found.first, found.last), (4, 11));
        // Nothing after the stored `last`: the stored header is exact.
        let found = exact(&log, b"r", header(11, 4, ring)).unwrap();
        assert_eq!((found.first, found.last), (4, 11));
        // An empty log whose first append came after the header.
        let empty = header(0, 1, ring);
        let found = exact(&log, b"other", empty).unwrap();
        assert_eq!(found, empty);
    }
}

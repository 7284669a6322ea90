//! Store format v4: each room's messages live in a ring of slots.
//!
//! Why: v2/v3 keyed messages by offset, so every append to a room at its
//! retention limit created a key and every prune deleted one. sled 0.34's
//! tree then splits and merges without end, and its log and data dir grew to
//! 6–11× the retained messages (7× at 100 per room). With a ring the slot of
//! the oldest message is overwritten instead: 2.4× on disk, a third of the
//! memory, three times the appends per second (BENCHMARKS.md, "Storage
//! soak"). The layout is written out in `src/storage/keys.rs`.
//!
//! The step moves each room's offset-keyed messages (`'m' room 0x00 offset`)
//! into a ring just large enough for them (`'s' room 0x00 slot`), with a v4
//! header (first retained offset and ring size added). A room re-lays its
//! ring to `history.max_per_room` when it next loads. Each room moves in one
//! sled batch; a room already moved (v4 header, no `'m'` keys) is skipped,
//! so re-running the step after a crash is safe.

use crate::storage::keys::{self, Header};

pub fn upgrade(db: &sled::Db) -> sled::Result<()> {
    let log = db.open_tree(keys::LOG_TREE)?;
    let headers: Vec<(sled::IVec, sled::IVec)> = log
        .scan_prefix(keys::ROOM_HEADER_PREFIX)
        .collect::<sled::Result<_>>()?;
    for (key, value) in headers {
        let Some(room) = keys::room_of_header(&key) else {
            continue;
        };
        let Some(old) = Header::decode(&value) else {
            continue; // Damaged: reported when the room loads.
        };
        let prefix = keys::message_prefix(room);
        let messages: Vec<(sled::IVec, sled::IVec)> =
            log.scan_prefix(&prefix).collect::<sled::Result<_>>()?;
        if old.ring != 0 && messages.is_empty() {
            continue; // Already moved.
        }
        let first = messages
            .first()
            .and_then(|(k, _)| keys::offset_of(k))
            .unwrap_or(old.last + 1);
        let ring = (old.last + 1).saturating_sub(first).max(1);
        let mut batch = sled::Batch::default();
        for (k, v) in &messages {
            batch.remove(k.clone());
            if let Some(offset) = keys::offset_of(k) {
                batch.insert(keys::slot_key(room, offset, ring), v.clone());
            }
        }
        let header = Header { first, ring, ..old };
        batch.insert(key.clone(), &header.encode()[..]);
        log.apply_batch(batch)?;
    }
    Ok(())
}

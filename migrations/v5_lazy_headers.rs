//! Store format v5: room headers are written lazily.
//!
//! Why: a v4 header was rewritten with every write group that touched its
//! room, which made two sled inserts of nearly every message; sled's insert
//! is most of what the store costs the hub's core. In v5 a header's `last`
//! may be behind the room's ring by fewer than `lag_limit(ring)` appends
//! (at most 63), and readers move it on past the slots after it that hold
//! their own offsets (`src/storage/headers.rs` says when a header is still
//! written at once).
//!
//! v5 also lets a slot hold a `lost` marker (`{"offset":N,"lost":true}`) in
//! place of a message found unreadable: the room's run of offsets stays
//! whole, so the log does not look damaged at every start (v4 pruned the
//! unreadable offset, which moved the log's first offset past the readable
//! messages before it).
//!
//! Every v4 header is exact, which is a valid v5 header, so the step changes
//! no data. The version is raised all the same: a v4 binary would trust a v5
//! header's `last` and hand out offsets again, so it must refuse a v5 store
//! (it does: the format is newer than it supports).

pub fn upgrade(_db: &sled::Db) -> sled::Result<()> {
    Ok(())
}

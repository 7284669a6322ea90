//! Store format v3: room headers record the run (incarnation) that last
//! wrote them, and the store records its runs and clean closes.
//!
//! Why: after an unclean stop of a run that acked writes before flushing
//! them (`durability = batched`), or after its writes started failing (a
//! full disk), the rooms that run wrote may have lost acked messages that
//! clients saw. Without knowing which rooms those are, they would hand the
//! lost offsets out again in the same epoch and a resuming client would be
//! told `recovered: true` across the gap. With the incarnation in each
//! header, those rooms move to a new epoch at the next open
//! (`src/storage/lifecycle.rs`). A v3 header is the v2 header plus 8 bytes.
//!
//! The step changes nothing: v3 reads v2 headers as written by run 0 (which
//! never recorded a clean close, so no v2 room is moved), and rewrites each
//! header in the v3 shape the next time it writes the room. It is a version
//! of its own so that an older binary, which cannot read v3 headers, refuses
//! the store instead of misreading it.

pub fn upgrade(_db: &sled::Db) -> sled::Result<()> {
    Ok(())
}

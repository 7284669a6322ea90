//! The store-format version and the ordered steps that upgrade it.
//!
//! The version lives in the `meta` tree under `format_version`. A new
//! database is stamped with [`CURRENT_VERSION`] directly. An older one is
//! upgraded one version at a time by the steps in `migrations/` (one file per
//! version, each describing what changed), with the new version stamped and
//! flushed after each step, so a crash mid-upgrade resumes at the step it was
//! in (every step is idempotent). A database newer than this binary is refused.

use super::keys::{FORMAT_VERSION_KEY, META_TREE};
use super::StoreError;

#[path = "../../migrations/v2_single_keyspace.rs"]
pub mod v2_single_keyspace;
#[path = "../../migrations/v3_run_markers.rs"]
pub mod v3_run_markers;
#[path = "../../migrations/v4_ring_slots.rs"]
pub mod v4_ring_slots;
#[path = "../../migrations/v5_lazy_headers.rs"]
pub mod v5_lazy_headers;

/// The format this binary reads and writes.
pub const CURRENT_VERSION: u32 = 5;

type Step = fn(&sled::Db) -> sled::Result<()>;

/// Upgrade steps: `(version it produces, step)`, in order.
const STEPS: &[(u32, Step)] = &[
    (2, v2_single_keyspace::upgrade),
    (3, v3_run_markers::upgrade),
    (4, v4_ring_slots::upgrade),
    (5, v5_lazy_headers::upgrade),
];

/// Reads the stored version (None for a database never stamped).
pub fn stored_version(db: &sled::Db) -> Result<Option<u32>, StoreError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(FORMAT_VERSION_KEY)? {
        None => Ok(None),
        Some(bytes) => {
            let arr: [u8; 4] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| StoreError::Corrupt("bad format_version".into()))?;
            Ok(Some(u32::from_be_bytes(arr)))
        }
    }
}

pub fn stamp(db: &sled::Db, version: u32) -> Result<(), StoreError> {
    db.open_tree(META_TREE)?
        .insert(FORMAT_VERSION_KEY, &version.to_be_bytes()[..])?;
    db.flush()?;
    Ok(())
}

/// Brings `db` to [`CURRENT_VERSION`]; returns the version it found.
pub fn migrate(db: &sled::Db) -> Result<u32, StoreError> {
    let found = match stored_version(db)? {
        Some(v) => v,
        None if is_empty(db)? => {
            stamp(db, CURRENT_VERSION)?;
            return Ok(CURRENT_VERSION);
        }
        None => {
            return Err(StoreError::Corrupt(
                "the data dir holds a database with no format version".into(),
            ))
        }
    };
    if found > CURRENT_VERSION {
        return Err(StoreError::FormatTooNew {
            found,
            supported: CURRENT_VERSION,
        });
    }
    for &(version, step) in STEPS.iter().filter(|(v, _)| *v > found) {
        step(db)?;
        stamp(db, version)?;
    }
    Ok(found)
}

fn is_empty(db: &sled::Db) -> Result<bool, StoreError> {
    for name in db.tree_names() {
        if name.as_ref() == META_TREE.as_bytes() {
            continue;
        }
        if !db.open_tree(&name)?.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

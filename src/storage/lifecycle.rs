//! A store's runs ("incarnations") and what they prove about the data.
//!
//! Every open of the store starts a new incarnation; a clean close records
//! that it ended cleanly. Room headers carry the incarnation that last wrote
//! them. At the next open this tells:
//!
//! - **an unclean stop of a run that acked before flushing** (`batched`, or a
//!   run whose writes started failing): the rooms it wrote may have lost acked
//!   messages that clients saw, so each moves to a new epoch (resuming clients
//!   get `recovered: false`) instead of handing the lost offsets out again;
//! - **lost flushed writes** (damaged or truncated files that sled recovered
//!   only a prefix of): the seal file beside the database records how many
//!   write groups were flushed at the last clean close, open or sync flush;
//!   a database that holds fewer lost data it had promised, so every room
//!   moves to a new epoch.
//!
//! A `sync` run that stopped uncleanly lost nothing it acked or showed, so its
//! rooms keep their epochs.

use super::keys::{
    self, Header, ACKS_UNFLUSHED_KEY, CLEAN_CLOSE_KEY, INCARNATION_KEY, META_TREE, SEQ_KEY,
};
use super::{new_epoch, StoreError};
use crate::config::Durability;
use std::path::Path;

/// The seal's file name, in the data dir beside sled's own files.
const SEAL_FILE: &str = "roomhub.seal";

/// What opening the store found and did.
#[derive(Debug)]
pub struct Begun {
    pub incarnation: u64,
    /// Write groups applied so far (the log's `seq`).
    pub seq: u64,
    /// Rooms moved to a new epoch, and why.
    pub new_epochs: Vec<(String, &'static str)>,
}

const UNCLEAN_BATCHED: &str =
    "the previous run stopped uncleanly after acking writes it had not flushed";
const LOST_FLUSHED: &str =
    "the store lost writes it had flushed (its files are damaged or were truncated)";

fn read_u64(tree: &sled::Tree, key: &[u8]) -> Result<Option<u64>, StoreError> {
    Ok(tree
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
}

/// Starts a new incarnation: detects what the last run left, moves the rooms
/// that may have lost acked writes to new epochs, and records the new run.
pub fn begin(
    db: &sled::Db,
    log: &sled::Tree,
    dir: &Path,
    durability: Durability,
) -> Result<Begun, StoreError> {
    let meta = db.open_tree(META_TREE)?;
    let previous = read_u64(&meta, INCARNATION_KEY)?;
    let clean = previous.is_none() || read_u64(&meta, CLEAN_CLOSE_KEY)? == previous;
    let acked_unflushed = meta
        .get(ACKS_UNFLUSHED_KEY)?
        .is_some_and(|v| v.as_ref() == [1]);
    let seq = read_u64(log, SEQ_KEY)?.unwrap_or(0);
    let lost_flushed = read_seal(dir).is_some_and(|sealed| seq < sealed);
    let incarnation = previous.unwrap_or(0) + 1;

    let mut new_epochs = Vec::new();
    if lost_flushed || (!clean && acked_unflushed) {
        let mut batch = sled::Batch::default();
        for entry in log.scan_prefix(keys::ROOM_HEADER_PREFIX) {
            let (key, value) = entry?;
            let Some(header) = Header::decode(&value) else {
                continue; // A damaged header is handled when the room loads.
            };
            let reason = if lost_flushed {
                LOST_FLUSHED
            } else if Some(header.incarnation) == previous {
                UNCLEAN_BATCHED
            } else {
                continue;
            };
            let moved = Header {
                epoch: new_epoch(),
                incarnation,
                ..header
            };
            batch.insert(key.as_ref(), &moved.encode()[..]);
            let room = keys::room_of_header(&key).unwrap_or_default();
            new_epochs.push((String::from_utf8_lossy(room).into_owned(), reason));
        }
        log.apply_batch(batch)?;
    }
    meta.insert(INCARNATION_KEY, &incarnation.to_be_bytes()[..])?;
    let acks_unflushed: &[u8] = if durability == Durability::Batched {
        &[1]
    } else {
        &[0]
    };
    meta.insert(ACKS_UNFLUSHED_KEY, acks_unflushed)?;
    db.flush()?;
    write_seal(dir, seq)?;
    Ok(Begun {
        incarnation,
        seq,
        new_epochs,
    })
}

/// Records a clean end of `incarnation` (after everything is flushed).
pub fn end(db: &sled::Db, dir: &Path, incarnation: u64, seq: u64) -> Result<(), StoreError> {
    db.open_tree(META_TREE)?
        .insert(CLEAN_CLOSE_KEY, &incarnation.to_be_bytes()[..])?;
    db.flush()?;
    write_seal(dir, seq)
}

/// The number of write groups the store had flushed when last sealed.
fn read_seal(dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(SEAL_FILE)).ok()?;
    text.trim().parse().ok()
}

/// Records that `seq` write groups are flushed. Written aside and renamed, so
/// a crash leaves the old seal or the new one, never a torn one.
pub fn write_seal(dir: &Path, seq: u64) -> Result<(), StoreError> {
    use std::io::Write;
    let io = |e: std::io::Error| StoreError::Unavailable(format!("writing the seal: {e}"));
    let tmp = dir.join(format!("{SEAL_FILE}.tmp"));
    let mut file = std::fs::File::create(&tmp).map_err(io)?;
    writeln!(file, "{seq}").map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, dir.join(SEAL_FILE)).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> (sled::Db, sled::Tree) {
        // sled's threads let go of a dropped database's lock file a moment
        // after the drop: retry, bounded.
        let mut tries = 0;
        let db = loop {
            match sled::Config::new().path(dir).open() {
                Ok(db) => break db,
                Err(e) if tries < 100 => {
                    tries += 1;
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cannot reopen: {e}"),
            }
        };
        let log = db.open_tree(keys::LOG_TREE).unwrap();
        (db, log)
    }

    fn header(log: &sled::Tree, room: &[u8]) -> Header {
        Header::decode(&log.get(keys::room_meta_key(room)).unwrap().unwrap()).unwrap()
    }

    fn write_room(log: &sled::Tree, room: &[u8], incarnation: u64) {
        let h = Header {
            epoch: 7,
            last: 3,
            incarnation,
            first: 1,
            ring: 10,
        };
        log.insert(keys::room_meta_key(room), &h.encode()[..])
            .unwrap();
    }

    #[test]
    fn an_unclean_batched_run_moves_the_rooms_it_wrote_to_new_epochs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, log) = open(dir.path());
            let first = begin(&db, &log, dir.path(), Durability::Batched).unwrap();
            assert_eq!(first.incarnation, 1);
            write_room(&log, b"older", 0);
            write_room(&log, b"busy", 1);
            db.flush().unwrap();
            // No `end`: the run stops uncleanly.
        }
        let (db, log) = open(dir.path());
        let second = begin(&db, &log, dir.path(), Durability::Sync).unwrap();
        assert_eq!(second.incarnation, 2);
        assert_eq!(
            second.new_epochs,
            vec![("busy".to_owned(), UNCLEAN_BATCHED)]
        );
        let busy = header(&log, b"busy");
        assert_ne!(busy.epoch, 7);
        assert_eq!(busy.last, 3, "offsets continue; only the epoch moves");
        assert_eq!(header(&log, b"older").epoch, 7);
        end(&db, dir.path(), second.incarnation, second.seq).unwrap();
    }

    #[test]
    fn a_clean_or_sync_stop_keeps_every_epoch() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, log) = open(dir.path());
            let run = begin(&db, &log, dir.path(), Durability::Batched).unwrap();
            write_room(&log, b"room", run.incarnation);
            end(&db, dir.path(), run.incarnation, run.seq).unwrap();
        }
        {
            let (db, log) = open(dir.path());
            let run = begin(&db, &log, dir.path(), Durability::Sync).unwrap();
            assert!(run.new_epochs.is_empty(), "a clean close");
            write_room(&log, b"room", run.incarnation);
            db.flush().unwrap(); // then an unclean stop of a sync run
        }
        let (db, log) = open(dir.path());
        let run = begin(&db, &log, dir.path(), Durability::Sync).unwrap();
        assert!(run.new_epochs.is_empty(), "sync acks only what is flushed");
        assert_eq!(header(&log, b"room").epoch, 7);
    }

    #[test]
    fn a_store_with_fewer_writes_than_sealed_moves_every_room() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (db, log) = open(dir.path());
            let run = begin(&db, &log, dir.path(), Durability::Sync).unwrap();
            write_room(&log, b"a", 0);
            write_room(&log, b"b", run.incarnation);
            end(&db, dir.path(), run.incarnation, 10).unwrap();
        }
        let (db, log) = open(dir.path());
        let run = begin(&db, &log, dir.path(), Durability::Sync).unwrap();
        let mut moved: Vec<_> = run.new_epochs.iter().map(|(r, _)| r.as_str()).collect();
        moved.sort();
        assert_eq!(moved, ["a", "b"]);
        assert!(run.new_epochs.iter().all(|(_, why)| *why == LOST_FLUSHED));
    }
}

//! Store format v2: every room in one keyspace (tree `log`), and idempotency
//! keys persisted next to the messages.
//!
//! Why: v1 kept one sled tree per room, and every tree costs sled memory and
//! metadata, which a hub with tens of thousands of rooms cannot afford; v1
//! also forgot idempotency keys on restart, so a client retrying a publish
//! across a restart could store it twice. The v2 layout is written out in
//! `src/storage/keys.rs`.
//!
//! The step copies each `room/<name>` tree's messages and the room's header
//! from `rooms` into `log`, flushes, then drops the v1 trees. Re-running it
//! after a crash is safe: copies overwrite themselves, and dropped trees are
//! simply absent.

use crate::storage::keys;

const V1_ROOMS_TREE: &[u8] = b"rooms";
const V1_ROOM_TREE_PREFIX: &[u8] = b"room/";

pub fn upgrade(db: &sled::Db) -> sled::Result<()> {
    let rooms = db.open_tree(V1_ROOMS_TREE)?;
    let log = db.open_tree(keys::LOG_TREE)?;
    let mut v1_trees = Vec::new();
    for entry in rooms.iter() {
        let (room, header) = entry?;
        let tree_name = [V1_ROOM_TREE_PREFIX, &room].concat();
        let messages = db.open_tree(&tree_name)?;
        let mut batch = sled::Batch::default();
        // The v1 header (epoch, last offset) has the v2 layout already.
        batch.insert(keys::room_meta_key(&room), header);
        for message in messages.iter() {
            let (offset, json) = message?;
            let offset = u64::from_be_bytes(offset.as_ref().try_into().map_err(|_| {
                sled::Error::Unsupported(format!(
                    "v1 room tree {:?} has a bad key",
                    String::from_utf8_lossy(&room)
                ))
            })?);
            batch.insert(keys::message_key(&room, offset), json);
        }
        log.apply_batch(batch)?;
        v1_trees.push(tree_name);
    }
    db.flush()?;
    for name in v1_trees {
        db.drop_tree(name)?;
    }
    db.drop_tree(V1_ROOMS_TREE)?;
    db.flush()?;
    Ok(())
}

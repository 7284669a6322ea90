//! An in-memory [`HistoryStore`] with the same contract as the sled one, for
//! benches (fan-out without disk) and tests. Nothing survives the process.

use super::{
    DedupEntry, ExpiryScan, HistoryStore, RoomSnapshot, StoreError, SweepCursor, Take, WriteBatch,
    WriteDone, WriteOp,
};
use crate::config::Durability;
use crate::protocol::{EncodedMessage, RoomName};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap};

#[derive(Default)]
struct RoomLog {
    epoch: u64,
    last: u64,
    messages: BTreeMap<u64, EncodedMessage>,
    keys: HashMap<String, (u64, u64)>,
}

#[derive(Default)]
pub struct MemoryStore {
    rooms: Mutex<HashMap<RoomName, RoomLog>>,
    node_id: Mutex<Option<String>>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

impl HistoryStore for MemoryStore {
    fn load_room(&self, room: &RoomName, tail: usize) -> Result<RoomSnapshot, StoreError> {
        let rooms = self.rooms.lock();
        let Some(log) = rooms.get(room) else {
            return Ok(RoomSnapshot {
                epoch: None,
                last_offset: 0,
                first_offset: 1,
                tail: Vec::new(),
                keys: Vec::new(),
                damage: None,
                lost: Vec::new(),
                ring: 0,
            });
        };
        let mut newest: Vec<EncodedMessage> =
            log.messages.values().rev().take(tail).cloned().collect();
        newest.reverse();
        Ok(RoomSnapshot {
            epoch: Some(log.epoch),
            last_offset: log.last,
            first_offset: log.messages.keys().next().copied().unwrap_or(log.last + 1),
            tail: newest,
            keys: log
                .keys
                .iter()
                .map(|(key, &(offset, ts))| DedupEntry {
                    key: key.clone(),
                    offset,
                    ts,
                })
                .collect(),
            damage: None,
            lost: Vec::new(),
            ring: 0,
        })
    }

    fn read_range(
        &self,
        room: &RoomName,
        from: u64,
        to: u64,
        limit: usize,
        take: Take,
    ) -> Result<Vec<EncodedMessage>, StoreError> {
        let rooms = self.rooms.lock();
        let Some(log) = rooms.get(room).filter(|_| from <= to) else {
            return Ok(Vec::new());
        };
        let range = log.messages.range(from..=to).map(|(_, m)| m.clone());
        Ok(match take {
            Take::Oldest => range.take(limit).collect(),
            Take::Newest => {
                let mut out: Vec<_> = range.rev().take(limit).collect();
                out.reverse();
                out
            }
        })
    }

    fn first_unexpired(
        &self,
        room: &RoomName,
        from: u64,
        cutoff_ts: u64,
    ) -> Result<u64, StoreError> {
        let rooms = self.rooms.lock();
        let Some(log) = rooms.get(room) else {
            return Ok(from);
        };
        Ok(log
            .messages
            .range(from..)
            .find(|(_, m)| m.ts >= cutoff_ts)
            .map(|(offset, _)| *offset)
            .unwrap_or(log.last + 1))
    }

    fn rooms_with_expired(
        &self,
        after: Option<&SweepCursor>,
        cutoff_ts: u64,
        scan: usize,
        limit: usize,
    ) -> Result<ExpiryScan, StoreError> {
        let rooms = self.rooms.lock();
        let mut names: Vec<&RoomName> = rooms
            .keys()
            .filter(|room| after.is_none_or(|after| room.as_str().as_bytes() > &after.0[..]))
            .collect();
        names.sort();
        let mut found = ExpiryScan::default();
        for (looked, room) in names.iter().enumerate() {
            if looked == scan || found.rooms.len() == limit {
                return Ok(found);
            }
            found.next = Some(SweepCursor(room.as_str().as_bytes().to_vec()));
            let oldest = rooms[*room].messages.values().next();
            if oldest.is_some_and(|m| m.ts < cutoff_ts) {
                found.rooms.push((*room).clone());
            }
        }
        found.next = None;
        Ok(found)
    }

    fn write(&self, batch: WriteBatch, done: WriteDone) {
        {
            let mut rooms = self.rooms.lock();
            let log = rooms.entry(batch.room.clone()).or_default();
            log.epoch = batch.epoch;
            for op in batch.ops {
                match op {
                    WriteOp::Append { message, key } => {
                        if let Some(key) = key {
                            log.keys.insert(key, (message.offset, message.ts));
                        }
                        log.last = message.offset;
                        log.messages.insert(message.offset, message);
                    }
                    WriteOp::Prune { from, to } => {
                        for offset in from..to {
                            log.messages.remove(&offset);
                        }
                    }
                    WriteOp::ForgetKeys(keys) => {
                        for key in keys {
                            log.keys.remove(&key);
                        }
                    }
                    WriteOp::Truncate { after } => {
                        log.messages.retain(|&offset, _| offset <= after);
                        log.keys.retain(|_, &mut (offset, _)| offset <= after);
                        log.last = after;
                    }
                    WriteOp::SetHeader { last } => log.last = last,
                    WriteOp::MarkLost { offset } => {
                        log.messages.remove(&offset);
                    }
                    // Offsets are the keys here: nothing to re-lay.
                    WriteOp::Relayout => {}
                }
            }
        }
        done(Ok(()));
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }

    fn node_id(&self, wanted: Option<&str>) -> Result<String, StoreError> {
        let mut id = self.node_id.lock();
        if let Some(w) = wanted {
            *id = Some(w.to_owned());
        }
        Ok(id
            .get_or_insert_with(|| format!("node-{:08x}", rand::random::<u32>()))
            .clone())
    }

    fn durability(&self) -> Durability {
        Durability::Batched
    }
}

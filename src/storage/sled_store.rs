//! The sled implementation of [`HistoryStore`], with group commit.
//!
//! All writes go through one writer thread. It takes every batch that is
//! waiting, applies them as one sled batch and, with `durability = sync`,
//! flushes once for all of them before calling their `done`: under load many
//! publishes share one fsync. With `batched` it calls `done` right after the
//! apply, and sled's own flusher thread flushes every [`BATCHED_FLUSH_EVERY`]
//! alongside (the writer never stops to flush, and a steady stream of
//! writes cannot postpone the flush).

use super::keys::{self, LOG_TREE, META_TREE, NODE_ID_KEY};
use super::{
    migrate, DedupEntry, HistoryStore, RoomSnapshot, StoreError, Take, WriteBatch, WriteDone,
    WriteOp,
};
use crate::config::Durability;
use crate::protocol::{EncodedMessage, RoomName};
use parking_lot::Mutex;
use serde_json::value::RawValue;
use std::path::Path;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

/// How stale the disk may get with `durability = batched`.
pub const BATCHED_FLUSH_EVERY: Duration = Duration::from_millis(10);

/// The most batches one group commit takes, so `done` callbacks keep flowing
/// under a flood.
const MAX_GROUP: usize = 4096;

enum Job {
    Write(WriteBatch, WriteDone),
    Flush(mpsc::SyncSender<Result<(), StoreError>>),
}

pub struct SledStore {
    db: sled::Db,
    log: sled::Tree,
    durability: Durability,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl SledStore {
    /// Opens (or creates) the database in `dir` and upgrades its format.
    /// `commit_delay`: how long the writer, when busy, waits for more writes
    /// before a group commit (`storage.commit_delay_us`).
    pub fn open(
        dir: &Path,
        durability: Durability,
        commit_delay: Duration,
    ) -> Result<SledStore, StoreError> {
        let flush_every = match durability {
            // The writer flushes every group (see the module docs).
            Durability::Sync => None,
            Durability::Batched => Some(BATCHED_FLUSH_EVERY.as_millis() as u64),
        };
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(256 * 1024 * 1024)
            .flush_every_ms(flush_every)
            .open()?;
        let from = migrate::migrate(&db)?;
        if from != migrate::CURRENT_VERSION {
            tracing::info!(
                from,
                to = migrate::CURRENT_VERSION,
                "upgraded the store format"
            );
        }
        let log = db.open_tree(LOG_TREE)?;
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            db: db.clone(),
            log: log.clone(),
            durability,
            commit_delay,
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(SledStore {
            db,
            log,
            durability,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Flushes, stops the writer thread and waits for it. Writes after this fail
    /// with [`StoreError::Closed`].
    pub fn close(&self) -> Result<(), StoreError> {
        let result = self.flush();
        self.jobs.lock().take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        result
    }

    fn decode(&self, json: sled::IVec) -> Result<EncodedMessage, StoreError> {
        let text =
            String::from_utf8(json.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let raw = RawValue::from_string(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        EncodedMessage::from_json(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A stored message, or `None` (with a warning) if it cannot be decoded:
    /// one unreadable entry must not make the room's whole history unreadable.
    fn readable(
        &self,
        room: &RoomName,
        entry: Result<(sled::IVec, sled::IVec), sled::Error>,
    ) -> Result<Option<EncodedMessage>, StoreError> {
        let (key, json) = entry?;
        match self.decode(json) {
            Ok(message) => Ok(Some(message)),
            Err(error) => {
                let offset = keys::offset_of(&key);
                tracing::warn!(%room, ?offset, %error, "skipped an unreadable stored message");
                Ok(None)
            }
        }
    }
}

impl Drop for SledStore {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

impl HistoryStore for SledStore {
    fn load_room(&self, room: &RoomName, tail: usize) -> Result<RoomSnapshot, StoreError> {
        let name = room.as_str().as_bytes();
        let meta = self.log.get(keys::room_meta_key(name))?;
        let (epoch, last_offset) = match meta {
            Some(bytes) => {
                let (epoch, last) = keys::unpair(&bytes)
                    .ok_or_else(|| StoreError::Corrupt(format!("room {room}: bad log header")))?;
                (Some(epoch), last)
            }
            None => (None, 0),
        };
        let prefix = keys::message_prefix(name);
        let first_offset = match self.log.scan_prefix(&prefix).next() {
            Some(entry) => keys::offset_of(&entry?.0).unwrap_or(last_offset + 1),
            None => last_offset + 1,
        };
        let mut messages = Vec::with_capacity(tail.min(1024));
        for entry in self.log.scan_prefix(&prefix).rev().take(tail) {
            messages.extend(self.readable(room, entry)?);
        }
        messages.reverse();
        let mut dedup = Vec::new();
        let dedup_prefix = keys::dedup_prefix(name);
        for entry in self.log.scan_prefix(&dedup_prefix) {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k[dedup_prefix.len()..]).into_owned();
            if let Some((offset, ts)) = keys::unpair(&v) {
                dedup.push(DedupEntry { key, offset, ts });
            }
        }
        Ok(RoomSnapshot {
            epoch,
            last_offset,
            first_offset,
            tail: messages,
            keys: dedup,
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
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let name = room.as_str().as_bytes();
        let range = self
            .log
            .range(keys::message_key(name, from)..=keys::message_key(name, to));
        let mut out = Vec::new();
        match take {
            Take::Oldest => {
                for entry in range.take(limit) {
                    out.extend(self.readable(room, entry)?);
                }
            }
            Take::Newest => {
                for entry in range.rev().take(limit) {
                    out.extend(self.readable(room, entry)?);
                }
                out.reverse();
            }
        }
        Ok(out)
    }

    fn first_unexpired(
        &self,
        room: &RoomName,
        from: u64,
        cutoff_ts: u64,
    ) -> Result<u64, StoreError> {
        let name = room.as_str().as_bytes();
        let mut next = from;
        for entry in self
            .log
            .range(keys::message_key(name, from)..=keys::message_key(name, u64::MAX))
        {
            // An unreadable message has no age: it goes with the expired ones.
            let Some(message) = self.readable(room, entry)? else {
                continue;
            };
            if message.ts >= cutoff_ts {
                return Ok(message.offset);
            }
            next = message.offset + 1;
        }
        Ok(next)
    }

    fn write(&self, batch: WriteBatch, done: WriteDone) {
        let sent = match self.jobs.lock().as_ref() {
            Some(tx) => tx.send(Job::Write(batch, done)).map_err(|e| e.0),
            None => Err(Job::Write(batch, done)),
        };
        if let Err(Job::Write(_, done)) = sent {
            done(Err(StoreError::Closed));
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::sync_channel(1);
        let sent = match self.jobs.lock().as_ref() {
            Some(jobs) => jobs.send(Job::Flush(tx)).is_ok(),
            None => false,
        };
        if !sent {
            // The writer is gone: flush what sled holds ourselves.
            self.db.flush()?;
            return Ok(());
        }
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    fn node_id(&self, wanted: Option<&str>) -> Result<String, StoreError> {
        let meta = self.db.open_tree(META_TREE)?;
        if let Some(id) = wanted {
            meta.insert(NODE_ID_KEY, id.as_bytes())?;
            return Ok(id.to_owned());
        }
        if let Some(id) = meta.get(NODE_ID_KEY)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = format!("node-{:08x}", rand::random::<u32>());
        meta.insert(NODE_ID_KEY, id.as_bytes())?;
        self.db.flush()?;
        Ok(id)
    }

    fn durability(&self) -> Durability {
        self.durability
    }
}

/// Takes `first` and every job waiting. When busy (the last group had
/// company) it first waits `delay` (like PostgreSQL's `commit_delay`), so the
/// group takes in the writes about to arrive: fewer, larger groups mean fewer
/// fsyncs, one wake-up of each room per group instead of per write, and
/// larger fan-outs (one socket write per member per group). One sleep, not a
/// wait on the channel: a blocked receiver is woken by every single write,
/// which is the cost this avoids. A lone writer (one publish at a time)
/// never waits.
fn gather(jobs: &mpsc::Receiver<Job>, first: Job, busy: bool, delay: Duration) -> Vec<Job> {
    if busy && !delay.is_zero() {
        std::thread::sleep(delay);
    }
    let mut group = vec![first];
    while group.len() < MAX_GROUP {
        match jobs.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
    group
}

/// The writer thread's state.
struct Writer {
    db: sled::Db,
    log: sled::Tree,
    durability: Durability,
    commit_delay: Duration,
}

impl Writer {
    fn run(self, jobs: mpsc::Receiver<Job>) {
        let mut last_group = 0;
        while let Ok(first) = jobs.recv() {
            let group = gather(&jobs, first, last_group > 1, self.commit_delay);
            last_group = group.len();
            let mut batch = sled::Batch::default();
            let mut done = Vec::with_capacity(group.len());
            let mut flush_waiters = Vec::new();
            for job in group {
                match job {
                    Job::Write(write, callback) => {
                        add_to_batch(&mut batch, write);
                        done.push(callback);
                    }
                    Job::Flush(waiter) => flush_waiters.push(waiter),
                }
            }
            let mut result = self.log.apply_batch(batch).map_err(StoreError::from);
            let must_flush = self.durability == Durability::Sync || !flush_waiters.is_empty();
            if result.is_ok() && must_flush {
                result = self.db.flush().map(|_| ()).map_err(StoreError::from);
            }
            if let Err(e) = &result {
                tracing::error!(error = %e, "store write failed");
            }
            for callback in done {
                callback(result.clone());
            }
            for waiter in flush_waiters {
                let _ = waiter.send(result.clone());
            }
        }
        self.flush_logged();
    }

    fn flush_logged(&self) {
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "store flush failed");
        }
    }
}

fn add_to_batch(batch: &mut sled::Batch, write: WriteBatch) {
    let room = write.room.as_str().as_bytes();
    let mut last_appended = None;
    for op in write.ops {
        match op {
            WriteOp::Append { message, key } => {
                if let Some(key) = key {
                    batch.insert(
                        keys::dedup_key(room, &key),
                        &keys::pair(message.offset, message.ts),
                    );
                }
                batch.insert(
                    keys::message_key(room, message.offset),
                    message.as_str().as_bytes(),
                );
                last_appended = Some(message.offset);
            }
            WriteOp::Prune { from, to } => {
                for offset in from..to {
                    batch.remove(keys::message_key(room, offset));
                }
            }
            WriteOp::ForgetKeys(keys_to_forget) => {
                for key in keys_to_forget {
                    batch.remove(keys::dedup_key(room, &key));
                }
            }
        }
    }
    if let Some(last) = last_appended {
        batch.insert(keys::room_meta_key(room), &keys::pair(write.epoch, last));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flush_job() -> Job {
        Job::Flush(mpsc::sync_channel(1).0)
    }

    #[test]
    fn a_lone_writer_does_not_wait_and_a_busy_one_gathers() {
        let (tx, rx) = mpsc::channel();
        // Not busy: only what is already queued, however long the delay.
        tx.send(flush_job()).unwrap();
        let group = gather(&rx, flush_job(), false, Duration::from_secs(3600));
        assert_eq!(group.len(), 2);
        // Busy: a write sent during the delay joins the group (50 ms into a
        // 1 s delay: wide margins on a noisy machine).
        let late = tx.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.send(flush_job()).unwrap();
        });
        let group = gather(&rx, flush_job(), true, Duration::from_secs(1));
        sender.join().unwrap();
        assert_eq!(group.len(), 2);
    }
}

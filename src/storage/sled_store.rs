//! The sled implementation of [`HistoryStore`].
//!
//! Writes go through one writer thread ([`super::writer`]: group commit,
//! bounded sled batches, recovery from write failures). With `durability =
//! sync` it flushes each group before calling their `done`; with `batched`
//! it calls `done` right after the apply and sled's own flusher thread
//! flushes every [`BATCHED_FLUSH_EVERY`] alongside.
//!
//! Reads check what they serve: a room's log whose header, offsets or
//! messages do not agree is reported (with the room's name) and handed to the
//! room as damaged; the room moves to a new epoch ([`RoomSnapshot::damage`])
//! and keeps what is still readable.

use super::headers;
use super::keys::{self, Header, LOG_TREE, META_TREE, NODE_ID_KEY};
use super::lifecycle::{self, Begun};
use super::writer::{Job, Writer};
use super::{
    migrate, DedupEntry, ExpiryScan, HistoryStore, RoomSnapshot, StoreError, SweepCursor, Take,
    WriteBatch, WriteDone,
};
use crate::config::Durability;
use crate::protocol::{EncodedMessage, RoomName};
use parking_lot::{Mutex, RwLock};
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How stale the disk may get with `durability = batched`.
pub const BATCHED_FLUSH_EVERY: Duration = Duration::from_millis(10);

/// sled's page cache. Its own accounting undercounts what it holds, so this
/// is kept well below what the hub may use.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// An open database.
#[derive(Clone)]
pub(super) struct Handles {
    pub db: sled::Db,
    pub log: sled::Tree,
    /// This open's incarnation ([`lifecycle`]).
    pub incarnation: u64,
}

/// Whether the store can write, and how many times it has recovered.
#[derive(Default)]
pub(super) struct Health {
    failed: AtomicBool,
    generation: AtomicU64,
    reason: Mutex<String>,
}

impl Health {
    pub fn is_writable(&self) -> bool {
        !self.failed.load(Ordering::SeqCst)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// What a write gets while the store is unwritable (no OS text: that
    /// went to the log).
    pub fn error(&self) -> StoreError {
        StoreError::Unavailable(super::writer::WRITE_FAILED.into())
    }

    /// The failure as the log told it.
    pub fn reason(&self) -> String {
        self.reason.lock().clone()
    }

    pub fn fail(&self, reason: String) {
        *self.reason.lock() = reason;
        self.failed.store(true, Ordering::SeqCst);
    }

    pub fn recover(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        self.failed.store(false, Ordering::SeqCst);
    }
}

/// What readers and the writer share.
pub(super) struct Shared {
    pub dir: PathBuf,
    pub durability: Durability,
    /// `None` only while the writer reopens the database.
    pub handles: RwLock<Option<Handles>>,
    pub health: Health,
}

pub struct SledStore {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

/// Opens the database in `dir`, upgrades its format and starts a new
/// incarnation (moving rooms whose acked writes may be lost to new epochs).
pub(super) fn open_handles(
    dir: &Path,
    durability: Durability,
) -> Result<(Handles, Begun), StoreError> {
    let flush_every = match durability {
        // The writer flushes every group (see the module docs).
        Durability::Sync => None,
        Durability::Batched => Some(BATCHED_FLUSH_EVERY.as_millis() as u64),
    };
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_CAPACITY)
        .flush_every_ms(flush_every);
    // sled panics on some damaged files instead of returning an error.
    let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || config.open()))
        .map_err(|_| damaged(dir, "sled could not read its files"))?;
    let db = opened.map_err(|e| match e {
        sled::Error::Io(io) => StoreError::Io(Arc::new(sled::Error::Io(io))),
        other => damaged(dir, &other.to_string()),
    })?;
    let from = migrate::migrate(&db)?;
    if from != migrate::CURRENT_VERSION {
        tracing::info!(
            from,
            to = migrate::CURRENT_VERSION,
            "upgraded the store format"
        );
    }
    let log = db.open_tree(LOG_TREE)?;
    let begun = lifecycle::begin(&db, &log, dir, durability)?;
    let handles = Handles {
        db,
        log,
        incarnation: begun.incarnation,
    };
    Ok((handles, begun))
}

fn damaged(dir: &Path, detail: &str) -> StoreError {
    // sled's own wording for foreign or damaged files guesses at versions.
    let detail = if detail.contains("earlier than 0.29") {
        "its files are not a sled database this version can read"
    } else {
        detail
    };
    StoreError::Damaged(format!(
        "{} does not hold a readable roomhub store ({detail}). If its files were damaged, restore them from a backup, or move the directory away to start with an empty store",
        dir.display()
    ))
}

/// Logs the rooms an open moved to a new epoch (a few by name, then a count).
pub(super) fn report_new_epochs(begun: &Begun) {
    const NAMED: usize = 20;
    for (room, why) in begun.new_epochs.iter().take(NAMED) {
        tracing::warn!(%room, reason = why, "room moved to a new epoch");
    }
    if begun.new_epochs.len() > NAMED {
        tracing::warn!(
            rooms = begun.new_epochs.len(),
            "rooms moved to a new epoch in all"
        );
    }
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
        let (handles, begun) = open_handles(dir, durability)?;
        report_new_epochs(&begun);
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            durability,
            handles: RwLock::new(Some(handles.clone())),
            health: Health::default(),
        });
        let (tx, rx) = mpsc::channel();
        let writer = Writer {
            shared: shared.clone(),
            handles: Some(handles),
            commit_delay,
            seq: begun.seq,
            sealed_at: Instant::now(),
            spare: Default::default(),
            headers: Default::default(),
        };
        let handle = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| StoreError::Corrupt(format!("cannot start the writer thread: {e}")))?;
        Ok(SledStore {
            shared,
            jobs: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(handle)),
        })
    }

    /// Flushes, stops the writer thread and waits for it. Writes after this fail
    /// with [`StoreError::Closed`]. An error says what could not be flushed.
    pub fn close(&self) -> Result<(), StoreError> {
        let result = self.flush();
        self.jobs.lock().take();
        if let Some(handle) = self.writer.lock().take() {
            let _ = handle.join();
        }
        result
    }

    /// The open database, or `unavailable` while it is being reopened.
    fn handles(&self) -> Result<Handles, StoreError> {
        self.shared
            .handles
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is reopening".into()))
    }

    fn decode(&self, json: sled::IVec) -> Result<EncodedMessage, StoreError> {
        let text =
            String::from_utf8(json.to_vec()).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let raw = RawValue::from_string(text).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        EncodedMessage::from_json(raw).map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    /// A room's log header as its ring has it ([`headers::exact`]), if it has a log.
    fn header(&self, handles: &Handles, room: &[u8]) -> Result<Option<Header>, StoreError> {
        let stored = handles
            .log
            .get(keys::room_meta_key(room))?
            .and_then(|v| Header::decode(&v));
        match stored {
            Some(stored) => Ok(Some(headers::exact(&handles.log, room, stored)?)),
            None => Ok(None),
        }
    }

    /// A stored message, or `None` (with a warning) if it cannot be decoded:
    /// one unreadable entry must not make a room's whole history unreadable.
    /// (A room that loads such an entry among its newest moves to a new
    /// epoch; see [`Self::read_room`].)
    fn readable(
        &self,
        room: &RoomName,
        entry: Result<(sled::IVec, sled::IVec), sled::Error>,
    ) -> Result<Option<EncodedMessage>, StoreError> {
        let (key, json) = entry?;
        if keys::is_lost_marker(&json) {
            return Ok(None); // Already reported, when it was found.
        }
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

impl SledStore {
    /// [`HistoryStore::first_unexpired`] over the ring `header` describes.
    fn first_unexpired_in(
        &self,
        handles: &Handles,
        room: &RoomName,
        header: Header,
        from: u64,
        cutoff_ts: u64,
    ) -> Result<u64, StoreError> {
        let name = room.as_str().as_bytes();
        let ring = header.ring.max(1);
        for offset in from.max(header.first)..=header.last {
            let key = keys::slot_key(name, offset, ring);
            let Some(value) = handles.log.get(&key)? else {
                continue;
            };
            // An unreadable message has no age: it goes with the expired ones.
            let Some(message) = self.readable(room, Ok((key.into(), value)))? else {
                continue;
            };
            if message.offset == offset && message.ts >= cutoff_ts {
                return Ok(offset);
            }
        }
        Ok(header.last + 1)
    }

    /// The offsets of a damaged log's retained range whose slot holds no
    /// readable message of its own (missing, unreadable, or another
    /// offset's): the room marks them lost, so the mended log is a whole run
    /// of offsets again and the next start finds it consistent. Read only
    /// for a damaged log: at most a ring's worth of slots.
    fn lost_offsets(
        &self,
        handles: &Handles,
        name: &[u8],
        header: Header,
        first: u64,
        last: u64,
    ) -> Result<Vec<u64>, StoreError> {
        let ring = header.ring.max(1);
        let mut lost = Vec::new();
        for offset in first.max((last + 1).saturating_sub(ring))..=last {
            let whole = match handles.log.get(keys::slot_key(name, offset, ring))? {
                Some(value) if keys::is_lost_marker(&value) => true,
                Some(value) => self.decode(value).is_ok_and(|m| m.offset == offset),
                None => false,
            };
            if !whole {
                lost.push(offset);
            }
        }
        Ok(lost)
    }

    /// Reads a room's log and checks that its header, offsets and newest
    /// messages agree; what does not is reported as [`RoomSnapshot::damage`].
    fn read_room(&self, room: &RoomName, tail: usize) -> Result<RoomSnapshot, StoreError> {
        let handles = self.handles()?;
        let log = &handles.log;
        let name = room.as_str().as_bytes();
        let mut damage = None;
        let header = match log.get(keys::room_meta_key(name))? {
            Some(bytes) => match Header::decode(&bytes) {
                Some(stored) => Some(headers::exact(log, name, stored)?),
                None => {
                    damage = Some("its header cannot be read".to_owned());
                    None
                }
            },
            None => None,
        };
        if !self.shared.health.is_writable()
            && header.is_some_and(|h| h.incarnation == handles.incarnation)
        {
            // Its last writes may have failed after sled applied them in
            // memory: nothing of it is served until the store has recovered.
            return Err(self.shared.health.error());
        }
        // The ring's slots (a ring holds at most `ring` of them).
        let prefix = keys::slot_prefix(name);
        let ring = header.map_or(0, |h| h.ring.max(1));
        let slots = log.scan_prefix(&prefix).keys().count() as u64;
        if header.is_none() && slots > 0 && damage.is_none() {
            damage = Some("it holds messages but no header".to_owned());
        }
        let last_offset = header.map_or(0, |h| h.last);
        let first_offset = header.map_or(last_offset + 1, |h| h.first.min(last_offset + 1));
        let expected_count = (last_offset + 1).saturating_sub(first_offset);
        if damage.is_none() && slots != expected_count {
            damage = Some(format!(
                "it holds {slots} messages where offsets {first_offset} to {last_offset} need {expected_count}"
            ));
        }

        // The newest messages, each read from its slot and checked to be
        // readable and the offset asked for. What is readable is kept (a
        // gap stays a gap); what is not is damage.
        let mut messages = Vec::with_capacity(tail.min(1024));
        let newest_from = first_offset.max((last_offset + 1).saturating_sub(tail as u64));
        if let Some(header) = header {
            let ring = header.ring.max(1);
            for offset in newest_from..=last_offset {
                let Some(value) = log.get(keys::slot_key(name, offset, ring))? else {
                    damage.get_or_insert(format!("offset {offset} is missing"));
                    continue;
                };
                if keys::is_lost_marker(&value) {
                    continue; // Found unreadable before and marked: not served.
                }
                match self.decode(value) {
                    Ok(message) if message.offset == offset => messages.push(message),
                    Ok(message) => {
                        damage.get_or_insert(format!(
                            "the slot of offset {offset} holds offset {}",
                            message.offset
                        ));
                    }
                    Err(e) => {
                        damage.get_or_insert(format!(
                            "the message at offset {offset} is unreadable ({e})"
                        ));
                    }
                }
            }
        }
        // The stored header may lag its ring (format v5), and the walk that
        // finds the exact one stops at the first slot that does not hold
        // the next offset. A slot within the lag that holds a newer offset,
        // or cannot be read at all, may be an acked message the walk could
        // not follow: damage, and no offset up to it is handed out again.
        let mut beyond = last_offset;
        if let Some(header) = header {
            let ring = header.ring.max(1);
            for offset in header.last + 1..header.last + headers::lag_limit(ring) {
                let Some(value) = log.get(keys::slot_key(name, offset, ring))? else {
                    continue;
                };
                match headers::offset_in(&value) {
                    Some(found) if found <= header.last => {} // an older message
                    Some(found) => {
                        damage.get_or_insert(format!(
                            "offset {found} lies past its newest offset {}",
                            header.last
                        ));
                        beyond = beyond.max(found);
                    }
                    None => {
                        damage.get_or_insert(format!(
                            "the slot after offset {} is unreadable",
                            offset - 1
                        ));
                        beyond = beyond.max(offset);
                    }
                }
            }
        }
        if let Some(reason) = &damage {
            tracing::error!(room = %room, %reason, "room log is inconsistent; the room moves to a new epoch");
        }
        let mut dedup = Vec::new();
        let dedup_prefix = keys::dedup_prefix(name);
        for entry in log.scan_prefix(&dedup_prefix) {
            let (k, v) = entry?;
            let key = String::from_utf8_lossy(&k[dedup_prefix.len()..]).into_owned();
            if let Some((offset, ts)) = keys::unpair(&v) {
                dedup.push(DedupEntry { key, offset, ts });
            }
        }
        // A damaged log may hold offsets past what its header and the run
        // of slots after it reach: none of them may be handed out again.
        let last_offset = match damage {
            Some(_) => log
                .scan_prefix(&prefix)
                .values()
                .flatten()
                .filter_map(|v| headers::offset_in(&v))
                .fold(beyond, u64::max),
            None => last_offset,
        };
        let lost = match (&damage, header) {
            (Some(_), Some(header)) => {
                self.lost_offsets(&handles, name, header, first_offset, last_offset)?
            }
            _ => Vec::new(),
        };
        Ok(RoomSnapshot {
            epoch: header.map(|h| h.epoch),
            last_offset,
            first_offset,
            tail: messages,
            keys: dedup,
            lost,
            damage,
            ring,
        })
    }
}

impl HistoryStore for SledStore {
    fn load_room(&self, room: &RoomName, tail: usize) -> Result<RoomSnapshot, StoreError> {
        self.read_room(room, tail)
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
        let handles = self.handles()?;
        let name = room.as_str().as_bytes();
        let Some(header) = self.header(&handles, name)? else {
            return Ok(Vec::new());
        };
        let (from, to) = (from.max(header.first), to.min(header.last));
        if from > to {
            return Ok(Vec::new());
        }
        let ring = header.ring.max(1);
        let read = |offset: u64| -> Result<Option<EncodedMessage>, StoreError> {
            let entry = handles.log.get(keys::slot_key(name, offset, ring))?;
            let Some(value) = entry else { return Ok(None) };
            let key = keys::slot_key(name, offset, ring);
            // A slot taken over by a newer offset does not hold this one.
            Ok(self
                .readable(room, Ok((key.into(), value)))?
                .filter(|m| m.offset == offset))
        };
        let mut out = Vec::new();
        match take {
            Take::Oldest => {
                for offset in from..=to {
                    if out.len() == limit {
                        break;
                    }
                    out.extend(read(offset)?);
                }
            }
            Take::Newest => {
                for offset in (from..=to).rev() {
                    if out.len() == limit {
                        break;
                    }
                    out.extend(read(offset)?);
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
        let handles = self.handles()?;
        let name = room.as_str().as_bytes();
        // A re-layout (queued by a room as it loads, just before it looks
        // for expired messages) moves every slot: a scan it overtakes would
        // skip young messages as missing and prune them. Only a scan over a
        // ring that held still counts; after a few tries, nothing expires
        // this time.
        for _ in 0..3 {
            let Some(header) = self.header(&handles, name)? else {
                return Ok(from);
            };
            let found = self.first_unexpired_in(&handles, room, header, from, cutoff_ts)?;
            let now = self.header(&handles, name)?;
            if now.is_some_and(|h| h.ring == header.ring && h.epoch == header.epoch) {
                return Ok(found);
            }
        }
        Ok(from)
    }

    fn rooms_with_expired(
        &self,
        after: Option<&SweepCursor>,
        cutoff_ts: u64,
        scan: usize,
        limit: usize,
    ) -> Result<ExpiryScan, StoreError> {
        use std::ops::Bound;
        let handles = self.handles()?;
        // The cursor is the last header key looked at.
        let start = match after {
            Some(cursor) => Bound::Excluded(cursor.0.clone()),
            None => Bound::Included(keys::ROOM_HEADER_PREFIX.to_vec()),
        };
        let mut found = ExpiryScan::default();
        for (looked, entry) in handles.log.range((start, Bound::Unbounded)).enumerate() {
            let (key, value) = entry?;
            // Past the last header the keyspace holds other kinds of keys.
            let Some(name) = keys::room_of_header(&key) else {
                break;
            };
            if looked == scan || found.rooms.len() == limit {
                return Ok(found);
            }
            found.next = Some(SweepCursor(key.to_vec()));
            let (Some(stored), Some(room)) = (
                Header::decode(&value),
                std::str::from_utf8(name)
                    .ok()
                    .and_then(|n| RoomName::parse(n).ok()),
            ) else {
                continue; // Not a room log this binary wrote; loading it says so.
            };
            let header = headers::exact(&handles.log, name, stored)?;
            if header.first > header.last {
                continue;
            }
            let slot = keys::slot_key(name, header.first, header.ring.max(1));
            // A missing or unreadable oldest message also wakes the room:
            // its load finds the damage and mends it.
            let expired = match handles.log.get(slot)?.map(|json| self.decode(json)) {
                Some(Ok(message)) => message.offset != header.first || message.ts < cutoff_ts,
                _ => true,
            };
            if expired {
                found.rooms.push(room);
            }
        }
        found.next = None;
        Ok(found)
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
            self.handles()?.db.flush()?;
            return Ok(());
        }
        rx.recv().unwrap_or(Err(StoreError::Closed))
    }

    fn node_id(&self, wanted: Option<&str>) -> Result<String, StoreError> {
        let handles = self.handles()?;
        let meta = handles.db.open_tree(META_TREE)?;
        if let Some(id) = wanted {
            meta.insert(NODE_ID_KEY, id.as_bytes())?;
            return Ok(id.to_owned());
        }
        if let Some(id) = meta.get(NODE_ID_KEY)? {
            return Ok(String::from_utf8_lossy(&id).into_owned());
        }
        let id = format!("node-{:08x}", rand::random::<u32>());
        meta.insert(NODE_ID_KEY, id.as_bytes())?;
        handles.db.flush()?;
        Ok(id)
    }

    fn durability(&self) -> Durability {
        self.shared.durability
    }

    fn writable(&self) -> bool {
        self.shared.health.is_writable()
    }

    fn generation(&self) -> u64 {
        self.shared.health.generation()
    }
}

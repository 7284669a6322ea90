//! The store's one writer thread: group commit, bounded sled batches, and
//! recovery from write failures.
//!
//! It takes every batch that is waiting and applies them in sled batches of
//! at most [`MAX_SLED_BATCH_BYTES`] each (one room's batch is never split, so
//! it stays atomic), then, with `durability = sync`, flushes once for the
//! whole group before calling their `done`. Why bounded: with large sled
//! batches (one per group: thousands of appends and prunes under load),
//! sled 0.34 stops reclaiming its log, and memory and the data dir grow with
//! every message that ever passed, pruned or not (BENCHMARKS.md, "Storage
//! soak": 5.3 GB RSS after 45 s). Small batches keep both at the size of
//! what is retained.
//!
//! When a write or flush fails (a full disk, an I/O error) sled refuses every
//! later write of that open database. The writer then fails what is queued,
//! reports the store unwritable, and reopens the database once there is room
//! again, which starts a new incarnation ([`super::lifecycle`]) and raises the
//! store's generation so rooms reload their view before writing again.

use super::headers::{self, Known, Remembered};
use super::keys::{self, Header, SEQ_KEY};
use super::sled_store::{Handles, Shared};
use super::{StoreError, WriteBatch, WriteDone, WriteOp};
use crate::config::Durability;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The most bytes of keys and values one sled batch carries. Measured with
/// `benches/storage_soak.rs` (200 rooms pruning at 100, groups of up to 4 096
/// appends): 32 and 64 KiB plateau (RSS 43 MB, 35 MB on disk, 42 k appends/s
/// at 32 KiB), 128 KiB already grows (1.2 GB after 1.35 M appends), as does
/// one batch per group.
const MAX_SLED_BATCH_BYTES: usize = 32 * 1024;

/// The most batches one group commit takes, so `done` callbacks keep flowing
/// under a flood.
const MAX_GROUP: usize = 4096;

/// The jobs the writer's reused buffers keep room for between groups (a
/// busy group's size; larger ones are freed after use).
const SPARE_JOBS: usize = 256;

/// How often an unwritable store checks whether it can recover.
const RECOVERY_CHECK_EVERY: Duration = Duration::from_millis(500);

/// Free bytes the disk needs before a reopen is tried after a failure (sled
/// starts a new segment on open). With room on the disk (the failure was
/// something else), a reopen is tried at most every [`RECOVERY_RETRY_EVERY`]:
/// each attempt closes the database, and reads wait for it meanwhile.
const RECOVERY_MIN_FREE: u64 = 4 * 1024 * 1024;
const RECOVERY_RETRY_EVERY: Duration = Duration::from_secs(2);

/// What clients are told while writes fail (the OS's words go to the log).
pub(super) const WRITE_FAILED: &str =
    "the disk refused the last writes (full, or an I/O error); nothing was stored";

/// How often, at most, a `sync` store records in the seal how much is flushed.
const SEAL_EVERY: Duration = Duration::from_secs(1);

pub(super) enum Job {
    Write(WriteBatch, WriteDone),
    Flush(mpsc::SyncSender<Result<(), StoreError>>),
}

pub(super) struct Writer {
    pub shared: Arc<Shared>,
    /// `None` only while a reopen has not succeeded yet.
    pub handles: Option<Handles>,
    pub commit_delay: Duration,
    /// Write groups applied (the log's `seq`), and the last one sealed.
    pub seq: u64,
    pub sealed_at: Instant,
    /// Buffers kept from one group to the next: growing fresh ones for every
    /// group made glibc consolidate its free lists on each growth, a tenth of
    /// this thread's time under load (perf, scenario B).
    pub spare: Spare,
    /// Room headers not written yet ([`headers`]: format v5 writes a header
    /// only when it cannot be read back from the ring).
    pub headers: Remembered,
}

/// The writer's reusable buffers (empty between groups).
#[derive(Default)]
pub(super) struct Spare {
    group: Vec<Job>,
    done: Vec<WriteDone>,
}

impl Writer {
    pub fn run(mut self, jobs: mpsc::Receiver<Job>) {
        let mut last_group = 0;
        let mut last_attempt = Instant::now();
        loop {
            if !self.shared.health.is_writable() {
                match jobs.recv_timeout(RECOVERY_CHECK_EVERY) {
                    Ok(job) => refuse(job, self.shared.health.error()),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                self.try_recover(&mut last_attempt);
                continue;
            }
            let Ok(first) = jobs.recv() else { break };
            let mut group = std::mem::take(&mut self.spare.group);
            gather(&jobs, first, last_group > 1, self.commit_delay, &mut group);
            last_group = group.len();
            let result = self.commit(&mut group);
            // What a flood grew is not kept for good.
            group.shrink_to(SPARE_JOBS);
            self.spare.group = group;
            if let Err(error) = result {
                tracing::error!(%error, "store write failed; publishes get `unavailable` until it recovers");
                self.shared.health.fail(error.to_string());
                self.headers.forget_all();
                // Everything queued was made against the failed state.
                while let Ok(job) = jobs.try_recv() {
                    refuse(job, self.shared.health.error());
                }
                last_attempt = Instant::now();
            }
        }
        self.finish();
    }

    /// Applies and (as the durability asks) flushes one group (leaving
    /// `group` empty); every `done` gets the outcome.
    fn commit(&mut self, group: &mut Vec<Job>) -> Result<(), StoreError> {
        let Some(handles) = self.handles.clone() else {
            for job in group.drain(..) {
                refuse(
                    job,
                    StoreError::Unavailable("the store is reopening".into()),
                );
            }
            return Ok(());
        };
        let generation = self.shared.health.generation();
        let mut done = std::mem::take(&mut self.spare.done);
        let mut flush_waiters = Vec::new();
        let mut chunk = sled::Batch::default();
        let mut chunk_bytes = 0;
        let mut result = Ok(());
        for job in group.drain(..) {
            match job {
                Job::Write(write, callback) if write.generation < generation => {
                    callback(Err(StoreError::Stale));
                }
                Job::Write(write, callback) => {
                    let reads_tree = write.ops.iter().any(|op| matches!(op, WriteOp::Relayout));
                    if result.is_ok() && reads_tree && chunk_bytes > 0 {
                        // A re-layout reads the room's messages from the tree.
                        result = handles.log.apply_batch(std::mem::take(&mut chunk));
                        chunk_bytes = 0;
                    }
                    if result.is_ok() {
                        match add_to_batch(&mut chunk, &mut self.headers, &handles, write) {
                            Ok(bytes) => chunk_bytes += bytes,
                            Err(error) => result = Err(error),
                        }
                        if chunk_bytes >= MAX_SLED_BATCH_BYTES {
                            result = handles.log.apply_batch(std::mem::take(&mut chunk));
                            chunk_bytes = 0;
                        }
                    }
                    done.push(callback);
                }
                Job::Flush(waiter) => flush_waiters.push(waiter),
            }
        }
        let result = result.map_err(StoreError::from).and_then(|()| {
            // Too many rooms remembered: their headers go with this group.
            for (key, header) in self.headers.settle(false) {
                chunk_bytes += key.len() + 40;
                chunk.insert(key, &header.encode()[..]);
                if chunk_bytes >= MAX_SLED_BATCH_BYTES {
                    handles.log.apply_batch(std::mem::take(&mut chunk))?;
                    chunk_bytes = 0;
                }
            }
            self.seq += 1;
            chunk.insert(SEQ_KEY, &self.seq.to_be_bytes()[..]);
            handles.log.apply_batch(chunk)?;
            let sync = self.shared.durability == Durability::Sync;
            if sync || !flush_waiters.is_empty() {
                handles.db.flush()?;
                if sync && self.sealed_at.elapsed() >= SEAL_EVERY {
                    // The group is durable whatever happens to the seal: a
                    // seal that cannot be written now is written later.
                    self.sealed_at = Instant::now();
                    if let Err(error) = super::lifecycle::write_seal(&self.shared.dir, self.seq) {
                        tracing::warn!(%error, "the store's seal was not updated");
                    }
                }
            }
            Ok(())
        });
        let reported = result
            .as_ref()
            .map(|_| ())
            .map_err(|_| StoreError::Unavailable(WRITE_FAILED.into()));
        for callback in done.drain(..) {
            callback(reported.clone());
        }
        done.shrink_to(SPARE_JOBS);
        self.spare.done = done;
        for waiter in flush_waiters {
            let _ = waiter.send(reported.clone());
        }
        result
    }

    /// Reopens the database once the disk has room again (or, for other
    /// failures, every little while): a new incarnation and generation.
    fn try_recover(&mut self, last_attempt: &mut Instant) {
        let room_again = free_bytes(&self.shared.dir).is_none_or(|f| f >= RECOVERY_MIN_FREE);
        if !room_again || last_attempt.elapsed() < RECOVERY_RETRY_EVERY {
            return;
        }
        *last_attempt = Instant::now();
        // Every handle must go before sled lets the directory be opened again.
        drop(self.shared.handles.write().take());
        drop(self.handles.take());
        match super::sled_store::open_handles(&self.shared.dir, self.shared.durability) {
            Ok((handles, begun)) => {
                tracing::info!(incarnation = begun.incarnation, "the store can write again");
                super::sled_store::report_new_epochs(&begun);
                self.seq = begun.seq;
                self.headers.forget_all();
                self.handles = Some(handles.clone());
                *self.shared.handles.write() = Some(handles);
                self.shared.health.recover();
            }
            Err(error) => {
                tracing::warn!(%error, "the store cannot reopen yet; retrying");
            }
        }
    }

    /// The jobs channel closed (the store is closing): a clean end of this
    /// incarnation if the store is healthy.
    fn finish(&mut self) {
        let (true, Some(handles)) = (self.shared.health.is_writable(), self.handles.clone()) else {
            tracing::error!(
                error = %self.shared.health.reason(),
                "the store closes without its last writes: publishes that failed were never acked; with `batched` durability, rooms written since the last flush move to a new epoch at the next start"
            );
            return;
        };
        // Every header exact again, so the next start reads no ring to find them.
        let mut batch = sled::Batch::default();
        for (key, header) in self.headers.settle(true) {
            batch.insert(key, &header.encode()[..]);
        }
        let settled = handles.log.apply_batch(batch).map_err(StoreError::from);
        if let Err(error) = settled.and_then(|()| {
            super::lifecycle::end(&handles.db, &self.shared.dir, handles.incarnation, self.seq)
        }) {
            tracing::error!(%error, "store flush at close failed");
        }
    }
}

fn refuse(job: Job, error: StoreError) {
    match job {
        Job::Write(_, done) => done(Err(error)),
        Job::Flush(waiter) => {
            let _ = waiter.send(Err(error));
        }
    }
}

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is a valid C string and `stat` a writable statvfs.
    let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
    (rc == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Puts `first` and every job waiting into `group` (empty). When busy (the last group had
/// company) it first waits `delay` (like PostgreSQL's `commit_delay`), so the
/// group takes in the writes about to arrive: fewer, larger groups mean fewer
/// fsyncs, one wake-up of each room per group instead of per write, and
/// larger fan-outs (one socket write per member per group). One sleep, not a
/// wait on the channel: a blocked receiver is woken by every single write,
/// which is the cost this avoids. A lone writer (one publish at a time)
/// never waits.
pub(super) fn gather(
    jobs: &mpsc::Receiver<Job>,
    first: Job,
    busy: bool,
    delay: Duration,
    group: &mut Vec<Job>,
) {
    if busy && !delay.is_zero() {
        std::thread::sleep(delay);
    }
    group.push(first);
    while group.len() < MAX_GROUP {
        match jobs.try_recv() {
            Ok(job) => group.push(job),
            Err(_) => break,
        }
    }
}

/// Adds one room's changes to `batch`; returns about how many bytes they add.
/// Messages go to their slot in the room's ring: an append at the retention
/// limit overwrites the oldest message's slot, and a prune deletes only
/// slots no newer retained offset has taken over. The room's header goes
/// with them only when readers could not find it from the ring ([`headers`]).
fn add_to_batch(
    batch: &mut sled::Batch,
    remembered: &mut Remembered,
    handles: &Handles,
    write: WriteBatch,
) -> sled::Result<usize> {
    if write.ops.is_empty() {
        return Ok(0);
    }
    let room = write.room.as_str().as_bytes();
    let header_key = keys::room_meta_key(room);
    let mut bytes = 0;
    let known = remembered.get(&handles.log, room, &header_key)?;
    let stored = known.and_then(|k| k.stored);
    let mut header = known.map(|k| k.exact).unwrap_or(Header {
        epoch: write.epoch,
        last: 0,
        incarnation: handles.incarnation,
        first: 1,
        ring: write.ring.max(1),
    });
    // Set by what readers cannot follow from the ring alone.
    let mut explicit = false;
    // Whether the batch adds or rewrites messages (not only forgets them).
    let mut writes_messages = false;
    let insert = |batch: &mut sled::Batch, bytes: &mut usize, key: Vec<u8>, value: &[u8]| {
        *bytes += key.len() + value.len();
        batch.insert(key, value);
    };
    let remove = |batch: &mut sled::Batch, bytes: &mut usize, key: Vec<u8>| {
        *bytes += key.len();
        batch.remove(key);
    };
    for op in write.ops {
        // As the log is now (a re-layout changes it for the ops after it).
        let ring = header.ring.max(1);
        match op {
            WriteOp::Append { message, key } => {
                writes_messages = true;
                let offset = message.offset;
                explicit |= offset != header.last + 1;
                if let Some(key) = key {
                    let entry = keys::pair(offset, message.ts);
                    insert(batch, &mut bytes, keys::dedup_key(room, &key), &entry);
                }
                let text = message.as_str().as_bytes();
                insert(batch, &mut bytes, keys::slot_key(room, offset, ring), text);
                if header.first > header.last {
                    header.first = offset;
                }
                header.last = header.last.max(offset);
                // The slot's previous message is gone.
                header.first = header.first.max((header.last + 1).saturating_sub(ring));
            }
            WriteOp::Prune { from, to } => {
                // Only the last `ring` offsets of the range can still own a slot.
                for offset in from.max(to.saturating_sub(ring))..to {
                    if offset + ring > header.last {
                        remove(batch, &mut bytes, keys::slot_key(room, offset, ring));
                    }
                }
                header.first = header.first.max(to);
            }
            WriteOp::MarkLost { offset } => {
                // Only while the offset still owns its slot.
                if header.retained().contains(&offset) && offset + ring > header.last {
                    let marker = keys::lost_marker(offset);
                    insert(
                        batch,
                        &mut bytes,
                        keys::slot_key(room, offset, ring),
                        &marker,
                    );
                }
            }
            WriteOp::ForgetKeys(keys_to_forget) => {
                for key in keys_to_forget {
                    remove(batch, &mut bytes, keys::dedup_key(room, &key));
                }
            }
            WriteOp::Truncate { after } => {
                let newest = header.last.max(after);
                for offset in (after + 1).max((newest + 1).saturating_sub(ring))..=newest {
                    remove(batch, &mut bytes, keys::slot_key(room, offset, ring));
                }
                for (key, value) in handles.log.scan_prefix(keys::dedup_prefix(room)).flatten() {
                    if keys::unpair(&value).is_some_and(|(offset, _)| offset > after) {
                        remove(batch, &mut bytes, key.to_vec());
                    }
                }
                header.last = after;
                header.first = header.first.min(after + 1);
                explicit = true;
                writes_messages = true;
            }
            WriteOp::SetHeader { last } => {
                header.last = last;
                header.first = header.first.min(last + 1);
                explicit = true;
                writes_messages = true;
            }
            WriteOp::Relayout => {
                bytes += relayout(batch, handles, room, &mut header, write.ring.max(1));
                explicit = true;
                writes_messages = true;
            }
        }
    }
    header.epoch = write.epoch;
    // The run marks a log whose acked messages a crash may have cut short
    // (`lifecycle`). A batch that only prunes or forgets keys acks nothing
    // (lost, it only brings back what the room prunes again), so it keeps
    // the run of the log's messages: a room pruned by its TTL (the sweep
    // starts idle ones for that) does not move to a new epoch after an
    // unclean stop with `batched` durability.
    if writes_messages || known.is_none() {
        header.incarnation = handles.incarnation;
    }
    let stored = if explicit || headers::must_write(stored.as_ref(), &header) {
        insert(batch, &mut bytes, header_key.clone(), &header.encode());
        Some(header)
    } else {
        stored
    };
    remembered.remember(
        header_key,
        Known {
            stored,
            exact: header,
        },
    );
    Ok(bytes)
}

/// Moves a room's retained messages into a ring of `ring` slots, keeping the
/// newest that fit. Reads the tree: the group's earlier batches must have
/// been applied first (`Writer::commit` does).
fn relayout(
    batch: &mut sled::Batch,
    handles: &Handles,
    room: &[u8],
    header: &mut Header,
    ring: u64,
) -> usize {
    let old_ring = header.ring.max(1);
    let keep_from = header.first.max((header.last + 1).saturating_sub(ring));
    let mut bytes = 0;
    let mut moved = Vec::new();
    for offset in keep_from..=header.last {
        if let Ok(Some(value)) = handles.log.get(keys::slot_key(room, offset, old_ring)) {
            moved.push((offset, value));
        }
    }
    for key in handles
        .log
        .scan_prefix(keys::slot_prefix(room))
        .keys()
        .flatten()
    {
        bytes += key.len();
        batch.remove(key);
    }
    for (offset, value) in moved {
        let key = keys::slot_key(room, offset, ring);
        bytes += key.len() + value.len();
        batch.insert(key, value);
    }
    header.first = keep_from;
    header.ring = ring;
    bytes
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
        let mut group = Vec::new();
        gather(
            &rx,
            flush_job(),
            false,
            Duration::from_secs(3600),
            &mut group,
        );
        assert_eq!(group.len(), 2);
        group.clear();
        // Busy: a write sent during the delay joins the group (50 ms into a
        // 1 s delay: wide margins on a noisy machine).
        let late = tx.clone();
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            late.send(flush_job()).unwrap();
        });
        gather(&rx, flush_job(), true, Duration::from_secs(1), &mut group);
        sender.join().unwrap();
        assert_eq!(group.len(), 2);
    }
}

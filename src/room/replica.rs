//! Cluster mode: how a room on this node catches up with its cluster log
//! before it answers anyone. The local sled log is a replica of the cluster
//! log: same offsets, same epoch, same bytes. What it lacks is read from
//! JetStream (direct gets, no consumer) and written locally; what the
//! cluster no longer has (pruned, expired, or from an older epoch) is
//! dropped locally too.
//!
//! The epoch of a room whose cluster log holds no record is the creation
//! time of its partition's stream (its *incarnation*), which every node
//! reads alike: nodes agree on it without writing anything. A local log
//! from an older incarnation (NATS lost its store) therefore starts over in
//! the new one, on every node the same way.

use super::messages::RoomError;
use super::registry::RoomContext;
use crate::cluster::{Cluster, ClusterError, LogBatch, RoomLog, RuntimeBound, StoredRecord};
use crate::protocol::{EncodedMessage, RoomName};
use crate::storage::{RoomSnapshot, StoreError, WriteBatch, WriteOp};
use std::sync::Arc;

/// A message caught up from the cluster log, with its idempotency key.
pub(super) struct CaughtUp {
    pub message: EncodedMessage,
    pub key: Option<String>,
}

/// A room in step with its cluster log.
pub(super) struct Synced {
    /// The local log after catching up (epoch and bounds as the cluster's).
    pub snapshot: RoomSnapshot,
    /// Messages this node had not stored, now stored, oldest first.
    pub caught_up: Vec<CaughtUp>,
    pub log: RoomLog,
    /// The stream sequence of the newest record applied (0: none).
    pub head: u64,
    /// The partition stream's incarnation this was read under.
    pub incarnation: u64,
    /// Records stored from before the catch-up on (repeats are skipped).
    pub live: RuntimeBound<async_nats::Subscriber>,
    /// Presence and typing from the other nodes.
    pub events: RuntimeBound<async_nats::Subscriber>,
}

fn lost(e: impl std::fmt::Display) -> RoomError {
    RoomError::Unavailable(ClusterError::Log(e.to_string()))
}

/// Drops every local message below `keep_from` from `snapshot` (and, via
/// `ops`, from the store).
fn forget_before(snapshot: &mut RoomSnapshot, keep_from: u64, ops: &mut Vec<WriteOp>) {
    if snapshot.first_offset < keep_from && snapshot.first_offset <= snapshot.last_offset {
        ops.push(WriteOp::Prune {
            from: snapshot.first_offset,
            to: keep_from.min(snapshot.last_offset + 1),
        });
    }
    snapshot.first_offset = snapshot.first_offset.max(keep_from);
    snapshot.tail.retain(|m| m.offset >= keep_from);
    // Offsets below the retained range were served by the cluster, not lost.
    snapshot.last_offset = snapshot.last_offset.max(keep_from - 1);
}

/// The local log no longer counts (another epoch): it starts over, empty, in `epoch`.
fn start_over(snapshot: &mut RoomSnapshot, epoch: u64, ops: &mut Vec<WriteOp>) {
    let everything = snapshot.last_offset + 1;
    forget_before(snapshot, everything, ops);
    if !snapshot.keys.is_empty() {
        ops.push(WriteOp::ForgetKeys(
            snapshot.keys.drain(..).map(|k| k.key).collect(),
        ));
    }
    *snapshot = RoomSnapshot {
        epoch: Some(epoch),
        last_offset: 0,
        first_offset: 1,
        tail: Vec::new(),
        keys: Vec::new(),
        damage: None,
        lost: Vec::new(),
        ring: snapshot.ring,
    };
}

pub(super) async fn catch_up(
    context: Arc<RoomContext>,
    cluster: Arc<Cluster>,
    room: RoomName,
    tail: usize,
) -> Result<Synced, RoomError> {
    let log = cluster.room_log(&room);
    let incarnation = cluster.incarnation(log.partition);
    if !cluster.is_linked_for(log.partition) || incarnation == 0 {
        return Err(RoomError::Unavailable(ClusterError::LinkDown));
    }
    let (store, name) = (context.store.clone(), room.clone());
    let mut snapshot = tokio::task::spawn_blocking(move || store.load_room(&name, tail))
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    // Subscribed before reading, so no record stored meanwhile is missed,
    // and no node's answer to our presence `sync` either.
    let live = cluster.live(&log).await?;
    let events = cluster.room_events(&room).await?;
    let mut ops = Vec::new();
    if snapshot.damage.is_some() {
        // The cluster has it all: a damaged local log is simply replaced.
        let epoch = snapshot.epoch.unwrap_or(incarnation);
        start_over(&mut snapshot, epoch, &mut ops);
        snapshot.epoch = None;
    }
    let mut caught_up = Vec::new();
    // Replicated streams may hold records stored out of turn (see
    // `LogBatch::after`): each is checked against the log before use.
    let check = context.settings.cluster.replicas > 1;
    let head = match cluster.last_record(&log).await? {
        None => {
            // Nothing retained: a new room, one whose history expired, or
            // one NATS lost. A local log made under this incarnation goes
            // on (its offsets are never reused); any other starts over.
            if snapshot.epoch.is_none_or(|epoch| epoch < incarnation) {
                start_over(&mut snapshot, incarnation, &mut ops);
            }
            0
        }
        Some(newest) => {
            let mut read = None;
            let decoded = LogBatch::decode(&newest.payload).ok();
            let in_log = match &decoded {
                Some(batch) => !check || in_turn(&cluster, &log, &newest, batch.after).await?,
                None => false,
            };
            let found = match decoded {
                Some(batch) if in_log => Some((batch.epoch, batch.last())),
                _ => {
                    // Not roomhub's (something else wrote on the room's
                    // subject), or stored out of turn: the newest record of
                    // the log is somewhere before it.
                    let records = read_missing(&cluster, &log, 0, &newest).await?;
                    let first_in_log = first_in_turn(&cluster, &log, &records, check).await?;
                    let newest_ours = in_log_order(&records, first_in_log)
                        .filter_map(|(r, in_log)| in_log.then_some(r))
                        .filter_map(|r| LogBatch::decode(&r.payload).ok())
                        .map(|b| (b.epoch, b.last()))
                        .last();
                    read = Some(records);
                    newest_ours
                }
            };
            match found {
                None => {
                    if snapshot.epoch.is_none_or(|epoch| epoch < incarnation) {
                        start_over(&mut snapshot, incarnation, &mut ops);
                    }
                }
                Some((epoch, last)) => {
                    if snapshot.epoch != Some(epoch) || snapshot.last_offset > last {
                        start_over(&mut snapshot, epoch, &mut ops);
                    }
                    if snapshot.last_offset < last {
                        let records = match read {
                            Some(records) => records,
                            None => {
                                read_missing(&cluster, &log, snapshot.last_offset, &newest).await?
                            }
                        };
                        let first_in_log = first_in_turn(&cluster, &log, &records, check).await?;
                        for (record, in_log) in in_log_order(&records, first_in_log) {
                            if in_log {
                                take_record(&room, record, &mut snapshot, &mut caught_up, &mut ops);
                            }
                        }
                    }
                }
            }
            newest.seq
        }
    };
    let max = context.settings.history.max_per_room;
    if let Some(last) = caught_up.last().map(|m| m.message.offset) {
        if last + 1 - snapshot.first_offset > max {
            let keep_from = last + 1 - max;
            caught_up.retain(|m| m.message.offset >= keep_from);
            forget_before(&mut snapshot, keep_from, &mut ops);
        }
    }
    ops.extend(caught_up.iter().map(|m| WriteOp::Append {
        message: m.message.clone(),
        key: m.key.clone(),
    }));
    let epoch = snapshot.epoch.unwrap_or(incarnation);
    snapshot.epoch = Some(epoch);
    if !ops.is_empty() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = WriteBatch {
            room: room.clone(),
            epoch,
            generation: context.store.generation(),
            ring: max,
            ops,
        };
        context.store.write(
            batch,
            Box::new(move |result| {
                let _ = tx.send(result);
            }),
        );
        rx.await.unwrap_or(Err(StoreError::Closed))?;
    }
    Ok(Synced {
        snapshot,
        caught_up,
        log,
        head,
        incarnation,
        live,
        events,
    })
}

/// Whether `record`, appended after stream sequence `after`, directly
/// follows that record on the room's subject (it does if nothing of the
/// room's was stored between them).
async fn in_turn(
    cluster: &Cluster,
    log: &RoomLog,
    record: &StoredRecord,
    after: Option<u64>,
) -> Result<bool, RoomError> {
    let Some(after) = after else {
        return Ok(true);
    };
    if after >= record.seq {
        return Ok(false);
    }
    let next = cluster.record_after(log, after).await?;
    Ok(next.is_none_or(|next| next.seq >= record.seq))
}

/// Whether the first of `records` (read in order) is part of the log.
async fn first_in_turn(
    cluster: &Cluster,
    log: &RoomLog,
    records: &[StoredRecord],
    check: bool,
) -> Result<bool, RoomError> {
    let Some(first) = records.first() else {
        return Ok(true);
    };
    if !check {
        return Ok(true);
    }
    let after = LogBatch::decode(&first.payload).ok().and_then(|b| b.after);
    in_turn(cluster, log, first, after).await
}

/// Each of `records` (consecutive records of the room's subject, oldest
/// first) with whether it is part of the log: the first as `first_in_log`
/// says, each later one if it was appended after a record no older than the
/// one before it (an older one: it was stored out of turn; a newer one:
/// records between expired).
fn in_log_order(
    records: &[StoredRecord],
    first_in_log: bool,
) -> impl Iterator<Item = (&StoredRecord, bool)> {
    records.iter().enumerate().map(move |(i, record)| {
        let in_log = match i.checked_sub(1) {
            None => first_in_log,
            Some(before) => LogBatch::decode(&record.payload)
                .ok()
                .and_then(|b| b.after)
                .is_none_or(|after| after >= records[before].seq),
        };
        (record, in_log)
    })
}

/// Takes one record's messages after the local log's newest, noting a gap
/// (records pruned or expired in the cluster before this node saw them).
fn take_record(
    room: &RoomName,
    record: &StoredRecord,
    snapshot: &mut RoomSnapshot,
    caught_up: &mut Vec<CaughtUp>,
    ops: &mut Vec<WriteOp>,
) {
    let batch = match LogBatch::decode(&record.payload) {
        Ok(batch) => batch,
        Err(error) => {
            return tracing::warn!(%room, seq = record.seq, %error, "skipped a cluster record");
        }
    };
    if Some(batch.epoch) != snapshot.epoch {
        // An older epoch's record still retained before the newest one's.
        return;
    }
    if batch.first > snapshot.last_offset + 1 {
        caught_up.clear();
        forget_before(snapshot, batch.first, ops);
    }
    for (offset, message) in batch.offsets() {
        if offset <= snapshot.last_offset {
            continue;
        }
        snapshot.last_offset = offset;
        match message.to_message(room, offset) {
            Ok(encoded) => caught_up.push(CaughtUp {
                message: encoded,
                key: message.key.as_deref().map(str::to_owned),
            }),
            Err(error) => tracing::warn!(%room, offset, %error, "skipped a cluster record"),
        }
    }
}

/// The records holding offsets after `have`, oldest first, up to `newest`
/// (and any stored since). A node that is a little behind finds where to
/// start by bisecting stream sequences, not by reading the whole log.
async fn read_missing(
    cluster: &Cluster,
    log: &RoomLog,
    have: u64,
    newest: &StoredRecord,
) -> Result<Vec<StoredRecord>, RoomError> {
    let holds_more = |record: &StoredRecord| {
        LogBatch::decode(&record.payload).map_or(true, |batch| batch.last() > have)
    };
    // With `after(m)` the room's first record after stream sequence `m`:
    // find the smallest `m` whose `after(m)` holds offsets after `have`.
    // Invariant: `after(known_not)` does not (None: no bound yet);
    // `after(known)` = `first` does.
    let (mut known_not, mut known) = (None::<u64>, newest.seq - 1);
    let mut first = newest.clone();
    if have == 0 {
        // Everything retained is missing: no need to search.
        if let Some(oldest) = cluster.record_after(log, 0).await? {
            (known, first) = (0, oldest);
        }
    }
    loop {
        let low = known_not.map_or(0, |m| m + 1);
        if low >= known {
            break;
        }
        let middle = low + (known - low) / 2;
        let Some(found) = cluster.record_after(log, middle).await? else {
            break;
        };
        if holds_more(&found) {
            known = middle;
            first = found;
        } else {
            // Every `m` up to just below `found` has it as `after(m)`.
            known_not = Some(middle.max(found.seq - 1));
        }
    }
    let mut after = first.seq;
    let mut records = vec![first];
    // Bounded: the room's subject retains at most `history.max_per_room`
    // records, plus what is stored while this reads.
    while let Some(record) = cluster.record_after(log, after).await? {
        after = record.seq;
        records.push(record);
        if records.len() > 1_000_000 {
            return Err(lost("catching up: the room's log did not end"));
        }
    }
    Ok(records)
}

//! Cluster mode: how a room on this node catches up with its cluster log
//! before it answers anyone. The local sled log is a replica of the cluster
//! log: same offsets, same epoch, same bytes. What it lacks is read from
//! JetStream and written locally; what the cluster no longer has (pruned, or
//! from an older epoch) is dropped locally too.

use super::messages::RoomError;
use super::registry::RoomContext;
use crate::cluster::{Cluster, ClusterError, LogRecord, RuntimeBound};
use crate::protocol::{EncodedMessage, RoomName};
use crate::storage::{RoomSnapshot, StoreError, WriteBatch, WriteOp};
use async_nats::jetstream::consumer::push::Ordered;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;

/// The longest catching up may wait for the next record before giving up
/// (the room then retries; joins meanwhile get `unavailable`).
const CATCH_UP_STALL: Duration = Duration::from_secs(5);

/// A room in step with its cluster log.
pub(super) struct Synced {
    /// The local log after catching up (epoch and bounds as the cluster's).
    pub snapshot: RoomSnapshot,
    /// Records this node had not stored, now stored, oldest first.
    pub caught_up: Vec<EncodedMessage>,
    /// The live log, from the record after the last caught-up one.
    pub follow: RuntimeBound<Ordered>,
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

pub(super) async fn catch_up(
    context: Arc<RoomContext>,
    cluster: Arc<Cluster>,
    room: RoomName,
    tail: usize,
) -> Result<Synced, RoomError> {
    let (store, name) = (context.store.clone(), room.clone());
    let mut snapshot = tokio::task::spawn_blocking(move || store.load_room(&name, tail))
        .await
        .unwrap_or(Err(StoreError::Closed))?;
    let bounds = cluster.log_bounds(&room).await?;
    // Subscribed before anything else so no node's answer to our `sync` is missed.
    let events = cluster.room_events(&room).await?;
    let mut ops = Vec::new();
    if snapshot.epoch != Some(bounds.epoch) || snapshot.last_offset > bounds.last {
        // The local log belongs to an older cluster log: it no longer counts.
        let everything = snapshot.last_offset + 1;
        forget_before(&mut snapshot, everything, &mut ops);
        snapshot = RoomSnapshot {
            epoch: Some(bounds.epoch),
            last_offset: 0,
            first_offset: 1,
            tail: Vec::new(),
            keys: Vec::new(),
            damage: None,
            unreadable: Vec::new(),
            ring: 0,
        };
    }
    snapshot.keys.clear();
    if bounds.first > snapshot.last_offset + 1 {
        // What this node missed is no longer retained anywhere.
        forget_before(&mut snapshot, bounds.first, &mut ops);
    }
    let mut follow = cluster.follow(&room, snapshot.last_offset + 1).await?;
    let mut caught_up: Vec<EncodedMessage> = Vec::new();
    let mut next = snapshot.last_offset + 1;
    while next <= bounds.last {
        let item = tokio::time::timeout(CATCH_UP_STALL, follow.next())
            .await
            .map_err(|_| lost("catching up stalled"))?
            .ok_or_else(|| lost("the cluster log ended"))?
            .map_err(lost)?;
        let seq = item.info().map_err(lost)?.stream_sequence;
        if seq < next {
            continue;
        }
        if seq > next {
            // Pruned in the cluster while we read: history starts at `seq`.
            caught_up.clear();
            forget_before(&mut snapshot, seq, &mut ops);
        }
        next = seq + 1;
        match LogRecord::decode(&item.payload).and_then(|r| r.to_message(&room, seq)) {
            Ok(message) => caught_up.push(message),
            Err(error) => tracing::warn!(%room, seq, %error, "skipped a cluster record"),
        }
    }
    let max = context.settings.history.max_per_room;
    if let Some(last) = caught_up.last().map(|m| m.offset) {
        if last + 1 - snapshot.first_offset > max {
            let keep_from = last + 1 - max;
            caught_up.retain(|m| m.offset >= keep_from);
            forget_before(&mut snapshot, keep_from, &mut ops);
        }
    }
    ops.extend(caught_up.iter().map(|message| WriteOp::Append {
        message: message.clone(),
        key: None,
    }));
    if !ops.is_empty() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let batch = WriteBatch {
            room: room.clone(),
            epoch: bounds.epoch,
            generation: context.store.generation(),
            ring: context.settings.history.max_per_room,
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
        follow,
        events,
    })
}

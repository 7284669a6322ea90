//! Cluster mode: with `cluster.nats_url` set, nodes share rooms through NATS.
//!
//! - Each room's **cluster log** is a JetStream stream of its own, so the
//!   stream's sequence numbers are the room's offsets and its creation time
//!   is the room's epoch: the same on every node, with no sequencing of ours.
//!   A publish is acked once JetStream has stored it (`Nats-Msg-Id` = the
//!   idempotency key, so a repeat is refused cluster-wide). Every node's room
//!   actor follows its log with an ordered consumer, writes what arrives to
//!   its sled log and fans it out: one order, everywhere.
//! - Presence, typing and direct messages are core NATS: they need no log.
//!   A node refreshes its presence in each room every heartbeat interval;
//!   a node not heard of for `heartbeat.timeout_ms` has left the room.
//!
//! Standalone (no NATS URL) is the absence of a [`Cluster`]: rooms sequence
//! their own offsets and nothing here runs.

mod feed_report;
mod health;
mod nats;
mod records;
mod subjects;

pub use nats::{
    AppendDone, Cluster, ClusterError, LogAppender, LogBounds, LogMessage, RuntimeBound,
};
pub use records::{DirectRecord, LogRecord, RecordError, RoomEvent};
pub use subjects::Subjects;

use crate::directory::SessionDirectory;
use futures_util::StreamExt;
use std::sync::Arc;

/// Delivers other nodes' direct messages to this node's sessions, until the
/// subscription ends. (A node's own directs are delivered locally at once.)
pub async fn relay_directs(cluster: Arc<Cluster>, directory: Arc<SessionDirectory>) {
    let mut directs = loop {
        match cluster.directs().await {
            Ok(subscriber) => break subscriber,
            Err(error) => {
                tracing::warn!(%error, "direct messages from other nodes: retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
        }
    };
    while let Some(message) = directs.next().await {
        let Ok(record) = serde_json::from_slice::<DirectRecord>(&message.payload) else {
            tracing::warn!("ignored a malformed direct message from the cluster");
            continue;
        };
        if record.node == cluster.node_id() {
            continue;
        }
        let Ok(user) = crate::protocol::UserId::parse(&record.user) else {
            continue;
        };
        directory.send_to_user(&user, &record.frame);
    }
}

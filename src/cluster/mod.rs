//! Cluster mode: with `cluster.nats_url` set, nodes share rooms through NATS.
//!
//! - Each room's **cluster log** is one subject in one of a fixed set of
//!   JetStream streams (`cluster.partitions`, chosen by a hash of the room),
//!   with per-subject retention. Its records are batches of messages that
//!   carry their epoch and offsets. A node appends only after the room's
//!   newest record (`Nats-Expected-Last-Subject-Sequence`), so there is one
//!   order and every writer has seen all before its own; a publish is acked
//!   once JetStream has stored it and this node has applied it. Nodes that
//!   serve the room hear each stored record on a core subject (JetStream
//!   republishes it) and read any they missed by direct get: no consumer,
//!   stream or entry per room, and no traffic for rooms a node does not serve.
//! - Presence, typing and direct messages are core NATS: they need no log.
//!   A room announces its node's presence when it changes; each node says
//!   it is alive once per heartbeat interval (one message per node, see
//!   `nodes.rs`) and goodbye when it stops; a node not heard of for
//!   `heartbeat.timeout_ms`, or gone, has left every room.
//!
//! Standalone (no NATS URL) is the absence of a [`Cluster`]: rooms sequence
//! their own offsets and nothing here runs.

mod feed_report;
mod health;
mod log;
mod migrate;
mod nats;
mod nodes;
mod partitions;
mod records;
mod subjects;

pub use log::{live_sequence, AppendError, StoredRecord};
pub use migrate::MigrateError;
pub use nats::{server_addrs, Cluster, ClusterError, RuntimeBound};
pub use nodes::{Liveness, NodeRecord, Nodes};
pub use records::{DirectRecord, LogBatch, LogRecord, RecordError, RoomEvent};
pub use subjects::{RoomLog, Subjects};

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

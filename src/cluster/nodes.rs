//! Node liveness: each node says it is alive once per heartbeat interval on
//! one subject (`<prefix>.nodes.alive`: one message per node, not per room),
//! and goodbye when it stops. Every node keeps when it last heard each
//! other node; rooms drop the presence of nodes gone silent or gone, so
//! rooms need announce their presence only when it changes.

use super::nats::Cluster;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    pub node: String,
    /// `alive` (heartbeat) or `goodbye` (the node stops).
    pub kind: String,
    /// Random per process start: tells one life of a node from the next
    /// (reports about a dead node's users carry it in their ids).
    #[serde(default)]
    pub boot: u64,
}

/// What this node knows of another node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Last heard at.
    Alive(Instant),
    /// Said goodbye.
    Gone,
    /// Never heard of (yet).
    Unknown,
}

#[derive(Default)]
pub struct Nodes {
    seen: Mutex<HashMap<String, Liveness>>,
    boots: Mutex<HashMap<String, u64>>,
}

impl Nodes {
    /// Notes a heartbeat or goodbye; true when it is the first heartbeat of
    /// a node (or of a new life of it) that this node hears.
    pub fn heard(&self, record: &NodeRecord, now: Instant) -> bool {
        let state = if record.kind == "goodbye" {
            Liveness::Gone
        } else {
            Liveness::Alive(now)
        };
        let before = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.node.clone(), state);
        let new_life = record.boot != 0 && self.boot_of(&record.node) != record.boot;
        if record.boot != 0 {
            self.boots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(record.node.clone(), record.boot);
        }
        matches!(state, Liveness::Alive(_))
            && (new_life || !matches!(before, Some(Liveness::Alive(_))))
    }

    /// The boot id `node` last said (0: never heard).
    pub fn boot_of(&self, node: &str) -> u64 {
        self.boots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
            .unwrap_or(0)
    }

    /// The nodes heard of since `cutoff` (this one not included).
    pub fn live(&self, cutoff: Instant) -> usize {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|l| matches!(l, Liveness::Alive(at) if *at >= cutoff))
            .count()
    }

    pub fn liveness(&self, node: &str) -> Liveness {
        self.seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .copied()
            .unwrap_or(Liveness::Unknown)
    }
}

/// How often the heartbeat task looks whether the link just came up.
const LINK_CHECK: Duration = Duration::from_millis(20);

/// A subscription to the node-level subject `subject` names, retried each
/// second until made; `None` once the cluster link is gone.
async fn subscribed(
    cluster: &Weak<Cluster>,
    subject: impl Fn(&super::Subjects) -> String,
    what: &str,
) -> Option<super::RuntimeBound<async_nats::Subscriber>> {
    loop {
        let link = cluster.upgrade()?;
        match link.subscribe(subject(link.subjects())).await {
            Ok(subscriber) => return Some(subscriber),
            Err(error) => tracing::warn!(%error, "{what}: retrying"),
        }
        drop(link);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Says this node is alive every `every` and hears the others, for as long
/// as the cluster link lives.
pub(super) async fn run(cluster: Weak<Cluster>, every: Duration) {
    let Some(mut heard) = subscribed(&cluster, |s| s.nodes_alive(), "node heartbeats").await else {
        return;
    };
    let Some(mut queries) = subscribed(&cluster, |s| s.nodes_query(), "node queries").await else {
        return;
    };
    let Some(mut serving_asks) =
        subscribed(&cluster, |s| s.nodes_serving(), "room serving asks").await
    else {
        return;
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Heartbeats are sent only while NATS answers: the first one goes the
    // moment it does (and again after each reconnect), not a tick later, so
    // the others (who answer a newcomer at once) are known before this
    // node's rooms ask who is there.
    let mut link_check = tokio::time::interval(LINK_CHECK);
    let mut announced = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let Some(link) = cluster.upgrade() else { return };
                link.send_node_record("alive");
                announced = link.can_publish_core();
            }
            _ = link_check.tick() => {
                let Some(link) = cluster.upgrade() else { return };
                let linked = link.can_publish_core();
                if linked && !announced {
                    link.send_node_record("alive");
                }
                announced = linked;
            }
            ask = serving_asks.next() => {
                let Some(ask) = ask else { return };
                let Some(link) = cluster.upgrade() else { return };
                link.answer_serving(ask);
            }
            query = queries.next() => {
                let Some(query) = query else { return };
                let Some(link) = cluster.upgrade() else { return };
                link.answer_query(query);
            }
            message = heard.next() => {
                let Some(message) = message else { return };
                let Some(link) = cluster.upgrade() else { return };
                let Ok(record) = serde_json::from_slice::<NodeRecord>(&message.payload) else {
                    continue;
                };
                // A node new to this one hears this one's heartbeat at
                // once, not an interval later: until it does, it would
                // count this node out (a room it starts would not ask it
                // who is there).
                if record.node != link.node_id() && link.nodes().heard(&record, Instant::now()) {
                    link.send_node_record("alive");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodbye_is_gone_and_a_heartbeat_revives() {
        let nodes = Nodes::default();
        let now = Instant::now();
        assert_eq!(nodes.liveness("a"), Liveness::Unknown);
        let alive = NodeRecord {
            node: "a".into(),
            kind: "alive".into(),
            boot: 1,
        };
        assert!(nodes.heard(&alive, now), "a new node");
        assert_eq!(nodes.liveness("a"), Liveness::Alive(now));
        assert!(!nodes.heard(&alive, now), "known already");
        let bye = NodeRecord {
            node: "a".into(),
            kind: "goodbye".into(),
            boot: 1,
        };
        assert!(!nodes.heard(&bye, now));
        assert_eq!(nodes.liveness("a"), Liveness::Gone);
        assert!(nodes.heard(&alive, now), "back after a goodbye");
        assert_eq!(nodes.liveness("a"), Liveness::Alive(now));
        let restarted = NodeRecord { boot: 2, ..alive };
        assert!(nodes.heard(&restarted, now), "a new life");
    }
}

//! The events hook: a bounded queue of events and the one task that sends
//! them, in order, in batches, until the backend takes them.
//!
//! Events keep their place in the queue until a batch holding them is
//! answered 2xx, so a retried batch carries the same ids. When the backend
//! fails for long, the oldest events are dropped (and counted) rather than
//! holding memory without end.

use super::client::{Hook, HookClient};
use crate::metrics::Metrics;
use parking_lot::Mutex;
use serde_json::{Map, Value};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// The most events one request carries.
const MAX_BATCH: usize = 100;
/// Retry delays: doubling from the first to the last.
const FIRST_RETRY: Duration = Duration::from_millis(100);
const LAST_RETRY: Duration = Duration::from_secs(10);

/// The event types of `hooks.events` (the order of `config::HOOK_EVENT_TYPES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    SessionConnected,
    SessionDisconnected,
    RoomOccupied,
    RoomVacated,
    UserJoined,
    UserLeft,
    Message,
}

impl EventKind {
    const ALL: [EventKind; 7] = [
        EventKind::SessionConnected,
        EventKind::SessionDisconnected,
        EventKind::RoomOccupied,
        EventKind::RoomVacated,
        EventKind::UserJoined,
        EventKind::UserLeft,
        EventKind::Message,
    ];

    pub fn name(self) -> &'static str {
        crate::config::HOOK_EVENT_TYPES[self as usize]
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

struct Queued {
    seq: u64,
    json: String,
}

#[derive(Default)]
struct Waiting {
    events: VecDeque<Queued>,
    next_seq: u64,
}

pub struct EventQueue {
    wanted: u8,
    node: String,
    /// Makes ids unique across restarts of a node.
    boot: u32,
    capacity: usize,
    waiting: Mutex<Waiting>,
    wake: Notify,
    metrics: Metrics,
}

impl EventQueue {
    pub fn new(types: &[String], capacity: usize, node: &str, metrics: Metrics) -> Self {
        let wanted = EventKind::ALL
            .iter()
            .filter(|k| types.iter().any(|t| t == k.name()))
            .fold(0, |bits, k| bits | k.bit());
        Self {
            wanted,
            node: node.to_owned(),
            boot: rand::random(),
            capacity,
            waiting: Mutex::default(),
            wake: Notify::new(),
            metrics,
        }
    }

    /// Whether `hooks.events` lists this type.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.wanted & kind.bit() != 0
    }

    /// Queues an event made of `fields` (called only if [`Self::wants`] it,
    /// so nothing is built for types not sent). Never blocks on the network.
    pub fn push(&self, kind: EventKind, fields: Value) {
        if !self.wants(kind) {
            return;
        }
        let mut waiting = self.waiting.lock();
        let seq = waiting.next_seq;
        waiting.next_seq += 1;
        let mut event = Map::new();
        event.insert(
            "id".into(),
            format!("{}-{:08x}-{seq}", self.node, self.boot).into(),
        );
        event.insert("type".into(), kind.name().into());
        event.insert("ts".into(), crate::room::actor::now_ms().into());
        if let Value::Object(fields) = fields {
            event.extend(fields);
        }
        let json = Value::Object(event).to_string();
        if waiting.events.len() >= self.capacity {
            waiting.events.pop_front();
            self.metrics.hook_events_dropped.inc();
        } else {
            self.metrics.hook_events_queued.inc();
        }
        waiting.events.push_back(Queued { seq, json });
        drop(waiting);
        self.wake.notify_one();
    }

    /// The next batch: its body and the last sequence number it holds.
    fn batch(&self) -> Option<(Vec<u8>, u64)> {
        let waiting = self.waiting.lock();
        let last = waiting
            .events
            .get(waiting.events.len().min(MAX_BATCH).checked_sub(1)?)?
            .seq;
        let mut body = String::from("{\"node\":");
        body.push_str(&Value::from(self.node.as_str()).to_string());
        body.push_str(",\"events\":[");
        for (i, event) in waiting.events.iter().take(MAX_BATCH).enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(&event.json);
        }
        body.push_str("]}");
        Some((body.into_bytes(), last))
    }

    /// Forgets the events the backend took (some may have been dropped meanwhile).
    fn delivered(&self, upto: u64) {
        let mut waiting = self.waiting.lock();
        while waiting.events.front().is_some_and(|e| e.seq <= upto) {
            waiting.events.pop_front();
            self.metrics.hook_events_queued.dec();
        }
    }

    /// Whether every event so far was delivered (or dropped).
    pub fn is_empty(&self) -> bool {
        self.waiting.lock().events.is_empty()
    }

    /// Sends batches for as long as the hub runs.
    pub async fn deliver(self: Arc<Self>, client: Arc<HookClient>, url: String) {
        let mut retry = FIRST_RETRY;
        loop {
            // Registered before looking, so a push in between still wakes us.
            let woken = self.wake.notified();
            let Some((body, upto)) = self.batch() else {
                woken.await;
                continue;
            };
            match client.post(Hook::Events, &url, body).await {
                Ok(answer) if (200..300).contains(&answer.status) => {
                    self.delivered(upto);
                    retry = FIRST_RETRY;
                }
                outcome => {
                    let why = match outcome {
                        Ok(answer) => format!("the backend answered {}", answer.status),
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(error = %why, retry_ms = retry.as_millis() as u64, "events hook failed; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(LAST_RETRY);
                }
            }
        }
    }
}

//! The room registry: room name → the room's actor on this node.
//!
//! Rooms are started on first use on the calling thread's arbiter, which
//! spreads rooms over the server's worker threads. A room that has been empty
//! for `rooms.idle_timeout_ms` removes itself ([`RoomRegistry::remove`]) and
//! stops; a request that reached it just as it stopped sees a closed mailbox,
//! and callers then simply ask the registry again (see `session::joining`).

use super::actor::RoomActor;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use crate::storage::HistoryStore;
use actix::{Actor, Addr};
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// What every room needs from the app.
pub struct RoomContext {
    pub settings: Arc<Settings>,
    pub store: Arc<dyn HistoryStore>,
    pub metrics: Metrics,
    /// Present in cluster mode: the room's log is then the cluster's.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// The events hook's queue, when `hooks.events_url` is set.
    pub events: Option<Arc<crate::hooks::events::EventQueue>>,
}

/// Counts a room keeps current for `/api/rooms` without a round trip.
#[derive(Default)]
pub struct RoomStats {
    pub users: AtomicUsize,
    pub sessions: AtomicUsize,
}

struct Entry {
    addr: Addr<RoomActor>,
    generation: u64,
    stats: Arc<RoomStats>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RoomSummary {
    pub room: RoomName,
    pub users: usize,
    pub sessions: usize,
}

#[derive(Clone)]
pub struct RoomRegistry {
    rooms: Arc<Mutex<HashMap<RoomName, Entry>>>,
    context: Arc<RoomContext>,
    generations: Arc<AtomicU64>,
    /// The most rooms running at once since [`RoomRegistry::take_peak`].
    peak: Arc<AtomicUsize>,
}

impl RoomRegistry {
    pub fn new(context: RoomContext) -> Self {
        Self {
            rooms: Arc::default(),
            context: Arc::new(context),
            generations: Arc::default(),
            peak: Arc::default(),
        }
    }

    /// The most rooms that ran at once since the last call.
    pub fn take_peak(&self) -> usize {
        self.peak.swap(self.count(), Ordering::Relaxed)
    }

    /// The room's actor, started here if the room is not running.
    pub fn get_or_start(&self, room: &RoomName) -> Addr<RoomActor> {
        let mut rooms = self.rooms.lock();
        if let Some(entry) = rooms.get(room) {
            if entry.addr.connected() {
                return entry.addr.clone();
            }
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let stats = Arc::new(RoomStats::default());
        let addr = RoomActor::new(room.clone(), generation, stats.clone(), self.clone()).start();
        let replaced = rooms.insert(
            room.clone(),
            Entry {
                addr: addr.clone(),
                generation,
                stats,
            },
        );
        if replaced.is_none() {
            self.context.metrics.rooms.inc();
        }
        self.peak.fetch_max(rooms.len(), Ordering::Relaxed);
        addr
    }

    /// Removes the room if `generation` is still the registered one.
    pub(crate) fn remove(&self, room: &RoomName, generation: u64) {
        let mut rooms = self.rooms.lock();
        if rooms.get(room).is_some_and(|e| e.generation == generation) {
            rooms.remove(room);
            self.context.metrics.rooms.dec();
        }
    }

    /// Whether the room runs on this node.
    pub fn is_running(&self, room: &str) -> bool {
        RoomName::parse(room).is_ok_and(|room| self.rooms.lock().contains_key(&room))
    }

    pub fn context(&self) -> &Arc<RoomContext> {
        &self.context
    }

    pub fn count(&self) -> usize {
        self.rooms.lock().len()
    }

    /// Every running room with its users and sessions, by name.
    pub fn summaries(&self) -> Vec<RoomSummary> {
        let mut out: Vec<RoomSummary> = self
            .rooms
            .lock()
            .iter()
            .map(|(room, e)| RoomSummary {
                room: room.clone(),
                users: e.stats.users.load(Ordering::Relaxed),
                sessions: e.stats.sessions.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.room.cmp(&b.room));
        out
    }
}

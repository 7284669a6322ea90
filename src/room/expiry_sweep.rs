//! The TTL sweep: expired history of rooms that are not running leaves the
//! disk too.
//!
//! A running room prunes what outlived `history.ttl_secs` itself (each
//! maintenance tick, and before it serves anything after loading). A room
//! nobody uses stops after `rooms.idle_timeout_ms`, and without the sweep
//! its expired messages would stay on disk until its next use, which may be
//! never. The sweep walks the stored rooms a step at a time and starts each
//! one that is not running and holds an expired message: the room is the
//! only writer of its log, so it prunes them itself as it loads, then stops
//! again once idle. Nothing writes a stopped room's log behind its back.
//!
//! Bounded on purpose: each step reads at most [`LOGS_PER_STEP`] room
//! headers (on a blocking thread) and starts at most [`ROOMS_PER_STEP`]
//! rooms, and no more than [`MAX_RUNNING`] rooms it started run at once
//! (each stays until `rooms.idle_timeout_ms` has passed), so a store with a
//! million expired rooms is worked through at a steady pace, in bounded
//! memory, instead of loading them all at once. The steps of one pass come
//! a second apart (a million rooms: about four minutes of reading headers);
//! passes, [`step_every`] apart.

use super::RoomRegistry;
use crate::protocol::RoomName;
use crate::storage::{ExpiryScan, SweepCursor};
use actix::Arbiter;
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The most room logs one step looks at.
const LOGS_PER_STEP: usize = 4096;
/// The most rooms one step starts.
const ROOMS_PER_STEP: usize = 64;
/// The most rooms started by the sweep that may be running at once.
const MAX_RUNNING: usize = 256;
/// The longest between two steps (a quarter of the TTL when that is shorter,
/// but at least a second), once a pass over the store is done.
const MAX_STEP_EVERY: Duration = Duration::from_secs(30);
/// The wait between the steps of one pass, and after a step that found
/// more than it could start.
const BACKLOG_STEP_EVERY: Duration = Duration::from_secs(1);

/// How long the sweep waits after a finished pass for a given `ttl_secs`.
pub fn step_every(ttl_secs: u64) -> Duration {
    Duration::from_secs(ttl_secs / 4).clamp(Duration::from_secs(1), MAX_STEP_EVERY)
}

/// The running sweep. Its rooms live on an arbiter of their own: not on the
/// thread that runs the server (a room started there would serve whoever
/// joins it from that thread), and stopped as a whole, after the drain and
/// before the store closes.
pub struct ExpirySweep {
    arbiter: Arbiter,
    stopping: Arc<AtomicBool>,
}

impl ExpirySweep {
    /// Starts the sweep; nothing to do (`None`) without a TTL.
    pub fn start(registry: RoomRegistry) -> Option<ExpirySweep> {
        let ttl_secs = registry.context().settings.history.ttl_secs;
        if ttl_secs == 0 {
            return None;
        }
        let arbiter = Arbiter::new();
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        arbiter.spawn(async move {
            let period = step_every(ttl_secs);
            let mut sweep = Sweep::default();
            // The first step comes one period after start, not while the
            // node is still taking its first connections.
            let mut wait = period;
            loop {
                tokio::time::sleep(wait).await;
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let more = sweep.step(&registry, ttl_secs).await;
                wait = if more { BACKLOG_STEP_EVERY } else { period };
            }
        });
        Some(ExpirySweep { arbiter, stopping })
    }

    /// Starts no more rooms (the node is draining).
    pub fn stop_starting(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Stops the rooms the sweep started and waits for them.
    pub async fn stop(self) {
        self.stop_starting();
        self.arbiter.stop();
        let arbiter = self.arbiter;
        let _ = tokio::task::spawn_blocking(move || arbiter.join()).await;
    }
}

#[derive(Default)]
struct Sweep {
    /// Where the next step continues (`None`: from the first room).
    cursor: Option<SweepCursor>,
    /// Rooms this sweep started that may still be running.
    started: HashSet<RoomName>,
}

impl Sweep {
    /// One step: finds rooms with expired history after the cursor and
    /// starts those not running. Returns whether work is left for the next
    /// step of this pass (more rooms than it could start, or logs not yet
    /// looked at).
    async fn step(&mut self, registry: &RoomRegistry, ttl_secs: u64) -> bool {
        self.started
            .retain(|room| registry.is_running(room.as_str()));
        let limit = ROOMS_PER_STEP.min(MAX_RUNNING - self.started.len());
        if limit == 0 {
            return true;
        }
        let store = registry.context().store.clone();
        let cutoff = super::actor::now_ms().saturating_sub(ttl_secs * 1000);
        let after = self.cursor.clone();
        let scan = tokio::task::spawn_blocking(move || {
            store.rooms_with_expired(after.as_ref(), cutoff, LOGS_PER_STEP, limit)
        })
        .await;
        let ExpiryScan { rooms, next } = match scan {
            Ok(Ok(found)) => found,
            Ok(Err(error)) => {
                // A store that cannot be read now is tried again next step.
                tracing::warn!(%error, "the TTL sweep could not read the store");
                return false;
            }
            Err(_) => return false,
        };
        for room in rooms {
            if !registry.is_running(room.as_str()) {
                registry.get_or_start(&room);
                registry.context().metrics.rooms_swept.inc();
                self.started.insert(room);
            }
        }
        self.cursor = next;
        self.cursor.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_the_ttl_within_bounds() {
        assert_eq!(step_every(1), Duration::from_secs(1));
        assert_eq!(step_every(60), Duration::from_secs(15));
        assert_eq!(step_every(86_400), MAX_STEP_EVERY);
    }
}

//! Cluster mode: room and presence hook events reported once for the
//! cluster. A change is reported by the node whose session made it, judged
//! from its view of every node's presence. Where views lag by a NATS round
//! trip the nodes settle it the same way, without asking anyone:
//! - First joins on two nodes at once (each saw an empty room): each holds
//!   its `room_occupied`, and the room's later events behind it to keep
//!   their order, for [`RACE_WINDOW`] (in cluster mode always); its
//!   presence announcement says so. If meanwhile another node announces
//!   that it holds one too, the node with the smaller id reports and the
//!   other drops its `room_occupied`.
//! - Last leaves on two nodes at once (each still saw the other's user, so
//!   neither reported `room_vacated`): when the other's "nobody here"
//!   arrives without its vacated mark and this node's own last user left
//!   within [`RACE_WINDOW`], the smaller id reports.
//! - A node that dies cannot report its users' departures: every node that
//!   sees them reports them, with ids made of the dead node, its boot id,
//!   the room and the user, so these duplicates carry the same id.

use super::*;
use crate::hooks::events::EventKind;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// How long a node's view of the others' presence may lag (a NATS round
/// trip, with room to spare).
pub(super) const RACE_WINDOW: Duration = Duration::from_millis(250);

#[derive(Default)]
pub(super) struct Reports {
    /// Events held while a `room_occupied` may be raced, in order, each
    /// with its own `ts`.
    held: RefCell<Option<Vec<(EventKind, Value)>>>,
    hold_generation: u64,
    /// The held `room_occupied` is still this node's to report.
    occupied_mine: bool,
    /// When this node's last local user left.
    pub(super) local_emptied_at: Option<Instant>,
    /// The next presence announcement says this node reported `room_vacated`.
    pub(super) vacated_to_announce: bool,
    /// The next presence announcement says this node holds a `room_occupied`.
    pub(super) occupied_to_announce: bool,
}

impl RoomActor {
    /// Queues a hook event about this room (`room` added), or holds it
    /// behind a `room_occupied` that may be raced.
    pub(super) fn emit(&self, kind: EventKind, fields: impl FnOnce() -> Value) {
        let Some(events) = self.context.events.as_ref().filter(|q| q.wants(kind)) else {
            return;
        };
        let mut fields = fields();
        fields["room"] = json!(self.name);
        if let Some(held) = self.reports.held.borrow_mut().as_mut() {
            fields["ts"] = json!(now_ms());
            held.push((kind, fields));
            return;
        }
        events.push(kind, fields);
    }

    /// The room's first user (as far as this node knows) just joined here.
    pub(super) fn occupied(&mut self, ctx: &mut Context<Self>) {
        // Held in cluster mode even with no other node known yet: a node
        // that started a moment ago may not have been heard of.
        if self.context.cluster.is_some() && self.reports.held.borrow().is_none() {
            *self.reports.held.borrow_mut() = Some(Vec::new());
            self.reports.hold_generation += 1;
            let generation = self.reports.hold_generation;
            ctx.run_later(RACE_WINDOW, move |act, _| {
                if act.reports.hold_generation == generation {
                    act.release_held();
                }
            });
        }
        self.reports.occupied_mine = true;
        self.reports.occupied_to_announce = self.context.cluster.is_some();
        self.emit(EventKind::RoomOccupied, || json!({}));
    }

    /// Sends the held events (without `room_occupied` if another node
    /// reports it).
    pub(super) fn release_held(&mut self) {
        let Some(held) = self.reports.held.borrow_mut().take() else {
            return;
        };
        let mine = std::mem::take(&mut self.reports.occupied_mine);
        let Some(events) = self.context.events.as_ref() else {
            return;
        };
        for (kind, fields) in held {
            if kind != EventKind::RoomOccupied || mine {
                events.push(kind, fields);
            }
        }
    }

    /// Another node's presence arrived: settles the races above.
    /// `had_users`: `node` counted users before; `was_empty`: the room was
    /// empty before; `vacated`: `node` reported `room_vacated` with it;
    /// `occupied`: `node` holds a `room_occupied` of its own.
    pub(super) fn heard_presence(
        &mut self,
        node: &str,
        had_users: bool,
        was_empty: bool,
        vacated: bool,
        occupied: bool,
    ) {
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        let me = cluster.node_id();
        let racing_first = occupied
            && self.reports.held.borrow().is_some()
            && self.reports.occupied_mine
            && !had_users
            && self.presence.has_users(node);
        if racing_first && node < me {
            self.reports.occupied_mine = false;
        }
        let racing_last = !was_empty
            && self.presence.is_empty()
            && !vacated
            && self
                .reports
                .local_emptied_at
                .is_some_and(|at| at.elapsed() < RACE_WINDOW);
        if racing_last && me < node {
            self.emit(EventKind::RoomVacated, || json!({}));
        }
    }

    /// `node` died (no heartbeat, no goodbye) and its users are gone from
    /// here: reported with the same ids on every node that sees it.
    pub(super) fn node_died(&mut self, node: &str, changes: Vec<Change>, emptied: bool) {
        let boot = self.context.cluster.as_ref().map_or(0, |c| c.boot_of(node));
        for change in changes {
            if let Change::Left(user) = &change {
                let id = self.gone_id(node, boot, "user_left", user.as_str());
                self.emit(EventKind::UserLeft, || json!({"user": user, "id": id}));
            }
            self.tell_members(change);
        }
        if emptied {
            let id = self.gone_id(node, boot, "room_vacated", "");
            self.emit(EventKind::RoomVacated, || json!({ "id": id }));
        }
    }

    fn gone_id(&self, node: &str, boot: u64, kind: &str, user: &str) -> String {
        let mut digest = Sha256::new();
        for part in [self.name.as_str(), kind, user] {
            digest.update(part.as_bytes());
            digest.update([0]);
        }
        let hash: String = digest.finalize()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("{node}-{boot:016x}-gone-{hash}")
    }
}

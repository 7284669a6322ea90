//! Cluster mode: the room's presence and typing between the nodes that
//! serve it (core NATS; nothing of it is kept in the cluster log).

use super::*;
use crate::cluster::Liveness;

impl RoomActor {
    /// Cluster mode: tells the other nodes who is here on this node.
    pub(super) fn announce_presence(&mut self) {
        let Some(cluster) = &self.context.cluster else {
            return;
        };
        if self.log.is_none() {
            return;
        }
        cluster.send_room_event(
            &self.name,
            &RoomEvent::Presence {
                node: cluster.node_id().to_owned(),
                users: self.presence.local_counts(),
                vacated: std::mem::take(&mut self.reports.vacated_to_announce),
                occupied: std::mem::take(&mut self.reports.occupied_to_announce),
            },
        );
    }

    /// Cluster mode: how often this room checks whether the nodes it heard
    /// presence from are still alive (their heartbeats come at least twice
    /// per `heartbeat.timeout_ms`; checking four times per timeout drops a
    /// dead node's users within 1.25 × the timeout, inside the contract's 2 ×).
    pub(super) fn presence_periods(&self) -> (Duration, Duration) {
        let heartbeat = &self.context.settings.heartbeat;
        let announce = Duration::from_millis(heartbeat.interval_ms.min(heartbeat.timeout_ms / 2));
        let check = (announce / 2).clamp(Duration::from_millis(5), MAINTENANCE_EVERY);
        (announce, check)
    }

    /// Cluster mode: forgets the presence of nodes gone silent (no heartbeat
    /// for `heartbeat.timeout_ms`) or gone (goodbye). Presence itself is
    /// announced only when it changes: nodes' liveness is one heartbeat per
    /// node (`cluster/nodes.rs`), not one per room.
    pub(super) fn tick_presence(&mut self) {
        if self.log.is_none() {
            return;
        }
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        let generation = cluster.link_generation();
        if generation != self.presence_generation && cluster.is_linked() {
            // A reconnect or a slow subscription: presence updates may have
            // been lost either way. Ask the others again and say ours.
            self.presence_generation = generation;
            cluster.send_room_event(
                &self.name,
                &RoomEvent::Sync {
                    node: cluster.node_id().to_owned(),
                },
            );
            if self.presence.local_users() > 0 {
                self.announce_presence();
            }
        }
        let timeout = Duration::from_millis(self.context.settings.heartbeat.timeout_ms);
        let Some(cutoff) = Instant::now().checked_sub(timeout) else {
            return;
        };
        let gone = self
            .presence
            .expire_remote_where(|node, seen| match cluster.liveness(node) {
                Liveness::Gone => true,
                Liveness::Alive(heard) => heard < cutoff && seen < cutoff,
                Liveness::Unknown => seen < cutoff,
            });
        if !gone.is_empty() {
            // The silent node cannot report its users' departures; every
            // node that sees them does, with the same ids.
            for (node, changes, emptied) in gone {
                self.node_died(&node, changes, emptied);
            }
            self.update_stats();
        }
    }
}

/// Cluster mode: presence and typing from the other nodes in the room.
impl StreamHandler<async_nats::Message> for RoomActor {
    fn handle(&mut self, event: async_nats::Message, _ctx: &mut Context<Self>) {
        let Ok(event) = serde_json::from_slice::<RoomEvent>(&event.payload) else {
            return tracing::warn!(room = %self.name, "ignored a malformed cluster event");
        };
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        if event.node() == cluster.node_id() {
            return;
        }
        match event {
            RoomEvent::Presence {
                node,
                users,
                vacated,
                occupied,
            } => {
                let users = users
                    .into_iter()
                    .filter_map(|(user, n)| UserId::parse(&user).ok().map(|u| (u, n)))
                    .collect();
                let (had_users, was_empty) =
                    (self.presence.has_users(&node), self.presence.is_empty());
                for change in self.presence.set_remote(&node, users, Instant::now()) {
                    self.tell_members(change);
                }
                self.heard_presence(&node, had_users, was_empty, vacated, occupied);
                self.update_stats();
            }
            // Answered even with nobody here: the asking room counts the
            // answers and stops waiting once every live node answered.
            RoomEvent::Sync { .. } => self.announce_presence(),
            RoomEvent::Typing { user, active, .. } => {
                let Ok(user) = UserId::parse(&user) else {
                    return;
                };
                let frame = encode(&ServerFrame::Typing {
                    room: &self.name,
                    user: &user,
                    active,
                });
                self.fan_out(&WireFrames::text(&frame), |_, member| member.user != user);
            }
        }
    }

    fn finished(&mut self, _ctx: &mut Context<Self>) {}
}

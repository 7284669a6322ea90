//! The room actor: the one writer of its room's log on this node.
//!
//! A publish gets the next offset at once and goes to the store; the room
//! keeps it in `unpersisted` until the store says it is durable, and only
//! then fans it out (to every member, the publisher's session included) and
//! acks it. Fan-out and acks therefore follow offset order, and no client
//! ever sees a message that a crash could take back.
//!
//! The room keeps the newest durable messages in memory (`tail`) so joins and
//! history pages are usually answered without the store. Deeper reads run on
//! a blocking thread; a `join` that needs one pauses this room's mailbox
//! (`AtomicResponse`) so that its history and the live messages after it
//! meet without a gap or a repeat. The thread itself is never blocked.
//!
//! One file per concern, all on the one actor:
//! - this file: the actor, its members and presence, maintenance;
//! - [`log_state`]: the log as held in memory (offsets, tail, keys, pending);
//! - [`publish`]: offsets, appends, pruning, store failures;
//! - [`fanout`]: durable groups to every member, then the acks;
//! - [`reads`]: `join` (history, exact resume) and `history` pages;
//! - [`cluster_replica`]: cluster mode: catch up with the cluster log, apply its records;
//! - [`cluster_feed`]: cluster mode: the live feed of the log, kept whole;
//! - [`cluster_append`]: cluster mode: publishes appended in batches;
//! - [`cluster_presence`]: cluster mode: presence and typing between nodes.

use super::messages::*;
use super::presence::{Change, Presence};
use super::registry::{RoomContext, RoomRegistry, RoomStats};
use super::replica::{self, Synced};
use crate::cluster::{ClusterError, LogRecord, RoomEvent};
use crate::hooks::events::EventKind;
use crate::outbound::{Offer, Outbound, SessionLink, WireFrames};
use crate::protocol::server::MessageTag;
use crate::protocol::{
    encode, EncodedMessage, Message, PresenceEntry, RoomName, ServerFrame, SessionId, UserId,
};
use crate::storage::{new_epoch, RoomSnapshot, StoreError, Take, WriteBatch, WriteOp};
use actix::prelude::*;
use serde_json::json;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod cluster_append;
mod cluster_feed;
mod cluster_presence;
mod cluster_replica;
mod cluster_reports;
mod fanout;
mod log_state;
mod publish;
mod reads;

use cluster_append::Outbox;
use cluster_feed::Feed;
use log_state::{DurableSignal, LogState, Pending};
use reads::JoinReply;

/// The tail holds at most this many messages (enough for any single page)...
const TAIL_MAX_MESSAGES: usize = 256;
/// ...and at most this many bytes, so big messages cannot bloat a room.
const TAIL_MAX_BYTES: usize = 1 << 20;
/// The most newly durable messages one fan-out hands each member. A node
/// catching up with the cluster log can have thousands durable at once; in
/// one go they would fill every session's outbound queue (1013) however fast
/// its reader, so they go out in groups, one room turn each.
const MAX_FANOUT_GROUP: usize = 256;
/// How often a room expires keys and messages and checks whether it is idle.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(1);

/// A message id: 128 random bits, hex.
fn new_message_id() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

struct Member {
    user: UserId,
    link: SessionLink,
}

pub struct RoomActor {
    durable_signal: Arc<DurableSignal>,
    name: RoomName,
    generation: u64,
    registry: RoomRegistry,
    context: Arc<RoomContext>,
    stats: Arc<RoomStats>,
    log: Option<LogState>,
    members: HashMap<SessionId, Member>,
    presence: Presence,
    empty_since: Option<Instant>,
    /// Cluster mode: publishes on their way to the room's cluster log.
    outbox: Outbox,
    /// Cluster mode: a catch-up is under way.
    syncing: bool,
    /// Cluster mode: the room's place in its cluster log, and its live feed.
    feed: Feed,
    /// Cluster mode: joins resuming from an offset not applied here yet.
    parked_joins: Vec<(Instant, Join, JoinReply)>,
    /// Cluster mode: the link generation presence was last exchanged under
    /// (a newer one: presence updates may have been lost, so ask again).
    presence_generation: u64,
    /// Cluster mode: hook reports held or settled against other nodes'.
    reports: cluster_reports::Reports,
}

impl RoomActor {
    pub(crate) fn new(
        name: RoomName,
        generation: u64,
        stats: Arc<RoomStats>,
        registry: RoomRegistry,
    ) -> Self {
        let presence_generation = registry
            .context()
            .cluster
            .as_ref()
            .map_or(0, |c| c.link_generation());
        Self {
            durable_signal: Arc::default(),
            name,
            generation,
            context: registry.context().clone(),
            registry,
            stats,
            log: None,
            members: HashMap::new(),
            presence: Presence::default(),
            empty_since: Some(Instant::now()),
            outbox: Outbox::default(),
            syncing: false,
            feed: Feed::default(),
            parked_joins: Vec::new(),
            presence_generation,
            reports: cluster_reports::Reports::default(),
        }
    }

    fn settings(&self) -> &crate::config::Settings {
        &self.context.settings
    }

    fn presence_list(&self) -> Vec<PresenceEntry> {
        self.presence.list()
    }

    fn update_stats(&self) {
        self.stats
            .users
            .store(self.presence.local_users(), Ordering::Relaxed);
        self.stats
            .sessions
            .store(self.members.len(), Ordering::Relaxed);
    }

    fn add_member(
        &mut self,
        ctx: &mut Context<Self>,
        session: SessionId,
        user: UserId,
        link: SessionLink,
    ) {
        if self.members.contains_key(&session) {
            return;
        }
        self.empty_since = None;
        // Reported by the node whose session made the change, so once for
        // the cluster (the others hear of it through presence).
        if self.presence.is_empty() {
            self.occupied(ctx);
        }
        if let Some(change) = self.presence.add_local(&user) {
            self.report(&change);
            self.tell_members(change);
        }
        self.members.insert(session, Member { user, link });
        self.update_stats();
        self.announce_presence();
    }

    /// Tells this node's members that a user came or went (room-wide).
    fn tell_members(&mut self, change: Change) {
        let frame = match &change {
            Change::Joined(user) => encode(&ServerFrame::UserJoined {
                room: &self.name,
                user,
            }),
            Change::Left(user) => encode(&ServerFrame::UserLeft {
                room: &self.name,
                user,
            }),
        };
        self.fan_out(&WireFrames::text(&frame), |_, _| true);
    }

    /// Reports a presence change to the events hook: the changes this node's
    /// sessions make, and those of a node that died without a goodbye.
    pub(super) fn report(&self, change: &Change) {
        match change {
            Change::Joined(user) => self.emit(EventKind::UserJoined, || json!({"user": user})),
            Change::Left(user) => self.emit(EventKind::UserLeft, || json!({"user": user})),
        }
    }

    fn remove_member(&mut self, session: SessionId) {
        self.drop_members(vec![(session, false)]);
    }

    /// Removes sessions (`true`: evicted as too slow), then tells the others
    /// about every user who has no session left. All are removed before any
    /// `user_left` goes out, so a departing session is never offered frames
    /// (or counted as evicted) twice.
    fn drop_members(&mut self, sessions: Vec<(SessionId, bool)>) {
        let mut gone = Vec::new();
        let mut removed = false;
        for (session, evicted) in sessions {
            let Some(member) = self.members.remove(&session) else {
                continue;
            };
            removed = true;
            if evicted {
                self.context.metrics.slow_consumer_disconnects.inc();
            }
            gone.extend(self.presence.remove_local(&member.user));
        }
        if self.members.is_empty() {
            self.empty_since = Some(Instant::now());
        }
        if removed && self.presence.local_users() == 0 {
            self.reports.local_emptied_at = Some(Instant::now());
        }
        self.update_stats();
        for change in gone {
            self.report(&change);
            self.tell_members(change);
        }
        // After `user_left`: the room's last user leaves, then it is empty
        // (on every node, as far as this one knows).
        if removed && self.presence.is_empty() {
            self.release_held();
            self.emit(EventKind::RoomVacated, || json!({}));
            self.reports.vacated_to_announce = true;
        }
        if removed {
            self.announce_presence();
        }
    }

    fn reply_ack(&self, reply: PublishReply, offset: u64) {
        reply.ack(offset);
    }

    fn reply_error(&self, reply: PublishReply, error: RoomError) {
        reply.fail(&self.context.metrics, error);
    }

    /// Why the room cannot answer yet: its log is not loaded (standalone),
    /// or not caught up with the cluster log (cluster).
    fn not_ready(&self) -> RoomError {
        match self.context.cluster {
            Some(_) => RoomError::Unavailable(ClusterError::LinkDown),
            None => RoomError::Restarting,
        }
    }

    /// Drops every member (each is told, and may join again) and stops; the
    /// next use of the room starts it afresh from what is stored.
    fn close(&mut self, ctx: &mut Context<Self>) {
        for member in self.members.values() {
            member.link.tell(Outbound::RoomClosed(self.name.clone()));
        }
        self.members.clear();
        self.presence.clear_local();
        self.update_stats();
        self.registry.remove(&self.name, self.generation);
        ctx.stop();
    }

    fn maintain(&mut self, ctx: &mut Context<Self>) {
        let settings = self.context.settings.clone();
        if let Some(idle) = self.empty_since {
            let quiet = self.parked_joins.is_empty()
                && self.outbox.is_empty()
                && self
                    .log
                    .as_ref()
                    .is_none_or(|l| l.unpersisted.is_empty() && l.waiting_acks.is_empty());
            if quiet && idle.elapsed() >= Duration::from_millis(settings.rooms.idle_timeout_ms) {
                self.registry.remove(&self.name, self.generation);
                ctx.stop();
                return;
            }
        }
        if self.context.cluster.is_some() {
            self.maintain_cluster(ctx);
        }
        let Some(log) = self.log.as_mut() else { return };
        let store = &self.context.store;
        if self.context.cluster.is_none() && store.writable() && store.generation() > log.generation
        {
            // The store recovered from a write failure since this view was
            // loaded (see `resync`).
            return self.resync(ctx);
        }
        if log.degraded {
            return;
        }
        let now = now_ms();
        // Forget idempotency keys whose window has passed.
        let key_cutoff = now.saturating_sub(settings.history.dedup_window_secs * 1000);
        let expired: Vec<String> = log
            .keys
            .iter()
            .filter(|(_, &(_, ts))| ts < key_cutoff)
            .map(|(k, _)| k.clone())
            .collect();
        if !expired.is_empty() {
            for k in &expired {
                log.keys.remove(k);
            }
            self.write(ctx, vec![WriteOp::ForgetKeys(expired)], None);
        }
        self.expire_messages(ctx, now, false);
    }
}

impl Actor for RoomActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Rooms take a burst of publishes from many sessions; their senders use
        // `do_send`, so this only sizes the channel's first allocation.
        ctx.set_mailbox_capacity(1024);
        ctx.run_interval(MAINTENANCE_EVERY, |act, ctx| act.maintain(ctx));
        if self.context.cluster.is_some() {
            let (_, check) = self.presence_periods();
            ctx.run_interval(check, |act, _| act.tick_presence());
            return self.start_sync(ctx);
        }
        // `wait`: no message is handled before the log is loaded.
        ctx.wait(
            self.load_view()
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok((generation, snapshot)) => act.loaded(ctx, generation, snapshot),
                    Err(error) => act.fail(ctx, error),
                }),
        );
    }

    /// Hook events held for a race (cluster mode) go out, whatever stops
    /// the room.
    fn stopped(&mut self, _ctx: &mut Context<Self>) {
        self.release_held();
    }
}

impl Handler<Leave> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, _ctx: &mut Context<Self>) {
        self.remove_member(msg.session);
    }
}

impl Handler<Typing> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Typing, _ctx: &mut Context<Self>) {
        let Some(user) = self.members.get(&msg.session).map(|m| m.user.clone()) else {
            return;
        };
        let frame = encode(&ServerFrame::Typing {
            room: &self.name,
            user: &user,
            active: msg.active,
        });
        self.fan_out(&WireFrames::text(&frame), |_, member| member.user != user);
        if let Some(cluster) = &self.context.cluster {
            cluster.send_room_event(
                &self.name,
                &RoomEvent::Typing {
                    node: cluster.node_id().to_owned(),
                    user: user.as_str().to_owned(),
                    active: msg.active,
                },
            );
        }
    }
}

impl Handler<PresenceQuery> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: PresenceQuery, _ctx: &mut Context<Self>) {
        let Some(member) = self.members.get(&msg.session) else {
            return;
        };
        let frame = encode(&ServerFrame::Presence {
            reference: msg.reference.as_deref(),
            room: &self.name,
            users: &self.presence_list(),
        });
        if member.link.offer_text(&frame) == Offer::Evicted {
            self.drop_members(vec![(msg.session, true)]);
        }
    }
}

#[cfg(test)]
mod tests {
    // The room is exercised end to end in tests/api (rooms, history, recovery).
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn error_codes_map() {
        assert_eq!(RoomError::NotJoined.code(), ErrorCode::NotJoined);
        assert_eq!(RoomError::Restarting.code(), ErrorCode::Internal);
    }
}

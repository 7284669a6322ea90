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

use super::messages::*;
use super::presence::{Change, Presence};
use super::registry::{RoomContext, RoomRegistry, RoomStats};
use super::replica::{self, Synced};
use crate::cluster::{ClusterError, LogAppender, LogMessage, LogRecord, RoomEvent};
use crate::outbound::{Offer, Outbound, SessionLink, WireFrames};
use crate::protocol::server::MessageTag;
use crate::protocol::{
    encode, EncodedMessage, Message, PresenceEntry, RoomName, ServerFrame, SessionId, UserId,
};
use crate::storage::{new_epoch, RoomSnapshot, StoreError, Take, WriteBatch, WriteOp};
use actix::prelude::*;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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

/// A message given an offset, waiting for the store.
struct Pending {
    message: EncodedMessage,
    reply: Option<PublishReply>,
}

/// The room's log as this node knows it (present once loaded).
struct LogState {
    epoch: u64,
    /// The newest offset handed out.
    last_assigned: u64,
    /// The newest offset known durable; everything served is at or below it.
    durable: u64,
    /// The oldest retained offset.
    first_retained: u64,
    /// The newest durable messages, contiguous up to `durable`.
    tail: VecDeque<EncodedMessage>,
    tail_bytes: usize,
    /// Idempotency key → (first offset, when it was first seen, unix ms).
    keys: HashMap<String, (u64, u64)>,
    unpersisted: VecDeque<Pending>,
    /// Acks for repeated keys whose first publish is not durable yet.
    waiting_acks: Vec<(u64, PublishReply)>,
}

impl LogState {
    fn from_snapshot(snapshot: RoomSnapshot, epoch: u64, dedup_window_ms: u64) -> Self {
        let cutoff = now_ms().saturating_sub(dedup_window_ms);
        let tail_bytes = snapshot.tail.iter().map(|m| m.as_str().len()).sum();
        LogState {
            epoch,
            last_assigned: snapshot.last_offset,
            durable: snapshot.last_offset,
            first_retained: snapshot.first_offset,
            tail: snapshot.tail.into(),
            tail_bytes,
            keys: snapshot
                .keys
                .into_iter()
                .filter(|k| k.ts >= cutoff)
                .map(|k| (k.key, (k.offset, k.ts)))
                .collect(),
            unpersisted: VecDeque::new(),
            waiting_acks: Vec::new(),
        }
    }

    fn push_tail(&mut self, message: EncodedMessage) {
        self.tail_bytes += message.as_str().len();
        self.tail.push_back(message);
        while self.tail.len() > TAIL_MAX_MESSAGES
            || (self.tail_bytes > TAIL_MAX_BYTES && self.tail.len() > 1)
        {
            self.pop_tail();
        }
    }

    fn pop_tail(&mut self) {
        if let Some(old) = self.tail.pop_front() {
            self.tail_bytes -= old.as_str().len();
        }
    }

    fn forget_before(&mut self, first_retained: u64) {
        self.first_retained = self.first_retained.max(first_retained);
        while self
            .tail
            .front()
            .is_some_and(|m| m.offset < self.first_retained)
        {
            self.pop_tail();
        }
    }

    /// The first offset the tail holds (`durable + 1` when it is empty).
    fn tail_start(&self) -> u64 {
        self.tail.front().map_or(self.durable + 1, |m| m.offset)
    }
}

/// A contiguous range of durable offsets to read, `limit` from one end.
#[derive(Debug, Clone, Copy)]
struct RangeQuery {
    from: u64,
    to: u64,
    limit: usize,
    take: Take,
}

/// How the store's writer thread tells a room what became durable without a
/// message per batch: it raises `upto` and sends one `Persisted` only if none
/// is pending, so a group commit of many publishes wakes the room once and
/// the room fans them out together (one socket write per member per group,
/// not per message).
#[derive(Default)]
pub(crate) struct DurableSignal {
    upto: AtomicU64,
    pending: AtomicBool,
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
    /// Cluster mode: appends to the room's cluster log (once caught up).
    appender: Option<LogAppender>,
    /// Cluster mode: a catch-up is under way.
    syncing: bool,
    /// Cluster mode: when this node last told the others its presence.
    announced: Instant,
    /// Cluster mode: joins resuming from an offset not applied here yet.
    parked_joins: Vec<(Instant, Join, JoinReply)>,
}

type JoinReply = tokio::sync::oneshot::Sender<Result<(), RoomError>>;

/// The longest a resuming join waits for this node to reach its offset.
const PARKED_JOIN_WAIT: Duration = Duration::from_secs(3);

impl RoomActor {
    pub(crate) fn new(
        name: RoomName,
        generation: u64,
        stats: Arc<RoomStats>,
        registry: RoomRegistry,
    ) -> Self {
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
            appender: None,
            syncing: false,
            announced: Instant::now(),
            parked_joins: Vec::new(),
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

    /// Offers `frames` to every member `to` accepts (the same bytes to
    /// each); evicts those that cannot keep up.
    fn fan_out(&mut self, frames: &WireFrames, to: impl Fn(SessionId, &Member) -> bool) -> u64 {
        let mut delivered = 0;
        let mut lost = Vec::new();
        for (&id, member) in &self.members {
            if !to(id, member) {
                continue;
            }
            match member.link.offer(frames) {
                Offer::Delivered => delivered += 1,
                Offer::Evicted => lost.push((id, true)),
                Offer::Gone => lost.push((id, false)),
            }
        }
        if !lost.is_empty() {
            self.drop_members(lost);
        }
        delivered
    }

    fn add_member(&mut self, session: SessionId, user: UserId, link: SessionLink) {
        if self.members.contains_key(&session) {
            return;
        }
        self.empty_since = None;
        if let Some(change) = self.presence.add_local(&user) {
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

    /// Cluster mode: tells the other nodes who is here on this node.
    fn announce_presence(&mut self) {
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
            },
        );
        self.announced = Instant::now();
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
        self.update_stats();
        for change in gone {
            self.tell_members(change);
        }
        if removed {
            self.announce_presence();
        }
    }

    /// Answers a range from the tail when it holds what is asked, else hands
    /// the query back to be read from the store.
    fn read_tail(&self, q: RangeQuery) -> Result<Vec<EncodedMessage>, RangeQuery> {
        let Some(log) = &self.log else {
            return Ok(Vec::new());
        };
        if q.from > q.to || q.limit == 0 {
            return Ok(Vec::new());
        }
        let in_range = || {
            log.tail
                .iter()
                .filter(|m| m.offset >= q.from && m.offset <= q.to)
        };
        let covered =
            q.from >= log.tail_start() || (q.take == Take::Newest && in_range().count() >= q.limit);
        if !covered {
            return Err(q);
        }
        Ok(match q.take {
            Take::Oldest => in_range().take(q.limit).cloned().collect(),
            Take::Newest => {
                let all: Vec<_> = in_range().collect();
                all[all.len().saturating_sub(q.limit)..]
                    .iter()
                    .map(|m| (*m).clone())
                    .collect()
            }
        })
    }

    /// Reads a range, from the tail or (off this thread) from the store.
    fn read(&self, q: RangeQuery) -> ResponseFuture<Result<Vec<EncodedMessage>, StoreError>> {
        match self.read_tail(q) {
            Ok(messages) => Box::pin(async move { Ok(messages) }),
            Err(q) => {
                let store = self.context.store.clone();
                let room = self.name.clone();
                Box::pin(async move {
                    tokio::task::spawn_blocking(move || {
                        store.read_range(&room, q.from, q.to, q.limit, q.take)
                    })
                    .await
                    .unwrap_or(Err(StoreError::Closed))
                })
            }
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

    /// The store failed: nothing after `durable` can be trusted. Refuse what is
    /// pending, drop every member (they are told, and may join again) and stop,
    /// so the next use reloads the room from the store.
    fn fail(&mut self, ctx: &mut Context<Self>, error: StoreError) {
        tracing::error!(room = %self.name, %error, "room stopped after a store failure");
        if let Some(log) = self.log.take() {
            for pending in log.unpersisted {
                if let Some(reply) = pending.reply {
                    self.reply_error(reply, RoomError::Store(error.clone()));
                }
            }
            for (_, reply) in log.waiting_acks {
                self.reply_error(reply, RoomError::Store(error.clone()));
            }
        }
        self.close(ctx);
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
        self.expire_messages(ctx, now);
    }

    /// Cluster mode: retries a failed catch-up, forgets the presence of nodes
    /// gone silent, and refreshes this node's presence for the others.
    fn maintain_cluster(&mut self, ctx: &mut Context<Self>) {
        if self.log.is_none() && !self.syncing {
            self.start_sync(ctx);
        }
        self.release_parked_joins(ctx);
    }

    /// Cluster mode: how often this node tells the others its presence (at
    /// least twice per `heartbeat.timeout_ms`, so a live node never lapses),
    /// and how often it checks theirs (twice per announcement, so a silent
    /// node is gone within 1.25 × the timeout, inside the contract's 2 ×).
    fn presence_periods(&self) -> (Duration, Duration) {
        let heartbeat = &self.context.settings.heartbeat;
        let announce = Duration::from_millis(heartbeat.interval_ms.min(heartbeat.timeout_ms / 2));
        let check = (announce / 2).clamp(Duration::from_millis(5), MAINTENANCE_EVERY);
        (announce, check)
    }

    /// Cluster mode: forgets the presence of nodes gone silent and refreshes
    /// this node's presence for the others.
    fn tick_presence(&mut self) {
        if self.log.is_none() {
            return;
        }
        let timeout = Duration::from_millis(self.context.settings.heartbeat.timeout_ms);
        let (announce_every, _) = self.presence_periods();
        if let Some(cutoff) = Instant::now().checked_sub(timeout) {
            let changes = self.presence.expire_remote(cutoff);
            if !changes.is_empty() {
                for change in changes {
                    self.tell_members(change);
                }
                self.update_stats();
            }
        }
        if self.presence.local_users() > 0 && self.announced.elapsed() >= announce_every {
            self.announce_presence();
        }
    }

    /// Cluster mode: catches up with the room's cluster log; the mailbox
    /// waits meanwhile, so nothing is answered from a log that is behind.
    fn start_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        self.syncing = true;
        let catch_up = replica::catch_up(
            self.context.clone(),
            cluster,
            self.name.clone(),
            TAIL_MAX_MESSAGES,
        );
        ctx.wait(catch_up.into_actor(self).map(|result, act, ctx| {
            act.syncing = false;
            match result {
                Ok(synced) => act.synced(ctx, synced),
                Err(error) => {
                    tracing::warn!(room = %act.name, %error, "room not caught up with the cluster; retrying")
                }
            }
        }));
    }

    fn synced(&mut self, ctx: &mut Context<Self>, synced: Synced) {
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        let Synced {
            snapshot,
            caught_up,
            follow,
            events,
        } = synced;
        self.loaded(snapshot);
        if let Some(log) = self.log.as_mut() {
            for message in caught_up {
                log.durable = message.offset;
                log.last_assigned = message.offset;
                log.push_tail(message);
            }
        }
        ctx.add_stream(follow);
        ctx.add_stream(events);
        self.appender = Some(cluster.appender(&self.name));
        cluster.send_room_event(
            &self.name,
            &RoomEvent::Sync {
                node: cluster.node_id().to_owned(),
            },
        );
        self.announce_presence();
    }

    /// Cluster mode: a record of the room's cluster log, in log order.
    fn apply(&mut self, ctx: &mut Context<Self>, message: EncodedMessage) {
        let Some(log) = self.log.as_mut() else { return };
        // A repeat: the ordered consumer re-delivers after re-creating itself.
        if message.offset <= log.last_assigned {
            return;
        }
        let mut ops = Vec::new();
        if message.offset > log.last_assigned + 1 {
            // Pruned from the cluster log before this node saw them.
            if log.first_retained <= log.last_assigned {
                ops.push(WriteOp::Prune {
                    from: log.first_retained,
                    to: log.last_assigned + 1,
                });
            }
            log.forget_before(message.offset);
        }
        log.last_assigned = message.offset;
        self.append(ctx, ops, message, None, None);
    }

    /// Queues an offset-assigned message for the store (pruning to
    /// `history.max_per_room`); it is fanned out once durable.
    fn append(
        &mut self,
        ctx: &mut Context<Self>,
        mut ops: Vec<WriteOp>,
        message: EncodedMessage,
        key: Option<String>,
        reply: Option<PublishReply>,
    ) {
        let max_per_room = self.settings().history.max_per_room;
        let Some(log) = self.log.as_mut() else { return };
        let offset = message.offset;
        ops.push(WriteOp::Append {
            message: message.clone(),
            key,
        });
        if offset + 1 - log.first_retained > max_per_room {
            let keep_from = offset + 1 - max_per_room;
            ops.push(WriteOp::Prune {
                from: log.first_retained,
                to: keep_from,
            });
            log.forget_before(keep_from);
        }
        log.unpersisted.push_back(Pending { message, reply });
        self.write(ctx, ops, Some(offset));
    }

    /// Cluster mode: hands a publish to the cluster log; the ack comes with
    /// JetStream's, the fan-out when the record comes back in log order.
    fn publish_to_cluster(&mut self, msg: Publish, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(appender)) = (&self.context.cluster, &self.appender) else {
            return self.reply_error(msg.reply, self.not_ready());
        };
        if !cluster.is_linked() {
            return self.reply_error(msg.reply, RoomError::Unavailable(ClusterError::LinkDown));
        }
        let id = new_message_id();
        let record = LogRecord {
            id: &id,
            user: msg.user.as_str(),
            data: &msg.data,
            ts: now_ms(),
        };
        let payload = match serde_json::to_vec(&record) {
            Ok(payload) => payload,
            Err(e) => {
                let error = RoomError::Unavailable(ClusterError::Log(e.to_string()));
                return self.reply_error(msg.reply, error);
            }
        };
        let (reply, metrics, room) = (msg.reply, self.context.metrics.clone(), ctx.address());
        appender.append(
            payload,
            msg.key,
            Box::new(move |result| match result {
                Ok(offset) => room.do_send(Committed { offset, reply }),
                Err(error) => reply.fail(&metrics, RoomError::Unavailable(error)),
            }),
        );
    }

    /// Prunes messages older than `history.ttl_secs`.
    fn expire_messages(&mut self, ctx: &mut Context<Self>, now: u64) {
        let ttl_ms = self.settings().history.ttl_secs * 1000;
        let Some(log) = self.log.as_ref() else { return };
        if ttl_ms == 0 || log.first_retained > log.durable {
            return;
        }
        let cutoff = now.saturating_sub(ttl_ms);
        // Nothing to do when the oldest retained message is in the tail and young.
        if log
            .tail
            .front()
            .is_some_and(|m| m.offset == log.first_retained && m.ts >= cutoff)
        {
            return;
        }
        let (store, room, from, durable) = (
            self.context.store.clone(),
            self.name.clone(),
            log.first_retained,
            log.durable,
        );
        let find = tokio::task::spawn_blocking(move || store.first_unexpired(&room, from, cutoff));
        ctx.spawn(find.into_actor(self).map(move |found, act, ctx| {
            let Ok(Ok(keep_from)) = found else { return };
            let keep_from = keep_from.min(durable + 1);
            let Some(log) = act.log.as_mut() else { return };
            if keep_from > log.first_retained {
                let from = log.first_retained;
                log.forget_before(keep_from);
                act.write(
                    ctx,
                    vec![WriteOp::Prune {
                        from,
                        to: keep_from,
                    }],
                    None,
                );
            }
        }));
    }

    /// Sends ops to the store; `upto` marks a batch that makes offsets durable.
    fn write(&self, ctx: &mut Context<Self>, ops: Vec<WriteOp>, upto: Option<u64>) {
        let Some(log) = &self.log else { return };
        let addr = ctx.address();
        let room = self.name.clone();
        let signal = self.durable_signal.clone();
        let batch = WriteBatch {
            room: self.name.clone(),
            epoch: log.epoch,
            ops,
        };
        self.context.store.write(
            batch,
            Box::new(move |result| match (upto, result) {
                (Some(upto), Ok(())) => {
                    signal.upto.fetch_max(upto, Ordering::SeqCst);
                    if !signal.pending.swap(true, Ordering::SeqCst) {
                        addr.do_send(Persisted { result: Ok(()) });
                    }
                }
                (Some(_), Err(error)) => addr.do_send(Persisted { result: Err(error) }),
                (None, result) => {
                    if let Err(error) = result {
                        tracing::warn!(%room, %error, "room housekeeping write failed");
                    }
                }
            }),
        );
    }

    /// A room without a log gets a new epoch in memory; the log (and the
    /// epoch with it) is written with its first message, so joining rooms
    /// that never see a message leaves nothing on disk. An epoch that was
    /// never written covered no messages, so losing it in a restart costs a
    /// resuming client nothing.
    fn loaded(&mut self, snapshot: RoomSnapshot) {
        let window_ms = self.settings().history.dedup_window_secs * 1000;
        let epoch = snapshot.epoch.unwrap_or_else(new_epoch);
        self.log = Some(LogState::from_snapshot(snapshot, epoch, window_ms));
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
        let (store, room) = (self.context.store.clone(), self.name.clone());
        let load = tokio::task::spawn_blocking(move || store.load_room(&room, TAIL_MAX_MESSAGES));
        // `wait`: no message is handled before the log is loaded.
        ctx.wait(load.into_actor(self).map(|result, act, ctx| {
            match result.unwrap_or(Err(StoreError::Closed)) {
                Ok(snapshot) => act.loaded(snapshot),
                Err(error) => act.fail(ctx, error),
            }
        }));
    }
}

impl Handler<Join> for RoomActor {
    type Result = ResponseFuture<Result<(), RoomError>>;

    fn handle(&mut self, msg: Join, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let behind = match (&self.log, &msg.since, &self.context.cluster) {
            (Some(log), Some(since), Some(_)) => {
                since.epoch == log.epoch && since.offset > log.durable
            }
            _ => false,
        };
        if behind {
            // Cluster mode: the client saw an offset (on another node) that
            // this node has not applied yet. Answer once it has, so the
            // resume is exact, or after a bound.
            self.parked_joins
                .push((Instant::now() + PARKED_JOIN_WAIT, msg, tx));
        } else {
            self.join_now(ctx, msg, tx);
        }
        Box::pin(async move { rx.await.unwrap_or(Err(RoomError::Restarting)) })
    }
}

impl RoomActor {
    /// Adds the member and answers with `joined`. The context waits for the
    /// history read (like `AtomicResponse`), so history and the live messages
    /// after it meet without a gap or a repeat.
    fn join_now(&mut self, ctx: &mut Context<Self>, msg: Join, reply: JoinReply) {
        let Some(log) = &self.log else {
            let _ = reply.send(Err(self.not_ready()));
            return;
        };
        let (epoch, durable, first) = (log.epoch, log.durable, log.first_retained);
        // Resume only within this epoch, from a point we have reached, with
        // nothing after it pruned.
        let resumable = msg
            .since
            .filter(|s| s.epoch == epoch && s.offset <= durable && s.offset + 1 >= first);
        let query = match resumable {
            Some(since) => RangeQuery {
                from: since.offset + 1,
                to: durable,
                limit: usize::MAX,
                take: Take::Oldest,
            },
            None => RangeQuery {
                from: first,
                to: durable,
                limit: msg.history,
                take: Take::Newest,
            },
        };
        let history = self.read(query);
        let Join {
            session,
            user,
            link,
            reference,
            ..
        } = msg;
        ctx.wait(history.into_actor(self).map(move |history, act, _| {
            let history = match history {
                Ok(history) => history,
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                    return;
                }
            };
            // The member joins here, while the room waits for nothing else,
            // and `joined` is its first frame from the room: several joins
            // answered in one turn (parked ones) each get theirs before any
            // `user_joined` of the next.
            act.add_member(session, user, link.clone());
            let joined = encode(&ServerFrame::Joined {
                reference: reference.as_deref(),
                room: &act.name,
                epoch,
                offset: durable,
                history: &history,
                recovered: resumable.is_some(),
                presence: &act.presence_list(),
            });
            match link.offer_text(&joined) {
                Offer::Delivered => {}
                Offer::Evicted => act.drop_members(vec![(session, true)]),
                Offer::Gone => act.remove_member(session),
            }
            let _ = reply.send(Ok(()));
        }));
    }

    /// Answers the parked joins this node has caught up with, and those
    /// that waited long enough (they get the newest messages instead).
    fn release_parked_joins(&mut self, ctx: &mut Context<Self>) {
        if self.parked_joins.is_empty() {
            return;
        }
        let durable = self.log.as_ref().map_or(0, |l| l.durable);
        let now = Instant::now();
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.parked_joins)
            .into_iter()
            .partition(|(deadline, join, _)| {
                *deadline <= now || join.since.is_none_or(|s| s.offset <= durable)
            });
        self.parked_joins = waiting;
        for (_, join, reply) in ready {
            self.join_now(ctx, join, reply);
        }
    }
}

impl Handler<Leave> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Leave, _ctx: &mut Context<Self>) {
        self.remove_member(msg.session);
    }
}

impl Handler<Publish> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Publish, ctx: &mut Context<Self>) {
        if let PublishReply::Session { session, .. } = &msg.reply {
            if !self.members.contains_key(session) {
                return self.reply_error(msg.reply, RoomError::NotJoined);
            }
        }
        if self.context.cluster.is_some() {
            return self.publish_to_cluster(msg, ctx);
        }
        let window_ms = self.settings().history.dedup_window_secs * 1000;
        let Some(log) = self.log.as_mut() else {
            return self.reply_error(msg.reply, RoomError::Restarting);
        };
        let now = now_ms();
        if let Some(&(offset, seen)) = msg.key.as_ref().and_then(|k| log.keys.get(k)) {
            if now.saturating_sub(seen) < window_ms {
                if offset <= log.durable {
                    self.reply_ack(msg.reply, offset);
                } else {
                    log.waiting_acks.push((offset, msg.reply));
                }
                return;
            }
        }
        let offset = log.last_assigned + 1;
        log.last_assigned = offset;
        let id = new_message_id();
        let message = Message {
            kind: MessageTag,
            room: &self.name,
            offset,
            id: &id,
            user: &msg.user,
            data: &msg.data,
            ts: now,
        }
        .encode();
        if let Some(key) = &msg.key {
            log.keys.insert(key.clone(), (offset, now));
        }
        self.append(ctx, Vec::new(), message, msg.key, Some(msg.reply));
    }
}

/// Cluster mode: JetStream has stored a publish of this node. The ack waits
/// until this node's room has it too (durable here, fanned out), so a client
/// that got its ack finds the message on this node at once (in `history`, in
/// a `join`), and publishers cannot run ahead of this node's deliveries.
#[derive(Message)]
#[rtype(result = "()")]
struct Committed {
    offset: u64,
    reply: PublishReply,
}

impl Handler<Committed> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Committed, _ctx: &mut Context<Self>) {
        match self.log.as_mut() {
            Some(log) if msg.offset > log.durable => log.waiting_acks.push((msg.offset, msg.reply)),
            _ => self.reply_ack(msg.reply, msg.offset),
        }
    }
}

/// Cluster mode: the room's log, in order, from JetStream.
impl StreamHandler<LogMessage> for RoomActor {
    fn handle(&mut self, item: LogMessage, ctx: &mut Context<Self>) {
        let record = match item {
            Ok(record) => record,
            Err(error) => {
                return tracing::warn!(room = %self.name, %error, "cluster log delivery");
            }
        };
        let Ok(seq) = record.info().map(|info| info.stream_sequence) else {
            return tracing::warn!(room = %self.name, "a cluster record without JetStream info");
        };
        match LogRecord::decode(&record.payload).and_then(|r| r.to_message(&self.name, seq)) {
            Ok(message) => self.apply(ctx, message),
            Err(error) => {
                // Not ours (something else published on the room's subject):
                // skip its offset, so the next record is not taken for a gap
                // left by pruning (which would forget the history before it).
                tracing::warn!(room = %self.name, seq, %error, "skipped a cluster record");
                if let Some(log) = self.log.as_mut() {
                    log.last_assigned = log.last_assigned.max(seq);
                }
            }
        }
    }

    /// The ordered consumer gave up (it retries through link losses, so this
    /// is rare): catch up again from what is stored.
    fn finished(&mut self, ctx: &mut Context<Self>) {
        tracing::warn!(room = %self.name, "cluster log ended; catching up again");
        self.close(ctx);
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
            RoomEvent::Presence { node, users } => {
                let users = users
                    .into_iter()
                    .filter_map(|(user, n)| UserId::parse(&user).ok().map(|u| (u, n)))
                    .collect();
                for change in self.presence.set_remote(&node, users, Instant::now()) {
                    self.tell_members(change);
                }
                self.update_stats();
            }
            RoomEvent::Sync { .. } => {
                if self.presence.local_users() > 0 {
                    self.announce_presence();
                }
            }
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

impl Handler<Persisted> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Persisted, ctx: &mut Context<Self>) {
        if let Err(error) = msg.result {
            return self.fail(ctx, error);
        }
        // Clear `pending` before reading `upto`: a batch that lands after
        // this read sends a new `Persisted` (see `DurableSignal`).
        self.durable_signal.pending.store(false, Ordering::SeqCst);
        let upto = self.durable_signal.upto.load(Ordering::SeqCst);
        let Some(log) = self.log.as_mut() else { return };
        let mut ready = Vec::new();
        while ready.len() < MAX_FANOUT_GROUP
            && log
                .unpersisted
                .front()
                .is_some_and(|p| p.message.offset <= upto)
        {
            // Checked by the loop condition.
            let pending = log.unpersisted.pop_front().expect("front exists");
            log.durable = pending.message.offset;
            if pending.message.offset >= log.first_retained {
                log.push_tail(pending.message.clone());
            }
            ready.push(pending);
        }
        if log
            .unpersisted
            .front()
            .is_some_and(|p| p.message.offset <= upto)
        {
            // The rest in a later turn, after the sessions have had theirs.
            ctx.address().do_send(Persisted { result: Ok(()) });
        }
        let durable = log.durable;
        let (acks, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut log.waiting_acks)
            .into_iter()
            .partition(|(offset, _)| *offset <= durable);
        log.waiting_acks = waiting;
        // Sessions with an ack due first: each gets the group, then its
        // acks (never an ack before its message), and only then the other
        // members get the group, so a publisher's next publishes are not held
        // back by a large room's writes. Acks due include those that waited
        // for this group (cluster mode, and repeated keys).
        // Sorted for a binary search per member: usually one or a few, and
        // cheaper than hashing every member's id twice per group.
        let mut publishers: Vec<SessionId> = ready
            .iter()
            .filter_map(|p| p.reply.as_ref())
            .chain(acks.iter().map(|(_, reply)| reply))
            .filter_map(PublishReply::session)
            .collect();
        publishers.sort_unstable();
        publishers.dedup();
        let is_publisher = |id: &SessionId| publishers.binary_search(id).is_ok();
        let frames = (!ready.is_empty()).then(|| {
            // Encoded once, WebSocket framing included; every recipient gets
            // the same bytes, the whole group in one write.
            WireFrames::texts(ready.iter().map(|p| p.message.as_str()))
        });
        let mut delivered = 0;
        if let (Some(frames), false) = (&frames, publishers.is_empty()) {
            delivered += self.fan_out(frames, |id, _| is_publisher(&id));
        }
        for pending in ready {
            if let Some(reply) = pending.reply {
                self.reply_ack(reply, pending.message.offset);
            }
        }
        for (offset, reply) in acks {
            self.reply_ack(reply, offset);
        }
        if let Some(frames) = &frames {
            delivered += self.fan_out(frames, |id, _| !is_publisher(&id));
            let count = frames.count() as u64;
            self.context.metrics.messages_published.inc_by(count);
            self.context
                .metrics
                .messages_delivered
                .inc_by(delivered * count);
        }
        self.release_parked_joins(ctx);
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

impl Handler<HistoryQuery> for RoomActor {
    type Result = ResponseActFuture<Self, Result<HistoryPage, RoomError>>;

    fn handle(&mut self, msg: HistoryQuery, _ctx: &mut Context<Self>) -> Self::Result {
        let Some(log) = &self.log else {
            return Box::pin(fut::ready(Err(self.not_ready())));
        };
        let epoch = log.epoch;
        let query = match msg.after {
            Some(after) => RangeQuery {
                from: (after + 1).max(log.first_retained),
                to: log.durable,
                limit: msg.limit,
                take: Take::Oldest,
            },
            None => RangeQuery {
                from: log.first_retained,
                to: msg
                    .before
                    .map_or(log.durable, |b| b.saturating_sub(1).min(log.durable)),
                limit: if msg.before == Some(0) { 0 } else { msg.limit },
                take: Take::Newest,
            },
        };
        Box::pin(
            self.read(query)
                .into_actor(self)
                .map(move |messages, _, _| {
                    Ok(HistoryPage {
                        epoch,
                        messages: messages?,
                    })
                }),
        )
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

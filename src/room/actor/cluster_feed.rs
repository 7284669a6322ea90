//! Cluster mode: keeps the room's live feed of its cluster log running.
//!
//! The ordered consumer re-creates itself after a reconnect, but not when it
//! vanishes otherwise (deleted, reaped, lost by NATS): it then only reports
//! missed heartbeats, and a room that trusted it would never apply another
//! record nor answer a waiting ack. So the room repairs its feed (a new
//! consumer from the record after the last one applied) when the feed
//! reports an error or ends, or when a publish JetStream committed is not
//! delivered soon; and no ack waits longer than [`APPLY_LIMIT`].

use super::*;
use crate::cluster::RuntimeBound;
use async_nats::jetstream::consumer::push::Ordered;

/// A committed publish still not delivered after this long means the feed
/// stopped (deliveries normally follow JetStream's ack within milliseconds).
const FEED_STALL: Duration = Duration::from_secs(2);
/// The longest an ack waits for this node to apply a committed publish
/// (checked each maintenance tick, so up to a second more); then the client
/// is told it was committed but not applied here.
const APPLY_LIMIT: Duration = Duration::from_secs(8);

/// The state of the room's live feed.
#[derive(Default)]
pub(super) struct Feed {
    /// The stream now followed (replaced on repair).
    handle: Option<SpawnHandle>,
    /// The newest offset JetStream committed for a publish of this node.
    committed: u64,
    /// Since when a committed offset has waited for delivery without any
    /// record arriving.
    behind_since: Option<Instant>,
    /// A new consumer is being made.
    repairing: bool,
    /// A repair is due at the next tick: the last attempt failed, or the
    /// feed ended while the link was down (nothing else would report it).
    retry: bool,
    /// The feed is known to have stopped (counted once in the node's report).
    lost: bool,
    /// Offsets committed for this node's publishes whose acks may still
    /// wait, with when JetStream committed them, in commit order. (One list
    /// checked each maintenance tick, not a timer per publish: actix polls
    /// every future of a context on each wake-up.)
    awaiting: VecDeque<(u64, Instant)>,
}

impl RoomActor {
    /// Follows `follow` from now on, instead of any earlier feed.
    pub(super) fn follow_feed(&mut self, ctx: &mut Context<Self>, follow: RuntimeBound<Ordered>) {
        if let Some(old) = self.feed.handle.take() {
            ctx.cancel_future(old);
        }
        self.feed.handle = Some(ctx.add_stream(follow));
    }

    /// A record arrived: the feed runs.
    pub(super) fn feed_progressed(&mut self) {
        self.feed_restored();
        let behind = self
            .log
            .as_ref()
            .is_some_and(|log| self.feed.committed > log.last_assigned);
        self.feed.behind_since = behind.then(Instant::now);
    }

    fn feed_restored(&mut self) {
        if std::mem::take(&mut self.feed.lost) {
            if let Some(cluster) = &self.context.cluster {
                cluster.feed_repaired();
            }
        }
    }

    /// The feed reported an error or ended: repair it.
    pub(super) fn feed_failed(&mut self, ctx: &mut Context<Self>, why: &dyn std::fmt::Display) {
        tracing::debug!(room = %self.name, %why, "cluster feed stopped");
        if !std::mem::replace(&mut self.feed.lost, true) {
            if let Some(cluster) = &self.context.cluster {
                cluster.feed_lost();
            }
        }
        self.repair_feed(ctx);
    }

    /// The followed stream ended by itself.
    pub(super) fn feed_ended(&mut self, ctx: &mut Context<Self>) {
        self.feed.handle = None;
        self.feed_failed(ctx, &"the cluster log ended");
    }

    /// Each maintenance tick: acks waiting too long are answered, a failed
    /// repair is tried again, and a stalled feed is taken for lost.
    pub(super) fn check_feed(&mut self, ctx: &mut Context<Self>) {
        let Some(durable) = self.log.as_ref().map(|log| log.durable) else {
            return;
        };
        while let Some(&(offset, committed)) = self.feed.awaiting.front() {
            if offset > durable && committed.elapsed() < APPLY_LIMIT {
                break;
            }
            self.feed.awaiting.pop_front();
            if offset > durable {
                self.give_up_waiting(offset);
            }
        }
        let stalled = self
            .feed
            .behind_since
            .is_some_and(|since| since.elapsed() >= FEED_STALL);
        if stalled {
            self.feed.behind_since = Some(Instant::now());
            self.feed_failed(ctx, &"committed publishes were not delivered");
        } else if self.feed.retry {
            self.repair_feed(ctx);
        }
    }

    /// Makes a new consumer from the record after the last one applied; the
    /// old feed goes once the new one is there (repeats are skipped by offset).
    fn repair_feed(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(log)) = (self.context.cluster.clone(), self.log.as_ref()) else {
            return;
        };
        if self.feed.repairing {
            return;
        }
        if !cluster.is_linked() {
            // A feed still there re-creates its consumer on reconnect, and
            // reports missed heartbeats again (every 10 s) if that fails: a
            // repair now would make a second consumer per room on every NATS
            // restart. Only an ended feed needs the next tick to retry.
            self.feed.retry = self.feed.handle.is_none();
            return;
        }
        self.feed.repairing = true;
        self.feed.retry = false;
        let (room, from) = (self.name.clone(), log.last_assigned + 1);
        let follow = async move { cluster.follow(&room, from).await };
        ctx.spawn(follow.into_actor(self).map(|result, act, ctx| {
            act.feed.repairing = false;
            match result {
                Ok(follow) => {
                    act.follow_feed(ctx, follow);
                    act.feed_restored();
                }
                Err(error) => {
                    act.feed.retry = true;
                    tracing::debug!(room = %act.name, %error, "cluster feed not repaired yet")
                }
            }
        }));
    }

    /// JetStream committed `offset` for a publish of this node, not applied
    /// here yet: the ack waits, but not beyond [`APPLY_LIMIT`].
    pub(super) fn await_delivery(&mut self, offset: u64, reply: PublishReply) {
        let Some(log) = self.log.as_mut() else { return };
        log.waiting_acks.push((offset, reply));
        if offset > log.last_assigned && self.feed.behind_since.is_none() {
            self.feed.behind_since = Some(Instant::now());
        }
        self.feed.committed = self.feed.committed.max(offset);
        self.feed.awaiting.push_back((offset, Instant::now()));
    }

    /// Answers the acks still waiting for offsets up to `offset` with an
    /// error that says they were committed.
    fn give_up_waiting(&mut self, offset: u64) {
        let Some(log) = self.log.as_mut() else { return };
        let (late, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut log.waiting_acks)
            .into_iter()
            .partition(|(o, _)| *o <= offset);
        log.waiting_acks = waiting;
        for (offset, reply) in late {
            let error = RoomError::Unavailable(ClusterError::NotApplied(offset));
            self.reply_error(reply, error);
        }
    }
}

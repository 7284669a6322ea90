//! Cluster mode: the room's live feed of its cluster log, kept whole.
//!
//! JetStream republishes each stored record on the room's live subject;
//! this node listens while it serves the room. Core NATS delivers at most
//! once, so the feed is never trusted alone: a record whose offsets do not
//! follow the newest applied, a reconnect or a slow subscription (the link's
//! generation rises), a join that saw an offset this node lacks, and a
//! periodic check while the room has members all make the room read its log
//! after the newest record it applied (direct gets, in order). A feed that
//! ends is subscribed again. So a room cannot go deaf: at worst it hears of
//! a record one check later.

use super::*;
use crate::cluster::{live_sequence, RoomLog, RuntimeBound, StoredRecord};
use cluster_replica::Source;

/// How often a room with members reads its log even though the feed looks
/// whole (one direct get, answered "nothing new" when all is well).
const VERIFY_EVERY: Duration = Duration::from_secs(10);
/// The most records one read applies before the room's other work.
const READ_BATCH: usize = 256;

/// The state of the room's place in its cluster log.
#[derive(Default)]
pub(super) struct Feed {
    pub(super) log: Option<RoomLog>,
    /// The stream sequence of the newest record applied (0: none).
    pub(super) head: u64,
    /// The partition stream's incarnation the room caught up under.
    incarnation: u64,
    /// The link generation when the room last read its log.
    link_generation: u64,
    live: Option<SpawnHandle>,
    /// A new live subscription is being made.
    subscribing: bool,
    pub(super) events: Option<SpawnHandle>,
    /// A read of the log is under way.
    pub(super) reading: bool,
    /// Another read is due (asked for during one, or the last one failed).
    read_again: bool,
    /// When the log was last read.
    read_at: Option<Instant>,
    /// The feed is known to have stopped (counted once in the node's report).
    lost: bool,
}

/// A record as JetStream republished it.
pub(super) struct LiveRecord(async_nats::Message);

impl RoomActor {
    /// The room's partition can be written and read (an election of another
    /// partition's stream does not hold this room back).
    pub(super) fn linked(&self, cluster: &crate::cluster::Cluster) -> bool {
        match &self.feed.log {
            Some(log) => cluster.is_linked_for(log.partition),
            None => cluster.is_linked(),
        }
    }

    /// Follows the room's log from the record at `head` on.
    pub(super) fn follow_log(
        &mut self,
        ctx: &mut Context<Self>,
        log: RoomLog,
        head: u64,
        incarnation: u64,
        live: RuntimeBound<async_nats::Subscriber>,
    ) {
        let generation = self
            .context
            .cluster
            .as_ref()
            .map_or(0, |c| c.link_generation());
        self.feed.log = Some(log);
        self.feed.head = head;
        self.feed.incarnation = incarnation;
        self.feed.link_generation = generation;
        self.feed.read_at = Some(Instant::now());
        self.listen(ctx, live);
    }

    fn listen(&mut self, ctx: &mut Context<Self>, live: RuntimeBound<async_nats::Subscriber>) {
        use futures_util::StreamExt;
        if let Some(old) = self.feed.live.take() {
            ctx.cancel_future(old);
        }
        self.feed.live = Some(ctx.add_stream(live.map(LiveRecord)));
    }

    /// Each maintenance tick: a new incarnation of the partition means the
    /// log this room followed is gone; records may have been missed since
    /// the link's last hiccup; a failed read is tried again; a room with
    /// members checks its log now and then.
    pub(super) fn check_feed(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(log)) = (self.context.cluster.clone(), self.feed.log.as_ref())
        else {
            return;
        };
        let incarnation = cluster.incarnation(log.partition);
        if incarnation != 0 && incarnation != self.feed.incarnation {
            return self.restart_from_cluster(ctx, "NATS made the room's partition stream anew");
        }
        if !self.linked(&cluster) {
            // Nothing is heard live meanwhile (counted once, for the node's report).
            self.feed_failed(&"the cluster link is down");
        }
        if self.feed.live.is_none() && !self.feed.subscribing && self.linked(&cluster) {
            self.resubscribe(ctx);
        }
        let missed = cluster.link_generation() != self.feed.link_generation;
        let due = !self.members.is_empty()
            && self
                .feed
                .read_at
                .is_none_or(|at| at.elapsed() >= VERIFY_EVERY);
        if missed || due || self.feed.read_again || !self.parked_joins.is_empty() {
            self.read_log(ctx);
        }
        self.check_outbox(ctx);
    }

    /// Reads the records after the newest applied, in order, and applies
    /// them; then the room's appends go on.
    pub(super) fn read_log(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(log)) = (self.context.cluster.clone(), self.feed.log.clone())
        else {
            return;
        };
        if self.feed.reading {
            self.feed.read_again = true;
            return;
        }
        if !self.linked(&cluster) {
            self.feed.read_again = true;
            return;
        }
        self.feed.reading = true;
        self.feed.read_again = false;
        self.feed.link_generation = cluster.link_generation();
        self.feed.read_at = Some(Instant::now());
        let head = self.feed.head;
        let read = async move {
            let mut records = Vec::new();
            let mut after = head;
            while records.len() < READ_BATCH {
                match cluster.record_after(&log, after).await {
                    Ok(Some(record)) => {
                        after = record.seq;
                        records.push(record);
                    }
                    Ok(None) => return (records, Ok(true)),
                    Err(error) => return (records, Err(error)),
                }
            }
            (records, Ok(false))
        };
        ctx.spawn(read.into_actor(self).map(|(records, outcome), act, ctx| {
            act.feed.reading = false;
            act.context
                .metrics
                .cluster_read_records
                .inc_by(records.len() as u64);
            for record in records {
                act.apply_record(ctx, record, Source::Log);
                if act.log.is_none() {
                    return; // Restarted from the cluster.
                }
            }
            match outcome {
                Ok(true) => {
                    act.feed_restored();
                    act.log_read(ctx);
                }
                Ok(false) => act.read_log(ctx),
                Err(error) => {
                    act.feed_failed(&error);
                    act.feed.read_again = true;
                }
            }
            if act.feed.read_again && !act.feed.reading {
                act.read_log(ctx);
            }
        }));
    }

    fn resubscribe(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(log)) = (self.context.cluster.clone(), self.feed.log.clone())
        else {
            return;
        };
        self.feed.subscribing = true;
        let subscribe = async move { cluster.live(&log).await };
        ctx.spawn(
            subscribe
                .into_actor(self)
                .map(|result, act, ctx| match result {
                    Ok(live) => {
                        act.feed.subscribing = false;
                        act.listen(ctx, live);
                        // Records stored while no one listened.
                        act.read_log(ctx);
                    }
                    Err(error) => {
                        act.feed.subscribing = false;
                        act.feed_failed(&error);
                    }
                }),
        );
    }

    fn feed_failed(&mut self, why: &dyn std::fmt::Display) {
        tracing::debug!(room = %self.name, %why, "cluster feed interrupted");
        if !std::mem::replace(&mut self.feed.lost, true) {
            if let Some(cluster) = &self.context.cluster {
                cluster.feed_lost();
            }
        }
    }

    fn feed_restored(&mut self) {
        if std::mem::take(&mut self.feed.lost) {
            if let Some(cluster) = &self.context.cluster {
                cluster.feed_repaired();
            }
        }
    }
}

/// Cluster mode: the room's records, live, as JetStream stored them.
impl StreamHandler<LiveRecord> for RoomActor {
    fn handle(&mut self, LiveRecord(message): LiveRecord, ctx: &mut Context<Self>) {
        let Some(seq) = live_sequence(&message) else {
            return tracing::warn!(room = %self.name, "a live cluster record without its sequence");
        };
        self.context.metrics.cluster_live_records.inc();
        let record = StoredRecord {
            seq,
            payload: message.payload,
        };
        self.apply_record(ctx, record, Source::Live);
    }

    /// The subscription ended (the client gave it up): the next tick makes
    /// a new one and reads what was missed.
    fn finished(&mut self, _ctx: &mut Context<Self>) {
        self.feed.live = None;
        self.feed_failed(&"the live feed ended");
    }
}

//! Cluster mode: the room follows its cluster log. It catches up before it
//! answers anyone, then applies each record in log order (its own appends as
//! JetStream acks them, the others' as they arrive live or are read), and
//! starts over from the cluster when the log moved to another epoch.

use super::*;
use crate::cluster::{LogBatch, StoredRecord};
use replica::CaughtUp;

/// Where a record came from, which says what a gap before it means.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Source {
    /// Heard live: records before it were missed; read them first.
    Live,
    /// Read in log order (or acked to this node): the records before it
    /// are gone from the cluster (pruned or expired); history starts here.
    Log,
}

/// How long a room that starts being served waits for the other nodes'
/// presence before it answers its first joins.
const PRESENCE_WAIT: Duration = Duration::from_millis(500);

/// Asks the other nodes for their presence in `room` and collects the
/// answers until every live node answered or `PRESENCE_WAIT` passed: nodes
/// serving the room answer with their presence, nodes starting it with
/// their own ask (nobody there yet), the others with "nobody here" to the
/// node-level ask (`nodes.serving`). So the wait is one round trip, and
/// `PRESENCE_WAIT` only bounds it when a node does not answer.
async fn ask_presence(
    cluster: &crate::cluster::Cluster,
    room: &RoomName,
    events: &mut crate::cluster::RuntimeBound<async_nats::Subscriber>,
    metrics: &crate::metrics::Metrics,
) -> Vec<(String, std::collections::BTreeMap<UserId, u32>)> {
    use futures_util::StreamExt;
    let expected = cluster.live_nodes();
    let mut heard = std::collections::BTreeMap::new();
    if expected == 0 || !cluster.is_linked() {
        return Vec::new();
    }
    cluster.send_room_event(
        room,
        &RoomEvent::Sync {
            node: cluster.node_id().to_owned(),
        },
    );
    let mut nobody = cluster.ask_serving(room).await;
    let mut answered = std::collections::BTreeSet::new();
    #[derive(serde::Deserialize)]
    struct Nobody {
        node: String,
    }
    let waited = tokio::time::timeout(PRESENCE_WAIT, async {
        while answered.len() < expected {
            let nobody_here = async {
                match nobody.as_mut() {
                    Some(answers) => answers.next().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                message = events.next() => {
                    let Some(message) = message else { return };
                    match serde_json::from_slice::<RoomEvent>(&message.payload) {
                        Ok(RoomEvent::Presence { node, users, .. }) if node != cluster.node_id() => {
                            let users = users
                                .into_iter()
                                .filter_map(|(user, n)| UserId::parse(&user).ok().map(|u| (u, n)))
                                .collect();
                            heard.insert(node.clone(), users);
                            answered.insert(node);
                        }
                        Ok(RoomEvent::Sync { node }) if node != cluster.node_id() => {
                            answered.insert(node);
                        }
                        _ => {}
                    }
                }
                answer = nobody_here => {
                    let Some(answer) = answer else {
                        nobody = None;
                        continue;
                    };
                    if let Ok(Nobody { node }) = serde_json::from_slice(&answer.payload) {
                        answered.insert(node);
                    }
                }
            }
        }
    })
    .await;
    if waited.is_err() {
        metrics.cluster_presence_waits_cut.inc();
    }
    heard.into_iter().collect()
}

impl RoomActor {
    /// Cluster mode: retries a failed catch-up, keeps the feed and the
    /// appends going, and answers joins waiting for this node to catch up.
    pub(super) fn maintain_cluster(&mut self, ctx: &mut Context<Self>) {
        if self.log.is_none() && !self.syncing {
            self.start_sync(ctx);
        }
        self.check_feed(ctx);
        self.release_parked_joins(ctx);
    }

    /// Cluster mode: catches up with the room's cluster log; the mailbox
    /// waits meanwhile, so nothing is answered from a log that is behind.
    pub(super) fn start_sync(&mut self, ctx: &mut Context<Self>) {
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        self.syncing = true;
        let catch_up = replica::catch_up(
            self.context.clone(),
            cluster.clone(),
            self.name.clone(),
            TAIL_MAX_MESSAGES,
        );
        let (name, metrics) = (self.name.clone(), self.context.metrics.clone());
        let catch_up = async move {
            let mut synced = catch_up.await?;
            let heard = ask_presence(&cluster, &name, &mut synced.events, &metrics).await;
            Ok::<_, RoomError>((synced, heard))
        };
        ctx.wait(catch_up.into_actor(self).map(|result, act, ctx| {
            act.syncing = false;
            match result {
                Ok((synced, heard)) => {
                    act.synced(ctx, synced);
                    // Before any join is answered: `joined` lists what the
                    // other nodes said.
                    for (node, users) in heard {
                        for change in act.presence.set_remote(&node, users, Instant::now()) {
                            act.tell_members(change);
                        }
                    }
                    act.update_stats();
                }
                // While the link is down every starting room fails here each
                // second: the link's own report says why, once.
                Err(error) if !act.context.cluster.as_ref().is_some_and(|c| c.is_linked()) => {
                    tracing::debug!(room = %act.name, %error, "room not caught up with the cluster; retrying")
                }
                Err(error) => {
                    tracing::warn!(room = %act.name, %error, "room not caught up with the cluster; retrying")
                }
            }
        }));
    }

    pub(super) fn synced(&mut self, ctx: &mut Context<Self>, synced: Synced) {
        let Some(cluster) = self.context.cluster.clone() else {
            return;
        };
        let Synced {
            snapshot,
            caught_up,
            log,
            head,
            incarnation,
            live,
            events,
        } = synced;
        self.loaded(ctx, self.context.store.generation(), snapshot);
        if let Some(state) = self.log.as_mut() {
            for CaughtUp { message, key } in caught_up {
                state.durable = message.offset;
                state.last_assigned = message.offset;
                if let Some(key) = key {
                    state.keys.insert(key, (message.offset, message.ts));
                }
                state.push_tail(message);
            }
        }
        self.follow_log(ctx, log, head, incarnation, live);
        self.feed.events = Some(ctx.add_stream(events));
        cluster.send_room_event(
            &self.name,
            &RoomEvent::Sync {
                node: cluster.node_id().to_owned(),
            },
        );
        self.announce_presence();
    }

    /// Applies a record of the room's log: its messages after the newest
    /// applied are written, then fanned out, in log order. A record of this
    /// node's append in flight carries that append's replies.
    ///
    /// A record that does not directly follow the record it was appended
    /// after is not part of the log (see `LogBatch::after`): every node
    /// skips it alike; if it is this node's batch, its publishes go again.
    pub(super) fn apply_record(
        &mut self,
        ctx: &mut Context<Self>,
        record: StoredRecord,
        source: Source,
    ) {
        let Some(log) = self.log.as_ref() else { return };
        if record.seq <= self.feed.head {
            return; // A repeat (heard live and read, or acked and heard).
        }
        let batch = match LogBatch::decode(&record.payload) {
            Ok(batch) => batch,
            Err(error) => {
                // Not ours (something else published on the room's subject).
                tracing::warn!(room = %self.name, seq = record.seq, %error, "skipped a cluster record");
                self.feed.head = record.seq;
                return;
            }
        };
        if batch.epoch != log.epoch {
            return self.restart_from_cluster(ctx, "the room's cluster log is in another epoch");
        }
        match batch.after {
            // Records this node has not seen came before it.
            Some(after) if after > self.feed.head && source == Source::Live => {
                return self.read_log(ctx);
            }
            Some(after) if after < self.feed.head => {
                tracing::debug!(room = %self.name, seq = record.seq, after, head = self.feed.head,
                    "skipped a cluster record stored out of turn");
                self.feed.head = record.seq;
                if let Some(in_flight) = self.take_in_flight(&batch.batch) {
                    self.requeue(in_flight);
                    self.pump(ctx);
                }
                return;
            }
            _ => {}
        }
        if batch.first > log.last_assigned + 1 && source == Source::Live {
            return self.read_log(ctx);
        }
        let mut replies = Self::replies_of(self.take_in_flight(&batch.batch));
        let Some(log) = self.log.as_mut() else { return };
        self.feed.head = record.seq;
        let mut ops = Vec::new();
        if batch.first > log.last_assigned + 1 {
            // Pruned or expired in the cluster before this node saw them.
            if log.first_retained <= log.last_assigned {
                ops.push(WriteOp::Prune {
                    from: log.first_retained,
                    to: log.last_assigned + 1,
                });
            }
            log.forget_before(batch.first);
            log.last_assigned = batch.first - 1;
        }
        for (offset, record) in batch.offsets() {
            let Some(log) = self.log.as_mut() else { return };
            if offset <= log.last_assigned {
                continue;
            }
            log.last_assigned = offset;
            let message = match record.to_message(&self.name, offset) {
                Ok(message) => message,
                Err(error) => {
                    tracing::warn!(room = %self.name, offset, %error, "skipped a cluster message");
                    continue;
                }
            };
            let key = record.key.as_deref().map(str::to_owned);
            if let Some(key) = &key {
                log.keys.insert(key.clone(), (offset, record.ts));
            }
            let (reply, repeats) = replies.remove(&offset).unwrap_or_default();
            log.waiting_acks
                .extend(repeats.into_iter().map(|reply| (offset, reply)));
            self.append(ctx, std::mem::take(&mut ops), message, key, reply);
        }
        if !ops.is_empty() {
            self.write(ctx, ops, None);
        }
        // Offsets of this node's batch that the log already held (records
        // written before `after` was checked): those were not committed.
        for (reply, repeats) in replies.into_values() {
            for reply in reply.into_iter().chain(repeats) {
                let error = ClusterError::Log("lost a race in the cluster log".into());
                reply.fail(&self.context.metrics, RoomError::Unavailable(error));
            }
        }
    }

    /// The room's cluster log is not the one this node followed (another
    /// epoch: NATS lost its store, or the log started over): every member is
    /// told the room restarted (they join again and resume with
    /// `recovered: false`) and the room starts afresh from the cluster.
    pub(super) fn restart_from_cluster(&mut self, ctx: &mut Context<Self>, why: &str) {
        tracing::warn!(room = %self.name, why, "room starts over from the cluster log; its members join again");
        self.fail_outbox(true);
        self.close(ctx);
    }
}

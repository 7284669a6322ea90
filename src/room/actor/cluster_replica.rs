//! Cluster mode: the room follows its cluster log (catch-up, then records in
//! log order) and hands publishes to it.

use super::*;

impl RoomActor {
    /// Cluster mode: retries a failed catch-up, forgets the presence of nodes
    /// gone silent, and refreshes this node's presence for the others.
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
            cluster,
            self.name.clone(),
            TAIL_MAX_MESSAGES,
        );
        ctx.wait(catch_up.into_actor(self).map(|result, act, ctx| {
            act.syncing = false;
            match result {
                Ok(synced) => act.synced(ctx, synced),
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
            follow,
            events,
        } = synced;
        self.loaded(ctx, self.context.store.generation(), snapshot);
        if let Some(log) = self.log.as_mut() {
            for message in caught_up {
                log.durable = message.offset;
                log.last_assigned = message.offset;
                log.push_tail(message);
            }
        }
        self.follow_feed(ctx, follow);
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
    pub(super) fn apply(&mut self, ctx: &mut Context<Self>, message: EncodedMessage) {
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

    /// Cluster mode: hands a publish to the cluster log; the ack comes with
    /// JetStream's, the fan-out when the record comes back in log order.
    pub(super) fn publish_to_cluster(&mut self, msg: Publish, ctx: &mut Context<Self>) {
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
}

/// Cluster mode: JetStream has stored a publish of this node. The ack waits
/// until this node's room has it too (durable here, fanned out), so a client
/// that got its ack finds the message on this node at once (in `history`, in
/// a `join`), and publishers cannot run ahead of this node's deliveries.
#[derive(Message)]
#[rtype(result = "()")]
pub(super) struct Committed {
    offset: u64,
    reply: PublishReply,
}

impl Handler<Committed> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Committed, _ctx: &mut Context<Self>) {
        match self.log.as_ref() {
            Some(log) if msg.offset > log.durable => self.await_delivery(msg.offset, msg.reply),
            _ => {
                // Already here (fanned out before JetStream's answer came back).
                if self.context.events.is_some() {
                    let message = self
                        .log
                        .as_ref()
                        .and_then(|log| log.tail.iter().rev().find(|m| m.offset == msg.offset));
                    self.emit_message(message);
                }
                self.reply_ack(msg.reply, msg.offset)
            }
        }
    }
}

/// Cluster mode: the room's log, in order, from JetStream.
impl StreamHandler<LogMessage> for RoomActor {
    fn handle(&mut self, item: LogMessage, ctx: &mut Context<Self>) {
        let record = match item {
            Ok(record) => record,
            // Missed heartbeats: the consumer is gone, or NATS is in trouble.
            Err(error) => return self.feed_failed(ctx, &error),
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
        self.feed_progressed();
    }

    /// The ordered consumer gave up (it retries through link losses, so this
    /// is rare): follow again from the record after the last one applied.
    /// (A feed replaced by a repair is cancelled and does not end here.)
    fn finished(&mut self, ctx: &mut Context<Self>) {
        self.feed_ended(ctx);
    }
}

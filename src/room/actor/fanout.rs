//! Fan-out: what became durable goes to every member, encoded once, with
//! the publishers' acks after their messages.

use super::*;
use crate::hooks::events::EventKind;
use serde_json::value::RawValue;

impl RoomActor {
    /// Offers `frames` to every member `to` accepts (the same bytes to
    /// each); evicts those that cannot keep up.
    pub(super) fn fan_out(
        &mut self,
        frames: &WireFrames,
        to: impl Fn(SessionId, &Member) -> bool,
    ) -> u64 {
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
}

impl Handler<Persisted> for RoomActor {
    type Result = ();

    fn handle(&mut self, msg: Persisted, ctx: &mut Context<Self>) {
        if let Err(failure) = msg.result {
            return self.write_failed(ctx, failure);
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
            // Messages this node took (the others' nodes report theirs).
            if pending.reply.is_some() {
                self.emit(EventKind::Message, || message_event(&pending.message));
            }
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

/// A `message` event's fields, read back from the encoded message.
fn message_event(message: &crate::protocol::EncodedMessage) -> serde_json::Value {
    #[derive(serde::Deserialize)]
    struct Fields<'a> {
        #[serde(borrow)]
        id: &'a RawValue,
        #[serde(borrow)]
        user: &'a RawValue,
        #[serde(borrow)]
        data: &'a RawValue,
    }
    match serde_json::from_str::<Fields>(message.json.get()) {
        Ok(f) => {
            serde_json::json!({"offset": message.offset, "id": f.id, "user": f.user, "data": f.data})
        }
        // The hub encoded it itself, with these fields.
        Err(_) => serde_json::json!({"offset": message.offset}),
    }
}

//! The publish path: a publish gets the next offset and goes to the store;
//! pruning (count and age) and store failures.

use super::*;

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
        if log.degraded {
            let error = StoreError::Unavailable(
                "the room's store cannot write right now; nothing was stored".into(),
            );
            return self.reply_error(msg.reply, RoomError::Store(error));
        }
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

impl RoomActor {
    /// Queues an offset-assigned message for the store (pruning to
    /// `history.max_per_room`); it is fanned out once durable.
    pub(super) fn append(
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

    /// Sends ops to the store; `upto` marks a batch that makes offsets durable.
    pub(super) fn write(&self, ctx: &mut Context<Self>, ops: Vec<WriteOp>, upto: Option<u64>) {
        let Some(log) = &self.log else { return };
        let addr = ctx.address();
        let room = self.name.clone();
        let signal = self.durable_signal.clone();
        let generation = log.generation;
        let batch = WriteBatch {
            room: self.name.clone(),
            epoch: log.epoch,
            generation,
            ring: self.settings().history.max_per_room,
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
                (Some(_), Err(error)) => addr.do_send(Persisted {
                    result: Err(WriteFailure { generation, error }),
                }),
                (None, result) => {
                    if let Err(error) = result {
                        tracing::warn!(%room, %error, "room housekeeping write failed");
                    }
                }
            }),
        );
    }

    /// Prunes messages older than `history.ttl_secs`. With `hold`, the room
    /// handles nothing else until they are out of its view: a room that has
    /// just loaded must not serve its first reader messages that expired
    /// while it was not running.
    pub(super) fn expire_messages(&mut self, ctx: &mut Context<Self>, now: u64, hold: bool) {
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
        let prune = find.into_actor(self).map(move |found, act, ctx| {
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
                // Counted once queued for the store's writer.
                act.context
                    .metrics
                    .messages_expired
                    .inc_by(keep_from - from);
            }
        });
        if hold {
            ctx.wait(prune);
        } else {
            ctx.spawn(prune);
        }
    }

    /// The store failed: nothing after `durable` can be trusted. Refuse what is
    /// pending, drop every member (they are told, and may join again) and stop,
    /// so the next use reloads the room from the store.
    pub(super) fn fail(&mut self, ctx: &mut Context<Self>, error: StoreError) {
        tracing::error!(room = %self.name, %error, "room stopped after a store failure");
        self.fail_outbox(false);
        if let Some(mut log) = self.log.take() {
            for reply in log.roll_back() {
                self.reply_error(reply, RoomError::Store(error.clone()));
            }
        }
        self.close(ctx);
    }

    /// A write of this room failed (standalone). The room stays up and keeps
    /// serving what is durable; what was pending is refused (`unavailable`,
    /// never acked or shown) and publishes wait until the store recovers and
    /// the room has reloaded its view ([`Self::resync`]). Failures of writes
    /// made before the last reload are old news.
    pub(super) fn write_failed(&mut self, ctx: &mut Context<Self>, failure: WriteFailure) {
        if self.context.cluster.is_some() {
            return self.fail(ctx, failure.error);
        }
        let Some(log) = self.log.as_mut() else { return };
        if failure.generation < log.generation {
            return;
        }
        if !log.degraded {
            tracing::warn!(room = %self.name, error = %failure.error, "room refuses publishes until the store can write again");
        }
        log.degraded = true;
        let replies = log.roll_back();
        for reply in replies {
            self.reply_error(reply, RoomError::Store(failure.error.clone()));
        }
    }

    /// A degraded room whose store writes again reloads its view from it.
    /// Same epoch and nothing served lost (`sync`): it carries on, after
    /// deleting what the failed writes may have left. Otherwise (the store
    /// moved the room to a new epoch, as after a failure with `batched`
    /// durability): members are told to join again and the room starts
    /// over from the store.
    pub(super) fn resync(&mut self, ctx: &mut Context<Self>) {
        ctx.wait(self.load_view().into_actor(self).map(|result, act, ctx| {
            let Ok((generation, snapshot)) = result else {
                return; // Still failing: the next maintenance tick retries.
            };
            let Some(log) = act.log.as_mut() else { return };
            let unchanged = snapshot.damage.is_none()
                && snapshot.epoch == Some(log.epoch)
                && snapshot.last_offset >= log.durable;
            if unchanged {
                // Writes still on their way carry the old generation and
                // will be refused: their publishes are refused now.
                for reply in log.roll_back() {
                    let error = StoreError::Unavailable("the store was recovering".into());
                    act.reply_error(reply, RoomError::Store(error));
                }
                let Some(log) = act.log.as_mut() else { return };
                log.generation = generation;
                log.degraded = false;
                if snapshot.last_offset > log.durable {
                    let after = log.durable;
                    act.write(ctx, vec![WriteOp::Truncate { after }], None);
                }
                tracing::info!(room = %act.name, "room takes publishes again");
                return;
            }
            tracing::warn!(room = %act.name, "room moved to a new epoch while the store recovered; its members join again");
            for member in act.members.values() {
                member.link.tell(Outbound::RoomClosed(act.name.clone()));
            }
            act.members.clear();
            act.presence.clear_local();
            act.empty_since = Some(Instant::now());
            act.update_stats();
            act.loaded(ctx, generation, snapshot);
        }));
    }

    /// Reads the room's log from the store, off the actor's thread, with the
    /// store generation it comes from (read first: a recovery in between
    /// makes the first write stale, refused and reloaded, never wrongly
    /// accepted).
    pub(super) fn load_view(
        &self,
    ) -> impl std::future::Future<Output = Result<(u64, RoomSnapshot), StoreError>> {
        let (store, room) = (self.context.store.clone(), self.name.clone());
        let load = tokio::task::spawn_blocking(move || {
            let generation = store.generation();
            store
                .load_room(&room, TAIL_MAX_MESSAGES)
                .map(|snapshot| (generation, snapshot))
        });
        async move { load.await.unwrap_or(Err(StoreError::Closed)) }
    }

    /// A room without a log gets a new epoch in memory; the log (and the
    /// epoch with it) is written with its first message, so joining rooms
    /// that never see a message leaves nothing on disk. An epoch that was
    /// never written covered no messages, so losing it in a restart costs a
    /// resuming client nothing. A damaged log moves to a new epoch at once
    /// (written now), keeping what is readable.
    pub(super) fn loaded(
        &mut self,
        ctx: &mut Context<Self>,
        generation: u64,
        snapshot: RoomSnapshot,
    ) {
        let window_ms = self.settings().history.dedup_window_secs * 1000;
        let damaged = snapshot.damage.is_some();
        let epoch = match snapshot.epoch {
            Some(epoch) if !damaged => epoch,
            _ => new_epoch(),
        };
        let lost = snapshot.lost.clone();
        let last = snapshot.last_offset;
        let relayout = snapshot.ring != 0 && snapshot.ring != self.settings().history.max_per_room;
        self.log = Some(LogState::from_snapshot(
            snapshot, epoch, window_ms, generation,
        ));
        if relayout {
            // `history.max_per_room` changed since the log was laid out: its
            // ring of slots takes the new size (the store keeps the newest
            // that fit; offsets and epoch are unchanged).
            self.write(ctx, vec![WriteOp::Relayout], None);
            let max = self.settings().history.max_per_room;
            if let Some(log) = self.log.as_mut() {
                log.forget_before((last + 1).saturating_sub(max));
            }
        }
        if damaged {
            // The header first (it may reach past the stored one), then the
            // missing and unreadable messages marked lost, not pruned: a
            // prune moves the log's first offset past them, and the readable
            // messages before them would make the log look damaged at every
            // start.
            let mut ops = vec![WriteOp::SetHeader { last }];
            ops.extend(lost.into_iter().map(|offset| WriteOp::MarkLost { offset }));
            self.write(ctx, ops, None);
        }
        self.expire_messages(ctx, now_ms(), true);
    }
}

//! Reads: `join` (with history or an exact resume), `history` pages, from the
//! in-memory tail or, off the room's thread, from the store.

use super::*;

/// A contiguous range of durable offsets to read, `limit` from one end.
#[derive(Debug, Clone, Copy)]
pub(super) struct RangeQuery {
    pub(super) from: u64,
    pub(super) to: u64,
    pub(super) limit: usize,
    pub(super) take: Take,
}

pub(super) type JoinReply = tokio::sync::oneshot::Sender<Result<(), RoomError>>;

/// The longest a resuming join waits for this node to reach its offset.
const PARKED_JOIN_WAIT: Duration = Duration::from_secs(3);

impl RoomActor {
    /// Answers a range from the tail when it holds what is asked, else hands
    /// the query back to be read from the store.
    pub(super) fn read_tail(&self, q: RangeQuery) -> Result<Vec<EncodedMessage>, RangeQuery> {
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
    pub(super) fn read(
        &self,
        q: RangeQuery,
    ) -> ResponseFuture<Result<Vec<EncodedMessage>, StoreError>> {
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
            // Records this node missed: read them now.
            self.read_log(ctx);
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
    pub(super) fn join_now(&mut self, ctx: &mut Context<Self>, msg: Join, reply: JoinReply) {
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
        ctx.wait(history.into_actor(self).map(move |history, act, ctx| {
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
            act.add_member(ctx, session, user, link.clone());
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
    pub(super) fn release_parked_joins(&mut self, ctx: &mut Context<Self>) {
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

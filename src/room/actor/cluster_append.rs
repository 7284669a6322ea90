//! Cluster mode: the room's publishes go to its cluster log in batches, one
//! batch in flight at a time, each appended after the newest record this
//! node applied (optimistic concurrency, see `cluster::log`).
//!
//! While a batch is in flight, new publishes queue and go together in the
//! next one: a busy room pays one JetStream round trip per batch, not per
//! message. A batch that loses the race to another node's record is not
//! stored: the room reads what it missed and builds the batch again (keys
//! checked anew, offsets after the others'). A batch whose answer was lost
//! may have been stored: the room reads its log; if the batch is there it
//! was, if another record came first it was not, and if nothing came it is
//! sent again, unchanged (JetStream stores at most one of the copies). So
//! `unavailable` only ever means "not committed", except after
//! [`APPEND_LIMIT`] without an answer, which says the outcome is unknown.
//!
//! With replicated streams JetStream's check of the expected sequence is
//! not reliable (see `LogBatch::after`): two nodes' batches appended after
//! the same record may both be stored. Every node then applies only the
//! first (the other does not follow the record it names), so a node whose
//! batch was stored must not apply it straight from the ack: it reads its
//! log in order up to that record, and if its batch lost, the publishes go
//! back to the front of the queue, in order, for the next batch.

use super::*;
use crate::cluster::{AppendError, LogBatch};
use bytes::Bytes;
use std::borrow::Cow;

/// The most messages in one record, and its largest size (NATS refuses
/// payloads over 1 MiB by default; a message larger than this goes alone).
const MAX_BATCH_MESSAGES: usize = 256;
const MAX_BATCH_BYTES: usize = 256 * 1024;
/// The most publishes a room holds while its batches are in flight: beyond,
/// publishes are refused at once rather than queued without bound.
const MAX_QUEUED: usize = 8192;
/// How long a batch may take to be committed, attempts included.
const APPEND_LIMIT: Duration = Duration::from_secs(8);
/// How soon a batch stored but not yet readable is looked for again.
const REREAD_AFTER: Duration = Duration::from_millis(20);

/// A publish waiting for its batch.
pub(super) struct Queued {
    user: UserId,
    data: Box<serde_json::value::RawValue>,
    key: Option<String>,
    reply: PublishReply,
}

struct Entry {
    publish: Queued,
    offset: u64,
    /// Its key is a repeat of an earlier message of the same batch.
    repeat: bool,
}

/// The batch sent and not yet resolved.
pub(super) struct InFlight {
    id: String,
    /// The stream sequence it was appended after.
    expected: u64,
    payload: Bytes,
    entries: Vec<Entry>,
    started: Instant,
    /// An append is on its way (else: waiting for a read to settle it).
    sending: bool,
    /// An attempt got no answer: it may have been stored.
    maybe_stored: bool,
    /// JetStream stored it at this sequence; whether it is part of the log
    /// is known once the log is read up to it (replicated streams).
    stored_at: Option<u64>,
}

#[derive(Default)]
pub(super) struct Outbox {
    queued: VecDeque<Queued>,
    in_flight: Option<InFlight>,
    next_batch: u64,
}

impl Outbox {
    pub(super) fn is_empty(&self) -> bool {
        self.queued.is_empty() && self.in_flight.is_none()
    }
}

/// The replies of a committed batch by offset: the publish that made the
/// message, and those that repeated its key.
pub(super) type Replies = HashMap<u64, (Option<PublishReply>, Vec<PublishReply>)>;

impl RoomActor {
    /// Cluster mode: queues a publish for the room's next batch.
    pub(super) fn publish_to_cluster(&mut self, msg: Publish, ctx: &mut Context<Self>) {
        let Some(cluster) = &self.context.cluster else {
            return self.reply_error(msg.reply, self.not_ready());
        };
        if self.log.is_none() {
            return self.reply_error(msg.reply, self.not_ready());
        }
        if !self.linked(cluster) {
            return self.reply_error(msg.reply, RoomError::Unavailable(ClusterError::LinkDown));
        }
        if self.outbox.queued.len() >= MAX_QUEUED {
            let error = ClusterError::Log("too many publishes waiting for the cluster log".into());
            return self.reply_error(msg.reply, RoomError::Unavailable(error));
        }
        self.outbox.queued.push_back(Queued {
            user: msg.user,
            data: msg.data,
            key: msg.key,
            reply: msg.reply,
        });
        self.pump(ctx);
    }

    /// Sends the next batch, unless one is in flight or the log is being read.
    pub(super) fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.outbox.in_flight.is_some() || self.feed.reading || self.outbox.queued.is_empty() {
            return;
        }
        let window_ms = self.settings().history.dedup_window_secs * 1000;
        let Some(log) = self.log.as_mut() else { return };
        let now = now_ms();
        let first = log.last_assigned + 1;
        let mut entries: Vec<Entry> = Vec::new();
        let mut in_batch: HashMap<String, u64> = HashMap::new();
        let mut bytes = 0;
        let mut ids = Vec::new();
        let mut acked = Vec::new();
        while let Some(next) = self.outbox.queued.front() {
            let size = next.data.get().len() + next.key.as_ref().map_or(0, String::len) + 96;
            if ids.len() >= MAX_BATCH_MESSAGES
                || (!ids.is_empty() && bytes + size > MAX_BATCH_BYTES)
            {
                break;
            }
            let Some(publish) = self.outbox.queued.pop_front() else {
                break;
            };
            if let Some(key) = &publish.key {
                if let Some(&(offset, seen)) = log.keys.get(key) {
                    if now.saturating_sub(seen) < window_ms {
                        acked.push((offset, publish.reply));
                        continue;
                    }
                }
                if let Some(&offset) = in_batch.get(key) {
                    entries.push(Entry {
                        publish,
                        offset,
                        repeat: true,
                    });
                    continue;
                }
            }
            let offset = first + ids.len() as u64;
            if let Some(key) = &publish.key {
                in_batch.insert(key.clone(), offset);
            }
            bytes += size;
            ids.push(new_message_id());
            entries.push(Entry {
                publish,
                offset,
                repeat: false,
            });
        }
        for (offset, reply) in acked {
            if offset <= log.durable {
                reply.ack(offset);
            } else {
                log.waiting_acks.push((offset, reply));
            }
        }
        if ids.is_empty() {
            return;
        }
        let messages = entries
            .iter()
            .filter(|e| !e.repeat)
            .zip(&ids)
            .map(|(e, id)| LogRecord {
                id,
                user: e.publish.user.as_str(),
                data: &e.publish.data,
                ts: now,
                key: e.publish.key.as_deref().map(Cow::Borrowed),
            })
            .collect();
        self.outbox.next_batch += 1;
        let id = format!(
            "{}-{}-{}",
            self.context.cluster.as_ref().map_or("", |c| c.node_id()),
            rand::random::<u32>(),
            self.outbox.next_batch
        );
        let batch = LogBatch {
            epoch: log.epoch,
            first,
            batch: Cow::Borrowed(&id),
            after: Some(self.feed.head),
            messages,
        };
        let payload = match serde_json::to_vec(&batch) {
            Ok(payload) => Bytes::from(payload),
            Err(e) => {
                let error = ClusterError::Log(e.to_string());
                for entry in entries {
                    entry
                        .publish
                        .reply
                        .fail(&self.context.metrics, RoomError::Unavailable(error.clone()));
                }
                return;
            }
        };
        self.outbox.in_flight = Some(InFlight {
            id,
            expected: self.feed.head,
            payload,
            entries,
            started: Instant::now(),
            sending: false,
            maybe_stored: false,
            stored_at: None,
        });
        self.send_in_flight(ctx);
    }

    fn send_in_flight(&mut self, ctx: &mut Context<Self>) {
        let (Some(cluster), Some(log), Some(in_flight)) = (
            self.context.cluster.clone(),
            self.feed.log.clone(),
            self.outbox.in_flight.as_mut(),
        ) else {
            return;
        };
        in_flight.sending = true;
        let (expected, payload) = (in_flight.expected, in_flight.payload.clone());
        let append = async move { cluster.append(&log, expected, payload).await };
        ctx.spawn(
            append
                .into_actor(self)
                .map(|result, act, ctx| act.appended(ctx, result)),
        );
    }

    fn appended(&mut self, ctx: &mut Context<Self>, result: Result<u64, AppendError>) {
        let replicated = self.settings().cluster.replicas > 1;
        let Some(in_flight) = self.outbox.in_flight.as_mut() else {
            // Settled already: its record was heard live or read.
            return self.pump(ctx);
        };
        in_flight.sending = false;
        match result {
            Ok(seq) if replicated => {
                // Maybe not alone after `expected`: read the log up to it.
                in_flight.stored_at = Some(seq);
                self.read_log(ctx);
            }
            Ok(seq) => {
                // Stored right after `expected`, the newest record applied
                // (one replica: JetStream checks the expectation under the
                // stream's lock).
                let record = crate::cluster::StoredRecord {
                    seq,
                    payload: in_flight.payload.clone(),
                };
                self.apply_record(ctx, record, cluster_replica::Source::Log);
            }
            Err(AppendError::NotStored(error)) => {
                let in_flight = self.outbox.in_flight.take();
                if let Some(in_flight) = in_flight {
                    if in_flight.maybe_stored {
                        // An earlier attempt may still be stored: settle by reading.
                        self.outbox.in_flight = Some(in_flight);
                        return self.read_log(ctx);
                    }
                    self.refuse(in_flight, error);
                }
            }
            Err(AppendError::Conflict) => {
                self.context.metrics.cluster_append_conflicts.inc();
                self.read_log(ctx);
            }
            Err(AppendError::Unknown(_)) => {
                in_flight.maybe_stored = true;
                self.read_log(ctx);
            }
        }
        self.pump(ctx);
    }

    /// The log was read up to its newest record: an in-flight batch not
    /// found in it is settled (built again after the others', or sent
    /// again), and the next batch goes.
    pub(super) fn log_read(&mut self, ctx: &mut Context<Self>) {
        let head = self.feed.head;
        if let Some(in_flight) = self.outbox.in_flight.as_mut() {
            if in_flight.sending {
                return;
            }
            if in_flight.stored_at.is_some() {
                // Stored, but not yet readable here (a replica that answers
                // direct gets may lag its leader by a moment): read again.
                if in_flight.started.elapsed() < APPEND_LIMIT {
                    ctx.run_later(REREAD_AFTER, |act, ctx| act.read_log(ctx));
                    return;
                }
                if let Some(in_flight) = self.outbox.in_flight.take() {
                    let error = ClusterError::OutcomeUnknown(
                        "stored, but not found in the cluster log in time".into(),
                    );
                    self.refuse(in_flight, error);
                }
                return self.pump(ctx);
            }
            if in_flight.expected != head {
                // Another record came first: this batch was not stored.
                if let Some(in_flight) = self.outbox.in_flight.take() {
                    for entry in in_flight.entries.into_iter().rev() {
                        self.outbox.queued.push_front(entry.publish);
                    }
                }
            } else if in_flight.started.elapsed() < APPEND_LIMIT {
                // Nothing came after `expected`: try the same batch again.
                return self.send_in_flight(ctx);
            } else if let Some(in_flight) = self.outbox.in_flight.take() {
                let error = if in_flight.maybe_stored {
                    ClusterError::OutcomeUnknown("no answer from the cluster log".into())
                } else {
                    ClusterError::LinkDown
                };
                self.refuse(in_flight, error);
            }
        }
        self.pump(ctx);
    }

    /// Each maintenance tick: a batch that cannot be settled in time is
    /// answered (its outcome unknown if it may have been stored).
    pub(super) fn check_outbox(&mut self, _ctx: &mut Context<Self>) {
        let late = self
            .outbox
            .in_flight
            .as_ref()
            .is_some_and(|f| !f.sending && f.started.elapsed() >= APPEND_LIMIT);
        if late {
            if let Some(in_flight) = self.outbox.in_flight.take() {
                let error = if in_flight.maybe_stored || in_flight.stored_at.is_some() {
                    ClusterError::OutcomeUnknown("no answer from the cluster log".into())
                } else {
                    ClusterError::LinkDown
                };
                self.refuse(in_flight, error);
            }
        }
    }

    /// The in-flight batch if it is `id`, now found in the log.
    pub(super) fn take_in_flight(&mut self, id: &str) -> Option<InFlight> {
        if self.outbox.in_flight.as_ref().is_none_or(|f| f.id != id) {
            return None;
        }
        self.outbox.in_flight.take()
    }

    /// The batch was stored but is not part of the log (it did not follow
    /// the record it was appended after): its publishes go first into the
    /// next batch, in their order; their clients only see a later ack.
    pub(super) fn requeue(&mut self, in_flight: InFlight) {
        self.context.metrics.cluster_append_conflicts.inc();
        for entry in in_flight.entries.into_iter().rev() {
            self.outbox.queued.push_front(entry.publish);
        }
    }

    /// The replies of a batch found in the log, by offset.
    pub(super) fn replies_of(in_flight: Option<InFlight>) -> Replies {
        let mut replies = Replies::new();
        let Some(in_flight) = in_flight else {
            return replies;
        };
        for entry in in_flight.entries {
            let slot = replies.entry(entry.offset).or_default();
            if entry.repeat {
                slot.1.push(entry.publish.reply);
            } else {
                slot.0 = Some(entry.publish.reply);
            }
        }
        replies
    }

    fn refuse(&mut self, in_flight: InFlight, error: ClusterError) {
        for entry in in_flight.entries {
            let error = RoomError::Unavailable(error.clone());
            entry.publish.reply.fail(&self.context.metrics, error);
        }
    }

    /// Answers every publish waiting (the room stops): queued ones were not
    /// committed; one in flight may have been.
    pub(super) fn fail_outbox(&mut self, in_flight_unknown: bool) {
        if let Some(in_flight) = self.outbox.in_flight.take() {
            let error = if in_flight_unknown || in_flight.maybe_stored {
                ClusterError::OutcomeUnknown("the room restarted".into())
            } else {
                ClusterError::LinkDown
            };
            self.refuse(in_flight, error);
        }
        for publish in std::mem::take(&mut self.outbox.queued) {
            let error = RoomError::Unavailable(ClusterError::LinkDown);
            publish.reply.fail(&self.context.metrics, error);
        }
    }
}

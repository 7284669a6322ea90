//! The room's log as this node holds it in memory: offsets handed out and
//! durable, the tail of newest durable messages, idempotency keys, and the
//! publishes waiting for the store.

use super::*;

/// A message given an offset, waiting for the store.
pub(super) struct Pending {
    pub(super) message: EncodedMessage,
    pub(super) reply: Option<PublishReply>,
}

/// The room's log as this node knows it (present once loaded).
pub(super) struct LogState {
    pub(super) epoch: u64,
    /// The newest offset handed out.
    pub(super) last_assigned: u64,
    /// The newest offset known durable; everything served is at or below it.
    pub(super) durable: u64,
    /// The oldest retained offset.
    pub(super) first_retained: u64,
    /// The newest durable messages, contiguous up to `durable`.
    pub(super) tail: VecDeque<EncodedMessage>,
    pub(super) tail_bytes: usize,
    /// Idempotency key → (first offset, when it was first seen, unix ms).
    pub(super) keys: HashMap<String, (u64, u64)>,
    pub(super) unpersisted: VecDeque<Pending>,
    /// Acks for repeated keys whose first publish is not durable yet.
    pub(super) waiting_acks: Vec<(u64, PublishReply)>,
    /// The store generation this view was loaded from; writes carry it.
    pub(super) generation: u64,
    /// A write failed: publishes are refused until the room has reloaded
    /// its view from the recovered store.
    pub(super) degraded: bool,
}

impl LogState {
    pub(super) fn from_snapshot(
        snapshot: RoomSnapshot,
        epoch: u64,
        dedup_window_ms: u64,
        generation: u64,
    ) -> Self {
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
            generation,
            degraded: false,
        }
    }

    /// Forgets every publish that was not made durable (its write failed):
    /// the offsets go back to `durable`, never shown to anyone, and their
    /// idempotency keys are forgotten so a retry is stored.
    pub(super) fn roll_back(&mut self) -> Vec<PublishReply> {
        let durable = self.durable;
        self.last_assigned = durable;
        self.keys.retain(|_, &mut (offset, _)| offset <= durable);
        let mut replies: Vec<PublishReply> = std::mem::take(&mut self.unpersisted)
            .into_iter()
            .filter_map(|p| p.reply)
            .collect();
        replies.extend(
            std::mem::take(&mut self.waiting_acks)
                .into_iter()
                .map(|(_, reply)| reply),
        );
        replies
    }

    pub(super) fn push_tail(&mut self, message: EncodedMessage) {
        self.tail_bytes += message.as_str().len();
        self.tail.push_back(message);
        while self.tail.len() > TAIL_MAX_MESSAGES
            || (self.tail_bytes > TAIL_MAX_BYTES && self.tail.len() > 1)
        {
            self.pop_tail();
        }
    }

    pub(super) fn pop_tail(&mut self) {
        if let Some(old) = self.tail.pop_front() {
            self.tail_bytes -= old.as_str().len();
        }
    }

    pub(super) fn forget_before(&mut self, first_retained: u64) {
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
    pub(super) fn tail_start(&self) -> u64 {
        self.tail.front().map_or(self.durable + 1, |m| m.offset)
    }
}

/// How the store's writer thread tells a room what became durable without a
/// message per batch: it raises `upto` and sends one `Persisted` only if none
/// is pending, so a group commit of many publishes wakes the room once and
/// the room fans them out together (one socket write per member per group,
/// not per message).
#[derive(Default)]
pub(super) struct DurableSignal {
    pub(super) upto: AtomicU64,
    pub(super) pending: AtomicBool,
}

//! The outbound queue of one session, counted in frames.
//!
//! The session writes frames into its own buffer and sends them when the
//! socket takes them (`super::socket`), so it keeps a ledger: every frame is
//! recorded with where it ends in the byte stream, and every successful socket
//! write reports how many bytes left ([`OutboundLedger::sent`]). Frames not
//! yet sent are the queue; when it reaches `limits.outbound_queue` the session
//! is too slow and is closed with 1013 instead of growing memory.

use std::collections::VecDeque;

pub struct OutboundLedger {
    /// Bytes the socket has taken.
    taken: u64,
    /// Bytes written into the outbound buffer so far.
    written: u64,
    /// Where each frame still queued ends, in `written` terms.
    ends: VecDeque<u64>,
    capacity: usize,
}

impl OutboundLedger {
    pub fn new(capacity: usize) -> Self {
        Self {
            taken: 0,
            written: 0,
            ends: VecDeque::new(),
            capacity,
        }
    }

    /// The size on the wire of a server frame (unmasked) with this payload.
    pub fn wire_len(payload: usize) -> u64 {
        let header = match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        };
        (header + payload) as u64
    }

    /// Frames written but not yet taken by the socket.
    pub fn queued(&mut self) -> usize {
        while self.ends.front().is_some_and(|&end| end <= self.taken) {
            self.ends.pop_front();
        }
        if self.ends.is_empty() && self.ends.capacity() > 16 {
            // A burst grew the queue; an idle connection should not keep it.
            self.ends = VecDeque::new();
        }
        self.ends.len()
    }

    /// Records that the socket took `bytes` more.
    pub fn sent(&mut self, bytes: usize) {
        self.taken += bytes as u64;
        self.queued();
    }

    /// Records a data frame; `false` (and nothing recorded) if the queue is full.
    #[cfg(test)]
    pub fn try_push(&mut self, payload: usize) -> bool {
        if !self.has_room_for(1) {
            return false;
        }
        self.record(payload);
        true
    }

    /// Records a control frame (ping, pong, close), which is never refused.
    pub fn record(&mut self, payload: usize) {
        self.record_wire(Self::wire_len(payload) as usize);
    }

    /// Whether `frames` more data frames fit in the queue.
    pub fn has_room_for(&mut self, frames: usize) -> bool {
        self.queued() + frames <= self.capacity
    }

    /// Records a frame already encoded, by its length on the wire.
    pub fn record_wire(&mut self, wire: usize) {
        // Drop what was taken first, so an idle connection's pings do not
        // pile up in `ends`.
        self.queued();
        self.written += wire as u64;
        self.ends.push_back(self.written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_the_queue_as_their_bytes_are_sent() {
        let mut ledger = OutboundLedger::new(2);
        assert!(ledger.try_push(10)); // 12 bytes on the wire
        assert!(ledger.try_push(200)); // 204 bytes
        assert!(!ledger.try_push(1), "full");
        ledger.sent(12);
        assert_eq!(ledger.queued(), 1);
        assert!(ledger.try_push(1));
        ledger.sent(204 + 3);
        assert_eq!(ledger.queued(), 0);
    }

    #[test]
    fn a_partly_sent_frame_is_still_queued() {
        let mut ledger = OutboundLedger::new(1);
        assert!(ledger.try_push(10));
        ledger.sent(11);
        assert!(
            !ledger.try_push(1),
            "one byte of the frame is still waiting"
        );
        ledger.sent(1);
        assert!(ledger.try_push(1));
    }

    #[test]
    fn pings_on_an_idle_connection_do_not_accumulate() {
        let mut ledger = OutboundLedger::new(4);
        for _ in 0..10_000 {
            ledger.record(0);
            ledger.sent(2);
        }
        ledger.record(0);
        assert_eq!(ledger.ends.len(), 1);
        assert!(ledger.ends.capacity() <= 16);
    }
}

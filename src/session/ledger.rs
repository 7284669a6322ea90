//! The outbound queue of one session, counted in frames.
//!
//! actix-web-actors buffers written frames without bound, so the session
//! keeps its own ledger: every frame it writes is recorded with where it ends
//! in the byte stream, and the response body reports how many bytes the HTTP
//! layer has taken ([`OutboundLedger::counter`]). Frames not yet taken are the
//! queue; when it reaches `limits.outbound_queue` the session is too slow and
//! is closed with 1013 instead of growing memory.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;

pub struct OutboundLedger {
    /// Bytes the HTTP layer has pulled from the WebSocket stream.
    taken: Rc<Cell<u64>>,
    /// Bytes written into the WebSocket stream so far (shared with the
    /// watchdog, which reads "no progress" as "the actor cannot run").
    written: Rc<Cell<u64>>,
    /// Where each frame still queued ends, in `written` terms.
    ends: VecDeque<u64>,
    capacity: usize,
}

impl OutboundLedger {
    pub fn new(capacity: usize) -> Self {
        Self {
            taken: Rc::default(),
            written: Rc::default(),
            ends: VecDeque::new(),
            capacity,
        }
    }

    /// The counter the response body advances as it yields bytes.
    pub fn counter(&self) -> Rc<Cell<u64>> {
        self.taken.clone()
    }

    /// The bytes written so far, as the watchdog sees them.
    pub fn progress(&self) -> Rc<Cell<u64>> {
        self.written.clone()
    }

    /// The size on the wire of a server frame (unmasked) with this payload.
    fn wire_len(payload: usize) -> u64 {
        let header = match payload {
            0..=125 => 2,
            126..=65535 => 4,
            _ => 10,
        };
        (header + payload) as u64
    }

    /// Frames written but not yet taken by the HTTP layer.
    pub fn queued(&mut self) -> usize {
        let taken = self.taken.get();
        while self.ends.front().is_some_and(|&end| end <= taken) {
            self.ends.pop_front();
        }
        self.ends.len()
    }

    /// Records a data frame; `false` (and nothing recorded) if the queue is full.
    pub fn try_push(&mut self, payload: usize) -> bool {
        if self.queued() >= self.capacity {
            return false;
        }
        self.record(payload);
        true
    }

    /// Records a control frame (ping, pong, close), which is never refused.
    pub fn record(&mut self, payload: usize) {
        // Drop what was taken first, so an idle connection's pings do not
        // pile up in `ends`.
        self.queued();
        let written = self.written.get() + Self::wire_len(payload);
        self.written.set(written);
        self.ends.push_back(written);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_leave_the_queue_as_their_bytes_are_taken() {
        let mut ledger = OutboundLedger::new(2);
        assert!(ledger.try_push(10)); // 12 bytes on the wire
        assert!(ledger.try_push(200)); // 204 bytes
        assert!(!ledger.try_push(1), "full");
        ledger.counter().set(12);
        assert_eq!(ledger.queued(), 1);
        assert!(ledger.try_push(1));
        ledger.counter().set(12 + 204 + 3);
        assert_eq!(ledger.queued(), 0);
    }

    #[test]
    fn pings_on_an_idle_connection_do_not_accumulate() {
        let mut ledger = OutboundLedger::new(4);
        let counter = ledger.counter();
        for _ in 0..10_000 {
            ledger.record(0);
            counter.set(counter.get() + 2);
        }
        ledger.record(0);
        assert_eq!(ledger.ends.len(), 1);
    }
}

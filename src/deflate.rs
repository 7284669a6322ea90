//! Raw deflate as permessage-deflate (RFC 7692) uses it, with no context
//! kept between messages: [`compress`] one message's payload, and
//! [`Inflater`] to read one back under a size limit.
//!
//! Both sides run without context takeover (the session negotiates it, see
//! `session::deflate`), so every message is deflated and inflated from a
//! fresh state. That is what lets a broadcast be compressed once for every
//! recipient, and lets a connection hold no deflate state while idle: the
//! compressor is one per thread, and so is the inflater for a message that
//! arrives in one frame.
//!
//! Pure: no socket, no session. The hub's outbound side, its frame reader
//! and `roomhub load` all use this module.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use std::cell::RefCell;

/// What a sync flush ends with; RFC 7692 §7.2.1 strips it from a message
/// and §7.2.2 has the receiver put it back before inflating.
pub const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// zlib-rs's level 1 is its "quick" strategy (fixed Huffman codes only),
/// which barely shrinks short JSON (a 146-byte chat frame: 141 bytes); level
/// 2 is the fastest that builds codes for the message (118 bytes), and
/// higher levels add nothing on messages this short (BENCHMARKS.md,
/// "Compression").
const LEVEL: u32 = 2;

thread_local! {
    /// Deflate state is a few hundred KiB: one per thread, reset per message.
    static COMPRESSOR: RefCell<Compress> =
        RefCell::new(Compress::new(Compression::new(LEVEL), false));
    /// For messages that arrive in one frame (nearly all): no connection
    /// needs inflate state of its own for those.
    static INFLATER: RefCell<Inflater> = RefCell::new(Inflater::new());
}

/// Appends `payload` deflated as one permessage-deflate message (a fresh
/// context, the trailing `00 00 ff ff` stripped) to `out`.
pub fn compress(payload: &[u8], out: &mut Vec<u8>) {
    COMPRESSOR.with(|compressor| {
        let mut compressor = compressor.borrow_mut();
        compressor.reset();
        let start = out.len();
        // Chat JSON shrinks; the few bytes over the input cover what does not.
        out.reserve(payload.len() / 2 + 64);
        let mut consumed = 0;
        loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = compressor.total_in();
            let status = compressor
                .compress_vec(&payload[consumed..], out, FlushCompress::Sync)
                // Only a misuse of the stream (not data) makes deflate fail.
                .expect("deflate accepts any input");
            consumed += (compressor.total_in() - before) as usize;
            // Done once all input is in and the flush fit (space left over).
            if consumed == payload.len() && out.len() < out.capacity() {
                break;
            }
            debug_assert!(matches!(status, Status::Ok | Status::BufError));
        }
        debug_assert!(out[start..].ends_with(&TAIL));
        out.truncate(out.len() - TAIL.len());
    });
}

/// Why a compressed message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit; found while inflating, before
    /// more than the limit (plus one byte) is held.
    #[error("inflates to over {0} bytes")]
    TooBig(usize),
    /// Not a deflate stream (or one that used a context it was told not to).
    #[error("invalid deflate data")]
    Corrupt,
}

/// Inflates one message at a time, fed in pieces (one per frame of a
/// fragmented message), never producing more than a limit.
pub struct Inflater {
    inner: Decompress,
    /// The stream ended (a final block): later input is ignored.
    ended: bool,
}

impl Default for Inflater {
    fn default() -> Self {
        Self::new()
    }
}

impl Inflater {
    pub fn new() -> Self {
        Self {
            inner: Decompress::new(false),
            ended: false,
        }
    }

    /// Inflates a whole message (all of its frames' payloads in one) with
    /// this thread's inflater.
    pub fn whole(payload: &[u8], out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        INFLATER.with(|inflater| {
            let mut inflater = inflater.borrow_mut();
            inflater.reset();
            let result = inflater
                .feed(payload, out, max)
                .and_then(|()| inflater.finish(out, max));
            inflater.reset();
            result
        })
    }

    /// Ready for a new message.
    pub fn reset(&mut self) {
        self.inner.reset(false);
        self.ended = false;
    }

    /// Inflates the next piece of the message onto `out`, which never
    /// grows past `max` bytes: `TooBig` as soon as the output would.
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let mut consumed = 0;
        while !self.ended {
            if out.len() == out.capacity() {
                if out.len() > max {
                    return Err(InflateError::TooBig(max));
                }
                // Doubling, but never past one byte over the limit: that
                // byte is how an overflow shows.
                let target = (out.len() * 2).max(out.len() + 1024).min(max + 1);
                out.reserve_exact(target - out.len());
            }
            let (in_before, out_before) = (self.inner.total_in(), out.len());
            let status = self
                .inner
                .decompress_vec(&input[consumed..], out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            consumed += (self.inner.total_in() - in_before) as usize;
            if out.len() > max {
                return Err(InflateError::TooBig(max));
            }
            if status == Status::StreamEnd {
                self.ended = true;
            }
            let progressed = self.inner.total_in() > in_before || out.len() > out_before;
            // All input taken, and room was left: nothing more comes out
            // until more input does.
            if consumed == input.len() && out.len() < out.capacity() {
                break;
            }
            if !progressed && out.len() < out.capacity() {
                break;
            }
        }
        Ok(())
    }

    /// Ends the message: feeds back the stripped tail (RFC 7692 §7.2.2).
    pub fn finish(&mut self, out: &mut Vec<u8>, max: usize) -> Result<(), InflateError> {
        self.feed(&TAIL, out, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deflated(payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        compress(payload, &mut out);
        out
    }

    const CHAT: &str = r#"{"type":"message","room":"lobby","offset":1042,"id":"01JQ8T6W4M2B5X7C9D0E","user":"alice","ts":1733390000123,"data":{"text":"see you at the standup in five minutes"}}"#;

    #[test]
    fn a_message_comes_back_whole_and_smaller() {
        let wire = deflated(CHAT.as_bytes());
        assert!(wire.len() < CHAT.len(), "{} >= {}", wire.len(), CHAT.len());
        assert!(!wire.ends_with(&TAIL), "the tail is stripped");
        let mut out = Vec::new();
        Inflater::whole(&wire, &mut out, 1024).unwrap();
        assert_eq!(out, CHAT.as_bytes());
    }

    #[test]
    fn each_message_stands_alone() {
        // No context taken over: the second message inflates on its own.
        let first = deflated(CHAT.as_bytes());
        let second = deflated(CHAT.as_bytes());
        assert_eq!(first, second);
        let mut out = Vec::new();
        Inflater::whole(&second, &mut out, 1024).unwrap();
        assert_eq!(out, CHAT.as_bytes());
    }

    #[test]
    fn an_empty_message_and_incompressible_bytes_round_trip() {
        for payload in [Vec::new(), (0..=255u8).cycle().take(5000).collect()] {
            let mut out = Vec::new();
            Inflater::whole(&deflated(&payload), &mut out, 8192).unwrap();
            assert_eq!(out, payload);
        }
    }

    #[test]
    fn pieces_fed_one_by_one_make_the_message() {
        let big = CHAT.repeat(40);
        let wire = deflated(big.as_bytes());
        let mut inflater = Inflater::new();
        let mut out = Vec::new();
        for piece in wire.chunks(7) {
            inflater.feed(piece, &mut out, 1 << 20).unwrap();
        }
        inflater.finish(&mut out, 1 << 20).unwrap();
        assert_eq!(out, big.as_bytes());
    }

    #[test]
    fn a_bomb_stops_one_byte_past_the_limit() {
        // 10 MB of zeros deflate to about 10 KB.
        let wire = deflated(&vec![0u8; 10 << 20]);
        assert!(wire.len() < 20_000, "{}", wire.len());
        let mut out = Vec::new();
        assert_eq!(
            Inflater::whole(&wire, &mut out, 65_536),
            Err(InflateError::TooBig(65_536))
        );
        assert!(out.capacity() <= 65_537, "held {}", out.capacity());
        // Exactly the limit is fine.
        let wire = deflated(&[b'a'; 4096]);
        let mut out = Vec::new();
        Inflater::whole(&wire, &mut out, 4096).unwrap();
        assert_eq!(out.len(), 4096);
    }

    #[test]
    fn garbage_is_corrupt() {
        let mut out = Vec::new();
        assert_eq!(
            Inflater::whole(&[0xff; 16], &mut out, 1024),
            Err(InflateError::Corrupt)
        );
        // The thread's inflater is fine afterwards.
        Inflater::whole(&deflated(b"hello"), &mut out, 1024).unwrap();
        assert_eq!(out, b"hello");
    }
}

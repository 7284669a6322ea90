//! Frames for members that negotiated permessage-deflate: each frame's
//! payload deflated once (no context taken over, so the bytes fit every
//! such member) and sent with RSV1 set.
//!
//! A payload under [`THRESHOLD`] bytes is sent as it is, RSV1 clear (RFC
//! 7692 lets every message choose): the hub's small frames (acks, typing,
//! presence changes) shrink by a few bytes at most, not worth a compressor
//! run per frame. So does a payload that would not shrink.

use super::Encoded;
use bytes::{BufMut, BytesMut};
use std::cell::RefCell;

/// The smallest payload worth compressing. Measured on the hub's frames
/// (BENCHMARKS.md, "Compression"): under about 100 bytes deflate saves 0-7
/// bytes (an ack or typing frame nothing, a presence change or direct message
/// under 10%); from the shortest chat `message` frames (about 120 bytes)
/// on it saves 15-35%.
pub const THRESHOLD: usize = 100;

/// FIN, RSV1 ("per-message compressed") and the text opcode.
const FIN_RSV1_TEXT: u8 = 0x80 | 0x40 | 0x1;

thread_local! {
    /// Where a payload is deflated before its frame header can be written.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The compressed encoding of plain (unmasked, final, text) frames.
pub fn encode(plain: &Encoded) -> Encoded {
    let mut bytes = BytesMut::with_capacity(plain.bytes.len());
    let mut lens = Vec::with_capacity(plain.lens.len());
    let mut compressed = 0;
    let mut at = 0;
    for &len in plain.lens.iter() {
        let frame = &plain.bytes[at..at + len];
        at += len;
        let before = bytes.len();
        if write_text(&mut bytes, payload_of(frame)) {
            compressed += 1;
        } else {
            bytes.extend_from_slice(frame);
        }
        lens.push(bytes.len() - before);
    }
    Encoded {
        bytes: bytes.freeze(),
        lens: lens.into(),
        compressed,
    }
}

/// Writes `payload` as a compressed text frame at the end of `buffer`;
/// `false` (and nothing written) if it is under [`THRESHOLD`] or would
/// not shrink.
pub fn write_text(buffer: &mut BytesMut, payload: &[u8]) -> bool {
    if payload.len() < THRESHOLD {
        return false;
    }
    SCRATCH.with(|scratch| {
        let mut deflated = scratch.borrow_mut();
        deflated.clear();
        crate::deflate::compress(payload, &mut deflated);
        if deflated.len() >= payload.len() {
            return false;
        }
        buffer.reserve(10 + deflated.len());
        buffer.put_u8(FIN_RSV1_TEXT);
        match deflated.len() {
            len @ 0..=125 => buffer.put_u8(len as u8),
            len @ 126..=65535 => {
                buffer.put_u8(126);
                buffer.put_u16(len as u16);
            }
            len => {
                buffer.put_u8(127);
                buffer.put_u64(len as u64);
            }
        }
        buffer.extend_from_slice(&deflated);
        // A burst of large frames should not leave a thread holding much.
        if deflated.capacity() > 256 * 1024 {
            *deflated = Vec::new();
        }
        true
    })
}

/// The payload of a server frame (unmasked: 2, 4 or 10 header bytes).
fn payload_of(frame: &[u8]) -> &[u8] {
    let header = match frame[1] & 0x7f {
        126 => 4,
        127 => 10,
        _ => 2,
    };
    &frame[header..]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::WireFrames;

    /// A server frame's RSV1 bit and payload, inflated if set.
    fn read(frame: &[u8]) -> (bool, Vec<u8>) {
        let rsv1 = frame[0] & 0x40 != 0;
        let payload = payload_of(frame);
        if !rsv1 {
            return (false, payload.to_vec());
        }
        let mut out = Vec::new();
        crate::deflate::Inflater::whole(payload, &mut out, 1 << 20).unwrap();
        (true, out)
    }

    #[test]
    fn large_frames_are_compressed_small_ones_are_not_and_order_is_kept() {
        let long = format!(
            r#"{{"type":"message","data":{{"text":"{}"}}}}"#,
            "ab ".repeat(60)
        );
        let big = "y".repeat(70_000);
        let short = r#"{"type":"ack","ref":"p1","offset":14}"#;
        let frames = WireFrames::texts([long.as_str(), short, big.as_str()]);
        let deflated = frames.deflated();
        assert_eq!(deflated.lens.len(), 3);
        assert_eq!(deflated.compressed, 2);
        let mut at = 0;
        let mut seen = Vec::new();
        for &len in deflated.lens.iter() {
            seen.push(read(&deflated.bytes[at..at + len]));
            at += len;
        }
        assert_eq!(at, deflated.bytes.len());
        assert_eq!(seen[0], (true, long.into_bytes()));
        assert_eq!(seen[1], (false, short.as_bytes().to_vec()));
        assert_eq!(seen[2], (true, big.into_bytes()));
        // The short frame is byte for byte the plain one.
        let plain = frames.plain();
        let short_plain = &plain.bytes[plain.lens[0]..plain.lens[0] + plain.lens[1]];
        assert_eq!(
            &deflated.bytes[deflated.lens[0]..][..deflated.lens[1]],
            short_plain
        );
    }

    #[test]
    fn compressed_once_and_shared() {
        let frames = WireFrames::text(&"z".repeat(500));
        let copy = frames.clone();
        let a = frames.deflated().bytes.as_ptr();
        let b = copy.deflated().bytes.as_ptr();
        assert_eq!(a, b, "the clone shares the compressed bytes");
    }

    #[test]
    fn what_does_not_shrink_goes_plain() {
        // Bytes deflate cannot shrink (a de Bruijn-like walk of all values).
        let noise: String = (0..400u32)
            .map(|i| char::from(b'!' + ((i * 7919 + i / 3) % 90) as u8))
            .collect();
        let mut buffer = BytesMut::new();
        let shrank = write_text(&mut buffer, noise.as_bytes());
        assert_eq!(shrank, !buffer.is_empty());
        let mut buffer = BytesMut::new();
        assert!(!write_text(&mut buffer, &[b'a'; THRESHOLD - 1]));
        assert!(buffer.is_empty());
        assert!(write_text(&mut buffer, &[b'a'; THRESHOLD]));
    }
}

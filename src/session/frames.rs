//! Client frames off the wire, checked to the letter of RFC 6455, in memory
//! bounded by the frame limit whatever a client sends.
//!
//! Pure: bytes go in ([`FrameReader::feed`]), whole messages and control
//! frames come out ([`FrameReader::next`]), or the [`Violation`] that fails
//! the connection, with its close code. No socket, no clock, so the fuzz
//! target drives exactly what a session runs.
//!
//! actix-http's `ws::Parser` decodes each frame (reserved bits, masking,
//! opcodes, control frame lengths, unmasking). What it leaves to its caller
//! is done here: a frame's declared length is checked against the limit as
//! soon as its header is in (the parser only refuses a frame once all of it
//! has been buffered), fragments are reassembled under the same limit, text
//! is checked as UTF-8 as it arrives, and close payloads are validated with
//! a distinct code for a reason that is not UTF-8 (1007) and a bad status
//! code (1002), which the parser reports alike.
//!
//! With permessage-deflate negotiated (RFC 7692), a message whose first
//! frame has RSV1 set is inflated under the same limit, and refused with
//! 1009 as soon as its inflated size passes it (a deflate bomb is never
//! inflated in full). A message in one frame is inflated with the thread's
//! inflater; only a compressed message arriving in fragments has inflate
//! state of its own, for as long as it is arriving.

use crate::deflate::{InflateError, Inflater};
use actix_http::ws::{CloseReason, OpCode, Parser};
use bytes::{Bytes, BytesMut};
use bytestring::ByteString;

/// The longest frame header: 2 bytes, an 8-byte length, a 4-byte mask.
pub const MAX_HEADER_BYTES: usize = 14;

/// RSV1: a compressed message (RFC 7692 §6), on its first frame only.
const RSV1: u8 = 0x40;

/// RFC 6455 §5.5: control frames carry at most 125 bytes.
const MAX_CONTROL_PAYLOAD: u64 = 125;

/// One thing a client sent, whole.
#[derive(Debug, PartialEq, Eq)]
pub enum Inbound {
    /// A text message (one frame or reassembled fragments), valid UTF-8.
    Text(ByteString),
    /// A binary message; its bytes are not kept (the hub takes JSON text only).
    Binary,
    Ping(Bytes),
    Pong,
    /// The client closes, with a valid status code and UTF-8 reason if any.
    Close(Option<CloseReason>),
}

/// Why the connection fails; [`Violation::close_code`] is what it is closed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A frame, or a fragmented message so far, declared more than the limit.
    #[error("frame or message over {0} bytes")]
    TooBig(usize),
    /// Any breach of the framing rules (RFC 6455 §5, §7.4).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Text, or a close reason, that is not UTF-8 (RFC 6455 §8.1).
    #[error("text is not valid UTF-8")]
    InvalidUtf8,
}

impl From<InflateError> for Violation {
    fn from(e: InflateError) -> Self {
        match e {
            InflateError::TooBig(max) => Violation::TooBig(max),
            InflateError::Corrupt => Violation::Protocol("invalid compressed data"),
        }
    }
}

impl Violation {
    pub fn close_code(self) -> crate::protocol::CloseCode {
        use crate::protocol::CloseCode;
        match self {
            Violation::TooBig(_) => CloseCode::FrameTooBig,
            Violation::Protocol(_) => CloseCode::ProtocolError,
            Violation::InvalidUtf8 => CloseCode::InvalidData,
        }
    }
}

/// Where the reader is between frames: a message arriving in fragments is
/// kept until its last one. (One enum with `Failed`, so the reader is no
/// bigger than the codec and fragment buffer it replaced.)
enum Fragmented {
    None,
    /// A violation was found: nothing is read any more.
    Failed,
    /// `checked`: how many leading bytes are known to be whole UTF-8
    /// characters (a character may be split between fragments).
    Text {
        bytes: Vec<u8>,
        checked: usize,
    },
    /// Only the length is kept, for the limit.
    Binary {
        len: usize,
    },
    /// A compressed message (boxed: the inflate state is only allocated
    /// while such a message arrives, and the reader stays small).
    Deflated(Box<Deflating>),
}

/// A compressed message arriving in fragments.
struct Deflating {
    inflater: Inflater,
    text: bool,
    /// Inflated so far; at most the limit.
    bytes: Vec<u8>,
    /// As for `Fragmented::Text`.
    checked: usize,
    /// Compressed bytes so far: the limit applies on the wire too.
    wire: usize,
}

pub struct FrameReader {
    /// Bytes read but not decoded yet. Once drained, at most one partial
    /// frame of at most the limit (its header checked), plus the last read.
    inbound: BytesMut,
    fragmented: Fragmented,
    max_bytes: usize,
    /// permessage-deflate was negotiated: RSV1 marks a compressed message.
    deflate: bool,
}

impl FrameReader {
    /// `max_bytes`: the largest frame, and the largest message reassembled
    /// from fragments (`limits.max_frame_bytes`).
    pub fn new(max_bytes: usize, leftover: &[u8]) -> Self {
        Self {
            inbound: BytesMut::from(leftover),
            fragmented: Fragmented::None,
            max_bytes,
            deflate: false,
        }
    }

    /// With permessage-deflate negotiated.
    pub fn with_deflate(mut self, deflate: bool) -> Self {
        self.deflate = deflate;
        self
    }

    /// Takes bytes read from the connection. Call [`Self::next_inbound`] until it
    /// yields nothing before feeding more: that is what bounds the buffer.
    pub fn feed(&mut self, bytes: &[u8]) {
        if !matches!(self.fragmented, Fragmented::Failed) {
            self.inbound.extend_from_slice(bytes);
        }
    }

    /// Bytes held for this connection (buffers' capacity): what the limit bounds.
    pub fn held_bytes(&self) -> usize {
        let fragments = match &self.fragmented {
            Fragmented::Text { bytes, .. } => bytes.capacity(),
            Fragmented::Deflated(d) => d.bytes.capacity(),
            Fragmented::None | Fragmented::Failed | Fragmented::Binary { .. } => 0,
        };
        self.inbound.capacity() + fragments
    }

    /// Bytes fed but not decoded yet.
    pub fn pending_bytes(&self) -> usize {
        self.inbound.len()
    }

    /// The next whole message or control frame among the bytes fed, `None`
    /// until one is complete. After an `Err` the connection is to be failed
    /// with its close code; the reader then holds nothing and yields nothing.
    pub fn next_inbound(&mut self) -> Result<Option<Inbound>, Violation> {
        if matches!(self.fragmented, Fragmented::Failed) {
            return Ok(None);
        }
        let next = self.decode();
        if next.is_err() {
            self.inbound = BytesMut::new();
            self.fragmented = Fragmented::Failed;
        } else if self.inbound.is_empty() {
            // Decoded frames share the buffer's memory; let it go with them,
            // so an idle connection holds no buffer.
            self.inbound = BytesMut::new();
        }
        next
    }

    fn decode(&mut self) -> Result<Option<Inbound>, Violation> {
        loop {
            let Some((first, declared)) = peek_header(&self.inbound) else {
                return Ok(None);
            };
            let opcode = first & 0x0f;
            let compressed = self.deflate && first & RSV1 != 0;
            if compressed {
                // §6.1: only the first frame of a data message may say so.
                if opcode == 0 || opcode & 0x8 != 0 {
                    return Err(Violation::Protocol(
                        "RSV1 on a continuation or control frame",
                    ));
                }
                // actix-http's parser refuses reserved bits; the bit is
                // taken off for it, and put back while the frame is partial.
                self.inbound[0] &= !RSV1;
            }
            self.check_declared(opcode, declared)?;
            let parsed =
                Parser::parse(&mut self.inbound, true, self.max_bytes).map_err(parse_violation)?;
            let Some((fin, opcode, payload)) = parsed else {
                if compressed {
                    self.inbound[0] |= RSV1;
                }
                return Ok(None);
            };
            let payload = payload.map(BytesMut::freeze).unwrap_or_default();
            let frame = if compressed {
                self.on_compressed(fin, opcode, &payload)?
            } else {
                self.on_frame(fin, opcode, payload)?
            };
            // Only a fragment that does not end a message yields nothing.
            if let Some(inbound) = frame {
                return Ok(Some(inbound));
            }
        }
    }

    /// Refuses a frame on its header alone, before its payload is buffered.
    fn check_declared(&self, opcode: u8, declared: u64) -> Result<(), Violation> {
        let is_control = opcode & 0x8 != 0;
        if is_control {
            return if declared > MAX_CONTROL_PAYLOAD {
                Err(Violation::Protocol("control frame over 125 bytes"))
            } else {
                Ok(())
            };
        }
        let so_far = match (&self.fragmented, opcode) {
            // A continuation adds to its message (a stray one fails later).
            (Fragmented::Text { bytes, .. }, 0) => bytes.len(),
            (Fragmented::Binary { len }, 0) => *len,
            (Fragmented::Deflated(d), 0) => d.wire,
            _ => 0,
        };
        let total = (so_far as u64).saturating_add(declared);
        if total > self.max_bytes as u64 {
            return Err(Violation::TooBig(self.max_bytes));
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: Bytes,
    ) -> Result<Option<Inbound>, Violation> {
        let open = matches!(
            self.fragmented,
            Fragmented::Text { .. } | Fragmented::Binary { .. } | Fragmented::Deflated(_)
        );
        match opcode {
            OpCode::Text | OpCode::Binary if open => Err(Violation::Protocol(
                "a new message inside a fragmented message",
            )),
            OpCode::Text if fin => ByteString::try_from(payload)
                .map(|text| Some(Inbound::Text(text)))
                .map_err(|_| Violation::InvalidUtf8),
            OpCode::Binary if fin => Ok(Some(Inbound::Binary)),
            OpCode::Text => {
                self.fragmented = Fragmented::Text {
                    bytes: Vec::new(),
                    checked: 0,
                };
                self.add_fragment(fin, &payload)
            }
            OpCode::Binary => {
                self.fragmented = Fragmented::Binary { len: 0 };
                self.add_fragment(fin, &payload)
            }
            OpCode::Continue if !open => {
                Err(Violation::Protocol("a continuation frame with no message"))
            }
            OpCode::Continue => self.add_fragment(fin, &payload),
            _ if !fin => Err(Violation::Protocol("a fragmented control frame")),
            OpCode::Ping => Ok(Some(Inbound::Ping(payload))),
            OpCode::Pong => Ok(Some(Inbound::Pong)),
            OpCode::Close => close_payload(&payload).map(|reason| Some(Inbound::Close(reason))),
            // The parser refuses the reserved opcodes (`Bad`) itself.
            OpCode::Bad => Err(Violation::Protocol("a reserved opcode")),
        }
    }

    /// The first frame of a compressed message (a text or binary frame
    /// with RSV1; other frames were refused on their header).
    fn on_compressed(
        &mut self,
        fin: bool,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<Option<Inbound>, Violation> {
        if !matches!(self.fragmented, Fragmented::None) {
            return Err(Violation::Protocol(
                "a new message inside a fragmented message",
            ));
        }
        let text = opcode == OpCode::Text;
        if fin {
            let mut bytes = Vec::new();
            Inflater::whole(payload, &mut bytes, self.max_bytes)?;
            return Ok(Some(if text {
                let text =
                    ByteString::try_from(Bytes::from(bytes)).map_err(|_| Violation::InvalidUtf8)?;
                Inbound::Text(text)
            } else {
                Inbound::Binary
            }));
        }
        self.fragmented = Fragmented::Deflated(Box::new(Deflating {
            inflater: Inflater::new(),
            text,
            bytes: Vec::new(),
            checked: 0,
            wire: 0,
        }));
        self.add_fragment(false, payload)
    }

    /// Adds a fragment to the open message (its size already checked);
    /// the whole message once `fin`.
    fn add_fragment(&mut self, fin: bool, payload: &[u8]) -> Result<Option<Inbound>, Violation> {
        match &mut self.fragmented {
            Fragmented::Deflated(d) => {
                d.wire += payload.len();
                d.inflater.feed(payload, &mut d.bytes, self.max_bytes)?;
                if fin {
                    d.inflater.finish(&mut d.bytes, self.max_bytes)?;
                }
                if d.text {
                    d.checked = utf8_checked(&d.bytes, d.checked)?;
                }
            }
            Fragmented::Text { bytes, checked } => {
                reserve_within(bytes, payload.len(), self.max_bytes);
                bytes.extend_from_slice(payload);
                *checked = utf8_checked(bytes, *checked)?;
            }
            Fragmented::Binary { len } => *len += payload.len(),
            Fragmented::None | Fragmented::Failed => {}
        }
        if !fin {
            return Ok(None);
        }
        match std::mem::replace(&mut self.fragmented, Fragmented::None) {
            Fragmented::Text { bytes, checked } if checked == bytes.len() => {
                // Checked as it came; converting checks once more, which
                // only fragmented messages pay.
                ByteString::try_from(Bytes::from(bytes))
                    .map(|text| Some(Inbound::Text(text)))
                    .map_err(|_| Violation::InvalidUtf8)
            }
            // It ends inside a character.
            Fragmented::Text { .. } => Err(Violation::InvalidUtf8),
            Fragmented::Binary { .. } => Ok(Some(Inbound::Binary)),
            Fragmented::Deflated(d) if !d.text => Ok(Some(Inbound::Binary)),
            Fragmented::Deflated(d) if d.checked == d.bytes.len() => {
                ByteString::try_from(Bytes::from(d.bytes))
                    .map(|text| Some(Inbound::Text(text)))
                    .map_err(|_| Violation::InvalidUtf8)
            }
            Fragmented::Deflated(_) => Err(Violation::InvalidUtf8),
            Fragmented::None | Fragmented::Failed => Ok(None),
        }
    }
}

/// The first byte (FIN, RSV, opcode) and declared payload length of the
/// frame at the start of `buf`, once its header's length bytes are in.
fn peek_header(buf: &[u8]) -> Option<(u8, u64)> {
    let (&first, rest) = buf.split_first()?;
    let (&second, rest) = rest.split_first()?;
    let declared = match second & 0x7f {
        126 => u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
        127 => u64::from_be_bytes(rest.get(..8)?.try_into().ok()?),
        len => u64::from(len),
    };
    Some((first, declared))
}

/// Grows a reassembly buffer as `Vec` would (doubling, so many small
/// fragments copy little) but never past the limit.
fn reserve_within(bytes: &mut Vec<u8>, additional: usize, max: usize) {
    let needed = bytes.len() + additional;
    if needed > bytes.capacity() {
        let target = needed.max(bytes.capacity() * 2).min(max).max(needed);
        bytes.reserve_exact(target - bytes.len());
    }
}

/// Checks the bytes after `checked` as UTF-8; the new count of leading
/// whole characters, or a violation as soon as a byte cannot be UTF-8
/// (a character cut at the end may be completed by the next fragment).
fn utf8_checked(bytes: &[u8], checked: usize) -> Result<usize, Violation> {
    match std::str::from_utf8(&bytes[checked..]) {
        Ok(_) => Ok(bytes.len()),
        Err(e) if e.error_len().is_none() => Ok(checked + e.valid_up_to()),
        Err(_) => Err(Violation::InvalidUtf8),
    }
}

/// A close frame's payload: empty, or a status code allowed on the wire
/// (RFC 6455 §7.4) and a UTF-8 reason.
fn close_payload(payload: &[u8]) -> Result<Option<CloseReason>, Violation> {
    if payload.len() > 2 && std::str::from_utf8(&payload[2..]).is_err() {
        return Err(Violation::InvalidUtf8);
    }
    // With the reason known to be UTF-8, actix-http's only remaining
    // refusals are a 1-byte payload and a status code not for the wire.
    Parser::try_parse_close_payload(payload)
        .map_err(|_| Violation::Protocol("an invalid close status code"))
}

fn parse_violation(e: actix_http::ws::ProtocolError) -> Violation {
    use actix_http::ws::ProtocolError as E;
    match e {
        // A 64-bit length with its top bit set.
        E::Overflow => Violation::Protocol("an invalid payload length"),
        E::UnmaskedFrame => Violation::Protocol("an unmasked client frame"),
        E::InvalidOpcode(_) | E::BadOpCode => Violation::Protocol("a reserved opcode"),
        E::InvalidLength(_) => Violation::Protocol("control frame over 125 bytes"),
        // Reserved bits set (reported as I/O by actix-http 3).
        _ => Violation::Protocol("reserved bits set"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

    /// A masked client frame; `first`: FIN, RSV and opcode bits.
    fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        header_len(&mut out, payload.len() as u64);
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
        out
    }

    fn header_len(out: &mut Vec<u8>, len: u64) {
        match len {
            0..=125 => out.push(0x80 | len as u8),
            126..=0xffff => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(len as u16).to_be_bytes());
            }
            _ => {
                out.push(0x80 | 127);
                out.extend_from_slice(&len.to_be_bytes());
            }
        }
    }

    fn read_all(max: usize, wire: &[u8]) -> (Vec<Inbound>, Option<Violation>) {
        let mut reader = FrameReader::new(max, &[]);
        reader.feed(wire);
        let mut out = Vec::new();
        // Bounded: every item consumes at least a header.
        for _ in 0..=wire.len() {
            match reader.next_inbound() {
                Ok(Some(item)) => out.push(item),
                Ok(None) => return (out, None),
                Err(v) => return (out, Some(v)),
            }
        }
        unreachable!("more items than bytes")
    }

    fn text(s: &str) -> Inbound {
        Inbound::Text(ByteString::from(s))
    }

    #[test]
    fn whole_frames_and_fragmented_messages_come_out_whole() {
        let mut wire = frame(0x81, b"one");
        wire.extend(frame(0x01, b"d"));
        wire.extend(frame(0x89, b"hi")); // a ping between fragments is allowed
        wire.extend(frame(0x00, &"\u{e9}".as_bytes()[..1]));
        wire.extend(frame(0x80, &"\u{e9}".as_bytes()[1..]));
        wire.extend(frame(0x82, b"\x00\x01"));
        wire.extend(frame(0x8a, b""));
        wire.extend(frame(0x88, b"\x03\xe8bye"));
        let (items, violation) = read_all(1024, &wire);
        assert_eq!(violation, None);
        assert_eq!(
            items,
            vec![
                text("one"),
                Inbound::Ping(Bytes::from_static(b"hi")),
                text("d\u{e9}"),
                Inbound::Binary,
                Inbound::Pong,
                Inbound::Close(Some(CloseReason {
                    code: 1000.into(),
                    description: Some("bye".into())
                })),
            ]
        );
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_on_its_header_alone() {
        let mut header = vec![0x81];
        header_len(&mut header, 2 << 30);
        let mut reader = FrameReader::new(1024, &[]);
        reader.feed(&header[..5]);
        assert_eq!(
            reader.next_inbound(),
            Ok(None),
            "the length is not all in yet"
        );
        reader.feed(&header[5..]);
        assert_eq!(reader.next_inbound(), Err(Violation::TooBig(1024)));
        assert_eq!(reader.held_bytes(), 0);
        reader.feed(&[0; 4096]);
        assert_eq!(reader.next_inbound(), Ok(None), "nothing after a violation");
        assert_eq!(reader.held_bytes(), 0);
    }

    #[test]
    fn a_fragmented_message_is_refused_once_its_declared_total_passes_the_limit() {
        let mut wire = frame(0x01, &[b'x'; 600]);
        wire.extend(frame(0x00, &[b'x'; 400]));
        let mut reader = FrameReader::new(1024, &[]);
        reader.feed(&wire);
        assert_eq!(reader.next_inbound(), Ok(None));
        let mut next = vec![0x80];
        header_len(&mut next, 25);
        reader.feed(&next);
        assert_eq!(reader.next_inbound(), Err(Violation::TooBig(1024)));
        // Exactly the limit is fine.
        let mut wire = frame(0x01, &[b'x'; 1000]);
        wire.extend(frame(0x80, &[b'x'; 24]));
        let (items, violation) = read_all(1024, &wire);
        assert_eq!((items.len(), violation), (1, None));
    }

    #[test]
    fn invalid_utf8_fails_as_soon_as_it_arrives_even_split_across_fragments() {
        let mut wire = frame(0x01, b"\xce");
        wire.extend(frame(0x00, b"\x28"));
        assert_eq!(read_all(1024, &wire).1, Some(Violation::InvalidUtf8));
        // Not waiting for the last fragment.
        let wire = frame(0x01, b"ok\xff");
        assert_eq!(read_all(1024, &wire).1, Some(Violation::InvalidUtf8));
        // A message that ends inside a character.
        let wire = frame(0x81, b"\xe2\x82");
        assert_eq!(read_all(1024, &wire).1, Some(Violation::InvalidUtf8));
        let mut wire = frame(0x01, b"\xe2\x82");
        wire.extend(frame(0x80, b""));
        assert_eq!(read_all(1024, &wire).1, Some(Violation::InvalidUtf8));
    }

    #[test]
    fn framing_errors_are_protocol_violations() {
        let unmasked = vec![0x81, 0x02, b'h', b'i'];
        let mut long_ping = vec![0x89];
        header_len(&mut long_ping, 126);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("unmasked", unmasked),
            ("rsv1", frame(0xc1, b"x")),
            ("rsv3", frame(0x91, b"x")),
            ("opcode 3", frame(0x83, b"")),
            ("opcode 0xb", frame(0x8b, b"")),
            ("long ping", long_ping),
            ("fragmented ping", frame(0x09, b"")),
            ("stray continuation", frame(0x80, b"x")),
            (
                "text inside fragments",
                [frame(0x01, b"a"), frame(0x81, b"b")].concat(),
            ),
            (
                "binary inside fragments",
                [frame(0x01, b"a"), frame(0x02, b"b")].concat(),
            ),
            ("close of 1 byte", frame(0x88, b"\x03")),
        ];
        for (name, wire) in cases {
            assert!(
                matches!(read_all(1024, &wire).1, Some(Violation::Protocol(_))),
                "{name}"
            );
        }
    }

    #[test]
    fn close_codes_follow_rfc_6455_and_a_reason_must_be_utf8() {
        for bad in [
            0u16, 999, 1004, 1005, 1006, 1015, 1016, 1100, 2000, 2999, 5000,
        ] {
            let wire = frame(0x88, &bad.to_be_bytes());
            let violation = read_all(1024, &wire).1;
            assert!(matches!(violation, Some(Violation::Protocol(_))), "{bad}");
        }
        for good in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
            let (items, violation) = read_all(1024, &frame(0x88, &good.to_be_bytes()));
            assert_eq!((items.len(), violation), (1, None), "{good}");
        }
        let wire = frame(0x88, b"\x03\xe8\xff");
        assert_eq!(read_all(1024, &wire).1, Some(Violation::InvalidUtf8));
    }

    #[test]
    fn the_reader_is_no_bigger_than_the_codec_and_fragment_buffer_it_replaced() {
        // actix-http's `ws::Codec` (16 bytes), a `BytesMut` (32) and the
        // session's `Option`-like fragment buffer (24): idle memory stays,
        // but for the permessage-deflate flag (8 with padding; inflate
        // state is boxed, and only while a compressed message arrives).
        assert!(std::mem::size_of::<FrameReader>() <= 80);
    }

    fn deflated(text: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        crate::deflate::compress(text, &mut out);
        out
    }

    fn read_deflate(max: usize, wire: &[u8]) -> (Vec<Inbound>, Option<Violation>) {
        let mut reader = FrameReader::new(max, &[]).with_deflate(true);
        reader.feed(wire);
        let mut out = Vec::new();
        loop {
            match reader.next_inbound() {
                Ok(Some(item)) => out.push(item),
                Ok(None) => return (out, None),
                Err(v) => return (out, Some(v)),
            }
        }
    }

    #[test]
    fn a_compressed_message_is_inflated_and_plain_ones_still_pass() {
        let hello = format!(r#"{{"type":"publish","data":"{}"}}"#, "hello ".repeat(30));
        let mut wire = frame(0xc1, &deflated(hello.as_bytes()));
        wire.extend(frame(0x81, b"plain"));
        wire.extend(frame(0xc2, &deflated(b"\x00\x01")));
        let (items, violation) = read_deflate(1024, &wire);
        assert_eq!(violation, None);
        assert_eq!(items, vec![text(&hello), text("plain"), Inbound::Binary]);
        // Not negotiated: RSV1 is a protocol error, as before.
        let (_, violation) = read_all(1024, &frame(0xc1, &deflated(b"x")));
        assert!(matches!(violation, Some(Violation::Protocol(_))));
    }

    #[test]
    fn a_fragmented_compressed_message_has_rsv1_on_its_first_frame_only() {
        let long = "fragments ".repeat(50);
        let wire = deflated(long.as_bytes());
        let (a, rest) = wire.split_at(wire.len() / 3);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut stream = frame(0x41, a); // RSV1, text, not FIN
        stream.extend(frame(0x89, b"ping")); // control frames may interleave
        stream.extend(frame(0x00, b));
        stream.extend(frame(0x80, c));
        // Arriving a byte at a time changes nothing.
        let mut reader = FrameReader::new(1024, &[]).with_deflate(true);
        let mut items = Vec::new();
        for byte in &stream {
            reader.feed(std::slice::from_ref(byte));
            while let Some(item) = reader.next_inbound().unwrap() {
                items.push(item);
            }
        }
        assert_eq!(
            items,
            vec![Inbound::Ping(Bytes::from_static(b"ping")), text(&long)]
        );
        assert_eq!(
            reader.held_bytes(),
            0,
            "no inflate state or buffer after it"
        );
        // RSV1 on a continuation or a control frame is an error.
        let mut bad = frame(0x41, a);
        bad.extend(frame(0xc0, b));
        assert!(matches!(
            read_deflate(1024, &bad).1,
            Some(Violation::Protocol(_))
        ));
        assert!(matches!(
            read_deflate(1024, &frame(0xc9, b"")).1,
            Some(Violation::Protocol(_))
        ));
    }

    #[test]
    fn a_deflate_bomb_is_too_big_while_inflating() {
        // 1 MiB of spaces in about 1 KiB, against a 64 KiB limit.
        let bomb = deflated(&vec![b' '; 1 << 20]);
        assert!(bomb.len() < 4096);
        let (items, violation) = read_deflate(65_536, &frame(0xc1, &bomb));
        assert!(items.is_empty());
        assert_eq!(violation, Some(Violation::TooBig(65_536)));
        assert_eq!(violation.unwrap().close_code().code(), 1009);
        // In fragments, too.
        let (a, b) = bomb.split_at(bomb.len() / 2);
        let mut wire = frame(0x41, a);
        wire.extend(frame(0x80, b));
        assert_eq!(
            read_deflate(65_536, &wire).1,
            Some(Violation::TooBig(65_536))
        );
        // Corrupt data is a protocol error; inflated text must be UTF-8.
        let (_, violation) = read_deflate(1024, &frame(0xc1, &[0xff; 8]));
        assert!(matches!(violation, Some(Violation::Protocol(_))));
        let (_, violation) = read_deflate(1024, &frame(0xc1, &deflated(b"ok\xff")));
        assert_eq!(violation, Some(Violation::InvalidUtf8));
    }

    #[test]
    fn what_arrives_in_pieces_is_decoded_once_whole_and_nothing_stays_held() {
        let mut wire = frame(0x81, b"hello");
        wire.extend(frame(0x81, &[b'y'; 300]));
        let mut reader = FrameReader::new(1024, &wire[..1]);
        let mut items = Vec::new();
        for byte in &wire[1..] {
            reader.feed(std::slice::from_ref(byte));
            while let Some(item) = reader.next_inbound().unwrap() {
                items.push(item);
            }
        }
        assert_eq!(items.len(), 2);
        assert_eq!(items[0], text("hello"));
        assert_eq!(reader.held_bytes(), 0, "an idle connection holds no buffer");
    }
}

//! One load client: connect from a chosen (loopback) source address, join its
//! room with no history replay, then read, and for a publisher publish, until
//! told to stop. Frames are recognised by their prefix and the two numbers
//! needed (offset, send time) are read without a JSON parse.
//!
//! The WebSocket client is [`Conn`], not a WebSocket library: the load tool
//! has to read faster than the hub writes, so a read takes everything the
//! socket has into one buffer and frames are handled in place, with no
//! allocation per message and one clock reading per read.

use super::stats::{now_us, Local, Seen, Shared};
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};

/// A connection's read buffer starts this small (idle clients stay small)...
const READ_MIN: usize = 4 * 1024;
/// ...and doubles, up to this, while reads fill it.
const READ_MAX: usize = 128 * 1024;

const OP_TEXT: u8 = 0x1;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;

/// A server frame, borrowed from the read buffer.
enum Incoming<'a> {
    Text(&'a str),
    Close(u16),
}

/// A client WebSocket connection (RFC 6455 framing, client side).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Unhandled bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    out: Vec<u8>,
    /// Where a compressed frame is inflated (permessage-deflate, no
    /// context takeover: every frame inflates on its own).
    inflated: Vec<u8>,
}

impl Conn {
    /// Sends the upgrade request and reads the 101; bytes after it are kept.
    async fn open(mut stream: TcpStream, target: &Target, user: &str) -> anyhow::Result<Conn> {
        let request = format!(
            "GET {}?user={user} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n{}\r\n",
            target.path,
            target.authority,
            if target.compress {
                "Sec-WebSocket-Extensions: permessage-deflate\r\n"
            } else {
                ""
            }
        );
        stream.write_all(request.as_bytes()).await?;
        let mut conn = Conn {
            stream,
            buf: vec![0; READ_MIN],
            start: 0,
            end: 0,
            out: Vec::new(),
            inflated: Vec::new(),
        };
        loop {
            if conn.read().await? == 0 {
                anyhow::bail!("the connection ended during the handshake");
            }
            let head = &conn.buf[..conn.end];
            if let Some(at) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                let status = String::from_utf8_lossy(&head[..head.len().min(at)]);
                let status = status.lines().next().unwrap_or_default().to_owned();
                if !status.starts_with("HTTP/1.1 101") {
                    anyhow::bail!("upgrade refused: {status}");
                }
                conn.start = at + 4;
                return Ok(conn);
            }
        }
    }

    /// Reads what the socket has; 0 at the end of the stream.
    async fn read(&mut self) -> io::Result<usize> {
        poll_fn(|cx| self.poll_read(cx)).await
    }

    fn poll_read(&mut self, cx: &mut std::task::Context<'_>) -> Poll<io::Result<usize>> {
        if self.start == self.end {
            (self.start, self.end) = (0, 0);
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                (self.start, self.end) = (0, self.end - self.start);
            } else {
                // One frame bigger than the buffer.
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let mut read = ReadBuf::new(&mut self.buf[self.end..]);
        let result = Pin::new(&mut self.stream).poll_read(cx, &mut read);
        let n = read.filled().len();
        if let Poll::Ready(Ok(())) = result {
            self.end += n;
            if self.end == self.buf.len() && self.buf.len() < READ_MAX {
                // A busy connection: read more at a time.
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        result.map_ok(|()| n)
    }

    /// Hands each complete frame to `on_frame` until it returns false (the
    /// rest stays for later); answers pings.
    fn frames(&mut self, mut on_frame: impl FnMut(Incoming<'_>) -> bool) {
        while let Some((op, header, len)) = frame_header(&self.buf[self.start..self.end]) {
            if self.end - self.start < header + len {
                break;
            }
            let mut payload = &self.buf[self.start + header..self.start + header + len];
            let compressed = self.buf[self.start] & 0x40 != 0;
            self.start += header + len;
            if compressed {
                self.inflated.clear();
                if crate::deflate::Inflater::whole(payload, &mut self.inflated, READ_MAX * 64)
                    .is_err()
                {
                    continue;
                }
                payload = &self.inflated;
            }
            let go_on = match op {
                OP_TEXT => match std::str::from_utf8(payload) {
                    Ok(text) => on_frame(Incoming::Text(text)),
                    Err(_) => true,
                },
                OP_CLOSE => {
                    let code = match payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    on_frame(Incoming::Close(code))
                }
                OP_PING => {
                    push_frame(&mut self.out, OP_PONG, payload);
                    true
                }
                _ => true,
            };
            if !go_on {
                break;
            }
        }
    }

    /// Queues a text frame; [`Conn::flush`] sends it.
    fn feed(&mut self, text: &str) {
        push_frame(&mut self.out, OP_TEXT, text.as_bytes());
    }

    async fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.stream.write_all(&self.out).await?;
            self.out.clear();
        }
        Ok(())
    }

    async fn close(&mut self) -> io::Result<()> {
        push_frame(&mut self.out, OP_CLOSE, &1000u16.to_be_bytes());
        self.flush().await?;
        self.stream.shutdown().await
    }
}

/// Opcode, header length and payload length of the frame at the start of
/// `bytes`, once its header is complete. Server frames are never masked.
fn frame_header(bytes: &[u8]) -> Option<(u8, usize, usize)> {
    let [first, second, ..] = *bytes else {
        return None;
    };
    let op = first & 0x0f;
    let (len, header) = match second & 0x7f {
        126 => (
            u16::from_be_bytes(bytes.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(bytes.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        len => (len as usize, 2),
    };
    let header = header + if second & 0x80 != 0 { 4 } else { 0 };
    Some((op, header, len))
}

/// Appends a final client frame. The mask is zero: masking is required of
/// clients, but a load tool has no proxy caches to protect.
fn push_frame(out: &mut Vec<u8>, op: u8, payload: &[u8]) {
    out.push(0x80 | op);
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=65535 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(payload);
}

/// Where the hub listens.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the request line.
    pub authority: String,
    pub path: String,
    /// Offer permessage-deflate (`--compress`).
    pub compress: bool,
}

/// How a publisher publishes.
#[derive(Debug, Clone, Copy)]
pub struct PublishPlan {
    /// Publishes per second; 0 = as fast as `window` allows.
    pub rate: f64,
    /// Publishes sent and not yet answered, at most.
    pub window: usize,
    /// Size of the serialized `data`, in bytes.
    pub payload: usize,
    pub duration: Duration,
    /// Paced publishers only: how long after the common start this one's
    /// first publish goes out.
    pub phase: Duration,
}

pub struct ClientSpec {
    pub index: usize,
    pub room: usize,
    pub room_name: Arc<str>,
    pub source: Option<IpAddr>,
    pub publish: Option<PublishPlan>,
}

pub struct Control {
    /// Publishers only: when to start (the run's common start).
    pub start: Option<oneshot::Receiver<Instant>>,
    pub stop: oneshot::Receiver<()>,
}

/// What one client saw; the run's totals are summed from these.
#[derive(Default)]
pub struct Report {
    pub room: usize,
    pub joined: bool,
    /// The room's newest offset when this client joined.
    pub base: u64,
    pub seen: Seen,
    pub deliveries: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Messages at or below `base` (none expected with `history: 0`).
    pub stale: u64,
    /// Offsets of this publisher's acked publishes.
    pub acked: Vec<u64>,
    pub sent: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Why the connection ended before the run did, if it did.
    pub ended: Option<String>,
}

/// The number that follows `key` in `text`.
fn number_after(text: &str, key: &str) -> Option<u64> {
    let start = text.find(key)? + key.len();
    let digits = &text.as_bytes()[start..];
    let end = digits
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(digits.len());
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// A publish frame whose `data` carries the send time and serializes to
/// about `payload` bytes: `{"t":<unix µs>,"p":"xxx…"}`.
pub struct PublishFrame {
    head: String,
    tail: String,
}

impl PublishFrame {
    pub fn new(room: &str, payload: usize) -> Self {
        // `{"t":` + 16 digits + `,"p":"` + pad + `"}` = 29 + pad bytes.
        let pad = "x".repeat(payload.saturating_sub(29));
        Self {
            head: format!(r#"{{"type":"publish","room":"{room}","ref":"p","data":{{"t":"#),
            tail: format!(r#","p":"{pad}"}}}}"#),
        }
    }

    pub fn at(&self, now_us: u64) -> String {
        let mut s = String::with_capacity(self.head.len() + self.tail.len() + 20);
        s.push_str(&self.head);
        s.push_str(&now_us.to_string());
        s.push_str(&self.tail);
        s
    }
}

enum Frame {
    Delivered,
    Ack,
    PublishError,
    Other,
}

struct Client {
    shared: Arc<Shared>,
    report: Report,
    local: Local,
    last_offset: u64,
    in_flight: usize,
}

impl Client {
    /// `now`: when the read that brought this frame returned (frames that
    /// arrive together share it).
    fn on_text(&mut self, text: &str, now: u64) -> Frame {
        if text.starts_with(r#"{"type":"message""#) {
            let Some(offset) = number_after(text, r#""offset":"#) else {
                return Frame::Other;
            };
            self.report.deliveries += 1;
            if offset <= self.report.base {
                self.report.stale += 1;
            } else if !self.report.seen.insert(offset - self.report.base - 1) {
                self.report.duplicates += 1;
            }
            if offset < self.last_offset {
                self.report.out_of_order += 1;
            }
            self.last_offset = offset;
            let sent = number_after(text, r#""data":{"t":"#);
            self.local.delivery(&self.shared, sent, now);
            Frame::Delivered
        } else if text.starts_with(r#"{"type":"ack""#) {
            let Some(offset) = number_after(text, r#""offset":"#) else {
                return Frame::Other;
            };
            self.report.acked.push(offset);
            self.shared.acked.fetch_add(1, Ordering::Relaxed);
            self.shared.room_acked[self.report.room].fetch_add(1, Ordering::Relaxed);
            Frame::Ack
        } else if text.starts_with(r#"{"type":"error""#) {
            self.report.errors += 1;
            self.shared.errors.fetch_add(1, Ordering::Relaxed);
            if self.report.first_error.is_none() {
                self.report.first_error = Some(text.to_owned());
            }
            if text.contains(r#""ref":"p""#) {
                Frame::PublishError
            } else {
                Frame::Other
            }
        } else {
            Frame::Other
        }
    }

    /// Handles one frame; false once the connection has ended.
    fn on_frame(&mut self, frame: Incoming<'_>, now: u64) -> bool {
        let frame = match frame {
            Incoming::Text(text) => self.on_text(text, now),
            Incoming::Close(code) => {
                self.report.ended = Some(format!("closed by the hub with {code}"));
                return false;
            }
        };
        if matches!(frame, Frame::Ack | Frame::PublishError) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        true
    }

    /// Handles the frames already read; false once the connection has ended.
    fn on_frames(&mut self, conn: &mut Conn) -> bool {
        let now = now_us();
        let mut open = true;
        conn.frames(|frame| {
            open = self.on_frame(frame, now);
            open
        });
        open
    }
}

/// Reads what the socket has and handles it (answering pings); folds this
/// client's counts into the shared totals whenever the socket has nothing
/// more to give right now. False once the connection has ended.
async fn read_and_handle(conn: &mut Conn, client: &mut Client) -> bool {
    let read = poll_fn(|cx| match conn.poll_read(cx) {
        Poll::Pending => {
            client.local.flush(&client.shared);
            Poll::Pending
        }
        ready => ready,
    })
    .await;
    match read {
        Ok(0) => {
            client.report.ended = Some("connection ended".into());
            return false;
        }
        Ok(_) => {}
        Err(e) => {
            client.report.ended = Some(format!("websocket error: {e}"));
            return false;
        }
    }
    if !client.on_frames(conn) {
        return false;
    }
    if let Err(e) = conn.flush().await {
        client.report.ended = Some(format!("websocket error: {e}"));
        return false;
    }
    true
}

async fn connect(target: &Target, source: Option<IpAddr>, user: &str) -> anyhow::Result<Conn> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    Conn::open(stream, target, user).await
}

/// Connects and joins; the room's newest offset on success.
async fn join(conn: &mut Conn, room: &str) -> anyhow::Result<u64> {
    conn.feed(&format!(
        r#"{{"type":"join","room":"{room}","history":0,"ref":"j"}}"#
    ));
    conn.flush().await?;
    loop {
        let mut outcome = None;
        // Stop right after `joined`: later frames are the run's.
        conn.frames(|frame| {
            outcome = match frame {
                Incoming::Text(text) if text.starts_with(r#"{"type":"joined""#) => Some(
                    number_after(text, r#""offset":"#)
                        .ok_or_else(|| anyhow::anyhow!("joined without an offset: {text}")),
                ),
                Incoming::Text(text) if text.starts_with(r#"{"type":"error""#) => {
                    Some(Err(anyhow::anyhow!("join refused: {text}")))
                }
                Incoming::Text(_) => None,
                Incoming::Close(code) => Some(Err(anyhow::anyhow!("closed with {code}"))),
            };
            outcome.is_none()
        });
        if let Some(outcome) = outcome {
            return outcome;
        }
        conn.flush().await?;
        if conn.read().await? == 0 {
            anyhow::bail!("the connection ended before joined")
        }
    }
}

/// Runs one client to the end. `permit` (the connect-phase slot) is released
/// once the client has joined.
pub async fn run(
    spec: ClientSpec,
    target: Arc<Target>,
    shared: Arc<Shared>,
    control: Control,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Report {
    let mut report = Report {
        room: spec.room,
        ..Report::default()
    };
    let user = format!("load-{}", spec.index);
    let setup = async {
        let mut conn = connect(&target, spec.source, &user).await?;
        let base = join(&mut conn, &spec.room_name).await?;
        anyhow::Ok((conn, base))
    };
    let (mut conn, base) = match tokio::time::timeout(Duration::from_secs(30), setup).await {
        Ok(Ok(joined)) => joined,
        Ok(Err(e)) => {
            shared.connect_failed.fetch_add(1, Ordering::Relaxed);
            report.ended = Some(format!("connect: {e:#}"));
            return report;
        }
        Err(_) => {
            shared.connect_failed.fetch_add(1, Ordering::Relaxed);
            report.ended = Some("connect: timed out".into());
            return report;
        }
    };
    drop(permit);
    report.joined = true;
    report.base = base;
    shared.room_members[spec.room].fetch_add(1, Ordering::Relaxed);
    shared.connected.fetch_add(1, Ordering::Relaxed);
    let mut client = Client {
        shared: shared.clone(),
        report,
        local: Local::new(),
        last_offset: base,
        in_flight: 0,
    };
    let Control { start, mut stop } = control;
    match (spec.publish, start) {
        (Some(plan), Some(start)) => {
            publisher(
                &mut conn,
                &mut client,
                &spec.room_name,
                plan,
                start,
                &mut stop,
            )
            .await
        }
        _ => subscriber(&mut conn, &mut client, &mut stop).await,
    }
    client.local.flush(&shared);
    // Best effort: the hub sees a normal close rather than a dropped socket.
    let _ = tokio::time::timeout(Duration::from_millis(200), conn.close()).await;
    client.report
}

async fn subscriber(conn: &mut Conn, client: &mut Client, stop: &mut oneshot::Receiver<()>) {
    // Frames read with `joined` come first.
    if !client.on_frames(conn) {
        return;
    }
    loop {
        tokio::select! {
            biased;
            open = read_and_handle(conn, client) => {
                if !open {
                    return;
                }
            }
            _ = &mut *stop => return,
        }
    }
}

async fn publisher(
    conn: &mut Conn,
    client: &mut Client,
    room: &str,
    plan: PublishPlan,
    mut start: oneshot::Receiver<Instant>,
    stop: &mut oneshot::Receiver<()>,
) {
    if !client.on_frames(conn) {
        return;
    }
    // Keep reading (presence of the others joining) until the common start.
    let start = loop {
        tokio::select! {
            biased;
            at = &mut start => match at {
                Ok(at) => break at,
                // The run was called off before it started.
                Err(_) => return subscriber(conn, client, stop).await,
            },
            _ = &mut *stop => return,
            open = read_and_handle(conn, client) => {
                if !open {
                    return;
                }
            }
        }
    };
    let frames = PublishFrame::new(room, plan.payload);
    let deadline = tokio::time::sleep_until(start + plan.duration);
    tokio::pin!(deadline);
    let paced = plan.rate > 0.0;
    let mut ticker = tokio::time::interval_at(
        start + plan.phase,
        Duration::from_secs_f64(if paced { 1.0 / plan.rate } else { 1.0 }),
    );
    ticker.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut credit: u64 = 0;
    let mut publishing = true;
    let mut done = false;
    loop {
        if publishing {
            let mut fed = 0;
            while client.in_flight < plan.window && (!paced || credit > 0) {
                conn.feed(&frames.at(now_us()));
                client.in_flight += 1;
                credit = credit.saturating_sub(1);
                fed += 1;
            }
            if fed > 0 {
                client.report.sent += fed;
                client.shared.sent.fetch_add(fed, Ordering::Relaxed);
                if let Err(e) = conn.flush().await {
                    client.report.ended = Some(format!("websocket error: {e}"));
                    return;
                }
            }
        } else if client.in_flight == 0 && !done {
            done = true;
            client
                .shared
                .publishers_done
                .fetch_add(1, Ordering::Relaxed);
        }
        tokio::select! {
            biased;
            _ = &mut *stop => return,
            open = read_and_handle(conn, client) => {
                if !open {
                    return;
                }
            }
            _ = &mut deadline, if publishing => publishing = false,
            _ = ticker.tick(), if publishing && paced => credit += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_read_after_their_key() {
        let m = r#"{"type":"message","room":"r","offset":42,"id":"x","user":"u","data":{"t":1763900000000123,"p":"xx"},"ts":1}"#;
        assert_eq!(number_after(m, r#""offset":"#), Some(42));
        assert_eq!(
            number_after(m, r#""data":{"t":"#),
            Some(1_763_900_000_000_123)
        );
        assert_eq!(number_after(m, r#""nope":"#), None);
    }

    #[test]
    fn frame_headers_of_every_length_form() {
        for (len, header) in [
            (5usize, 2usize),
            (125, 2),
            (126, 4),
            (65_535, 4),
            (65_536, 10),
        ] {
            let mut frame = Vec::new();
            push_frame(&mut frame, OP_TEXT, &vec![b'x'; len]);
            // Ours are masked (4 more header bytes); the hub's are not.
            assert_eq!(frame_header(&frame), Some((OP_TEXT, header + 4, len)));
            frame[1] &= 0x7f;
            assert_eq!(frame_header(&frame[..header]), Some((OP_TEXT, header, len)));
            assert_eq!(
                frame_header(&frame[..header - 1]),
                None,
                "incomplete header"
            );
        }
    }

    #[test]
    fn publish_frames_carry_the_time_and_the_payload_size() {
        let frame = PublishFrame::new("room-1", 100).at(1_763_900_000_000_123);
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(value["type"], "publish");
        assert_eq!(value["room"], "room-1");
        assert_eq!(value["data"]["t"], 1_763_900_000_000_123u64);
        assert_eq!(value["data"].to_string().len(), 100);
    }
}

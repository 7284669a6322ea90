//! One load client: connect from a chosen (loopback) source address, join its
//! room with no history replay, then read, and for a publisher publish, until
//! told to stop. Frames are recognised by their prefix and the two numbers
//! needed (offset, send time) are read without a JSON parse.

use super::stats::{now_us, Local, Seen, Shared};
use futures_util::{SinkExt, StreamExt};
use std::future::poll_fn;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

type Ws = WebSocketStream<TcpStream>;

/// Where the hub listens.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as given, for the request line.
    pub authority: String,
    pub path: String,
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
    fn on_text(&mut self, text: &str) -> Frame {
        if text.starts_with(r#"{"type":"message""#) {
            let now = now_us();
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

    /// Handles one item from the socket; false once the connection has ended.
    fn on_item(&mut self, item: Option<Result<Message, impl std::fmt::Display>>) -> bool {
        let frame = match item {
            Some(Ok(Message::Text(text))) => self.on_text(&text),
            Some(Ok(Message::Close(close))) => {
                let code = close.map(|c| u16::from(c.code)).unwrap_or(1005);
                self.report.ended = Some(format!("closed by the hub with {code}"));
                return false;
            }
            Some(Ok(_)) => Frame::Other,
            Some(Err(e)) => {
                self.report.ended = Some(format!("websocket error: {e}"));
                return false;
            }
            None => {
                self.report.ended = Some("connection ended".into());
                return false;
            }
        };
        if matches!(frame, Frame::Ack | Frame::PublishError) {
            self.in_flight = self.in_flight.saturating_sub(1);
        }
        true
    }
}

/// The next item from the socket; folds this client's counts into the shared
/// totals whenever the socket has nothing more to give right now.
async fn next_item(
    ws: &mut Ws,
    local: &mut Local,
    shared: &Shared,
) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
    poll_fn(|cx| match ws.poll_next_unpin(cx) {
        Poll::Pending => {
            local.flush(shared);
            Poll::Pending
        }
        ready => ready,
    })
    .await
}

async fn connect(target: &Target, source: Option<IpAddr>, user: &str) -> anyhow::Result<Ws> {
    let socket = match target.addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let url = format!("ws://{}{}?user={user}", target.authority, target.path);
    let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
    Ok(ws)
}

/// Connects and joins; the room's newest offset on success.
async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<u64> {
    let frame = format!(r#"{{"type":"join","room":"{room}","history":0,"ref":"j"}}"#);
    ws.send(Message::Text(frame)).await?;
    while let Some(item) = ws.next().await {
        if let Message::Text(text) = item? {
            if text.starts_with(r#"{"type":"joined""#) {
                return number_after(&text, r#""offset":"#)
                    .ok_or_else(|| anyhow::anyhow!("joined without an offset: {text}"));
            }
            if text.starts_with(r#"{"type":"error""#) {
                anyhow::bail!("join refused: {text}");
            }
        }
    }
    anyhow::bail!("the connection ended before joined")
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
        let mut ws = connect(&target, spec.source, &user).await?;
        let base = join(&mut ws, &spec.room_name).await?;
        anyhow::Ok((ws, base))
    };
    let (mut ws, base) = match tokio::time::timeout(Duration::from_secs(30), setup).await {
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
                &mut ws,
                &mut client,
                &spec.room_name,
                plan,
                start,
                &mut stop,
            )
            .await
        }
        _ => subscriber(&mut ws, &mut client, &mut stop).await,
    }
    client.local.flush(&shared);
    // Best effort: the hub sees a normal close rather than a dropped socket.
    let _ = tokio::time::timeout(Duration::from_millis(200), ws.close(None)).await;
    client.report
}

async fn subscriber(ws: &mut Ws, client: &mut Client, stop: &mut oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            biased;
            item = next_item(ws, &mut client.local, &client.shared) => {
                if !client.on_item(item) {
                    return;
                }
            }
            _ = &mut *stop => return,
        }
    }
}

async fn publisher(
    ws: &mut Ws,
    client: &mut Client,
    room: &str,
    plan: PublishPlan,
    mut start: oneshot::Receiver<Instant>,
    stop: &mut oneshot::Receiver<()>,
) {
    // Keep reading (presence of the others joining) until the common start.
    let start = loop {
        tokio::select! {
            biased;
            at = &mut start => match at {
                Ok(at) => break at,
                // The run was called off before it started.
                Err(_) => return subscriber(ws, client, stop).await,
            },
            _ = &mut *stop => return,
            item = next_item(ws, &mut client.local, &client.shared) => {
                if !client.on_item(item) {
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
        start,
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
                let frame = frames.at(now_us());
                if ws.feed(Message::Text(frame)).await.is_err() {
                    break;
                }
                client.in_flight += 1;
                credit = credit.saturating_sub(1);
                fed += 1;
            }
            if fed > 0 {
                client.report.sent += fed;
                client.shared.sent.fetch_add(fed, Ordering::Relaxed);
                if let Err(e) = ws.flush().await {
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
            item = next_item(ws, &mut client.local, &client.shared) => {
                if !client.on_item(item) {
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
    fn publish_frames_carry_the_time_and_the_payload_size() {
        let frame = PublishFrame::new("room-1", 100).at(1_763_900_000_000_123);
        let value: serde_json::Value = serde_json::from_str(&frame).unwrap();
        assert_eq!(value["type"], "publish");
        assert_eq!(value["room"], "room-1");
        assert_eq!(value["data"]["t"], 1_763_900_000_000_123u64);
        assert_eq!(value["data"].to_string().len(), 100);
    }
}

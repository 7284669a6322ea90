//! permessage-deflate (RFC 7692) against a real hub over loopback, with a
//! handwritten client (the test WebSocket library does not do deflate):
//! negotiation, compressed and plain members of one room, the size
//! threshold, compressed client messages under the frame limit (a deflate
//! bomb is refused with 1009), fragments, and a resume with `since`.

use crate::helpers::*;
use crate::transport::read_head;
use roomhub::deflate::{compress, Inflater};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MASK: [u8; 4] = [0x3c, 0xa5, 0x17, 0x6e];
const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A masked client frame; `first`: FIN, RSV and opcode bits.
fn frame(first: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    match payload.len() {
        len @ 0..=125 => out.push(0x80 | len as u8),
        len @ 126..=0xffff => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&MASK);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    out
}

fn deflated(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    compress(payload, &mut out);
    out
}

/// A server text frame as it arrived: RSV1, and the payload (inflated).
struct Received {
    compressed: bool,
    json: Value,
}

/// A raw client connection, with or without an offer of permessage-deflate.
struct Raw {
    tcp: TcpStream,
    /// The `Sec-WebSocket-Extensions` the hub answered, if any.
    extensions: Option<String>,
}

impl Raw {
    async fn connect(app: &TestApp, query: &str, offer: Option<&str>) -> Raw {
        let mut tcp = TcpStream::connect(app.addr).await.unwrap();
        let offer = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{offer}\r\n",
            app.addr
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        let head = tokio::time::timeout(WAIT, read_head(&mut tcp))
            .await
            .expect("a handshake answer in time");
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        let extensions = head.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("sec-websocket-extensions")
                .then(|| value.trim().to_owned())
        });
        let mut raw = Raw { tcp, extensions };
        assert_eq!(raw.next().await.json["type"], "welcome");
        raw
    }

    /// The next text frame (pings skipped), inflated if compressed.
    async fn next(&mut self) -> Received {
        loop {
            let (first, payload) = tokio::time::timeout(WAIT, self.read_frame())
                .await
                .expect("a frame in time")
                .expect("the connection stays open");
            let compressed = first & 0x40 != 0;
            match first & 0x0f {
                0x1 => {
                    let text = if compressed {
                        let mut out = Vec::new();
                        Inflater::whole(&payload, &mut out, 1 << 20).expect("inflates");
                        out
                    } else {
                        payload
                    };
                    let json = serde_json::from_slice(&text).expect("JSON");
                    return Received { compressed, json };
                }
                0x9 | 0xa => assert!(!compressed, "control frames are never compressed"),
                other => panic!("unexpected opcode {other} ({payload:?})"),
            }
        }
    }

    async fn read_frame(&mut self) -> std::io::Result<(u8, Vec<u8>)> {
        let mut head = [0u8; 2];
        self.tcp.read_exact(&mut head).await?;
        let len = match head[1] & 0x7f {
            126 => u64::from(self.tcp.read_u16().await?),
            127 => self.tcp.read_u64().await?,
            len => u64::from(len),
        };
        let mut payload = vec![0; len as usize];
        self.tcp.read_exact(&mut payload).await?;
        Ok((head[0], payload))
    }

    async fn send(&mut self, message: &Value, compressed: bool) {
        let text = message.to_string();
        let wire = if compressed {
            frame(0xc1, &deflated(text.as_bytes()))
        } else {
            frame(0x81, text.as_bytes())
        };
        self.tcp.write_all(&wire).await.unwrap();
    }

    /// Sends `frame` and returns the answer with its `ref`.
    async fn request(&mut self, mut frame: Value, reference: &str, compressed: bool) -> Value {
        frame["ref"] = json!(reference);
        self.send(&frame, compressed).await;
        loop {
            let got = self.next().await.json;
            if got["ref"] == reference {
                return got;
            }
        }
    }

    /// The code of the hub's close frame.
    async fn close_code(&mut self) -> u16 {
        loop {
            let (first, payload) = tokio::time::timeout(WAIT, self.read_frame())
                .await
                .expect("a close in time")
                .expect("a close frame before the end");
            if first & 0x0f == 0x8 {
                return u16::from_be_bytes([payload[0], payload[1]]);
            }
        }
    }
}

fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// A chat line long enough to be compressed.
fn long_text(i: usize) -> Value {
    json!({"text": format!("message {i}: see you at the standup in five minutes, bring the notes")})
}

#[tokio::test]
async fn offered_it_is_negotiated_without_context_takeover_not_offered_or_disabled_it_is_not() {
    let app = TestApp::spawn().await;
    let offered = Raw::connect(&app, "user=a", Some(OFFER)).await;
    assert_eq!(
        offered.extensions.as_deref(),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let plain = Raw::connect(&app, "user=b", None).await;
    assert_eq!(plain.extensions, None);
    // An offer the hub cannot meet (a smaller server window) is declined.
    let declined = Raw::connect(
        &app,
        "user=c",
        Some("permessage-deflate; server_max_window_bits=9"),
    )
    .await;
    assert_eq!(declined.extensions, None);
    assert_eq!(
        metric(&app.metrics().await, "roomhub_compressed_connections_total"),
        1
    );
    let off = TestApp::spawn_with(&[("ROOMHUB_WEBSOCKET__COMPRESSION", "false")]).await;
    let refused = Raw::connect(&off, "user=a", Some(OFFER)).await;
    assert_eq!(refused.extensions, None);
    assert_eq!(
        metric(&off.metrics().await, "roomhub_compressed_connections_total"),
        0
    );
}

#[tokio::test]
async fn compressed_and_plain_members_get_the_same_messages_small_frames_uncompressed() {
    let app = TestApp::spawn().await;
    let mut zipped = Raw::connect(&app, "user=zip", Some(OFFER)).await;
    let mut plain = Raw::connect(&app, "user=plain", None).await;
    for (raw, r) in [(&mut zipped, "j1"), (&mut plain, "j2")] {
        let joined = raw
            .request(json!({"type": "join", "room": "mix"}), r, false)
            .await;
        assert_eq!(joined["type"], "joined", "{joined}");
    }
    let mut tungstenite = app.connect("user=lib").await;
    tungstenite.join("mix").await;
    for i in 0..5 {
        tungstenite.publish("mix", long_text(i)).await;
    }
    let mut seen = [Vec::new(), Vec::new()];
    for (k, raw) in [&mut zipped, &mut plain].into_iter().enumerate() {
        while seen[k].len() < 5 {
            let got = raw.next().await;
            if got.json["type"] == "message" {
                seen[k].push((got.compressed, got.json));
            }
        }
    }
    let messages = |k: usize| seen[k].iter().map(|(_, m)| m.clone()).collect::<Vec<_>>();
    assert_eq!(messages(0), messages(1), "the same messages, in order");
    assert!(seen[0].iter().all(|(c, _)| *c), "long ones compressed");
    // A frame under the threshold (typing, about 60 bytes): RSV1 clear.
    tungstenite
        .send(json!({"type": "typing", "room": "mix", "active": true}))
        .await;
    loop {
        let got = zipped.next().await;
        if got.json["type"] == "typing" {
            assert!(!got.compressed, "a short frame is sent plain");
            break;
        }
    }
    assert!(seen[1].iter().all(|(c, _)| !c), "never to a plain member");
    // The five, and the session's own long frames (`joined`, …).
    let metrics = app.metrics().await;
    assert!(metric(&metrics, "roomhub_messages_delivered_compressed_total") >= 5);
}

#[tokio::test]
async fn compressed_client_messages_are_read_whole_and_in_fragments() {
    let app = TestApp::spawn().await;
    let mut raw = Raw::connect(&app, "user=z", Some(OFFER)).await;
    let joined = raw
        .request(json!({"type": "join", "room": "frag"}), "j", true)
        .await;
    assert_eq!(joined["type"], "joined", "{joined}");
    let ack = raw
        .request(
            json!({"type": "publish", "room": "frag", "data": long_text(1)}),
            "p1",
            true,
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    // One message in three frames; RSV1 on the first only.
    let publish = json!({"type": "publish", "room": "frag", "data": long_text(2), "ref": "p2"});
    let wire = deflated(publish.to_string().as_bytes());
    let (a, rest) = wire.split_at(wire.len() / 3);
    let (b, c) = rest.split_at(rest.len() / 2);
    let mut frames = frame(0x41, a);
    frames.extend(frame(0x00, b));
    frames.extend(frame(0x80, c));
    raw.tcp.write_all(&frames).await.unwrap();
    // (Message 1 was read on the way to its ack.)
    let mut texts = Vec::new();
    while texts.is_empty() {
        let got = raw.next().await.json;
        if got["type"] == "message" {
            texts.push(got["data"].clone());
        }
    }
    assert_eq!(texts, vec![long_text(2)]);
}

#[tokio::test]
async fn a_deflate_bomb_is_refused_with_1009_and_memory_stays_bounded() {
    let app = TestApp::spawn().await;
    let rss_before = rss_kib(app.pid());
    let mut raw = Raw::connect(&app, "user=bomb", Some(OFFER)).await;
    // 8 MiB of spaces in about 8 KiB of deflate, well under the 64 KiB
    // frame limit on the wire; inflated it is 128 times the limit.
    let text = format!(
        r#"{{"type":"publish","room":"r","data":"{}"}}"#,
        " ".repeat(8 << 20)
    );
    let bomb = deflated(text.as_bytes());
    assert!(bomb.len() < 65_536, "{}", bomb.len());
    raw.tcp.write_all(&frame(0xc1, &bomb)).await.unwrap();
    assert_eq!(raw.close_code().await, 1009);
    let grown = rss_kib(app.pid()).saturating_sub(rss_before);
    assert!(grown < 16 * 1024, "the hub grew {grown} KiB");
}

#[tokio::test]
async fn a_resume_with_since_over_a_compressed_connection_gets_what_was_missed() {
    let app = TestApp::spawn().await;
    let mut writer = app.connect("user=w").await;
    let joined = writer.join("res").await;
    let epoch = joined["epoch"].clone();
    let first = writer.publish("res", long_text(0)).await;
    for i in 1..=4 {
        writer.publish("res", long_text(i)).await;
    }
    let mut raw = Raw::connect(&app, "user=r", Some(OFFER)).await;
    let since = json!({"epoch": epoch, "offset": first});
    raw.send(
        &json!({"type": "join", "room": "res", "since": since, "ref": "j"}),
        true,
    )
    .await;
    let joined = loop {
        let got = raw.next().await;
        if got.json["ref"] == "j" {
            break got;
        }
    };
    assert!(joined.compressed, "a long `joined` is compressed too");
    assert_eq!(joined.json["recovered"], true, "{}", joined.json);
    let texts: Vec<Value> = joined.json["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(texts, (1..=4).map(long_text).collect::<Vec<_>>());
}

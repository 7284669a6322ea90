//! The WebSocket transport the session owns after the handshake: what the
//! HTTP layer had already read is kept, only `GET /ws` upgrades, and frames
//! arrive intact however they are grouped.

use crate::helpers::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

pub fn upgrade_request(app: &TestApp, path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    )
}

/// A client text frame (clients must mask theirs).
fn masked_text(text: &str) -> Vec<u8> {
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let payload = text.as_bytes();
    assert!(payload.len() < 126, "short frames only");
    let mut frame = vec![0x81, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Reads the response head byte by byte, so no frame after it is consumed.
pub async fn read_head(tcp: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}

async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> Value {
    loop {
        let item = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a frame in time");
        match item {
            Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn frames_sent_together_with_the_handshake_are_not_lost() {
    let app = TestApp::spawn().await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    // The request and two frames in one write: the HTTP layer reads them
    // together, and the session must get what it read past the request.
    let mut bytes = upgrade_request(&app, "/ws?user=eager").into_bytes();
    bytes.extend(masked_text(r#"{"type":"ping","ref":"early"}"#));
    bytes.extend(masked_text(r#"{"type":"join","room":"r","ref":"j"}"#));
    tcp.write_all(&bytes).await.unwrap();
    let head = read_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws = WebSocketStream::from_raw_socket(tcp, Role::Client, None).await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    let pong = next_json(&mut ws).await;
    assert_eq!(
        (pong["type"].as_str(), pong["ref"].as_str()),
        (Some("pong"), Some("early"))
    );
    let joined = next_json(&mut ws).await;
    assert_eq!(
        (joined["type"].as_str(), joined["ref"].as_str()),
        (Some("joined"), Some("j"))
    );
}

#[tokio::test]
async fn only_get_ws_upgrades_and_a_refused_upgrade_closes_its_connection() {
    let app = TestApp::spawn().await;
    // Another path: 404 with the route table's JSON body, then the connection closes.
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(upgrade_request(&app, "/elsewhere").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, tcp.read_to_string(&mut response))
        .await
        .expect("the connection closes")
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 404"), "{response}");
    assert!(
        response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    let body: Value = serde_json::from_str(response.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"], "not_found");
    // Another method on /ws: 405, as the route table answers.
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let post = upgrade_request(&app, "/ws").replacen("GET", "POST", 1);
    tcp.write_all(post.as_bytes()).await.unwrap();
    assert!(read_head(&mut tcp).await.starts_with("HTTP/1.1 405"));
    // A plain GET /ws (no upgrade) still gets the handshake's 400.
    let plain = reqwest::get(app.url("/ws?user=a")).await.unwrap();
    assert_eq!(plain.status(), 400);
    // And the hub serves on.
    let mut c = app.connect("user=after").await;
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn large_groups_and_large_frames_arrive_intact_and_in_order() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut reader = app.connect("user=reader").await;
    reader.join("big").await;
    let mut writer = app.connect("user=writer").await;
    writer.join("big").await;
    // Sizes around the frame-header boundaries (125, 126, 65535 bytes on the
    // wire), sent without waiting, so the room hands them over in groups.
    let sizes = [1usize, 100, 125, 126, 127, 1000, 15_000, 65_000, 3, 70_000];
    let max = 16_384; // limits.max_message_bytes
    let mut sent = Vec::new();
    for (i, size) in sizes.iter().enumerate() {
        let size = (*size).min(max - 10);
        let text = "x".repeat(size);
        writer
            .send(json!({"type": "publish", "room": "big", "data": {"t": text}, "ref": format!("{i}")}))
            .await;
        sent.push(size);
    }
    for (i, size) in sent.iter().enumerate() {
        let m = reader.next_of("message").await;
        assert_eq!(m["offset"], i as u64 + 1);
        assert_eq!(m["data"]["t"].as_str().unwrap().len(), *size);
    }
}

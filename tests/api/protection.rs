//! Limits, slow readers, heartbeats, auth and the drain, against a real hub.

use crate::helpers::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metric(app: &TestApp, name: &str) -> f64 {
    let text = app.metrics().await;
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Polls `metric` until it reaches `at_least`, within the usual wait.
async fn metric_reaches(app: &TestApp, name: &str, at_least: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while metric(app, name).await < at_least {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} never reached {at_least}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A raw TCP client that completes the WebSocket handshake and then does
/// nothing at all: never reads, never answers pings.
async fn raw_silent_client(app: &TestApp, query: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    let request = format!(
        "GET /ws?{query} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        app.addr
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    tcp
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(secret: &str, claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

async fn http_status(url: &str) -> u16 {
    match tokio_tungstenite::connect_async(url).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn publishes_over_the_rate_get_rate_limited_with_retry_after() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "3"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    c.join("r").await;
    let mut codes = Vec::new();
    for i in 0..5 {
        let reply = c
            .request(json!({"type": "publish", "room": "r", "data": i}))
            .await;
        if reply["type"] == "error" {
            assert_eq!(reply["code"], "rate_limited");
            let retry = reply["retry_after_ms"]
                .as_u64()
                .expect("retry_after_ms is always present");
            assert!(retry > 0 && retry <= 1000, "{reply}");
        }
        codes.push(reply["type"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        codes,
        ["ack", "ack", "ack", "error", "error"],
        "the bucket starts full (3)"
    );
    // typing and direct draw from the same bucket; the connection stays open.
    let typing = c
        .request(json!({"type": "typing", "room": "r", "active": true}))
        .await;
    assert_eq!(typing["code"], "rate_limited");
    let direct = c
        .request(json!({"type": "direct", "to": "bob", "data": 1}))
        .await;
    assert_eq!(direct["code"], "rate_limited");
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
    assert_eq!(metric(&app, "roomhub_rate_limited_total").await, 4.0);
}

#[tokio::test]
async fn sustained_abuse_closes_with_1008() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=mallory").await;
    for _ in 0..200 {
        c.send_text("garbage").await;
    }
    assert_eq!(c.closed().await, 1008);
    assert_eq!(metric(&app, "roomhub_abuse_disconnects_total").await, 1.0);
}

#[tokio::test]
async fn handshakes_per_ip_are_limited_with_429() {
    let app = TestApp::spawn_with(&[("ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "2")]).await;
    let url = format!("ws://{}/ws?user=a", app.addr);
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(http_status(&url).await);
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(statuses[0], 101);
}

#[tokio::test]
async fn concurrent_connections_per_ip_are_limited_with_429() {
    let app = TestApp::spawn_with(&[("ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP", "2")]).await;
    let first = app.connect("user=a").await;
    let _second = app.connect("user=b").await;
    let url = format!("ws://{}/ws?user=c", app.addr);
    assert_eq!(http_status(&url).await, 429);
    first.close().await;
    // The slot frees once the first connection is gone.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if http_status(&url).await == 101 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slot was never freed"
        );
    }
}

#[tokio::test]
async fn a_reader_that_stalls_is_closed_with_1013_and_the_others_get_everything() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__OUTBOUND_QUEUE", "32"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut stalled = raw_silent_client(&app, "user=stalled&room=flood").await;
    let mut healthy = app.connect("user=healthy").await;
    healthy.join("flood").await;
    // Enough bytes to fill the loopback socket buffers many times over,
    // published by a backend (four concurrent streams) so no publisher's own
    // session is part of the test.
    const N: u64 = 1500;
    let payload = "x".repeat(15_000);
    let publishers = (0..4).map(|w| {
        let (url, payload) = (app.url("/api/rooms/flood/messages"), payload.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..N / 4 {
                let body = json!({"data": {"i": i * 4 + w, "p": payload}});
                let resp = http
                    .post(&url)
                    .bearer_auth(API_KEY)
                    .json(&body)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 201);
            }
        })
    });
    let publishers = futures_util::future::join_all(publishers);
    let mut seen = 0;
    let mut stalled_left = false;
    while seen < N || !stalled_left {
        let f = healthy.next().await;
        match f["type"].as_str() {
            Some("message") => {
                assert_eq!(f["offset"], seen + 1, "every message, in order");
                seen += 1;
            }
            Some("user_left") if f["user"] == "stalled" => stalled_left = true,
            _ => {}
        }
    }
    for done in publishers.await {
        done.unwrap();
    }
    // The room drops the member at once; the session counts itself on closing.
    metric_reaches(&app, "roomhub_slow_consumer_disconnects_total", 1.0).await;
    // Reading now, the stalled client finds the 1013 close after what was queued.
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        &mut stalled,
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    use futures_util::StreamExt;
    let deadline = tokio::time::Instant::now() + WAIT;
    let code = loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("close frame")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(frame)))) => {
                break u16::from(frame.code)
            }
            Some(Ok(_)) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    };
    assert_eq!(code, 1013);
}

#[tokio::test]
async fn a_silent_peer_is_closed_after_the_heartbeat_timeout_and_leaves() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_HEARTBEAT__INTERVAL_MS", "100"),
        ("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "400"),
    ])
    .await;
    let mut watcher = app.connect("user=watcher").await;
    watcher.join("hb").await;
    let _silent = raw_silent_client(&app, "user=ghost&room=hb").await;
    assert_eq!(watcher.next_of("user_joined").await["user"], "ghost");
    assert_eq!(watcher.next_of("user_left").await["user"], "ghost");
    assert_eq!(metric(&app, "roomhub_heartbeat_timeouts_total").await, 1.0);
    // A client that answers pings (tungstenite does, while read) stays.
    tokio::time::sleep(Duration::from_millis(0)).await;
    assert_eq!(
        watcher.request(json!({"type": "ping"})).await["type"],
        "pong"
    );
}

#[tokio::test]
async fn jwt_tokens_decide_the_user_and_the_rooms() {
    const SECRET: &str = "test-secret";
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_AUTH__JWT_SECRET", SECRET),
        ("ROOMHUB_AUTH__ANONYMOUS", "false"),
    ])
    .await;
    let ws = |q: &str| format!("ws://{}/ws?{q}", app.addr);
    let valid = token(
        SECRET,
        json!({"sub": "carol", "exp": now_secs() + 3600, "rooms": ["team-*", "lobby"]}),
    );
    // Missing, forged, expired, malformed: 401 before the upgrade.
    assert_eq!(http_status(&ws("user=carol")).await, 401);
    let forged = token(
        "other-secret",
        json!({"sub": "carol", "exp": now_secs() + 3600}),
    );
    assert_eq!(http_status(&ws(&format!("token={forged}"))).await, 401);
    let expired = token(SECRET, json!({"sub": "carol", "exp": now_secs() - 3600}));
    assert_eq!(http_status(&ws(&format!("token={expired}"))).await, 401);
    assert_eq!(http_status(&ws("token=not.a.jwt")).await, 401);
    let no_sub = token(SECRET, json!({"exp": now_secs() + 3600}));
    assert_eq!(http_status(&ws(&format!("token={no_sub}"))).await, 401);
    // Valid: `sub` is the user, `?user=` is ignored, `rooms` restrict joins and history.
    let mut c = TestClient::connect(&ws(&format!("token={valid}&user=mallory"))).await;
    assert_eq!(c.welcome["user"], "carol");
    c.join("team-a").await;
    c.join("lobby").await;
    for frame in [
        json!({"type": "join", "room": "xteam-a"}),
        json!({"type": "history", "room": "secret"}),
    ] {
        assert_eq!(c.request(frame).await["code"], "forbidden");
    }
    // A token without `rooms` allows every room.
    let open = token(SECRET, json!({"sub": "dave", "exp": now_secs() + 3600}));
    let mut d = TestClient::connect(&ws(&format!("token={open}"))).await;
    d.join("anything").await;
    let log = app.log.lock().unwrap().clone();
    assert!(
        !log.contains(SECRET) && !log.contains(&valid),
        "secrets never reach the log"
    );
}

#[tokio::test]
async fn a_session_whose_token_expires_is_closed_with_1008() {
    const SECRET: &str = "s";
    let app = TestApp::spawn_with(&[("ROOMHUB_AUTH__JWT_SECRET", SECRET)]).await;
    let short = token(SECRET, json!({"sub": "erin", "exp": now_secs() + 2}));
    let mut c = TestClient::connect(&format!("ws://{}/ws?token={short}", app.addr)).await;
    assert_eq!(c.closed().await, 1008);
    // Anonymous users are still welcome on this hub (auth.anonymous defaults to true).
    let guest = app.connect("user=guest1").await;
    assert_eq!(guest.welcome["user"], "guest1");
}

#[tokio::test]
async fn upgrades_from_other_origins_get_403() {
    let app = TestApp::spawn_with(&[(
        "ROOMHUB_AUTH__ALLOWED_ORIGINS",
        "https://good.example,https://also.example",
    )])
    .await;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let with_origin = |origin: &str| {
        let mut req = format!("ws://{}/ws", app.addr)
            .into_client_request()
            .unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        req
    };
    assert!(
        tokio_tungstenite::connect_async(with_origin("https://also.example"))
            .await
            .is_ok()
    );
    match tokio_tungstenite::connect_async(with_origin("https://evil.example")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    // Non-browser clients send no Origin and are let through.
    app.connect("user=cli").await;
}

#[tokio::test]
async fn the_drain_answers_503_waits_for_a_stuck_client_then_exits_0() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_SERVER__SHUTDOWN_GRACE_MS", "3000"),
        ("ROOMHUB_LIMITS__OUTBOUND_QUEUE", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    // A client that never reads, with megabytes waiting for it.
    let _stuck = raw_silent_client(&app, "user=stuck&room=d").await;
    let mut good = app.connect("user=good").await;
    good.join("d").await;
    let payload = "y".repeat(15_000);
    for i in 0..600 {
        good.send(json!({"type": "publish", "room": "d", "data": {"i": i, "p": payload}, "ref": format!("{i}")})).await;
    }
    let mut acked = 0;
    while acked < 600 {
        if good.next().await["type"] == "ack" {
            acked += 1;
        }
    }
    unsafe { libc::kill(app.pid() as i32, libc::SIGTERM) };
    // The cooperating client is told and closed.
    assert_eq!(good.next_of("shutdown").await["reconnect"], true);
    assert_eq!(good.closed().await, 1001);
    // Meanwhile the node is not ready and refuses upgrades with Retry-After.
    let ready = reqwest::get(app.url("/readyz")).await.unwrap();
    assert_eq!(ready.status(), 503);
    match tokio_tungstenite::connect_async(format!("ws://{}/ws", app.addr)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 503);
            assert!(resp.headers().contains_key("retry-after"));
        }
        other => panic!("expected 503, got {:?}", other.map(|_| ())),
    }
    // The stuck client does not keep the node up past the grace period.
    assert!(app.wait_exit().success());
}

#[tokio::test]
async fn publishes_in_flight_at_sigterm_are_either_acked_and_stored_or_not_acked() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    c.join("inflight").await;
    for i in 0..2000 {
        c.send(json!({"type": "publish", "room": "inflight", "data": i, "ref": format!("{i}")}))
            .await;
        if i == 200 {
            unsafe { libc::kill(app.pid() as i32, libc::SIGTERM) };
        }
    }
    let mut acked = Vec::new();
    loop {
        let deadline = tokio::time::Instant::now() + WAIT;
        let frame = tokio::time::timeout_at(deadline, async { c.try_next().await })
            .await
            .expect("the drain ends");
        match frame {
            Some(f) if f["type"] == "ack" => acked.push(f["offset"].as_u64().unwrap()),
            Some(_) => {}
            None => break,
        }
    }
    assert!(app.wait_exit().success());
    app.restart();
    let mut stored = Vec::new();
    let mut since = 0;
    loop {
        let (_, page) = app
            .get_json(&format!(
                "/api/rooms/inflight/messages?since={since}&limit=200"
            ))
            .await;
        let batch = offsets(&page["messages"]);
        if batch.is_empty() {
            break;
        }
        since = *batch.last().unwrap();
        stored.extend(batch);
    }
    for offset in &acked {
        assert!(stored.contains(offset), "acked offset {offset} was lost");
    }
    assert_eq!(
        stored,
        (1..=stored.len() as u64).collect::<Vec<_>>(),
        "contiguous, nothing twice"
    );
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_cut_off_even_when_its_session_cannot_run() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__OUTBOUND_QUEUE", "16"),
        ("ROOMHUB_HEARTBEAT__INTERVAL_MS", "100"),
        ("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "500"),
    ])
    .await;
    let _stalled = raw_silent_client(&app, "user=stalled&room=cut").await;
    let payload = "z".repeat(15_000);
    // Fill its socket buffers, then stop: no more traffic that could evict it.
    for i in 0..800 {
        let resp = app
            .post(
                "/api/rooms/cut/messages",
                json!({"data": {"i": i, "p": payload}}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }
    metric_reaches(&app, "roomhub_stalled_sockets_cut_total", 1.0).await;
    // The session is gone everywhere: connections, presence, the room list.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, stats) = app.get_json("/api/stats").await;
        let (_, rooms) = app.get_json("/api/rooms").await;
        let sessions = rooms["rooms"].as_array().map_or(0, |r| {
            r.iter().map(|r| r["sessions"].as_u64().unwrap()).sum()
        });
        if stats["connections"] == 0 && sessions == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats} {rooms}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn churning_through_rooms_is_rate_limited() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=churner").await;
    let mut limited = None;
    for i in 0..200 {
        let reply = c
            .request(json!({"type": "join", "room": format!("churn-{i}"), "history": 0}))
            .await;
        if reply["type"] == "error" {
            limited = Some((i, reply));
            break;
        }
        c.request(json!({"type": "leave", "room": format!("churn-{i}")}))
            .await;
    }
    let (i, reply) = limited.expect("joins are rate limited");
    assert_eq!(reply["code"], "rate_limited");
    assert!(reply["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0));
    assert!(i >= 64, "a burst of 64 joins is allowed, got {i}");
    // History of a room not joined draws from the same bucket; the connection stays open.
    let reply = c
        .request(json!({"type": "history", "room": "elsewhere"}))
        .await;
    assert_eq!(reply["code"], "rate_limited");
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
}

//! Frames, names and error codes over a real WebSocket.

use crate::helpers::*;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn welcome_names_the_session_user_node_and_protocol() {
    let app = TestApp::spawn().await;
    let client = app.connect("user=alice").await;
    let w = &client.welcome;
    assert_eq!(w["user"], "alice");
    assert_eq!(w["protocol"], 1);
    assert_eq!(w["heartbeat_ms"], 10000);
    assert!(w["session"].as_str().is_some_and(|s| !s.is_empty()));
    assert!(w["node"].as_str().is_some_and(|s| !s.is_empty()));

    let guest = app.connect("").await;
    let user = guest.welcome["user"].as_str().unwrap();
    assert!(user.starts_with("guest-") && user.len() == 12, "{user}");
}

#[tokio::test]
async fn bad_query_parameters_get_http_400_before_the_upgrade() {
    let app = TestApp::spawn().await;
    for query in [
        "user=a%20b",
        "user=",
        "room=bad%20room",
        &format!("user={}", "u".repeat(65)),
    ] {
        let url = format!("ws://{}/ws?{query}", app.addr);
        match tokio_tungstenite::connect_async(&url).await {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status(), 400, "{query}")
            }
            other => panic!("{query}: expected HTTP 400, got {:?}", other.map(|_| ())),
        }
    }
}

#[tokio::test]
async fn bad_frames_get_the_right_error_code_and_the_connection_stays_open() {
    let app = TestApp::spawn_with(&[("ROOMHUB_LIMITS__MAX_MESSAGE_BYTES", "100")]).await;
    let mut c = app.connect("user=alice").await;
    let cases = [
        ("not json", "invalid_json"),
        ("[1,2,3]", "invalid_json"),
        ("{}", "bad_request"),
        (r#"{"type":42}"#, "bad_request"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (r#"{"type":"join"}"#, "bad_request"),
        (r#"{"type":"join","room":"no spaces"}"#, "bad_request"),
        (r#"{"type":"join","room":"r","history":500}"#, "bad_request"),
        (r#"{"type":"publish","room":"r"}"#, "bad_request"),
        (r#"{"type":"history","room":"r","limit":0}"#, "bad_request"),
        (r#"{"type":"typing","room":"r"}"#, "bad_request"),
        (r#"{"type":"direct","data":1}"#, "bad_request"),
    ];
    for (text, code) in cases {
        c.send_text(text).await;
        let err = c.next().await;
        assert_eq!(err["type"], "error", "{text}");
        assert_eq!(err["code"], code, "{text}: {err}");
        assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    // A binary frame is refused the same way.
    c.send_raw(Message::Binary(vec![1, 2, 3])).await;
    assert_eq!(c.next().await["code"], "bad_request");
    // Errors echo the ref.
    let err = c.request(json!({"type": "fly"})).await;
    assert_eq!(err["code"], "unknown_type");
    // Not joined yet.
    for frame in [
        json!({"type": "publish", "room": "r", "data": 1}),
        json!({"type": "typing", "room": "r", "active": true}),
        json!({"type": "presence", "room": "r"}),
        json!({"type": "leave", "room": "r"}),
    ] {
        let err = c.request(frame.clone()).await;
        assert_eq!(err["code"], "not_joined", "{frame}");
    }
    // Too large data (over 100 bytes) in publish and direct.
    c.join("r").await;
    let big = "x".repeat(200);
    let err = c
        .request(json!({"type": "publish", "room": "r", "data": big}))
        .await;
    assert_eq!(err["code"], "too_large");
    let err = c
        .request(json!({"type": "direct", "to": "bob", "data": big}))
        .await;
    assert_eq!(err["code"], "too_large");
    // Still healthy.
    let pong = c.request(json!({"type": "ping"})).await;
    assert_eq!(pong["type"], "pong");
    let (_, metrics) = (0, app.metrics().await);
    assert!(
        metrics.contains(r#"roomhub_errors_total{code="invalid_json"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"roomhub_errors_total{code="too_large"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn room_limit_per_connection() {
    let app = TestApp::spawn_with(&[("ROOMHUB_LIMITS__MAX_ROOMS_PER_CONNECTION", "2")]).await;
    let mut c = app.connect("user=alice").await;
    c.join("a").await;
    c.join("b").await;
    c.join("a").await; // joining again is not a new room
    let err = c.request(json!({"type": "join", "room": "c"})).await;
    assert_eq!(err["code"], "room_limit");
    c.request(json!({"type": "leave", "room": "a"})).await;
    c.join("c").await;
}

#[tokio::test]
async fn frames_over_the_hard_limit_close_with_1009() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_LIMITS__MAX_FRAME_BYTES", "2048"),
        ("ROOMHUB_LIMITS__MAX_MESSAGE_BYTES", "1024"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    let text = json!({"type": "publish", "room": "r", "data": "y".repeat(4000)}).to_string();
    c.send_text(&text).await;
    assert_eq!(c.closed().await, 1009);
}

#[tokio::test]
async fn ping_pong_and_refs_on_every_reply() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.next().await, json!({"type": "pong"}));
    c.send(json!({"type": "ping", "ref": "p1"})).await;
    assert_eq!(c.next().await, json!({"type": "pong", "ref": "p1"}));
    c.send(json!({"type": "join", "room": "r", "ref": "j"}))
        .await;
    let joined = c.next().await;
    assert_eq!(
        (joined["type"].as_str(), joined["ref"].as_str()),
        (Some("joined"), Some("j"))
    );
    c.send(json!({"type": "presence", "room": "r", "ref": "p"}))
        .await;
    assert_eq!(c.next().await["ref"], "p");
    c.send(json!({"type": "history", "room": "r", "ref": "h"}))
        .await;
    let h = c.next().await;
    assert_eq!(
        (h["type"].as_str(), h["ref"].as_str()),
        (Some("history"), Some("h"))
    );
    c.send(json!({"type": "typing", "room": "r", "active": true, "ref": "t"}))
        .await;
    assert_eq!(c.next().await, json!({"type": "ack", "ref": "t"}));
    c.send(json!({"type": "publish", "room": "r", "data": 1, "ref": "m"}))
        .await;
    let mut got = [c.next().await, c.next().await];
    got.sort_by_key(|f| f["type"].as_str().unwrap().to_owned());
    assert_eq!(got[0], json!({"type": "ack", "ref": "m", "offset": 1}));
    assert_eq!(got[1]["type"], "message");
    c.send(json!({"type": "leave", "room": "r", "ref": "l"}))
        .await;
    assert_eq!(c.next().await, json!({"type": "ack", "ref": "l"}));
}

//! Rooms: fan-out, offsets, presence, typing, direct, idempotency.

use crate::helpers::*;
use serde_json::json;

const FAST: &[(&str, &str)] = &[
    ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
    ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
];

#[tokio::test]
async fn messages_reach_every_member_with_contiguous_offsets_in_one_order() {
    let app = TestApp::spawn_with(FAST).await;
    let mut receivers = Vec::new();
    for i in 0..3 {
        let mut c = app.connect(&format!("user=reader{i}")).await;
        c.join("busy").await;
        receivers.push(c);
    }
    let mut publisher = app.connect("user=writer").await;
    publisher.join("busy").await;
    const N: u64 = 500;
    // Fire all publishes without waiting, then collect every ack.
    for i in 0..N {
        publisher
            .send(json!({"type": "publish", "room": "busy", "data": {"i": i}, "ref": format!("p{i}")}))
            .await;
    }
    let mut acked = Vec::new();
    let mut seen_by_publisher = Vec::new();
    while acked.len() < N as usize || seen_by_publisher.len() < N as usize {
        let f = publisher.next().await;
        match f["type"].as_str() {
            Some("ack") => acked.push(f["offset"].as_u64().unwrap()),
            Some("message") => seen_by_publisher.push(f["offset"].as_u64().unwrap()),
            _ => {}
        }
    }
    let expected: Vec<u64> = (1..=N).collect();
    assert_eq!(acked, expected, "acks in offset order");
    assert_eq!(seen_by_publisher, expected);
    for r in &mut receivers {
        let mut seen = Vec::new();
        while seen.len() < N as usize {
            let m = r.next_of("message").await;
            assert_eq!(m["room"], "busy");
            assert_eq!(m["user"], "writer");
            assert_eq!(m["data"]["i"], seen.len() as u64, "data in publish order");
            seen.push(m["offset"].as_u64().unwrap());
        }
        assert_eq!(seen, expected);
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("roomhub_messages_published_total 500"),
        "{metrics}"
    );
    assert!(
        metrics.contains("roomhub_messages_delivered_total 2000"),
        "{metrics}"
    );
}

#[tokio::test]
async fn message_frames_carry_every_field() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice&room=lobby").await;
    let joined = c.next().await;
    assert_eq!(joined["type"], "joined", "?room= joins right after welcome");
    assert_eq!(joined["room"], "lobby");
    assert_eq!(joined["offset"], 0);
    assert_eq!(joined["recovered"], false);
    assert!(joined["epoch"].as_u64().is_some_and(|e| e > 0));
    assert_eq!(
        joined["presence"],
        json!([{"user": "alice", "sessions": 1}])
    );
    c.send(json!({"type": "publish", "room": "lobby", "data": {"text": "hi"}}))
        .await;
    let m = c.next_of("message").await;
    assert_eq!(m["offset"], 1);
    assert_eq!(m["data"], json!({"text": "hi"}));
    assert_eq!(m["user"], "alice");
    assert!(m["id"].as_str().is_some_and(|id| !id.is_empty()));
    let ts = m["ts"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(ts <= now && now - ts < 60_000);
}

#[tokio::test]
async fn one_connection_in_many_rooms() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("a").await;
    c.join("b").await;
    let mut other = app.connect("user=bob").await;
    other.join("a").await;
    other.join("b").await;
    other.publish("a", json!("to a")).await;
    other.publish("b", json!("to b")).await;
    let first = c.next_of("message").await;
    let second = c.next_of("message").await;
    assert_eq!(
        (first["room"].as_str(), second["room"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(
        (first["offset"].as_u64(), second["offset"].as_u64()),
        (Some(1), Some(1))
    );
}

#[tokio::test]
async fn presence_counts_users_once_across_their_sessions() {
    let app = TestApp::spawn().await;
    let mut bob = app.connect("user=bob").await;
    bob.join("p").await;
    let mut alice1 = app.connect("user=alice").await;
    let joined = alice1.join("p").await;
    assert_eq!(
        joined["presence"],
        json!([{"user": "alice", "sessions": 1}, {"user": "bob", "sessions": 1}])
    );
    assert_eq!(
        bob.next().await,
        json!({"type": "user_joined", "room": "p", "user": "alice"})
    );
    // A second tab of alice: no new user_joined for bob.
    let mut alice2 = app.connect("user=alice").await;
    alice2.join("p").await;
    let presence = bob.request(json!({"type": "presence", "room": "p"})).await;
    assert_eq!(
        presence["users"],
        json!([{"user": "alice", "sessions": 2}, {"user": "bob", "sessions": 1}])
    );
    // alice1 leaves: alice is still here.
    alice1.request(json!({"type": "leave", "room": "p"})).await;
    let presence = bob.request(json!({"type": "presence", "room": "p"})).await;
    assert_eq!(
        presence["users"],
        json!([{"user": "alice", "sessions": 1}, {"user": "bob", "sessions": 1}])
    );
    // alice2 drops without a close frame: that is a leave too.
    alice2.drop_abruptly();
    assert_eq!(
        bob.next().await,
        json!({"type": "user_left", "room": "p", "user": "alice"})
    );
    let presence = bob.request(json!({"type": "presence", "room": "p"})).await;
    assert_eq!(presence["users"], json!([{"user": "bob", "sessions": 1}]));
    let (_, rooms) = app.get_json("/api/rooms").await;
    assert_eq!(
        rooms["rooms"],
        json!([{"room": "p", "users": 1, "sessions": 1}])
    );
}

#[tokio::test]
async fn typing_goes_to_the_others_only() {
    let app = TestApp::spawn().await;
    let mut alice = app.connect("user=alice").await;
    alice.join("t").await;
    let mut bob = app.connect("user=bob").await;
    bob.join("t").await;
    alice.next_of("user_joined").await;
    alice
        .send(json!({"type": "typing", "room": "t", "active": true}))
        .await;
    assert_eq!(
        bob.next().await,
        json!({"type": "typing", "room": "t", "user": "alice", "active": true})
    );
    // alice gets nothing back: the next thing she sees is her own pong.
    assert_eq!(alice.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn direct_messages_reach_every_session_of_the_user() {
    let app = TestApp::spawn().await;
    let mut bob1 = app.connect("user=bob").await;
    let mut bob2 = app.connect("user=bob").await;
    let mut alice = app.connect("user=alice").await;
    let ack = alice
        .request(json!({"type": "direct", "to": "bob", "data": {"text": "psst"}}))
        .await;
    assert_eq!(ack["type"], "ack");
    for bob in [&mut bob1, &mut bob2] {
        let d = bob.next().await;
        assert_eq!(d["type"], "direct");
        assert_eq!(d["from"], "alice");
        assert_eq!(d["data"], json!({"text": "psst"}));
        assert!(d["ts"].as_u64().is_some());
    }
    // To nobody online: still acked, nothing breaks.
    assert_eq!(
        alice
            .request(json!({"type": "direct", "to": "nobody", "data": 1}))
            .await["type"],
        "ack"
    );
}

#[tokio::test]
async fn a_repeated_idempotency_key_is_stored_once() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("idem").await;
    let mut watcher = app.connect("user=bob").await;
    watcher.join("idem").await;
    let first = c
        .request(json!({"type": "publish", "room": "idem", "data": "once", "key": "k-1"}))
        .await;
    let again = c
        .request(json!({"type": "publish", "room": "idem", "data": "once", "key": "k-1"}))
        .await;
    assert_eq!(first["offset"], 1);
    assert_eq!(
        again["offset"], 1,
        "the retry is acked with the first offset"
    );
    let other = c
        .request(json!({"type": "publish", "room": "idem", "data": "two", "key": "k-2"}))
        .await;
    assert_eq!(other["offset"], 2);
    let m1 = watcher.next_of("message").await;
    let m2 = watcher.next_of("message").await;
    assert_eq!(
        (m1["offset"].as_u64(), m2["offset"].as_u64()),
        (Some(1), Some(2))
    );
    let h = c.request(json!({"type": "history", "room": "idem"})).await;
    assert_eq!(offsets(&h["messages"]), vec![1, 2]);
}

#[tokio::test]
async fn leaving_stops_delivery() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("l").await;
    assert_eq!(
        c.request(json!({"type": "leave", "room": "l"})).await["type"],
        "ack"
    );
    let err = c
        .request(json!({"type": "publish", "room": "l", "data": 1}))
        .await;
    assert_eq!(err["code"], "not_joined");
    let mut bob = app.connect("user=bob").await;
    bob.join("l").await;
    bob.publish("l", json!(1)).await;
    // alice sees nothing from the room: her next frame is her own pong.
    assert_eq!(c.request(json!({"type": "ping"})).await["type"], "pong");
}

#[tokio::test]
async fn idle_empty_rooms_stop_and_start_again_on_demand() {
    let app = TestApp::spawn_with(&[("ROOMHUB_ROOMS__IDLE_TIMEOUT_MS", "200")]).await;
    let mut c = app.connect("user=alice").await;
    c.join("brief").await;
    c.publish("brief", json!("kept")).await;
    c.request(json!({"type": "leave", "room": "brief"})).await;
    // The room's actor stops once it has been empty for the idle timeout.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, rooms) = app.get_json("/api/rooms").await;
        if rooms["rooms"] == json!([]) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{rooms}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let metrics = app.metrics().await;
    assert!(metrics.contains("roomhub_rooms 0"), "{metrics}");
    // Joining again starts it from its log.
    let joined = c.join("brief").await;
    assert_eq!(offsets(&joined["history"]), vec![1]);
    assert_eq!(c.publish("brief", json!("more")).await, 2);
}

/// A repeated key (a retry from another connection) is acked with the group
/// that makes the first publish durable: after its message, on both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_key_is_acked_after_its_message() {
    let app = TestApp::spawn_with(FAST).await;
    let mut a = app.connect("user=u").await;
    let mut b = app.connect("user=u").await;
    a.join("dedup").await;
    b.join("dedup").await;
    let mut early = Vec::new();
    for n in 0..50 {
        let key = format!("k{n}");
        let fa = json!({"type": "publish", "room": "dedup", "data": n, "key": key, "ref": "a"});
        let fb = json!({"type": "publish", "room": "dedup", "data": n, "key": key, "ref": "b"});
        tokio::join!(a.send(fa), b.send(fb));
        if !message_before_ack(&mut a, &json!(n), "a").await {
            early.push(("a", n));
        }
        if !message_before_ack(&mut b, &json!(n), "b").await {
            early.push(("b", n));
        }
    }
    assert!(early.is_empty(), "ack before its message: {early:?}");
}

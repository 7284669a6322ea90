//! History replay, paging, recovery with `since`, retention.

use crate::helpers::*;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn publish_n(app: &TestApp, room: &str, n: u64) {
    for i in 0..n {
        let resp = app
            .post(
                &format!("/api/rooms/{room}/messages"),
                json!({"data": {"i": i}}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }
}

#[tokio::test]
async fn join_replays_the_newest_messages_oldest_first() {
    let app = TestApp::spawn_with(&[("ROOMHUB_HISTORY__REPLAY", "5")]).await;
    publish_n(&app, "h", 12).await;
    let mut c = app.connect("user=alice").await;
    let joined = c.join("h").await;
    assert_eq!(joined["offset"], 12);
    assert_eq!(
        offsets(&joined["history"]),
        vec![8, 9, 10, 11, 12],
        "history.replay by default"
    );
    let joined = c
        .request(json!({"type": "join", "room": "h", "history": 3}))
        .await;
    assert_eq!(offsets(&joined["history"]), vec![10, 11, 12]);
    let joined = c
        .request(json!({"type": "join", "room": "h", "history": 0}))
        .await;
    assert_eq!(joined["history"], json!([]));
}

#[tokio::test]
async fn history_pages_backwards_with_before() {
    let app = TestApp::spawn().await;
    publish_n(&app, "pages", 30).await;
    let mut c = app.connect("user=alice").await;
    let page = c
        .request(json!({"type": "history", "room": "pages", "limit": 10}))
        .await;
    assert_eq!(offsets(&page["messages"]), (21..=30).collect::<Vec<_>>());
    let page = c
        .request(json!({"type": "history", "room": "pages", "before": 21, "limit": 10}))
        .await;
    assert_eq!(offsets(&page["messages"]), (11..=20).collect::<Vec<_>>());
    let page = c
        .request(json!({"type": "history", "room": "pages", "before": 5}))
        .await;
    assert_eq!(offsets(&page["messages"]), vec![1, 2, 3, 4]);
    let page = c
        .request(json!({"type": "history", "room": "pages", "before": 1}))
        .await;
    assert_eq!(page["messages"], json!([]), "an empty page: no older ones");
    // The default limit is 50.
    let page = c.request(json!({"type": "history", "room": "pages"})).await;
    assert_eq!(offsets(&page["messages"]).len(), 30);
}

#[tokio::test]
async fn reconnecting_with_since_gets_exactly_what_was_missed() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    let joined = c.join("rec").await;
    let epoch = joined["epoch"].clone();
    let mut last = 0;
    for i in 0..5 {
        last = c.publish("rec", json!(i)).await;
    }
    c.close().await;
    publish_n(&app, "rec", 7).await;
    let mut c = app.connect("user=alice").await;
    let joined = c
        .request(json!({"type": "join", "room": "rec", "since": {"epoch": epoch, "offset": last}}))
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), (6..=12).collect::<Vec<_>>());
    assert_eq!(joined["offset"], 12);
    // Live messages continue right after the recovered ones.
    c.send(json!({"type": "publish", "room": "rec", "data": "live"}))
        .await;
    assert_eq!(c.next_of("message").await["offset"], 13);
    // Nothing missed: recovered with an empty history.
    let joined = c
        .request(json!({"type": "join", "room": "rec", "since": {"epoch": epoch, "offset": 13}}))
        .await;
    assert_eq!(
        (joined["recovered"].clone(), joined["history"].clone()),
        (json!(true), json!([]))
    );
}

#[tokio::test]
async fn recovery_reads_beyond_the_in_memory_tail() {
    let app = TestApp::spawn_with(&[("ROOMHUB_HISTORY__REPLAY", "3")]).await;
    publish_n(&app, "deep", 400).await;
    let (_, page) = app.get_json("/api/rooms/deep/messages?limit=1").await;
    let epoch = page["epoch"].clone();
    let mut c = app.connect("user=alice").await;
    let joined = c
        .request(json!({"type": "join", "room": "deep", "since": {"epoch": epoch, "offset": 10}}))
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), (11..=400).collect::<Vec<_>>());
    let page = c
        .request(json!({"type": "history", "room": "deep", "before": 20, "limit": 5}))
        .await;
    assert_eq!(offsets(&page["messages"]), (15..=19).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_gap_or_another_epoch_is_not_recovered() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_HISTORY__MAX_PER_ROOM", "10"),
        ("ROOMHUB_HISTORY__REPLAY", "4"),
    ])
    .await;
    publish_n(&app, "gap", 30).await;
    let mut c = app.connect("user=alice").await;
    let joined = c.join("gap").await;
    let epoch = joined["epoch"].as_u64().unwrap();
    // Offsets 3..=20 were pruned (only the newest 10 are retained).
    let joined = c
        .request(json!({"type": "join", "room": "gap", "since": {"epoch": epoch, "offset": 2}}))
        .await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(offsets(&joined["history"]), vec![27, 28, 29, 30]);
    // Exactly at the retention edge: 21..=30 are all retained.
    let joined = c
        .request(json!({"type": "join", "room": "gap", "since": {"epoch": epoch, "offset": 20}}))
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), (21..=30).collect::<Vec<_>>());
    // Another epoch.
    let joined = c
        .request(
            json!({"type": "join", "room": "gap", "since": {"epoch": epoch + 1, "offset": 25}}),
        )
        .await;
    assert_eq!(joined["recovered"], false);
    assert_eq!(offsets(&joined["history"]), vec![27, 28, 29, 30]);
    // Retention holds in history paging too.
    let page = c
        .request(json!({"type": "history", "room": "gap", "limit": 200}))
        .await;
    assert_eq!(offsets(&page["messages"]), (21..=30).collect::<Vec<_>>());
}

#[tokio::test]
async fn messages_older_than_the_ttl_are_pruned() {
    let app = TestApp::spawn_with(&[("ROOMHUB_HISTORY__TTL_SECS", "1")]).await;
    publish_n(&app, "ttl", 3).await;
    let (_, page) = app.get_json("/api/rooms/ttl/messages").await;
    assert_eq!(offsets(&page["messages"]), vec![1, 2, 3]);
    // Pruning runs in the background: poll until it has, within a bound.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, page) = app.get_json("/api/rooms/ttl/messages").await;
        if page["messages"] == Value::Array(vec![]) {
            break;
        }
        assert!(Instant::now() < deadline, "not pruned: {page}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // New messages keep their offsets after the pruned ones.
    let resp = app
        .post("/api/rooms/ttl/messages", json!({"data": 1}))
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["offset"], 4);
}

/// A room that starts after its messages expired (here: after a restart)
/// never serves them, not even to its first reader.
#[tokio::test]
async fn a_room_loaded_after_its_messages_expired_never_serves_them() {
    let mut app = TestApp::spawn_with(&[("ROOMHUB_HISTORY__TTL_SECS", "1")]).await;
    publish_n(&app, "reloaded", 3).await;
    let published = Instant::now();
    assert!(app.terminate().success());
    // The TTL is the subject: its second has to pass.
    tokio::time::sleep_until((published + Duration::from_millis(1200)).into()).await;
    app.restart();
    let (_, page) = app.get_json("/api/rooms/reloaded/messages").await;
    assert_eq!(page["messages"], json!([]));
    let mut c = app.connect("user=alice").await;
    assert_eq!(c.join("reloaded").await["history"], json!([]));
    let resp = app
        .post("/api/rooms/reloaded/messages", json!({"data": 1}))
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap()["offset"], 4);
}

/// Rooms nobody uses stop; the TTL sweep starts them again once their
/// messages expire so the messages leave the disk, not only the view.
#[tokio::test]
async fn expired_history_of_rooms_not_running_leaves_the_disk() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_HISTORY__TTL_SECS", "3"),
        ("ROOMHUB_ROOMS__IDLE_TIMEOUT_MS", "100"),
    ])
    .await;
    publish_n(&app, "forgotten", 3).await;
    publish_n(&app, "forgotten-too", 2).await;
    // The rooms stop (empty and idle) long before their messages expire, and
    // the sweep starts them again to prune.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let swept = app.metric("roomhub_rooms_swept_total").await;
        let expired = app.metric("roomhub_messages_expired_total").await;
        if swept >= 2 && expired == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "swept {swept} rooms, expired {expired} messages"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let data_dir = app.data_dir();
    assert!(app.terminate().success());
    let store = roomhub::storage::SledStore::open(
        &data_dir,
        roomhub::config::Durability::Sync,
        Duration::ZERO,
    )
    .expect("open the store");
    for (room, last) in [("forgotten", 3), ("forgotten-too", 2)] {
        let room = roomhub::protocol::RoomName::parse(room).unwrap();
        let snap = roomhub::storage::HistoryStore::load_room(&store, &room, 100).unwrap();
        assert!(snap.tail.is_empty(), "{room}: {:?}", snap.tail);
        assert_eq!((snap.first_offset, snap.last_offset), (last + 1, last));
    }
}

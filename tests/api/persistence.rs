//! Durability: restarts, kill -9, the drain, store-format upgrades.

use crate::helpers::*;
use roomhub::storage::keys::Header;
use serde_json::json;

#[tokio::test]
async fn history_and_epoch_survive_a_restart() {
    let mut app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    let epoch = c.join("keep").await["epoch"].clone();
    for i in 0..10 {
        c.publish("keep", json!(i)).await;
    }
    let dedup = c
        .request(json!({"type": "publish", "room": "keep", "data": "k", "key": "once"}))
        .await;
    assert_eq!(dedup["offset"], 11);
    drop(c);
    assert!(app.terminate().success());
    app.restart();
    let mut c = app.connect("user=alice").await;
    let joined = c
        .request(json!({"type": "join", "room": "keep", "since": {"epoch": epoch, "offset": 4}}))
        .await;
    assert_eq!(joined["epoch"], epoch, "the epoch is kept across restarts");
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), (5..=11).collect::<Vec<_>>());
    // The idempotency key is remembered across the restart.
    let retry = c
        .request(json!({"type": "publish", "room": "keep", "data": "k", "key": "once"}))
        .await;
    assert_eq!(retry["offset"], 11);
    assert_eq!(
        c.publish("keep", json!("next")).await,
        12,
        "offsets continue"
    );
}

#[tokio::test]
async fn kill_9_right_after_acks_loses_no_acked_message() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_STORAGE__DURABILITY", "sync"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    c.join("durable").await;
    const N: u64 = 300;
    for i in 0..N {
        c.send(json!({"type": "publish", "room": "durable", "data": i, "ref": format!("{i}")}))
            .await;
    }
    let mut acked = 0;
    while acked < N {
        if c.next().await["type"] == "ack" {
            acked += 1;
        }
    }
    app.kill9();
    app.restart();
    let (status, page) = app
        .get_json("/api/rooms/durable/messages?since=0&limit=200")
        .await;
    assert_eq!(status, 200);
    assert_eq!(offsets(&page["messages"]), (1..=200).collect::<Vec<_>>());
    let (_, page) = app
        .get_json("/api/rooms/durable/messages?since=200&limit=200")
        .await;
    assert_eq!(offsets(&page["messages"]), (201..=N).collect::<Vec<_>>());
}

/// The room headers on disk, by room (read with the hub stopped).
fn stored_headers(data: &std::path::Path) -> std::collections::HashMap<String, Header> {
    use roomhub::storage::keys;
    let db = sled::open(data).unwrap();
    let log = db.open_tree(keys::LOG_TREE).unwrap();
    log.scan_prefix(keys::ROOM_HEADER_PREFIX)
        .map(|entry| {
            let (key, value) = entry.unwrap();
            let room = keys::room_of_header(&key).unwrap();
            let header = Header::decode(&value).unwrap();
            (String::from_utf8(room.to_vec()).unwrap(), header)
        })
        .collect()
}

/// Format v5 writes a room's header only every few appends
/// (src/storage/headers.rs). After kill -9 the headers on disk trail the
/// rooms' rings, and the restart still finds every acked offset, keeps every
/// epoch (`sync`) and goes on after the last offset; a clean stop leaves
/// every header exact.
#[tokio::test]
async fn headers_behind_the_rings_after_kill_9_lose_no_offset() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_STORAGE__DURABILITY", "sync"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    // Around the lag limit of a 1 000-slot ring (64), and past it.
    let counts = [1u64, 5, 63, 64, 65, 130];
    let room = |i: usize| format!("lag-{i}");
    let mut c = app.connect("user=alice").await;
    let mut epochs = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        epochs.push(c.join(&room(i)).await["epoch"].as_u64().unwrap());
        // One at a time: each publish is a write group of its own.
        for k in 0..n {
            c.publish(&room(i), json!(k)).await;
        }
    }
    drop(c);
    app.kill9();
    let on_disk = stored_headers(&app.data_dir());
    let behind: Vec<_> = counts
        .iter()
        .enumerate()
        .filter(|&(i, &n)| on_disk[&room(i)].last < n)
        .map(|(i, _)| room(i))
        .collect();
    assert!(
        behind.len() >= 3,
        "headers trail their rings after kill -9: {behind:?} ({on_disk:?})"
    );

    app.restart();
    let mut c = app.connect("user=alice").await;
    for (i, &n) in counts.iter().enumerate() {
        let joined = c
            .request(json!({"type": "join", "room": room(i), "since": {"epoch": epochs[i], "offset": 0}}))
            .await;
        assert_eq!(joined["epoch"], epochs[i], "a sync run keeps its epochs");
        assert_eq!(joined["recovered"], true);
        assert_eq!(
            offsets(&joined["history"]),
            (1..=n).collect::<Vec<_>>(),
            "{}",
            room(i)
        );
        assert_eq!(c.publish(&room(i), json!("next")).await, n + 1);
    }
    drop(c);
    assert!(app.terminate().success());
    let on_disk = stored_headers(&app.data_dir());
    for (i, &n) in counts.iter().enumerate() {
        assert_eq!(
            on_disk[&room(i)].last,
            n + 1,
            "a clean stop writes every header"
        );
    }
}

#[tokio::test]
async fn sigterm_drains_sessions_then_exits_0() {
    let mut app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("drain").await;
    unsafe { libc::kill(app_pid(&app), libc::SIGTERM) };
    assert_eq!(
        c.next().await,
        json!({"type": "shutdown", "reason": "draining", "reconnect": true})
    );
    assert_eq!(c.closed().await, 1001);
    assert!(app.wait_exit().success());
}

fn app_pid(app: &TestApp) -> i32 {
    app.pid() as i32
}

#[tokio::test]
async fn a_version_1_store_is_upgraded_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        // Written exactly as format v1 laid it out (migrations/v1_initial.md).
        let db = sled::open(&data).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", &1u32.to_be_bytes()[..])
            .unwrap();
        let epoch: u64 = 4242;
        let mut header = epoch.to_be_bytes().to_vec();
        header.extend_from_slice(&3u64.to_be_bytes());
        db.open_tree("rooms")
            .unwrap()
            .insert("old-room", header)
            .unwrap();
        let room = db.open_tree("room/old-room").unwrap();
        for offset in 1..=3u64 {
            let json = json!({"type": "message", "room": "old-room", "offset": offset, "id": format!("m{offset}"),
                              "user": "alice", "data": {"n": offset}, "ts": 1_700_000_000_000u64 + offset});
            room.insert(offset.to_be_bytes(), json.to_string().as_bytes())
                .unwrap();
        }
        db.flush().unwrap();
    }
    let data_dir = data.to_str().unwrap();
    let app = TestApp::spawn_with(&[("ROOMHUB_STORAGE__DATA_DIR", data_dir)]).await;
    let mut c = app.connect("user=bob").await;
    let joined = c
        .request(json!({"type": "join", "room": "old-room", "since": {"epoch": 4242, "offset": 1}}))
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(joined["epoch"], 4242);
    assert_eq!(offsets(&joined["history"]), vec![2, 3]);
    assert_eq!(joined["history"][0]["data"], json!({"n": 2}));
    assert_eq!(c.publish("old-room", json!("new")).await, 4);
    assert!(app
        .log
        .lock()
        .unwrap()
        .contains("upgraded the store format"));
    drop(c);
    drop(app);
    let db = sled::open(&data).unwrap();
    let version = db
        .open_tree("meta")
        .unwrap()
        .get("format_version")
        .unwrap()
        .unwrap();
    assert_eq!(
        version.as_ref(),
        &roomhub::storage::migrate::CURRENT_VERSION.to_be_bytes()
    );
    assert!(
        !db.tree_names()
            .iter()
            .any(|n| n.as_ref() == b"room/old-room"),
        "v1 trees are gone"
    );
}

#[tokio::test]
async fn a_store_from_a_newer_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let db = sled::open(&data).unwrap();
        db.open_tree("meta")
            .unwrap()
            .insert("format_version", &99u32.to_be_bytes()[..])
            .unwrap();
        db.flush().unwrap();
    }
    let out = std::process::Command::new(bin())
        .current_dir(dir.path())
        .env("ROOMHUB_SERVER__BIND", "127.0.0.1:0")
        .env("ROOMHUB_STORAGE__DATA_DIR", &data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("format version 99"), "{stderr}");
}

/// A changed `history.max_per_room` takes effect on the stored log: fewer
/// keep the newest that fit, more keep what there is and grow; offsets and
/// the epoch stay.
#[tokio::test]
async fn changing_max_per_room_relays_the_log() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_HISTORY__MAX_PER_ROOM", "100"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    let epoch = c.join("resize").await["epoch"].clone();
    for i in 1..=50 {
        c.publish("resize", json!(i)).await;
    }
    drop(c);
    assert!(app.terminate().success());
    app.set_env("ROOMHUB_HISTORY__MAX_PER_ROOM", "20");
    app.restart();
    let mut c = app.connect("user=alice").await;
    let joined = c
        .request(json!({"type": "join", "room": "resize", "since": {"epoch": epoch, "offset": 40}, "history": 200}))
        .await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), (41..=50).collect::<Vec<_>>());
    let page = c
        .request(json!({"type": "history", "room": "resize", "limit": 200}))
        .await;
    assert_eq!(offsets(&page["messages"]), (31..=50).collect::<Vec<_>>());
    assert_eq!(c.publish("resize", json!("next")).await, 51);
    drop(c);
    assert!(app.terminate().success());
    app.set_env("ROOMHUB_HISTORY__MAX_PER_ROOM", "1000");
    app.restart();
    let mut c = app.connect("user=alice").await;
    c.join("resize").await;
    for i in 52..=60 {
        assert_eq!(c.publish("resize", json!(i)).await, i);
    }
    let page = c
        .request(json!({"type": "history", "room": "resize", "limit": 200}))
        .await;
    assert_eq!(offsets(&page["messages"]), (32..=60).collect::<Vec<_>>());
    assert_eq!(page["messages"].as_array().unwrap().len(), 29);
    let (_, http) = app
        .get_json("/api/rooms/resize/messages?since=0&limit=200")
        .await;
    assert_eq!(http["epoch"], epoch);
}

/// A header may trail its full ring by a few appends (format v5); when the
/// slot just past it cannot be read, the walk to the exact header stops
/// there. The load reports the damage and hands none of the offsets past
/// it out again (the room moves to a new epoch).
#[test]
fn an_unreadable_slot_past_a_trailing_header_is_damage_not_a_reused_offset() {
    use roomhub::config::Durability;
    use roomhub::protocol::RoomName;
    use roomhub::storage::{keys, HistoryStore, SledStore};
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    let room = RoomName::parse("trailing").unwrap();
    let store = SledStore::open(dir.path(), Durability::Sync, Duration::ZERO).unwrap();
    // A full ring of 16, then three more appends.
    let ops = (1..=19)
        .map(|o| roomhub::storage::WriteOp::Append {
            message: crate::store::message(&room, o, 1000 + o),
            key: None,
        })
        .collect();
    crate::store::write_ring(&store, &room, 5, 16, ops);
    store.close().unwrap();
    drop(store);
    // What a kill -9 can leave: the header at 16 (it trails by 3), and
    // here the slot of 17 damaged.
    {
        let db = sled::open(dir.path()).unwrap();
        let log = db.open_tree(keys::LOG_TREE).unwrap();
        let key = keys::room_meta_key(b"trailing");
        let mut header = Header::decode(&log.get(&key).unwrap().unwrap()).unwrap();
        assert_eq!(header.last, 19);
        (header.first, header.last) = (1, 16);
        log.insert(&key, header.encode().to_vec()).unwrap();
        log.insert(keys::slot_key(b"trailing", 17, 16), b"not json".as_slice())
            .unwrap();
        db.flush().unwrap();
    }
    let store = SledStore::open(dir.path(), Durability::Sync, Duration::ZERO).unwrap();
    let snap = store.load_room(&room, 3).unwrap();
    assert!(snap.damage.is_some(), "the damage is reported");
    assert!(
        snap.last_offset >= 19,
        "no acked offset is handed out again: {}",
        snap.last_offset
    );
}

/// A write that only prunes acks nothing, so it keeps the run of the log's
/// messages: a room the TTL sweep pruned does not move to a new epoch when
/// the `batched` run that pruned it stops uncleanly (a room that took a
/// publish in that run does).
#[tokio::test]
async fn a_ttl_prune_in_a_batched_run_that_crashes_keeps_the_epoch() {
    let mut app = TestApp::spawn_with(&[("ROOMHUB_STORAGE__DURABILITY", "batched")]).await;
    let mut c = app.connect("user=alice").await;
    let epoch = c.join("pruned").await["epoch"].as_u64().unwrap();
    for i in 0..3 {
        c.publish("pruned", json!(i)).await;
    }
    drop(c);
    assert!(app.terminate().success());

    app.set_env("ROOMHUB_HISTORY__TTL_SECS", "1");
    app.set_env("ROOMHUB_ROOMS__IDLE_TIMEOUT_MS", "100");
    app.restart();
    let mut c = app.connect("user=bob").await;
    let other_epoch = c.join("written").await["epoch"].as_u64().unwrap();
    c.publish("written", json!("acked, maybe not flushed"))
        .await;
    drop(c);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while app.metric("roomhub_messages_expired_total").await < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the sweep pruned nothing"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Both rooms stop once idle (a second's maintenance tick at least after
    // the prune was queued): by then the writer has applied it and sled's
    // flusher (every 10 ms with `batched`) has written it out.
    while app.metric("roomhub_rooms").await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rooms never stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let data = app.data_dir();
    app.kill9();
    let header = stored_headers(&data)["pruned"];
    assert_eq!(header.first, 4, "the prune reached the disk");

    app.restart();
    let (_, page) = app.get_json("/api/rooms/pruned/messages").await;
    assert_eq!(page["epoch"], epoch, "pruning acked nothing: same epoch");
    assert_eq!(page["messages"], json!([]));
    let (_, page) = app.get_json("/api/rooms/written/messages").await;
    assert_ne!(
        page["epoch"], other_epoch,
        "a room with a publish in the crashed batched run moves on"
    );
}

/// Changing `history.max_per_room` re-lays a room's ring as it loads, just
/// before it looks for expired messages: young messages stay.
#[tokio::test]
async fn a_ring_relaid_at_load_with_a_ttl_keeps_young_messages() {
    let mut app = TestApp::spawn_with(&[("ROOMHUB_HISTORY__MAX_PER_ROOM", "20")]).await;
    let mut c = app.connect("user=alice").await;
    c.join("relaid").await;
    for i in 0..15 {
        c.publish("relaid", json!(i)).await;
    }
    drop(c);
    assert!(app.terminate().success());
    app.set_env("ROOMHUB_HISTORY__MAX_PER_ROOM", "10");
    app.set_env("ROOMHUB_HISTORY__TTL_SECS", "3600");
    app.restart();
    let (_, page) = app.get_json("/api/rooms/relaid/messages?limit=100").await;
    assert_eq!(offsets(&page["messages"]), (6..=15).collect::<Vec<_>>());
}

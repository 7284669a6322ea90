//! Poisoned history: `data` that is well-formed JSON but that no ordinary
//! reader can parse back (too deep, a number beyond f64, a lone surrogate).
//! Publishes of it are refused; what is already in a store (written before
//! the check, or damaged) is served by every read path without a panic.

use crate::helpers::*;
use roomhub::config::Durability;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{Message, RoomName, UserId};
use roomhub::storage::{keys, HistoryStore, SledStore, WriteOp};
use serde_json::value::RawValue;
use std::time::Duration;

/// Each poison as raw JSON text, and a piece of it to find in a reply.
fn poisons() -> Vec<(String, &'static str)> {
    vec![
        (
            format!("{}0{}", "[".repeat(130), "]".repeat(130)),
            "[[[[[[[[[[[[[[[[0]]]",
        ),
        ("1e999999".to_owned(), "1e999999"),
        (r#""\ud800""#.to_owned(), r#""\ud800""#),
    ]
}

#[tokio::test]
async fn publishing_data_no_reader_can_parse_is_refused() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("clean").await;
    for (i, (data, _)) in poisons().into_iter().enumerate() {
        let reference = format!("p{i}");
        let frame =
            format!(r#"{{"type":"publish","room":"clean","data":{data},"ref":"{reference}"}}"#);
        let reply: serde_json::Value =
            serde_json::from_str(&c.request_text(&frame, &reference).await).unwrap();
        assert_eq!(
            (reply["type"].as_str(), reply["code"].as_str()),
            (Some("error"), Some("bad_request")),
            "{data:.40}: {reply}"
        );
        let resp = app
            .http()
            .post(app.url("/api/rooms/clean/messages"))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(format!(r#"{{"data":{data}}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "{data:.40}");
        let direct = format!(r#"{{"type":"direct","to":"bob","data":{data},"ref":"d{i}"}}"#);
        let reply = c.request_text(&direct, &format!("d{i}")).await;
        assert!(reply.contains("bad_request"), "{reply}");
    }
    // Nothing was stored: the history reads back.
    let (status, page) = app.get_json("/api/rooms/clean/messages").await;
    assert_eq!(
        (status, page["messages"].clone()),
        (200, serde_json::json!([]))
    );
}

/// Writes `messages` (raw `data`) after the room's last offset, as an older
/// hub could have; returns the room's epoch.
fn store_behind_the_hubs_back(dir: &std::path::Path, room: &str, datas: &[String]) -> u64 {
    let store = SledStore::open(dir, Durability::Sync, Duration::ZERO).expect("open the store");
    let room = RoomName::parse(room).unwrap();
    let snapshot = store.load_room(&room, 0).unwrap();
    let epoch = snapshot.epoch.expect("the room has a log");
    let user = UserId::parse("mallory").unwrap();
    let ops = datas
        .iter()
        .enumerate()
        .map(|(i, data)| {
            let data = RawValue::from_string(data.clone()).expect("raw JSON accepts it");
            let offset = snapshot.last_offset + 1 + i as u64;
            let message = Message {
                kind: MessageTag,
                room: &room,
                offset,
                id: "poison",
                user: &user,
                data: &data,
                ts: 1_700_000_000_000,
            };
            WriteOp::Append {
                message: message.encode(),
                key: None,
            }
        })
        .collect();
    crate::store::write(&store, &room, epoch, ops);
    store.close().expect("close the store");
    epoch
}

/// Overwrites one stored message with bytes that are not even JSON.
fn damage(dir: &std::path::Path, room: &str, offset: u64) {
    let db = sled::open(dir).expect("open sled");
    let log = db.open_tree(keys::LOG_TREE).unwrap();
    // The hub's default `history.max_per_room`: the ring the store laid out.
    let key = keys::slot_key(room.as_bytes(), offset, 1000);
    assert!(log.get(&key).unwrap().is_some(), "offset {offset} exists");
    log.insert(key, &b"\xff{not json"[..]).unwrap();
    db.flush().unwrap();
}

/// Every read path over what `store` leaves in the room's log, after one
/// message published normally ("first"): each of `expected` is served, and
/// none of `absent`.
async fn read_everywhere(
    store: impl FnOnce(&std::path::Path) -> u64,
    expected: &[&str],
    absent: &[&str],
) {
    let mut app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("poison").await;
    assert_eq!(c.publish("poison", serde_json::json!("first")).await, 1);
    c.close().await;
    assert!(app.terminate().success());
    let epoch = store(&app.data_dir());
    app.restart();

    let served = |what: &str, text: &str| {
        for needle in expected.iter().chain(&[r#""first""#]) {
            assert!(
                text.contains(needle),
                "{what}: {needle} missing in {text:.300}"
            );
        }
        for needle in absent {
            assert!(!text.contains(needle), "{what}: {needle} in {text:.300}");
        }
    };

    // HTTP history, paging back and forward.
    for query in ["", "?since=0", "?before=6&limit=200"] {
        let resp = app
            .http()
            .get(app.url(&format!("/api/rooms/poison/messages{query}")))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("an answer, not a dropped connection");
        assert_eq!(resp.status(), 200, "{query}");
        served(&format!("HTTP {query}"), &resp.text().await.unwrap());
    }

    let mut c = app.connect("user=bob").await;
    // `join` (its history), `history`, and a resume with `since`.
    let joined = c
        .request_text(r#"{"type":"join","room":"poison","ref":"j"}"#, "j")
        .await;
    served("join", &joined);
    let history = c
        .request_text(r#"{"type":"history","room":"poison","ref":"h"}"#, "h")
        .await;
    served("history", &history);
    let resume = format!(
        r#"{{"type":"join","room":"poison","since":{{"epoch":{epoch},"offset":0}},"ref":"s"}}"#
    );
    let resumed = c.request_text(&resume, "s").await;
    served("resume", &resumed);
    // The room still works.
    let next = c.publish("poison", serde_json::json!("after")).await;
    assert!(next > 1, "{next}");
}

/// Data stored before publishes were checked is served byte for byte (the
/// HTTP history used to panic on it and drop the connection, every time).
#[tokio::test]
async fn every_read_path_serves_poisoned_data_already_stored() {
    let poisons = poisons();
    let datas: Vec<String> = poisons.iter().map(|(d, _)| d.clone()).collect();
    let needles: Vec<&str> = poisons.iter().map(|(_, n)| *n).collect();
    read_everywhere(
        |dir| store_behind_the_hubs_back(dir, "poison", &datas),
        &needles,
        &[],
    )
    .await;
}

/// A stored message that is not even JSON any more (a damaged store) is
/// skipped with a warning; the rest of the room's history is served.
#[tokio::test]
async fn every_read_path_skips_a_damaged_stored_message() {
    let datas = [r#""second""#.to_owned(), r#""third""#.to_owned()];
    read_everywhere(
        |dir| {
            let epoch = store_behind_the_hubs_back(dir, "poison", &datas);
            damage(dir, "poison", 2);
            epoch
        },
        &[r#""third""#],
        &[r#""second""#, "not json"],
    )
    .await;
}

/// A damaged message in the middle of a room's log moves the room to a new
/// epoch once: the room removes it, keeps the readable messages around it,
/// and the next start finds the log consistent (same epoch, same messages).
#[tokio::test]
async fn a_damaged_message_is_mended_once_and_its_neighbours_kept() {
    let mut app = TestApp::spawn().await;
    for i in 1..=5 {
        let resp = app
            .post("/api/rooms/mended/messages", serde_json::json!({"data": i}))
            .await;
        assert_eq!(resp.status(), 201);
    }
    let (_, page) = app.get_json("/api/rooms/mended/messages").await;
    let first_epoch = page["epoch"].clone();
    assert!(app.terminate().success());
    damage(&app.data_dir(), "mended", 3);
    app.restart();
    let (_, page) = app.get_json("/api/rooms/mended/messages").await;
    let mended_epoch = page["epoch"].clone();
    assert_ne!(mended_epoch, first_epoch, "damage moves the room on");
    assert_eq!(offsets(&page["messages"]), vec![1, 2, 4, 5]);
    assert!(app.terminate().success());
    app.restart();
    let (_, page) = app.get_json("/api/rooms/mended/messages").await;
    assert_eq!(
        page["epoch"], mended_epoch,
        "mended once, not at every start"
    );
    assert_eq!(offsets(&page["messages"]), vec![1, 2, 4, 5]);
}

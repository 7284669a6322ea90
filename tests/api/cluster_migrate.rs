//! A cluster that ran the stream-per-room layout (a JetStream stream per
//! room, its sequences the offsets, its creation time the epoch) moves to
//! the partition streams when its nodes start: history, offsets, epochs,
//! ids and idempotency keys are kept, and the old streams go.

use crate::nats::{spawn_node, NatsServer};
use async_nats::jetstream::{self, stream};
use futures_util::TryStreamExt;
use roomhub::cluster::Subjects;
use roomhub::protocol::RoomName;
use serde_json::json;

/// Writes `room`'s log as roomhub did before partitions; returns its epoch.
async fn old_layout_room(js: &jetstream::Context, room: &str, messages: u64) -> u64 {
    let subjects = Subjects::new("roomhub", 8);
    let name = RoomName::parse(room).unwrap();
    let stream = js
        .create_stream(stream::Config {
            name: subjects.legacy_stream(&name),
            description: Some(format!("roomhub room {room}")),
            subjects: vec![subjects.legacy_subject(&name)],
            max_messages: 1000,
            ..Default::default()
        })
        .await
        .expect("create the old room stream");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for n in 1..=messages {
        let record =
            json!({"id": format!("{room}-id-{n}"), "user": "old", "data": {"n": n}, "ts": now});
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            format!("key-{n}").as_str(),
        );
        js.publish_with_headers(
            subjects.legacy_subject(&name),
            headers,
            record.to_string().into(),
        )
        .await
        .unwrap()
        .await
        .expect("stored");
    }
    (stream.cached_info().created.unix_timestamp_nanos() / 1_000_000) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_per_room_cluster_moves_to_partitions_keeping_offsets_and_epochs() {
    let nats = NatsServer::start();
    let client = async_nats::connect(nats.url()).await.expect("connect");
    let js = jetstream::new(client);
    let epochs = [
        old_layout_room(&js, "old-a", 5).await,
        old_layout_room(&js, "old-b", 40).await,
    ];
    // Two nodes start at once: both move rooms, neither duplicates.
    let (a, b) = tokio::join!(spawn_node(&nats, None, &[]), spawn_node(&nats, None, &[]));
    for (room, epoch, count) in [("old-a", epochs[0], 5u64), ("old-b", epochs[1], 40)] {
        for node in [&a, &b] {
            let mut reader = node.connect("user=reader").await;
            let joined = reader
                .request(
                    json!({"type": "join", "room": room, "since": {"epoch": epoch, "offset": 2}}),
                )
                .await;
            assert_eq!(joined["type"], "joined", "{joined}");
            assert_eq!(joined["recovered"], true, "{joined}");
            assert_eq!(joined["epoch"], epoch, "{joined}");
            let history = joined["history"].as_array().unwrap();
            let got: Vec<(u64, String)> = history
                .iter()
                .map(|m| {
                    (
                        m["offset"].as_u64().unwrap(),
                        m["id"].as_str().unwrap().to_owned(),
                    )
                })
                .collect();
            let want: Vec<(u64, String)> =
                (3..=count).map(|n| (n, format!("{room}-id-{n}"))).collect();
            assert_eq!(got, want, "{room} on a node");
        }
    }
    // Publishing continues the old offsets, and an old key is still known.
    let mut writer = b.connect("user=writer").await;
    writer.join("old-a").await;
    assert_eq!(writer.publish("old-a", json!("new")).await, 6);
    let repeat = writer
        .request(json!({"type": "publish", "room": "old-a", "data": "again", "key": "key-2"}))
        .await;
    assert_eq!(
        (repeat["type"].as_str(), repeat["offset"].as_u64()),
        (Some("ack"), Some(2)),
        "{repeat}"
    );
    // The old streams are gone; only the partitions remain.
    let names: Vec<String> = js.stream_names().try_collect().await.unwrap();
    assert!(
        !names.iter().any(|n| n.starts_with("roomhub_room_")),
        "{names:?}"
    );
    assert_eq!(names.len(), 8, "{names:?}");
}

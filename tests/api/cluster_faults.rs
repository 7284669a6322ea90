//! Cluster mode under NATS faults (real nats-server, real hub processes).
//! Every wait is bounded.

use crate::helpers::{TestApp, WAIT};
use crate::nats::{spawn_node, wait_ready, NatsServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// POSTs a message to `room` on `node`, answered within `WAIT`.
async fn post(node: &TestApp, room: &str, body: Value) -> (u16, Value) {
    let resp = tokio::time::timeout(
        WAIT,
        node.post(&format!("/api/rooms/{room}/messages"), body),
    )
    .await
    .expect("the publish was answered within the bound");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_room_used_on_three_nodes_at_once_takes_every_publish() {
    let nats = NatsServer::start();
    let nodes = [
        spawn_node(&nats, None, &[]).await,
        spawn_node(&nats, None, &[]).await,
        spawn_node(&nats, None, &[]).await,
    ];
    // Every room new, all at once on every node: stream creations race
    // each other, as under load.
    const ROOMS: usize = 200;
    let publishes = (0..ROOMS).flat_map(|round| {
        nodes.iter().enumerate().map(move |(n, node)| async move {
            let room = format!("race-{round}");
            let (status, body) = post(node, &room, json!({"data": {"node": n}})).await;
            (room, status, body)
        })
    });
    for (room, status, body) in futures_util::future::join_all(publishes).await {
        assert_eq!(status, 201, "{room}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_nats_makes_the_node_unready_until_it_runs_again() {
    let nats = NatsServer::start();
    let node = spawn_node(&nats, None, &[]).await;
    let (status, body) = post(&node, "stall", json!({"data": "before"})).await;
    assert_eq!(status, 201, "{body}");
    nats.pause();
    wait_ready(&node, false).await;
    // Refused before reaching NATS: truly not committed.
    let (status, body) = post(&node, "stall", json!({"data": "during"})).await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or("")
            .contains("not committed"),
        "{body}"
    );
    nats.resume();
    wait_ready(&node, true).await;
    let (status, body) = post(&node, "stall", json!({"data": "after"})).await;
    assert_eq!(status, 201, "{body}");
}

/// POSTs `body` to `room` until it is committed (the node may still be
/// healing from a fault), within `WAIT`; returns the offset.
async fn post_until_committed(node: &TestApp, room: &str, body: Value) -> u64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, answer) = post(node, room, body.clone()).await;
        if status == 201 {
            return answer["offset"].as_u64().expect("offset");
        }
        assert!(Instant::now() < deadline, "{room}: not committed: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publish_without_an_answer_is_unknown_and_a_keyed_retry_does_not_duplicate() {
    let nats = NatsServer::start();
    let node = spawn_node(&nats, None, &[]).await;
    let mut ann = node.connect("user=ann").await;
    ann.join("unknown").await;
    ann.publish("unknown", json!("before")).await;
    nats.pause();
    // Sent at once, before the node can tell that NATS stalled: it reaches
    // NATS's socket, but no ack comes back.
    let publish = json!({"type": "publish", "room": "unknown", "key": "k1", "data": "stalled"});
    let answer = tokio::time::timeout(WAIT, ann.request(publish.clone()))
        .await
        .expect("the publish was answered within the bound");
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "unavailable", "{answer}");
    let text = answer["message"].as_str().unwrap_or("");
    assert!(
        text.contains("outcome is unknown") && text.contains("same key"),
        "{answer}"
    );
    nats.resume();
    wait_ready(&node, true).await;
    // The retry with the same key (over HTTP: the idle WebSocket may have
    // been dropped for missed pings meanwhile) gets the one message's offset.
    let retried =
        post_until_committed(&node, "unknown", json!({"key": "k1", "data": "stalled"})).await;
    let (status, page) = node.get_json("/api/rooms/unknown/messages?limit=100").await;
    assert_eq!(status, 200);
    let stalled: Vec<u64> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["data"] == "stalled")
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(stalled, vec![retried], "{page}");
}

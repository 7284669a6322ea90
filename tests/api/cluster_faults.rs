//! Cluster mode under NATS faults (real nats-server, real hub processes).
//! Every wait is bounded.

use crate::helpers::{TestApp, WAIT};
use crate::nats::{spawn_node, wait_ready, NatsServer};
use serde_json::{json, Value};

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

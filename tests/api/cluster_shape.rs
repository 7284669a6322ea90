//! The cluster's cost follows the rooms being served, not the rooms that
//! ever existed: a fixed set of partition streams, no JetStream consumer,
//! and a node hears a room's traffic only while it serves that room.

use crate::nats::{spawn_node, NatsServer};
use async_nats::jetstream;
use futures_util::TryStreamExt;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rooms_cost_nats_no_stream_or_consumer_and_idle_nodes_hear_nothing() {
    const ROOMS: usize = 300;
    let nats = NatsServer::start();
    let idle_fast = [("ROOMHUB_ROOMS__IDLE_TIMEOUT_MS", "500")];
    let a = spawn_node(&nats, None, &idle_fast).await;
    let b = spawn_node(&nats, None, &idle_fast).await;
    for i in 0..ROOMS {
        let resp = a
            .post(
                &format!("/api/rooms/shape-{i}/messages"),
                json!({"data": i}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }
    let js = jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let infos: Vec<_> = js.streams().try_collect().await.unwrap();
    let consumers: usize = infos.iter().map(|i| i.state.consumer_count).sum();
    assert_eq!(infos.len(), 8, "one stream per partition, none per room");
    assert_eq!(consumers, 0, "no JetStream consumer at all");
    let subjects: u64 = infos.iter().map(|i| i.state.subjects_count).sum();
    assert_eq!(subjects, ROOMS as u64, "one subject per room");
    // Node b serves none of these rooms: it heard and read nothing of them.
    assert_eq!(b.metric("roomhub_cluster_live_records_total").await, 0);
    assert_eq!(b.metric("roomhub_cluster_read_records_total").await, 0);
    // Once b serves a room it hears that room's records, live.
    let mut bob = b.connect("user=bob").await;
    let joined = bob.join("shape-7").await;
    assert_eq!(joined["history"][0]["data"], 7, "{joined}");
    let resp = a
        .post("/api/rooms/shape-7/messages", json!({"data": "live"}))
        .await;
    assert_eq!(resp.status(), 201);
    let live = bob.next_of("message").await;
    assert_eq!(live["data"], "live");
    assert_eq!(b.metric("roomhub_cluster_live_records_total").await, 1);
}

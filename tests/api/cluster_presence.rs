//! Cluster presence: rooms announce presence changes, nodes their liveness
//! (one heartbeat per node, not per room). Real hub processes on a real
//! nats-server; every wait is bounded.

use crate::helpers::{free_port, TestClient, WAIT};
use crate::nats::{spawn_node, NatsServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// `nats-server`'s count of messages received from clients (`/varz`).
async fn in_msgs(nats: &NatsServer) -> u64 {
    let port = nats.monitor.expect("monitoring port");
    let varz: Value = reqwest::get(format!("http://127.0.0.1:{port}/varz"))
        .await
        .expect("varz")
        .json()
        .await
        .expect("varz json");
    varz["in_msgs"].as_u64().expect("in_msgs")
}

/// Reads frames until `user_left` for `user`; returns how long it took.
async fn left_within(client: &mut TestClient, user: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    let seen = tokio::time::timeout(limit, async {
        loop {
            let frame = client.next().await;
            if frame["type"] == "user_left" && frame["user"] == user {
                return;
            }
        }
    })
    .await;
    assert!(seen.is_ok(), "{user} did not leave within {limit:?}");
    start.elapsed()
}

const ROOMS_ENV: (&str, &str) = ("ROOMHUB_LIMITS__MAX_ROOMS_PER_CONNECTION", "5000");

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_presence_traffic_grows_with_nodes_not_rooms() {
    // ROOMHUB_TEST_ROOMS=1000 measures the figure.
    let rooms: usize = std::env::var("ROOMHUB_TEST_ROOMS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    let nats = NatsServer::start_with_monitor(Some(free_port()));
    let a = spawn_node(&nats, None, &[ROOMS_ENV]).await;
    let b = spawn_node(&nats, None, &[ROOMS_ENV]).await;
    let mut ann = a.connect("user=ann").await;
    let mut bob = b.connect("user=bob").await;
    for n in 0..rooms {
        ann.join(&format!("idle-{n}")).await;
        bob.join(&format!("idle-{n}")).await;
    }
    // Both keep answering pings, idle.
    tokio::spawn(async move { while ann.try_next().await.is_some() {} });
    tokio::spawn(async move { while bob.try_next().await.is_some() {} });
    // Presence and liveness subjects only (rooms also verify their log
    // every 10 s while they have members: that traffic is not presence).
    let client = async_nats::connect(nats.url()).await.expect("nats client");
    let mut presence = client.subscribe("roomhub.room.>").await.expect("sub");
    let mut nodes = client.subscribe("roomhub.nodes.>").await.expect("sub");
    client.flush().await.expect("flush");
    // The heartbeat interval is 500 ms (FAST_HEARTBEAT): a window of two
    // intervals after the joins' own presence updates went out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total_before = in_msgs(&nats).await;
    let window = Duration::from_millis(1000);
    let (mut room_msgs, mut node_msgs) = (0usize, 0usize);
    let _ = tokio::time::timeout(window, async {
        loop {
            tokio::select! {
                Some(_) = futures_util::StreamExt::next(&mut presence) => room_msgs += 1,
                Some(_) = futures_util::StreamExt::next(&mut nodes) => node_msgs += 1,
            }
        }
    })
    .await;
    let total = in_msgs(&nats).await - total_before;
    eprintln!(
        "idle presence traffic: {rooms} rooms x 2 nodes in {window:?}: {room_msgs} room presence \
         messages, {node_msgs} node heartbeats; {total} messages of any kind"
    );
    assert!(
        room_msgs + node_msgs < rooms / 4,
        "{room_msgs} + {node_msgs} presence messages in {window:?} for {rooms} idle rooms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_nodes_users_leave_within_twice_the_timeout() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let mut b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    ann.join("crash").await;
    let mut bob = b.connect("user=bob").await;
    bob.join("crash").await;
    tokio::spawn(async move { while bob.try_next().await.is_some() {} });
    assert_eq!(ann.next_of("user_joined").await["user"], "bob");
    b.kill9();
    // FAST_HEARTBEAT: timeout 1500 ms.
    let took = left_within(&mut ann, "bob", Duration::from_millis(3000)).await;
    eprintln!("a killed node's user left after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_drained_node_says_goodbye_and_its_users_leave_promptly() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    ann.join("drain").await;
    let mut bob = b.connect("user=bob").await;
    bob.join("drain").await;
    tokio::spawn(async move { while bob.try_next().await.is_some() {} });
    assert_eq!(ann.next_of("user_joined").await["user"], "bob");
    unsafe { libc::kill(b.pid() as i32, libc::SIGTERM) };
    // Well inside the 1500 ms timeout: not by expiry.
    let took = left_within(&mut ann, "bob", Duration::from_millis(1000)).await;
    eprintln!("a drained node's user left after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scope_cluster_sums_the_live_nodes() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    ann.join("shared").await;
    ann.join("only-a").await;
    let mut bob = b.connect("user=bob").await;
    bob.join("shared").await;
    assert_eq!(ann.next_of("user_joined").await["user"], "bob");
    // Until b has heard a's heartbeat (bounded).
    let deadline = Instant::now() + WAIT;
    let stats = loop {
        let (status, stats) = b.get_json("/api/stats?scope=cluster").await;
        assert_eq!(status, 200, "{stats}");
        if stats["nodes"].as_array().map(|n| n.len()) == Some(2) {
            break stats;
        }
        assert!(Instant::now() < deadline, "b never saw a: {stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(stats["scope"], "cluster");
    assert_eq!(stats["connections"], 2, "{stats}");
    assert_eq!(stats["rooms"], 2, "{stats}");
    assert_eq!(stats["users"], 3, "{stats}");
    assert_eq!(stats["sessions"], 3, "{stats}");
    let (status, rooms) = b.get_json("/api/rooms?scope=cluster").await;
    assert_eq!(status, 200);
    assert_eq!(
        rooms["rooms"],
        json!([
            {"room": "only-a", "users": 1, "sessions": 1},
            {"room": "shared", "users": 2, "sessions": 2},
        ]),
        "{rooms}"
    );
    // Without a scope (or `node`): this node's answer, as before.
    let (_, own) = b.get_json("/api/stats").await;
    let mut keys: Vec<&str> = own
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort();
    assert_eq!(keys, ["connections", "node", "rooms", "uptime_secs"]);
    assert_eq!(own["connections"], 1);
    assert_eq!(own["rooms"], 1);
    let (_, own_rooms) = b.get_json("/api/rooms").await;
    assert_eq!(
        own_rooms,
        json!({"rooms": [{"room": "shared", "users": 1, "sessions": 1}]})
    );
    let (_, node) = b.get_json("/api/rooms?scope=node").await;
    assert_eq!(node, own_rooms);
    // An unknown scope is refused.
    for path in ["/api/stats?scope=world", "/api/rooms?scope=world"] {
        let (status, body) = b.get_json(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(body.to_string().contains("scope"), "{body}");
    }
}

/// A join's presence snapshot includes what the cluster already knew: a
/// node that starts serving a room asks the others' presence first (bounded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn joined_right_after_a_join_on_another_node_lists_both() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut failures = 0;
    for n in 0..5 {
        let room = format!("fresh-{n}");
        let mut alice = a.connect("user=alice").await;
        alice.join(&room).await;
        let mut bob = b.connect("user=bob").await;
        let joined = bob.join(&room).await;
        let users: Vec<&str> = joined["presence"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| u["user"].as_str().unwrap())
            .collect();
        if users != ["alice", "bob"] {
            failures += 1;
            eprintln!("{room}: bob's joined listed {users:?}");
        }
    }
    assert_eq!(failures, 0);
    // Every room's ask was answered by every live node (the one not serving
    // it said "nobody here"): no first join waited out the 500 ms bound.
    for node in [&a, &b] {
        let metrics = node.metrics().await;
        assert!(
            metrics.contains("roomhub_cluster_presence_waits_cut_total 0"),
            "{}",
            metrics
                .lines()
                .filter(|l| l.contains("presence_waits"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

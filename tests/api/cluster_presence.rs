//! Cluster presence: rooms announce presence changes, nodes their liveness
//! (one heartbeat per node, not per room). Real hub processes on a real
//! nats-server; every wait is bounded.

use crate::helpers::{free_port, TestClient};
use crate::nats::{spawn_node, NatsServer};
use serde_json::Value;
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
    // The heartbeat interval is 500 ms (FAST_HEARTBEAT): a window of two
    // intervals after the joins' own presence updates went out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = in_msgs(&nats).await;
    let window = Duration::from_millis(1000);
    tokio::time::sleep(window).await;
    let sent = in_msgs(&nats).await - before;
    eprintln!(
        "idle presence traffic: {rooms} rooms x 2 nodes: {sent} messages in {window:?} ({} msg/s)",
        sent as f64 / window.as_secs_f64()
    );
    assert!(
        (sent as usize) < rooms / 4,
        "{sent} messages in {window:?} for {rooms} idle rooms"
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
    let mut b = spawn_node(&nats, None, &[]).await;
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

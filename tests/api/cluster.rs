//! Cluster mode: several real roomhub processes on one real nats-server
//! (JetStream), talking over loopback. Every receiver's whole sequence is
//! compared, not just counts.

use crate::helpers::{message_before_ack, offsets, TestClient, WAIT};
use crate::nats::{spawn_node, wait_ready, NatsServer};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Reads `room`'s messages until `count` have arrived; returns them in order.
async fn collect(client: &mut TestClient, room: &str, count: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = client.next().await;
        if frame["type"] == "message" && frame["room"] == room {
            got.push(frame);
        }
    }
    got
}

/// (offset, id) of each message: what must be identical on every node.
fn identity(messages: &[Value]) -> Vec<(u64, String)> {
    messages
        .iter()
        .map(|m| {
            (
                m["offset"].as_u64().unwrap(),
                m["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

async fn join_since(client: &mut TestClient, room: &str, epoch: &Value, offset: u64) -> Value {
    let joined = client
        .request(json!({"type": "join", "room": room, "since": {"epoch": epoch, "offset": offset}}))
        .await;
    assert_eq!(joined["type"], "joined", "{joined}");
    joined
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_on_three_nodes_give_one_order_everywhere() {
    let nats = NatsServer::start();
    let nodes = [
        spawn_node(&nats, None, &[]).await,
        spawn_node(&nats, None, &[]).await,
        spawn_node(&nats, None, &[]).await,
    ];
    let mut readers = Vec::new();
    let mut epochs = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut reader = node.connect(&format!("user=reader{i}")).await;
        let joined = reader.join("order").await;
        epochs.insert(joined["epoch"].to_string());
        readers.push(reader);
    }
    assert_eq!(epochs.len(), 1, "one epoch on every node: {epochs:?}");
    const EACH: usize = 60;
    let mut publishers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut publisher = node.connect(&format!("user=writer{i}")).await;
        publisher.join("order").await;
        publishers.push(publisher);
    }
    // Every publisher pipelines all its publishes at once, on its own node.
    let tasks: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(i, mut publisher)| {
            tokio::spawn(async move {
                for n in 0..EACH {
                    let frame = json!({"type": "publish", "room": "order", "ref": format!("p{n}"), "data": {"from": i, "n": n}});
                    publisher.send(frame).await;
                }
                let mut acked = Vec::new();
                while acked.len() < EACH {
                    let frame = publisher.next().await;
                    match frame["type"].as_str() {
                        Some("ack") => acked.push(frame["offset"].as_u64().unwrap()),
                        Some("error") => panic!("publish refused: {frame}"),
                        _ => {}
                    }
                }
                acked
            })
        })
        .collect();
    let mut all_acked = BTreeSet::new();
    for task in tasks {
        let acked = task.await.unwrap();
        // A node's acks come in the order of its publishes.
        assert!(acked.windows(2).all(|w| w[0] < w[1]), "{acked:?}");
        all_acked.extend(acked);
    }
    assert_eq!(all_acked.len(), 3 * EACH);
    let mut sequences = Vec::new();
    for reader in &mut readers {
        sequences.push(identity(&collect(reader, "order", 3 * EACH).await));
    }
    let first = &sequences[0];
    assert!(
        first.windows(2).all(|w| w[0].0 < w[1].0),
        "offsets increase"
    );
    assert_eq!(
        first.iter().map(|m| m.0).collect::<BTreeSet<_>>(),
        all_acked,
        "what was acked is what was delivered"
    );
    for other in &sequences[1..] {
        assert_eq!(other, first, "every node delivers the same sequence");
    }
    // History answers the same on every node.
    let mut pages = Vec::new();
    for node in &nodes {
        let (status, page) = node.get_json("/api/rooms/order/messages?limit=200").await;
        assert_eq!(status, 200);
        pages.push(identity(page["messages"].as_array().unwrap()));
    }
    assert_eq!(pages[0], *first);
    assert!(pages.iter().all(|p| p == &pages[0]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_resumes_on_another_node_and_a_restarted_node_catches_up() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let mut b = spawn_node(&nats, None, &[]).await;
    let mut alice = a.connect("user=alice").await;
    let joined = alice.join("resume").await;
    let epoch = joined["epoch"].clone();
    let mut writer = a.connect("user=writer").await;
    writer.join("resume").await;
    for n in 0..5 {
        writer.publish("resume", json!({"n": n})).await;
    }
    let seen = collect(&mut alice, "resume", 5).await;
    let last_seen = seen[4]["offset"].as_u64().unwrap();
    alice.close().await;
    // Node B goes down; more is published on A meanwhile.
    b.terminate();
    let mut missed = Vec::new();
    for n in 5..25 {
        missed.push(writer.publish("resume", json!({"n": n})).await);
    }
    b.restart();
    wait_ready(&b, true).await;
    // Alice comes back through B: exactly what she missed, recovered.
    let mut alice = b.connect("user=alice").await;
    let joined = join_since(&mut alice, "resume", &epoch, last_seen).await;
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(offsets(&joined["history"]), missed);
    // B's HTTP history is A's.
    let (_, on_a) = a.get_json("/api/rooms/resume/messages?limit=200").await;
    let (_, on_b) = b.get_json("/api/rooms/resume/messages?limit=200").await;
    assert_eq!(on_a, on_b);
    assert_eq!(on_b["messages"].as_array().unwrap().len(), 25);
    // Live traffic keeps flowing both ways.
    let mut reader = a.connect("user=reader").await;
    reader.join("resume").await;
    let offset = alice.publish("resume", json!({"n": "live"})).await;
    let got = collect(&mut reader, "resume", 1).await;
    assert_eq!(got[0]["offset"], offset);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_key_is_one_message_cluster_wide() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut on_a = a.connect("user=ann").await;
    let mut on_b = b.connect("user=bob").await;
    let mut reader = b.connect("user=reader").await;
    on_a.join("keys").await;
    on_b.join("keys").await;
    reader.join("keys").await;
    let publish =
        |key: &str| json!({"type": "publish", "room": "keys", "key": key, "data": {"k": key}});
    let first = on_a.request(publish("k1")).await;
    let again = on_b.request(publish("k1")).await;
    assert_eq!(first["type"], "ack");
    assert_eq!(again["offset"], first["offset"], "{again}");
    // Over HTTP on the other node, too.
    let resp = b
        .post(
            "/api/rooms/keys/messages",
            json!({"data": {"k": "k1"}, "key": "k1"}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["offset"], first["offset"]);
    let next = on_a.publish("keys", json!("after")).await;
    let got = collect(&mut reader, "keys", 2).await;
    assert_eq!(
        offsets(&json!(got)),
        vec![first["offset"].as_u64().unwrap(), next]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn presence_typing_direct_and_http_cross_nodes() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let mut b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    ann.join("lobby").await;
    let mut bob = b.connect("user=bob").await;
    let joined = bob.join("lobby").await;
    // Bob sees Ann (her node announces when B's room syncs), and Ann sees Bob join.
    let users = |frame: &Value| -> Vec<String> {
        frame["users"]
            .as_array()
            .or(frame["presence"].as_array())
            .unwrap()
            .iter()
            .map(|u| u["user"].as_str().unwrap().to_owned())
            .collect()
    };
    if !users(&joined).contains(&"ann".to_owned()) {
        let deadline = Instant::now() + WAIT;
        loop {
            let p = bob
                .request(json!({"type": "presence", "room": "lobby"}))
                .await;
            if users(&p) == ["ann", "bob"] {
                break;
            }
            assert!(Instant::now() < deadline, "bob never saw ann: {p}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let seen = ann.next_of("user_joined").await;
    assert_eq!(seen["user"], "bob");
    let p = ann
        .request(json!({"type": "presence", "room": "lobby"}))
        .await;
    assert_eq!(users(&p), ["ann", "bob"]);
    // Typing crosses nodes.
    bob.send(json!({"type": "typing", "room": "lobby", "active": true}))
        .await;
    let typing = ann.next_of("typing").await;
    assert_eq!(
        (typing["user"].as_str(), typing["active"].as_bool()),
        (Some("bob"), Some(true))
    );
    // A direct message from A reaches Bob on B, from a client and over HTTP.
    let ack = ann
        .request(json!({"type": "direct", "to": "bob", "data": {"hi": 1}}))
        .await;
    assert_eq!(ack["type"], "ack");
    let direct = bob.next_of("direct").await;
    assert_eq!(
        (direct["from"].as_str(), &direct["data"]),
        (Some("ann"), &json!({"hi": 1}))
    );
    let resp = a
        .post(
            "/api/users/bob/messages",
            json!({"data": "from the backend"}),
        )
        .await;
    assert_eq!(resp.status(), 202);
    assert_eq!(bob.next_of("direct").await["data"], "from the backend");
    // An HTTP publish on A reaches Bob on B.
    let resp = a
        .post("/api/rooms/lobby/messages", json!({"data": "news"}))
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(collect(&mut bob, "lobby", 1).await[0]["data"], "news");
    // Node B dies without a goodbye: Ann sees Bob leave within 2 × timeout.
    let started = Instant::now();
    b.kill9();
    let left = ann.next_of("user_left").await;
    assert_eq!(left["user"], "bob");
    assert!(
        started.elapsed() < Duration::from_millis(2 * 1500 + 1000),
        "{:?}",
        started.elapsed()
    );
    let p = ann
        .request(json!({"type": "presence", "room": "lobby"}))
        .await;
    assert_eq!(users(&p), ["ann"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_nats_a_node_is_unready_refuses_publishes_and_heals() {
    let mut nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    let mut bob = b.connect("user=bob").await;
    let joined = bob.join("outage").await;
    ann.join("outage").await;
    let before = ann.publish("outage", json!("before")).await;
    assert!(a.metrics().await.contains("roomhub_cluster_link_up 1"));
    nats.stop();
    wait_ready(&a, false).await;
    assert!(a.metrics().await.contains("roomhub_cluster_link_up 0"));
    let refused = ann
        .request(json!({"type": "publish", "room": "outage", "data": "during"}))
        .await;
    assert_eq!(
        (refused["type"].as_str(), refused["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{refused}"
    );
    let resp = a
        .post("/api/rooms/outage/messages", json!({"data": "during"}))
        .await;
    assert_eq!(resp.status(), 503);
    nats.restart();
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let metrics = a.metrics().await;
    assert!(metrics.contains("roomhub_cluster_link_up 1"), "{metrics}");
    assert!(
        metrics.contains("roomhub_cluster_link_losses_total 1"),
        "{metrics}"
    );
    // Connections stayed open; publishing works again and B sees it all, no gaps.
    let deadline = Instant::now() + WAIT;
    let after = loop {
        let reply = ann
            .request(json!({"type": "publish", "room": "outage", "data": "after"}))
            .await;
        if reply["type"] == "ack" {
            break reply["offset"].as_u64().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "publishing did not recover: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let got = collect(&mut bob, "outage", 2).await;
    assert_eq!(offsets(&json!(got)), vec![before, after]);
    // A client resuming on B from the start gets the same, recovered.
    let mut carol = b.connect("user=carol").await;
    let resumed = join_since(&mut carol, "outage", &joined["epoch"], 0).await;
    assert_eq!(resumed["recovered"], true);
    assert_eq!(offsets(&resumed["history"]), vec![before, after]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_of_a_killed_node_fail_over_and_lose_nothing() {
    let nats = NatsServer::start();
    let mut a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut reader = a.connect("user=reader").await;
    let joined = reader.join("failover").await;
    let epoch = joined["epoch"].clone();
    let mut writer = b.connect("user=writer").await;
    writer.join("failover").await;
    let mut acked = Vec::new();
    for n in 0..10 {
        acked.push(writer.publish("failover", json!(n)).await);
    }
    let seen = collect(&mut reader, "failover", 10).await;
    let last = seen[9]["offset"].as_u64().unwrap();
    a.kill9();
    for n in 10..20 {
        acked.push(writer.publish("failover", json!(n)).await);
    }
    let mut reader = b.connect("user=reader").await;
    let joined = join_since(&mut reader, "failover", &epoch, last).await;
    assert_eq!(joined["recovered"], true);
    let mut all = offsets(&json!(seen));
    all.extend(offsets(&joined["history"]));
    assert_eq!(all, acked, "nothing lost, nothing twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_draining_node_sends_its_clients_elsewhere_without_loss() {
    let nats = NatsServer::start();
    let mut a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut reader = a.connect("user=reader").await;
    let joined = reader.join("drain").await;
    let epoch = joined["epoch"].clone();
    let mut writer = b.connect("user=writer").await;
    writer.join("drain").await;
    let first = writer.publish("drain", json!(1)).await;
    let seen = collect(&mut reader, "drain", 1).await;
    assert_eq!(seen[0]["offset"], first);
    let pid = a.pid();
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    assert_eq!(reader.next_of("shutdown").await["reconnect"], true);
    assert_eq!(reader.closed().await, 1001);
    let status = a.wait_exit();
    assert!(status.success(), "{status}:\n{}", a.log.lock().unwrap());
    let second = writer.publish("drain", json!(2)).await;
    let mut reader = b.connect("user=reader").await;
    let joined = join_since(&mut reader, "drain", &epoch, first).await;
    assert_eq!(joined["recovered"], true);
    assert_eq!(offsets(&joined["history"]), vec![second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resuming_on_a_node_that_is_behind_waits_for_it() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let c = spawn_node(&nats, None, &[]).await;
    let mut reader = a.connect("user=reader").await;
    let epoch = reader.join("hop").await["epoch"].clone();
    let mut writer = c.connect("user=writer").await;
    writer.join("hop").await;
    // B follows the room live too, so it may trail A by a little.
    let mut member = b.connect("user=member").await;
    member.join("hop").await;
    tokio::spawn(async move { while member.try_next().await.is_some() {} });
    for round in 0..8 {
        let mut hop = b.connect("user=reader").await;
        for n in 0..100 {
            writer
                .send(json!({"type": "publish", "room": "hop", "data": {"r": round, "n": n}}))
                .await;
        }
        // Read on A up to the middle of the burst, then resume on B at once.
        let seen = loop {
            let frame = reader.next().await;
            if frame["type"] == "message" && frame["data"] == json!({"r": round, "n": 50}) {
                break frame["offset"].as_u64().unwrap();
            }
        };
        let joined = join_since(&mut hop, "hop", &epoch, seen).await;
        assert_eq!(joined["recovered"], true, "round {round}: {joined}");
        let resumed = offsets(&joined["history"]);
        assert!(
            resumed.first().is_none_or(|&o| o == seen + 1),
            "round {round}: {resumed:?}"
        );
        // Let the burst finish before the next round.
        loop {
            let frame = reader.next().await;
            if frame["type"] == "message" && frame["data"] == json!({"r": round, "n": 99}) {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_an_ack_the_node_that_gave_it_serves_the_message() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let _b = spawn_node(&nats, None, &[]).await;
    let mut writer = a.connect("user=writer").await;
    writer.join("yours").await;
    for n in 0..20 {
        let offset = writer.publish("yours", json!(n)).await;
        let (status, page) = a.get_json("/api/rooms/yours/messages?limit=1").await;
        assert_eq!(status, 200);
        assert_eq!(offsets(&page["messages"]), vec![offset], "publish {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_foreign_record_in_a_room_log_is_skipped_and_forgets_nothing() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut writer = a.connect("user=writer").await;
    let epoch = writer.join("foreign").await["epoch"].clone();
    let mut acked = Vec::new();
    for n in 0..3 {
        acked.push(writer.publish("foreign", json!(n)).await);
    }
    // Something that is not roomhub writes garbage into the room's log.
    let client = async_nats::connect(nats.url()).await.unwrap();
    let subject = roomhub::cluster::Subjects::new("roomhub", 8)
        .room_log(&roomhub::protocol::RoomName::parse("foreign").unwrap())
        .subject;
    async_nats::jetstream::new(client)
        .publish(subject, "not a record".into())
        .await
        .unwrap()
        .await
        .unwrap();
    for n in 3..5 {
        acked.push(writer.publish("foreign", json!(n)).await);
    }
    // Both nodes still hold the whole history, without the foreign record.
    for node in [&a, &b] {
        let mut reader = node.connect("user=reader").await;
        let joined = join_since(&mut reader, "foreign", &epoch, 0).await;
        assert_eq!(joined["recovered"], true, "{joined}");
        assert_eq!(offsets(&joined["history"]), acked);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_short_heartbeats_a_live_node_never_lapses_from_presence() {
    // Announcements must come at least twice per timeout, whatever the
    // heartbeat settings: here the timeout is shorter than a second.
    let short = [
        ("ROOMHUB_HEARTBEAT__INTERVAL_MS", "300"),
        ("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "400"),
    ];
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &short).await;
    let mut b = spawn_node(&nats, None, &short).await;
    let mut ann = a.connect("user=ann").await;
    ann.join("short").await;
    let mut bob = b.connect("user=bob").await;
    bob.join("short").await;
    // Bob keeps answering pings while ann watches.
    tokio::spawn(async move { while bob.try_next().await.is_some() {} });
    assert_eq!(ann.next_of("user_joined").await["user"], "bob");
    // For 2 s (five timeouts), bob must not lapse from ann's room.
    let quiet = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            let frame = ann.next().await;
            if frame["type"] == "user_left" {
                return frame;
            }
        }
    })
    .await;
    assert!(quiet.is_err(), "a live node lapsed: {:?}", quiet.ok());
    // Killed, bob leaves.
    b.kill9();
    assert_eq!(ann.next_of("user_left").await["user"], "bob");
}

/// Every ack waits for the record to come back from the cluster log, so it
/// is answered with the group that makes it durable here: the publisher
/// still gets its message first.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_publisher_gets_its_message_before_its_ack() {
    let nats = NatsServer::start();
    let node = spawn_node(&nats, None, &[]).await;
    let mut writer = node.connect("user=writer").await;
    writer.join("ackorder").await;
    let mut early = Vec::new();
    for n in 0..20 {
        let r = format!("p{n}");
        writer
            .send(json!({"type": "publish", "room": "ackorder", "data": n, "ref": r}))
            .await;
        if !message_before_ack(&mut writer, &json!(n), &r).await {
            early.push(n);
        }
    }
    assert!(early.is_empty(), "ack before its own message: {early:?}");
}

/// Two resuming joins parked together are answered in one turn of the room:
/// each gets `joined` before anything else of the room (here the other's
/// `user_joined`).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_joins_answered_together_each_get_joined_first() {
    let nats = NatsServer::start();
    let node = spawn_node(&nats, None, &[]).await;
    let mut carol = node.connect("user=carol").await;
    let epoch = carol.join("parked").await["epoch"].clone();
    let mut alice = node.connect("user=alice").await;
    let mut bob = node.connect("user=bob").await;
    // Ahead of this node: both wait the whole parking bound.
    let since = json!({"epoch": epoch, "offset": 1_000_000});
    alice
        .send(json!({"type": "join", "room": "parked", "since": since, "ref": "j"}))
        .await;
    bob.send(json!({"type": "join", "room": "parked", "since": since, "ref": "j"}))
        .await;
    for client in [&mut alice, &mut bob] {
        let first = client.next().await;
        assert_eq!(first["type"], "joined", "{first}");
    }
}

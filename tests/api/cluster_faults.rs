//! Cluster mode under NATS faults (real nats-server, real hub processes): a
//! room's consumer deleted behind the hub's back, a stalled server (SIGSTOP),
//! an outage with several live rooms, and a new room used on three nodes at
//! the same instant. Every wait is bounded.

use crate::helpers::{TestApp, TestClient, WAIT};
use crate::nats::{spawn_node, wait_ready, NatsServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};

/// The next `message` frame of `room`, within `WAIT`.
async fn next_message(client: &mut TestClient, room: &str) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let frame = client.next().await;
            if frame["type"] == "message" && frame["room"] == room {
                return frame;
            }
        }
    })
    .await
    .expect("no message within the bound")
}

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
async fn a_room_that_misses_live_records_reads_them() {
    let nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    // Node b reaches NATS through a proxy the test can cut.
    let proxy = CuttableProxy::start(&nats.url()).await;
    let b_url = proxy.url();
    let b = crate::helpers::TestApp::spawn_with(&[
        ("ROOMHUB_CLUSTER__NATS_URL", b_url.as_str()),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "1000"),
    ])
    .await;
    wait_ready(&b, true).await;
    let mut ann = b.connect("user=ann").await;
    ann.join("deaf").await;
    let before = ann.publish("deaf", json!("before")).await;
    // b's link drops (its live subscriptions with it) while a appends:
    // what b did not hear live it must read from the log.
    proxy.cut();
    let mut offsets = Vec::new();
    for n in 0..5 {
        let (status, body) = post(&a, "deaf", json!({"data": n})).await;
        assert_eq!(status, 201, "{body}");
        offsets.push(body["offset"].as_u64().unwrap());
    }
    proxy.restore();
    for offset in offsets {
        assert_eq!(next_message(&mut ann, "deaf").await["offset"], offset);
    }
    // And the room keeps working afterwards, on both nodes.
    let next = ann.publish("deaf", json!("later")).await;
    assert_eq!(next, before + 6);
}

/// A TCP proxy in front of NATS whose connections the test can cut (and
/// refuse until restored): a node's link drops while NATS stays up.
struct CuttableProxy {
    port: u16,
    open: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cuts: tokio::sync::watch::Sender<u64>,
}

impl CuttableProxy {
    async fn start(upstream: &str) -> CuttableProxy {
        use std::sync::atomic::Ordering;
        let upstream = upstream.trim_start_matches("nats://").to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let (cuts, _) = tokio::sync::watch::channel(0u64);
        let (accepting, cut_signal) = (open.clone(), cuts.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // Dropped: refused while cut.
                }
                let upstream = upstream.clone();
                let mut cut = cut_signal.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        CuttableProxy { port, open, cuts }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        self.cuts.send_modify(|n| *n += 1);
    }

    fn restore(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
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

/// Keeps `client` reading (so it answers the hub's pings) until `stop`.
fn keep_reading(
    mut client: TestClient,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                frame = client.try_next() => if frame.is_none() { return },
            }
        }
    })
}

/// The rooms counted by the "N rooms lost their cluster feed" lines of `log`.
fn rooms_reported_lost(log: &str) -> usize {
    const LOST: &str = " rooms lost their cluster feed";
    log.lines()
        .filter_map(|line| line.find(LOST).map(|at| &line[..at]))
        .filter_map(|head| head.rsplit(' ').next()?.parse::<usize>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outage_is_logged_once_with_counts_not_per_room() {
    const ROOMS: usize = 6;
    let mut nats = NatsServer::start();
    let node = spawn_node(&nats, None, &[]).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut readers = Vec::new();
    for i in 0..ROOMS {
        let mut member = node.connect(&format!("user=m{i}")).await;
        member.join(&format!("calm-{i}")).await;
        member.publish(&format!("calm-{i}"), json!("before")).await;
        readers.push(keep_reading(member, stopped.clone()));
    }
    let logged_before = node.log.lock().unwrap().len();
    nats.stop();
    wait_ready(&node, false).await;
    // Long enough for every room's consumer to miss its heartbeats (10 s),
    // and for the report (every 5 s) to count them.
    let deadline = Instant::now() + Duration::from_secs(30);
    while rooms_reported_lost(&node.log.lock().unwrap()[logged_before..]) < ROOMS {
        assert!(
            Instant::now() < deadline,
            "no summary of the lost feeds:\n{}",
            &node.log.lock().unwrap()[logged_before..]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    nats.restart();
    wait_ready(&node, true).await;
    for i in 0..ROOMS {
        let room = format!("calm-{i}");
        post_until_committed(&node, &room, json!({"data": "after"})).await;
    }
    let _ = stop.send(true);
    for reader in readers {
        reader.await.expect("reader");
    }
    let log = node.log.lock().unwrap()[logged_before..].to_owned();
    assert_eq!(rooms_reported_lost(&log), ROOMS, "{log}");
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    // The log not answering, the rooms' feeds: a few lines, not one per room.
    assert!(warnings.len() < ROOMS, "{}", warnings.join("\n"));
    assert!(
        !warnings.iter().any(|l| l.contains("room=")),
        "{}",
        warnings.join("\n")
    );
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

/// Joins `room` again, resuming `since`, until the node answers `joined`
/// (it may still be catching up with NATS), within `WAIT`.
async fn rejoin(client: &mut TestClient, room: &str, since: &Value) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let answer = client
                .request(json!({"type": "join", "room": room, "since": since}))
                .await;
            if answer["type"] == "joined" {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("joined again within the bound")
}

/// The next frame of `client` that says `room` restarted, within `WAIT`.
async fn room_restarted(client: &mut TestClient, room: &str) {
    tokio::time::timeout(WAIT, async {
        loop {
            let frame = client.next().await;
            let text = frame["message"].as_str().unwrap_or_default();
            if frame["type"] == "error" && frame["room"] == room && text.contains("restarted") {
                return;
            }
        }
    })
    .await
    .expect("no `room restarted` within the bound")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_nats_loses_its_store_every_node_moves_the_room_to_one_new_epoch() {
    let mut nats = NatsServer::start();
    let a = spawn_node(&nats, None, &[]).await;
    let b = spawn_node(&nats, None, &[]).await;
    let mut ann = a.connect("user=ann").await;
    let mut bob = b.connect("user=bob").await;
    let old = ann.join("amnesia").await["epoch"].clone();
    assert_eq!(bob.join("amnesia").await["epoch"], old);
    let mut last = 0;
    for n in 0..3 {
        last = ann.publish("amnesia", json!(n)).await;
    }
    for _ in 0..3 {
        next_message(&mut bob, "amnesia").await;
    }
    nats.restart_empty();
    // Both nodes drop the room's members, who join again: the resume from
    // the old epoch is not recovered, and both nodes are in one new epoch.
    let started = Instant::now();
    // (Both read at once: a client that reads nothing misses the hub's pings.)
    tokio::join!(
        room_restarted(&mut ann, "amnesia"),
        room_restarted(&mut bob, "amnesia")
    );
    wait_ready(&a, true).await;
    wait_ready(&b, true).await;
    let since = json!({"epoch": old, "offset": last});
    let (ann_joined, bob_joined) = tokio::join!(
        rejoin(&mut ann, "amnesia", &since),
        rejoin(&mut bob, "amnesia", &since)
    );
    let mut epochs = Vec::new();
    for joined in [ann_joined, bob_joined] {
        assert_eq!(joined["recovered"], false, "{joined}");
        assert_ne!(joined["epoch"], old, "{joined}");
        epochs.push(joined["epoch"].clone());
    }
    assert_eq!(epochs[0], epochs[1], "one new epoch on both nodes");
    // Publishing works again on both nodes, one order in the new epoch.
    let first = ann.publish("amnesia", json!("after")).await;
    let second = bob.publish("amnesia", json!("after, too")).await;
    assert_eq!((first, second), (1, 2));
    println!(
        "store loss: publishing again {:?} after the restart",
        started.elapsed()
    );
    for node in [&a, &b] {
        let mut reader = node.connect("user=reader").await;
        let joined = reader.join("amnesia").await;
        assert_eq!(joined["epoch"], epochs[0]);
        let offsets: Vec<u64> = joined["history"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["offset"].as_u64().unwrap())
            .collect();
        assert_eq!(offsets, [1, 2]);
    }
}

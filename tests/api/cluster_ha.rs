//! Cluster mode on a replicated NATS: three routed `nats-server -js`
//! processes, room logs on streams of three replicas (`cluster.replicas=3`),
//! hubs given every server (`cluster.nats_url` as a comma-separated list).
//! A NATS server dies under load: no acked message is lost or duplicated,
//! publishes are `unavailable` (not committed) while JetStream elects a new
//! leader and then succeed again, and hubs move to a surviving server by
//! themselves. Each test prints what it measured (`--nocapture`).

use crate::helpers::{offsets, TestApp};
use crate::nats_cluster::{spawn_node_on, wait_ready_within, NatsCluster, ELECTION};
use roomhub::cluster::Subjects;
use roomhub::protocol::RoomName;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one publish may keep being retried (an election included).
const PUBLISH_BOUND: Duration = Duration::from_secs(30);

/// The partition stream that holds `room`'s log (default prefix and partitions).
fn stream_of(room: &str) -> String {
    Subjects::new("roomhub", 8)
        .room_log(&RoomName::parse(room).unwrap())
        .stream
}

/// What one publisher saw.
#[derive(Default)]
struct Tally {
    /// (key, offset, when the ack came, when the publish was first sent).
    acked: Vec<(String, u64, Instant, Instant)>,
    /// `unavailable` answers (503), each retried with the same key.
    unavailable: u64,
    /// Of those, how many said the outcome was unknown (not "not committed").
    unknown: u64,
    /// Requests the hub did not answer in time (retried too).
    timeouts: u64,
    /// The texts of the `unavailable` answers, once each.
    reasons: BTreeSet<String>,
}

/// POSTs `{"data": {"k": key}, "key": key}` until it is acked (201),
/// retrying `unavailable` with the same key, within [`PUBLISH_BOUND`].
async fn publish_acked(node: &TestApp, room: &str, key: &str, tally: &Mutex<Tally>) -> u64 {
    let sent = Instant::now();
    let path = format!("/api/rooms/{room}/messages");
    let body = json!({"data": {"k": key}, "key": key});
    loop {
        assert!(
            sent.elapsed() < PUBLISH_BOUND,
            "{key} was not acked within {PUBLISH_BOUND:?}"
        );
        let answer =
            tokio::time::timeout(Duration::from_secs(15), node.post(&path, body.clone())).await;
        let Ok(resp) = answer else {
            tally.lock().unwrap().timeouts += 1;
            continue;
        };
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap_or(Value::Null);
        match status {
            201 => {
                let offset = answer["offset"].as_u64().expect("offset");
                let mut tally = tally.lock().unwrap();
                tally
                    .acked
                    .push((key.to_owned(), offset, Instant::now(), sent));
                return offset;
            }
            503 => {
                assert_eq!(answer["error"], "unavailable", "{answer}");
                let message = answer["message"].as_str().unwrap_or_default().to_owned();
                let mut tally = tally.lock().unwrap();
                tally.unavailable += 1;
                if message.contains("outcome is unknown") {
                    tally.unknown += 1;
                }
                // Offsets or counts would make every text new.
                tally.reasons.insert(message.chars().take(120).collect());
            }
            _ => panic!("{key}: unexpected answer {status}: {answer}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `<node>-<n>` keys one after the other until `stop` (at most `most`).
async fn publisher(
    node: &str,
    app: &TestApp,
    room: &str,
    tally: &Mutex<Tally>,
    stop: &AtomicBool,
    most: usize,
) {
    for n in 0..most {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        publish_acked(app, room, &format!("{node}-{n}"), tally).await;
    }
}

/// `room`'s whole history on `node` over HTTP (paged): (epoch, messages).
async fn history(node: &TestApp, room: &str) -> (u64, Vec<Value>) {
    let deadline = Instant::now() + ELECTION;
    let mut messages: Vec<Value> = Vec::new();
    let mut epoch = None;
    loop {
        // Without `since` a page is the newest messages: page from the start.
        let since = messages.last().map_or(0, |m| m["offset"].as_u64().unwrap());
        let since = format!("&since={since}");
        let (status, page) = node
            .get_json(&format!("/api/rooms/{room}/messages?limit=200{since}"))
            .await;
        if status != 200 {
            assert!(
                Instant::now() < deadline,
                "history of {room}: {status} {page}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let page_epoch = page["epoch"].as_u64().expect("epoch");
        assert!(
            epoch.is_none_or(|e| e == page_epoch),
            "the epoch changed while paging"
        );
        epoch = Some(page_epoch);
        let got = page["messages"].as_array().cloned().unwrap_or_default();
        let full = got.len() == 200;
        messages.extend(got);
        if !full {
            return (page_epoch, messages);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_streams_have_three_replicas_on_three_servers() {
    let nats = NatsCluster::start(3).await;
    let hub = spawn_node_on(&nats.url_list(), &[]).await;
    let resp = hub
        .post("/api/rooms/ha-replicas/messages", json!({"data": 1}))
        .await;
    assert_eq!(resp.status(), 201);
    // Every partition stream is made with three replicas, one per server.
    let subjects = Subjects::new("roomhub", 8);
    for partition in 0..8 {
        let stream = subjects.partition_stream(partition);
        let deadline = Instant::now() + ELECTION;
        let info = loop {
            if let Some(info) = nats.stream_info(&stream).await {
                break info;
            }
            assert!(Instant::now() < deadline, "no info on {stream}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert_eq!(info["config"]["num_replicas"], 3, "{stream}: {info}");
        let cluster = &info["cluster"];
        let mut peers: BTreeSet<&str> = cluster["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .filter_map(|r| r["name"].as_str())
            .collect();
        peers.insert(cluster["leader"].as_str().expect("a leader"));
        let all: BTreeSet<&str> = (0..3).map(|i| nats.name(i)).collect();
        assert_eq!(peers, all, "{stream}: a replica on every server");
    }
    // The room's record is stored on all three servers.
    let stream = stream_of("ha-replicas");
    for i in 0..3 {
        let deadline = Instant::now() + ELECTION;
        while nats.stored_on(i, &stream).await != Some(1) {
            assert!(
                Instant::now() < deadline,
                "{stream} on {}: {:?} messages",
                nats.name(i),
                nats.stored_on(i, &stream).await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_killing_a_rooms_stream_leader_under_load_loses_and_duplicates_nothing() {
    const ROOM: &str = "ha-load";
    /// Acks each publisher needs before the kill, and after it.
    const BEFORE: usize = 20;
    const AFTER: usize = 20;
    /// Each publisher stops after this many whatever happens.
    const MOST: usize = 400;
    let mut nats = NatsCluster::start(3).await;
    let a = spawn_node_on(&nats.url_list(), &[]).await;
    let b = spawn_node_on(&nats.url_list(), &[]).await;
    let seed = Mutex::new(Tally::default());
    publish_acked(&a, ROOM, "seed", &seed).await;
    let (epoch_before, _) = history(&b, ROOM).await;
    let stream = stream_of(ROOM);
    let leader = nats.wait_stream_leader(&stream).await;

    let tallies = [Mutex::new(Tally::default()), Mutex::new(Tally::default())];
    let stop = AtomicBool::new(false);
    let killed_at: Mutex<Option<Instant>> = Mutex::new(None);
    let count = |after: Option<Instant>| {
        tallies
            .iter()
            .map(|t| {
                let t = t.lock().unwrap();
                t.acked
                    .iter()
                    .filter(|(_, _, at, sent)| after.is_none_or(|k| *sent > k && *at > k))
                    .count()
            })
            .min()
            .unwrap()
    };
    let control = async {
        let deadline = Instant::now() + Duration::from_secs(30);
        while count(None) < BEFORE {
            assert!(Instant::now() < deadline, "publishes did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        nats.kill(leader);
        let kill = Instant::now();
        *killed_at.lock().unwrap() = Some(kill);
        while count(Some(kill)) < AFTER {
            assert!(
                kill.elapsed() < Duration::from_secs(45),
                "publishes did not come back after the kill"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::SeqCst);
    };
    tokio::join!(
        publisher("a", &a, ROOM, &tallies[0], &stop, MOST),
        publisher("b", &b, ROOM, &tallies[1], &stop, MOST),
        control
    );
    let kill = killed_at.lock().unwrap().expect("killed");
    let new_leader = nats.wait_stream_leader(&stream).await;
    assert_ne!(new_leader, leader);

    // Every acked publish, by key; no key acked at two offsets.
    let mut acked: BTreeMap<String, u64> = BTreeMap::new();
    acked.insert("seed".into(), seed.lock().unwrap().acked[0].1);
    for tally in tallies.iter() {
        for (key, offset, _, _) in &tally.lock().unwrap().acked {
            assert!(
                acked.insert(key.clone(), *offset).is_none(),
                "{key} acked twice"
            );
        }
    }
    // Both hubs' histories: the same, one epoch, contiguous, each key once,
    // every acked key at its acked offset.
    let deadline = Instant::now() + ELECTION;
    let (epoch, messages) = loop {
        let (epoch_a, on_a) = history(&a, ROOM).await;
        let (epoch_b, on_b) = history(&b, ROOM).await;
        if epoch_a == epoch_b && on_a == on_b && on_a.len() >= acked.len() {
            break (epoch_a, on_a);
        }
        if Instant::now() >= deadline {
            let differ = on_a.iter().zip(&on_b).position(|(x, y)| x != y);
            panic!(
                "the hubs' histories differ: {} vs {} messages ({} acked), epochs {epoch_a} \
                 {epoch_b}, first difference at index {differ:?}: {:?} vs {:?}",
                on_a.len(),
                on_b.len(),
                acked.len(),
                differ.map(|i| &on_a[i]),
                differ.map(|i| &on_b[i]),
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(epoch, epoch_before, "one epoch across the kill");
    let first = messages[0]["offset"].as_u64().unwrap();
    assert_eq!(first, 1, "the whole log, from its first offset");
    for (i, m) in messages.iter().enumerate() {
        assert_eq!(
            m["offset"].as_u64().unwrap(),
            first + i as u64,
            "contiguous offsets"
        );
    }
    let mut at: BTreeMap<String, u64> = BTreeMap::new();
    for m in &messages {
        let key = m["data"]["k"].as_str().expect("key in data").to_owned();
        let offset = m["offset"].as_u64().unwrap();
        assert!(
            at.insert(key.clone(), offset).is_none(),
            "{key} stored twice"
        );
    }
    assert_eq!(
        at, acked,
        "the log holds exactly the acked publishes, at their offsets"
    );

    // The killed server comes back on its store and catches up.
    nats.restart(leader);
    let deadline = Instant::now() + ELECTION;
    loop {
        let back = nats.stored_on(leader, &stream).await;
        let there = nats.stored_on(new_leader, &stream).await;
        if back.is_some() && back == there {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not catch up: {back:?} of {there:?} records",
            nats.name(leader)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // What it took.
    let mut unavailable = 0;
    let mut unknown = 0;
    let mut timeouts = 0;
    let mut reasons = BTreeSet::new();
    let mut first_back: Option<Duration> = None;
    let mut longest_wait = Duration::ZERO;
    for tally in tallies.iter() {
        let tally = tally.lock().unwrap();
        unavailable += tally.unavailable;
        unknown += tally.unknown;
        timeouts += tally.timeouts;
        reasons.extend(tally.reasons.iter().cloned());
        for (_, _, at, sent) in &tally.acked {
            longest_wait = longest_wait.max(at.duration_since(*sent));
            if *sent > kill {
                let back = at.duration_since(kill);
                first_back = Some(first_back.map_or(back, |f| f.min(back)));
            }
        }
    }
    eprintln!(
        "HA stream-leader kill: {} acked ({} per hub), killed {} (leader of {stream}), new leader {}; \
         first publish sent after the kill acked {:.2?} after it; longest single publish {:.2?}; \
         {unavailable} unavailable answers ({unknown} outcome unknown), {timeouts} timeouts, \
         lost 0, duplicated 0; reasons: {reasons:?}",
        acked.len(),
        acked.len() / 2,
        nats.name(leader),
        nats.name(new_leader),
        first_back.unwrap(),
        longest_wait,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_a_hub_whose_nats_server_dies_moves_to_another_by_itself() {
    const ROOM: &str = "ha-move";
    let mut nats = NatsCluster::start(3).await;
    let hub = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "ha-mover")]).await;
    let tally = Mutex::new(Tally::default());
    let seed = publish_acked(&hub, ROOM, "seed", &tally).await;
    let deadline = Instant::now() + ELECTION;
    let server = loop {
        if let Some(i) = nats.server_of_client("roomhub ha-mover").await {
            break i;
        }
        assert!(
            Instant::now() < deadline,
            "the hub's NATS connection not found"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    nats.kill(server);
    let kill = Instant::now();
    let reconnect = async {
        loop {
            if let Some(now) = nats.server_of_client("roomhub ha-mover").await {
                assert_ne!(now, server);
                return (now, kill.elapsed());
            }
            assert!(
                kill.elapsed() < Duration::from_secs(30),
                "the hub did not reconnect"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let publish = async {
        let offset = publish_acked(&hub, ROOM, "after", &tally).await;
        (offset, kill.elapsed())
    };
    let ((moved_to, reconnected), (after, published)) = tokio::join!(reconnect, publish);
    assert!(published < Duration::from_secs(30));
    wait_ready_within(&hub, Duration::from_secs(30)).await;
    let ready = kill.elapsed();
    assert_eq!(after, seed + 1, "nothing lost, nothing doubled");
    let (_, messages) = history(&hub, ROOM).await;
    let keys: Vec<&str> = messages
        .iter()
        .filter_map(|m| m["data"]["k"].as_str())
        .collect();
    assert_eq!(keys, ["seed", "after"]);
    let tally = tally.lock().unwrap();
    eprintln!(
        "HA hub's server killed ({} -> {}): reconnected within {reconnected:.2?} (seen in /connz), \
         publish acked {published:.2?} after the kill, ready (/readyz 200) {:.2?} after the kill; \
         {} unavailable answers; reasons: {:?}",
        nats.name(server),
        nats.name(moved_to),
        ready,
        tally.unavailable,
        tally.reasons,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_a_hub_starts_while_the_first_server_of_its_list_is_down() {
    let mut nats = NatsCluster::start(3).await;
    // The cluster's streams exist (three replicas are placed while all three
    // servers are up); then the first server of the list goes down.
    let first = spawn_node_on(&nats.url_list(), &[]).await;
    nats.kill(0);
    let started = Instant::now();
    let hub = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "ha-late")]).await;
    let ready = started.elapsed();
    let tally = Mutex::new(Tally::default());
    let offset = publish_acked(&hub, "ha-late", "one", &tally).await;
    let (_, messages) = history(&first, "ha-late").await;
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["offset"].as_u64(), Some(offset));
    let server = nats.server_of_client("roomhub ha-late").await;
    assert!(matches!(server, Some(1 | 2)), "{server:?}");
    eprintln!(
        "HA first server down at start: hub ready {ready:.2?} after its start, on {}; \
         {} unavailable answers",
        nats.name(server.unwrap()),
        tally.lock().unwrap().unavailable
    );
}

/// A record JetStream stored although the room's subject had moved past the
/// record it names as its predecessor (what nats-server before 2.9.21 does
/// with concurrent appends to a replicated stream, nats-io/nats-server#4320)
/// is not part of the room's log: hubs that hear it live skip it, a hub that
/// catches up while it is the newest record skips it, and the room goes on
/// from the offset it would have taken, the same on every hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_a_record_stored_out_of_turn_is_skipped_by_every_hub() {
    const ROOM: &str = "ha-out-of-turn";
    let nats = NatsCluster::start(3).await;
    let a = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "turn-a")]).await;
    let b = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "turn-b")]).await;
    // Members on both hubs, so both follow the room's live feed.
    let mut on_a = a.connect("user=ann").await;
    let mut on_b = b.connect("user=bob").await;
    on_a.join(ROOM).await;
    on_b.join(ROOM).await;
    for i in 1..=3 {
        assert_eq!(on_a.publish(ROOM, json!({"k": i})).await, i);
    }
    for i in 1..=3 {
        assert_eq!(on_b.next_of("message").await["offset"], i);
    }
    let (epoch, _) = history(&a, ROOM).await;

    // The intruder: offset 4 as if appended after the room's first record.
    let log = Subjects::new("roomhub", 8).room_log(&RoomName::parse(ROOM).unwrap());
    let client = async_nats::connect(nats.url(1)).await.expect("nats");
    let js = async_nats::jetstream::new(client);
    let record = json!({
        "e": epoch, "o": 4, "b": "intruder-1", "a": 1,
        "m": [{"id": "intruder", "user": "mallory", "data": {"k": "intruder"}, "ts": 1}]
    });
    js.publish(
        log.subject.clone(),
        serde_json::to_vec(&record).unwrap().into(),
    )
    .await
    .expect("sent")
    .await
    .expect("stored");

    // A third hub starts while the intruder is the newest record.
    let c = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "turn-c")]).await;
    let mut on_c = c.connect("user=cat").await;
    let joined = on_c
        .request(json!({"type": "join", "room": ROOM, "history": 10}))
        .await;
    assert_eq!(offsets(&joined["history"]), [1, 2, 3], "{joined}");

    // The room goes on at offset 4, from any hub.
    assert_eq!(on_b.publish(ROOM, json!({"k": 4})).await, 4);
    assert_eq!(on_c.publish(ROOM, json!({"k": 5})).await, 5);
    // (The publishers' own messages came before their acks.)
    let mut got = Vec::new();
    while got.len() < 2 {
        let message = on_a.next_of("message").await;
        assert_ne!(message["data"]["k"], "intruder", "{message}");
        got.push(message["offset"].as_u64().unwrap());
    }
    assert_eq!(got, [4, 5]);
    assert_eq!(on_b.next_of("message").await["offset"], 5);
    let (_, want) = history(&a, ROOM).await;
    let keys: Vec<&Value> = want.iter().map(|m| &m["data"]["k"]).collect();
    assert_eq!(keys, [1, 2, 3, 4, 5]);
    for hub in [&b, &c] {
        let (hub_epoch, got) = history(hub, ROOM).await;
        assert_eq!((hub_epoch, &got), (epoch, &want));
    }
}

/// While one partition's stream has no leader (its leader's server died,
/// JetStream is electing another), rooms in the other partitions go on:
/// their publishes are acked as before, while the leaderless partition's
/// rooms get `unavailable` (not committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_ha_an_election_holds_back_only_the_rooms_of_its_partition() {
    let mut nats = NatsCluster::start(3).await;
    let hub = spawn_node_on(&nats.url_list(), &[("ROOMHUB_SERVER__NODE_ID", "ha-part")]).await;
    let tally = Mutex::new(Tally::default());
    publish_acked(&hub, "ha-part-seed", "seed", &tally).await;
    let subjects = Subjects::new("roomhub", 8);
    let mut leaders = Vec::new();
    for partition in 0..8 {
        leaders.push(
            nats.wait_stream_leader(&subjects.partition_stream(partition))
                .await,
        );
    }
    let meta = nats.wait_meta_leader().await;
    let hub_server = nats
        .server_of_client("roomhub ha-part")
        .await
        .expect("the hub's NATS connection");
    // A server that is neither the hub's nor the meta leader, leading a partition.
    let victim = (0..3)
        .find(|&s| s != hub_server && s != meta && leaders.contains(&s))
        .expect("a server to kill");
    let room_in = |led_by_victim: bool| {
        (0..1000)
            .map(|i| format!("ha-part-{i}"))
            .find(|room| {
                let partition = subjects.room_log(&RoomName::parse(room).unwrap()).partition;
                (leaders[partition as usize] == victim) == led_by_victim
            })
            .unwrap()
    };
    let (stalled, going) = (room_in(true), room_in(false));
    let stalled_stream = subjects
        .room_log(&RoomName::parse(&stalled).unwrap())
        .stream;
    publish_acked(&hub, &stalled, "before-1", &tally).await;
    publish_acked(&hub, &going, "before-2", &tally).await;

    nats.kill(victim);
    // Publishes into the other partition, one after the other, while the
    // stalled partition's stream has no leader.
    let (mut during, mut refused_stalled) = (0, 0);
    for n in 0..200 {
        let answer = hub
            .post(&format!("/api/rooms/{going}/messages"), json!({"data": n}))
            .await;
        assert_eq!(
            answer.status(),
            201,
            "{going}: publish {n} during the election"
        );
        if nats.stream_leader(&stalled_stream).await.is_some() {
            break;
        }
        during += 1;
        let answer = hub
            .post(
                &format!("/api/rooms/{stalled}/messages"),
                json!({"data": n}),
            )
            .await;
        if answer.status() == 503 {
            refused_stalled += 1;
        }
    }
    eprintln!(
        "HA partition election: {during} publishes acked in another partition while \
         {stalled_stream} had no leader; {refused_stalled} publishes to it refused meanwhile"
    );
    assert!(during > 0, "the election ended before a publish");
    assert!(refused_stalled > 0, "the stalled partition took publishes");
}

//! The history log through faults: pruning for a long time, a crash in
//! `batched` mode, a full disk, damaged files. Real hub processes, real sled
//! data dirs; the full disk is a small tmpfs the test mounts (as root).

use crate::helpers::*;
use roomhub::config::Durability;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{Message, RoomName, UserId};
use roomhub::storage::{HistoryStore, SledStore, WriteBatch, WriteOp};
use serde_json::json;
use serde_json::value::RawValue;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Publish limits out of the way: these tests publish in bursts.
const UNTHROTTLED: [(&str, &str); 2] = [
    ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
    ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
];

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// Appends `rounds` × `per_room` messages to each room, every room pruned to
/// `keep`, `per_room` of each room's appends in flight at once (as a
/// publisher with a window does): one group commit then holds thousands.
fn pruning_load(store: &SledStore, rooms: &[RoomName], last: &mut [u64], rounds: usize) {
    const PER_ROOM: usize = 16;
    const KEEP: u64 = 100;
    let user = UserId::parse("soak").unwrap();
    let data = RawValue::from_string(format!("{{\"text\":\"{}\"}}", "x".repeat(100))).unwrap();
    for _ in 0..rounds {
        let (tx, rx) = mpsc::channel();
        for _ in 0..PER_ROOM {
            for (i, room) in rooms.iter().enumerate() {
                last[i] += 1;
                let offset = last[i];
                let message = Message {
                    kind: MessageTag,
                    room,
                    offset,
                    id: "0123456789abcdef0123456789abcdef",
                    user: &user,
                    data: &data,
                    ts: 1,
                }
                .encode();
                let mut ops = vec![WriteOp::Append { message, key: None }];
                if offset > KEEP {
                    ops.push(WriteOp::Prune {
                        from: offset - KEEP,
                        to: offset + 1 - KEEP,
                    });
                }
                let tx = tx.clone();
                store.write(
                    WriteBatch {
                        room: room.clone(),
                        epoch: 1,
                        generation: store.generation(),
                        ring: KEEP,
                        ops,
                    },
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
            }
        }
        for _ in 0..PER_ROOM * rooms.len() {
            rx.recv_timeout(WAIT).unwrap().unwrap();
        }
    }
}

/// The data dir follows what is retained, not what ever passed: after the
/// rooms are full, four times as many messages again leave it about where
/// it was. (Before the writer bounded its sled batches it grew by about
/// 1 KB per message: 80 MB here.)
#[test]
fn pruning_rooms_keep_the_data_dir_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::Sync, Duration::ZERO).unwrap();
    let rooms: Vec<RoomName> = (0..100)
        .map(|i| RoomName::parse(&format!("prune-{i}")).unwrap())
        .collect();
    let mut last = vec![0u64; rooms.len()];
    pruning_load(&store, &rooms, &mut last, 10); // 16 000 messages, rooms full
    store.flush().unwrap();
    let full = dir_bytes(dir.path());
    pruning_load(&store, &rooms, &mut last, 40); // 64 000 more
    store.flush().unwrap();
    let later = dir_bytes(dir.path());
    assert!(
        later < full * 2 + 4 * 1024 * 1024,
        "data dir grew from {full} to {later} bytes while 10 000 messages stayed retained"
    );
    let snap = store.load_room(&rooms[0], 1000).unwrap();
    assert_eq!((snap.first_offset, snap.last_offset), (701, 800));
    assert!(snap.damage.is_none());
}

async fn epoch_and_offset(c: &mut TestClient, room: &str) -> (u64, u64) {
    let joined = c.join(room).await;
    (
        joined["epoch"].as_u64().unwrap(),
        joined["offset"].as_u64().unwrap(),
    )
}

/// `batched` acks before the flush, so a crash can take back acked messages
/// that clients saw. The rooms that run wrote move to a new epoch: a client
/// resuming from what it saw gets `recovered: false`, never a silent gap or a
/// reused offset. Rooms the crashed run did not write keep their epoch.
#[tokio::test]
async fn a_batched_crash_moves_the_rooms_it_wrote_to_a_new_epoch() {
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_STORAGE__DURABILITY", "batched"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut c = app.connect("user=alice").await;
    c.join("calm").await;
    c.publish("calm", json!("before")).await;
    let calm = epoch_and_offset(&mut c, "calm").await;
    drop(c);
    assert!(app.terminate().success());

    app.restart();
    let mut c = app.connect("user=alice").await;
    c.join("busy").await;
    for i in 0..50 {
        c.publish("busy", json!(i)).await;
    }
    let seen = epoch_and_offset(&mut c, "busy").await;
    assert_eq!(seen.1, 50);
    app.kill9();

    app.restart();
    let mut c = app.connect("user=alice").await;
    let resumed = c
        .request(
            json!({"type": "join", "room": "busy", "since": {"epoch": seen.0, "offset": seen.1}}),
        )
        .await;
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_ne!(resumed["epoch"].as_u64().unwrap(), seen.0);
    let next = c.publish("busy", json!("after")).await;
    assert!(next > resumed["offset"].as_u64().unwrap());
    let calm_resumed = c
        .request(
            json!({"type": "join", "room": "calm", "since": {"epoch": calm.0, "offset": calm.1}}),
        )
        .await;
    assert_eq!(calm_resumed["recovered"], true, "{calm_resumed}");
    let log = app.log.lock().unwrap().clone();
    assert!(
        log.contains("room moved to a new epoch") && log.contains("busy"),
        "{log}"
    );
}

/// A small tmpfs, mounted for one test and unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (the test is skipped) when not root or mounting fails.
    fn mount(megabytes: u32) -> Option<Tmpfs> {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: mounting a tmpfs for the full-disk test needs root");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={megabytes}m"))
            .arg("tmpfs")
            .arg(dir.path())
            .status();
        if !status.is_ok_and(|s| s.success()) {
            eprintln!(
                "skipped: could not mount a tmpfs at {}",
                dir.path().display()
            );
            return None;
        }
        Some(Tmpfs { dir })
    }

    fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Fills what is left with a file; returns its path.
    fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 64 * 1024];
        while file.write_all(&block).is_ok() {}
        while file.write_all(&block[..512]).is_ok() {}
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

async fn ready_status(app: &TestApp) -> u16 {
    reqwest::get(app.url("/readyz"))
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

/// Waits (bounded) until `check` holds.
async fn eventually<F: std::future::Future<Output = bool>>(mut check: impl FnMut() -> F) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// A full disk is a state: publishes get `unavailable` (no OS text) and
/// nothing is acked or shown, `/readyz` answers 503, retained history stays
/// readable, and the hub writes again by itself once there is room, with
/// the next offset right after the last stored one. A drain while the disk
/// is full exits 0.
#[tokio::test]
async fn a_full_disk_refuses_publishes_keeps_reads_and_recovers_by_itself() {
    let Some(tmpfs) = Tmpfs::mount(24) else {
        return;
    };
    let data_dir = tmpfs.path().join("data");
    let data_dir = data_dir.to_str().unwrap().to_owned();
    let mut app = TestApp::spawn_with(&[
        ("ROOMHUB_STORAGE__DATA_DIR", data_dir.as_str()),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut alice = app.connect("user=alice").await;
    alice.join("full").await;
    for i in 1..=5 {
        assert_eq!(alice.publish("full", json!(i)).await, i);
    }
    let filler = tmpfs.fill();

    // Publishing until the store notices (sled may still have room in its
    // current segment for a few).
    let mut refused = None;
    for i in 0..2000 {
        let reply = alice
            .request(json!({"type": "publish", "room": "full", "data": "x".repeat(2000), "ref": format!("p{i}")}))
            .await;
        if reply["type"] == "error" {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("a publish is refused once the disk is full");
    assert_eq!(refused["code"], "unavailable", "{refused}");
    let text = refused["message"].as_str().unwrap();
    assert!(
        !text.contains("No space") && !text.contains("os error"),
        "{text}"
    );
    let stored_before = {
        let joined = app.connect("user=bob").await.join("full").await;
        joined["offset"].as_u64().unwrap()
    };
    assert!(eventually(|| async { ready_status(&app).await == 503 }).await);
    let again = alice
        .request(json!({"type": "publish", "room": "full", "data": "y"}))
        .await;
    assert_eq!(again["code"], "unavailable", "{again}");

    // Reads keep working: a new member's join, a history page, HTTP history.
    let mut bob = app.connect("user=bob").await;
    let joined = bob.join("full").await;
    assert_eq!(joined["offset"].as_u64().unwrap(), stored_before);
    let page = bob
        .request(json!({"type": "history", "room": "full", "limit": 3}))
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 3);
    let (status, http_page) = app
        .get_json("/api/rooms/full/messages?since=0&limit=5")
        .await;
    assert_eq!(status, 200);
    assert_eq!(offsets(&http_page["messages"]), vec![1, 2, 3, 4, 5]);
    // Nothing that failed is shown.
    let shown = tokio::time::timeout(Duration::from_millis(500), bob.try_next()).await;
    assert!(
        shown.is_err() || shown.unwrap().is_none_or(|f| f["type"] != "message"),
        "a message that failed to store was shown"
    );

    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(|| async { ready_status(&app).await == 200 }).await,
        "the hub recovers by itself:\n{}",
        app.log.lock().unwrap()
    );
    let mut next = None;
    for _ in 0..100 {
        let reply = alice
            .request(json!({"type": "publish", "room": "full", "data": "back"}))
            .await;
        if reply["type"] == "ack" {
            next = reply["offset"].as_u64();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        next,
        Some(stored_before + 1),
        "the next offset follows the last stored one"
    );
    let message = bob.next_of("message").await;
    assert_eq!(message["offset"].as_u64(), next);

    // A drain while the disk is full again still exits 0.
    let filler = tmpfs.fill();
    for i in 0..2000 {
        let reply = alice
            .request(json!({"type": "publish", "room": "full", "data": "x".repeat(2000), "ref": format!("q{i}")}))
            .await;
        if reply["type"] == "error" {
            break;
        }
    }
    assert!(app.terminate().success(), "{}", app.log.lock().unwrap());
    std::fs::remove_file(&filler).unwrap();
}

/// Overwrites `len` bytes in the middle of the largest file under `dir`.
fn damage_largest_file(dir: &Path, len: usize) {
    use std::io::{Seek, SeekFrom, Write};
    let largest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.metadata().is_ok_and(|m| m.is_file()))
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .unwrap()
        .path();
    let size = std::fs::metadata(&largest).unwrap().len();
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&largest)
        .unwrap();
    file.seek(SeekFrom::Start(size / 2)).unwrap();
    let noise: Vec<u8> = (0..len).map(|i| (i * 7 + 13) as u8).collect();
    file.write_all(&noise).unwrap();
    file.sync_all().unwrap();
}

/// Damaged files are never served as if nothing happened: the hub either
/// refuses to start (exit 2, saying what is wrong) or starts with the
/// damaged rooms in a new epoch, so a resuming client gets
/// `recovered: false` instead of a silent gap or a reused offset.
#[tokio::test]
async fn damaged_files_are_detected() {
    let mut app = TestApp::spawn_with(&UNTHROTTLED).await;
    let mut c = app.connect("user=alice").await;
    c.join("fragile").await;
    for i in 0..200 {
        c.publish("fragile", json!({"n": i, "pad": "p".repeat(200)}))
            .await;
    }
    let seen = epoch_and_offset(&mut c, "fragile").await;
    drop(c);
    assert!(app.terminate().success());
    damage_largest_file(&app.data_dir(), 4096);

    let out = std::process::Command::new(bin())
        .env("ROOMHUB_SERVER__BIND", "127.0.0.1:0")
        .env("ROOMHUB_STORAGE__DATA_DIR", app.data_dir())
        .env("ROOMHUB_SERVER__SHUTDOWN_GRACE_MS", "1000")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Either it exits (refused) or it prints its listening line (started).
    let pid = out.id() as i32;
    let output = {
        let waiter = std::thread::spawn(move || out.wait_with_output().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while !waiter.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if !waiter.is_finished() {
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        waiter.join().unwrap()
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.code() == Some(2) {
        assert!(
            stderr.contains("does not hold a readable roomhub store"),
            "{stderr}"
        );
        assert!(!stderr.contains("earlier than 0.29"), "{stderr}");
        return;
    }
    // It started: the room must not carry on in the same epoch.
    app.restart();
    let mut c = app.connect("user=alice").await;
    let resumed = c
        .request(json!({"type": "join", "room": "fragile", "since": {"epoch": seen.0, "offset": seen.1}}))
        .await;
    let same_epoch = resumed["epoch"].as_u64() == Some(seen.0);
    if same_epoch {
        // Only if nothing the room served was lost.
        assert_eq!(resumed["offset"].as_u64(), Some(seen.1), "{resumed}");
        assert_eq!(resumed["recovered"], true);
    } else {
        assert_eq!(resumed["recovered"], false);
    }
}

/// Files that are not a sled database at all: exit 2 with a message that
/// says so, not a guess about sled versions.
#[tokio::test]
async fn a_data_dir_of_random_bytes_is_refused_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let noise: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 31 % 251) as u8).collect();
    std::fs::write(data.join("db"), &noise).unwrap();
    std::fs::write(data.join("conf"), &noise[..512]).unwrap();
    let out = std::process::Command::new(bin())
        .env("ROOMHUB_SERVER__BIND", "127.0.0.1:0")
        .env("ROOMHUB_STORAGE__DATA_DIR", &data)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("does not hold a readable roomhub store"),
        "{stderr}"
    );
    assert!(!stderr.contains("earlier than 0.29"), "{stderr}");
}

/// A room log with a hole (entries lost from the middle) is reported with
/// the room's name when it loads, and the room moves to a new epoch without
/// handing out an offset it had served.
#[tokio::test]
async fn a_room_log_with_missing_messages_moves_to_a_new_epoch() {
    let mut app = TestApp::spawn_with(&UNTHROTTLED).await;
    let mut c = app.connect("user=alice").await;
    c.join("holey").await;
    for i in 0..20 {
        c.publish("holey", json!(i)).await;
    }
    let seen = epoch_and_offset(&mut c, "holey").await;
    drop(c);
    assert!(app.terminate().success());
    {
        let db = sled::open(app.data_dir()).unwrap();
        let log = db.open_tree("log").unwrap();
        // Offset 10's slot in the room's ring (`history.max_per_room`, 1000).
        let key = roomhub::storage::keys::slot_key(b"holey", 10, 1000);
        assert!(log.remove(key).unwrap().is_some());
        db.flush().unwrap();
    }
    app.restart();
    let mut c = app.connect("user=alice").await;
    let resumed = c
        .request(json!({"type": "join", "room": "holey", "since": {"epoch": seen.0, "offset": 5}}))
        .await;
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_ne!(resumed["epoch"].as_u64(), Some(seen.0));
    assert!(resumed["offset"].as_u64().unwrap() >= seen.1);
    let next = c.publish("holey", json!("next")).await;
    assert!(next > seen.1, "offset {next} was served before");
    let log = app.log.lock().unwrap().clone();
    assert!(
        log.contains("room log is inconsistent") && log.contains("holey"),
        "{log}"
    );
    // Mended once: the missing message is marked lost, and the next start
    // finds the log whole (same epoch, the same messages).
    let (_, page) = app.get_json("/api/rooms/holey/messages?limit=100").await;
    drop(c);
    assert!(app.terminate().success());
    app.restart();
    let (_, again) = app.get_json("/api/rooms/holey/messages?limit=100").await;
    assert_eq!(
        again["epoch"], page["epoch"],
        "mended once, not at every start"
    );
    assert_eq!(again["messages"], page["messages"]);
}

/// With `batched` durability a failed flush may have taken acked messages
/// with it, so once the disk has room again the rooms that were being
/// written move to a new epoch: members are told to join again, and a
/// client resuming from what it saw gets `recovered: false`.
#[tokio::test]
async fn a_full_disk_in_batched_mode_ends_in_a_new_epoch() {
    let Some(tmpfs) = Tmpfs::mount(24) else {
        return;
    };
    let data_dir = tmpfs.path().join("data");
    let data_dir = data_dir.to_str().unwrap().to_owned();
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_STORAGE__DATA_DIR", data_dir.as_str()),
        ("ROOMHUB_STORAGE__DURABILITY", "batched"),
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "100000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "100000"),
    ])
    .await;
    let mut alice = app.connect("user=alice").await;
    let epoch = alice.join("lossy").await["epoch"].as_u64().unwrap();
    for i in 1..=5 {
        alice.publish("lossy", json!(i)).await;
    }
    let filler = tmpfs.fill();
    let mut seen = 5;
    for i in 0..2000 {
        let reply = alice
            .request(json!({"type": "publish", "room": "lossy", "data": "x".repeat(2000), "ref": format!("p{i}")}))
            .await;
        match reply["type"].as_str() {
            Some("ack") => seen = reply["offset"].as_u64().unwrap(),
            Some("error") => {
                assert_eq!(reply["code"], "unavailable", "{reply}");
                break;
            }
            _ => {}
        }
    }
    assert!(eventually(|| async { ready_status(&app).await == 503 }).await);
    std::fs::remove_file(&filler).unwrap();
    assert!(
        eventually(|| async { ready_status(&app).await == 200 }).await,
        "the hub recovers by itself"
    );
    // The member is told the room restarted, and joins again.
    let notice = alice.next_of("error").await;
    assert_eq!(notice["room"], "lossy", "{notice}");
    let resumed = alice
        .request(
            json!({"type": "join", "room": "lossy", "since": {"epoch": epoch, "offset": seen}}),
        )
        .await;
    assert_eq!(resumed["recovered"], false, "{resumed}");
    assert_ne!(resumed["epoch"].as_u64(), Some(epoch));
    let next = alice.publish("lossy", json!("after")).await;
    assert!(next > resumed["offset"].as_u64().unwrap());
}

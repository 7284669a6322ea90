//! Storage soak: many pruning rooms written for a while, with the process's
//! RSS and the data dir's size printed as it goes. This is the measurement
//! behind "memory and disk are bounded by what is retained": a store whose
//! footprint follows the number of messages that ever passed, rather than the
//! number retained, shows it here within a minute.
//!
//! `cargo bench --bench storage_soak -- [--rooms 200] [--keep 100]
//! [--seconds 45] [--durability batched|sync] [--every 5] [--ttl-ms 0]`
//! prints one CSV line per report (`secs,messages,retained,rss_mb,disk_mb`)
//! and a summary. Run by `cargo test --benches` it is a 2-second smoke test.

use roomhub::config::Durability;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{Message, RoomName, UserId};
use roomhub::storage::{HistoryStore, SledStore, WriteBatch, WriteOp};
use serde_json::value::RawValue;
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

struct Options {
    rooms: usize,
    keep: u64,
    seconds: u64,
    durability: Durability,
    every: u64,
    window: usize,
}

fn options() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let benching = args.iter().any(|a| a == "--bench");
    let value = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let number = |name: &str, default: u64| {
        value(name)
            .map(|v| v.parse().expect("a number"))
            .unwrap_or(default)
    };
    Options {
        rooms: number("--rooms", 200) as usize,
        keep: number("--keep", 100),
        // Under `cargo test --benches`: a smoke run.
        seconds: if benching { number("--seconds", 45) } else { 2 },
        durability: match value("--durability").as_deref() {
            Some("sync") => Durability::Sync,
            _ => Durability::Batched,
        },
        every: number("--every", 5),
        window: number("--window", 16) as usize,
    }
}

fn rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

fn dir_mb(dir: &Path) -> f64 {
    fn walk(dir: &Path) -> u64 {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        entries
            .flatten()
            .map(|e| match e.metadata() {
                Ok(m) if m.is_dir() => walk(&e.path()),
                Ok(m) => m.len(),
                Err(_) => 0,
            })
            .sum()
    }
    walk(dir) as f64 / (1024.0 * 1024.0)
}

fn main() {
    let opts = options();
    let dir = tempfile::tempdir().expect("a temp dir");
    let store =
        SledStore::open(dir.path(), opts.durability, Duration::from_millis(4)).expect("open");
    let rooms: Vec<RoomName> = (0..opts.rooms)
        .map(|i| RoomName::parse(&format!("soak-room-{i}")).expect("a room name"))
        .collect();
    let user = UserId::parse("soak").expect("a user id");
    // A typical chat message's size (the load tool's default payload).
    let data =
        RawValue::from_string(format!("{{\"text\":\"{}\"}}", "x".repeat(100))).expect("valid JSON");
    let mut last = vec![0u64; opts.rooms];
    let started = Instant::now();
    let mut next_report = opts.every;
    let mut written = 0u64;
    println!("secs,messages,retained,rss_mb,disk_mb");
    // What one retained message costs in keys and values (the same for all).
    let message_bytes = 2 + 16 + 8 + 1 + {
        let probe = Message {
            kind: MessageTag,
            room: &rooms[0],
            offset: 1_000_000,
            id: "0123456789abcdef0123456789abcdef",
            user: &user,
            data: &data,
            ts: 1,
        }
        .encode();
        probe.as_str().len()
    } as u64;
    while started.elapsed() < Duration::from_secs(opts.seconds) {
        // `window` messages per room per round, all in flight at once, like
        // one publisher per room; each append prunes like a room at its limit.
        let (tx, rx) = mpsc::channel();
        for (i, room) in rooms
            .iter()
            .enumerate()
            .cycle()
            .take(opts.rooms * opts.window)
        {
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
            if offset > opts.keep {
                let keep_from = offset + 1 - opts.keep;
                ops.push(WriteOp::Prune {
                    from: keep_from - 1,
                    to: keep_from,
                });
            }
            let tx = tx.clone();
            store.write(
                WriteBatch {
                    room: room.clone(),
                    epoch: 1,
                    generation: store.generation(),
                    ring: opts.keep,
                    ops,
                },
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
        }
        for _ in 0..opts.rooms * opts.window {
            rx.recv().expect("a result").expect("a durable write");
        }
        written += (opts.rooms * opts.window) as u64;
        let secs = started.elapsed().as_secs();
        if secs >= next_report {
            next_report += opts.every;
            let retained: u64 = last.iter().map(|&l| l.min(opts.keep)).sum();
            println!(
                "{secs},{written},{retained},{:.0},{:.0}",
                rss_mb(),
                dir_mb(dir.path())
            );
        }
    }
    store.flush().expect("flush");
    let secs = started.elapsed().as_secs_f64();
    let retained: u64 = last.iter().map(|&l| l.min(opts.keep)).sum();
    let retained_mb = (retained * message_bytes) as f64 / (1024.0 * 1024.0);
    println!(
        "summary: {written} messages in {secs:.1} s ({:.0}/s), {retained} retained ({retained_mb:.1} MB of keys and values), RSS {:.0} MB, data dir {:.0} MB",
        written as f64 / secs,
        rss_mb(),
        dir_mb(dir.path())
    );
    store.close().expect("close");
}

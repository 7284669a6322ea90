//! Storage append throughput: how many single-message batches per second the
//! sled store makes durable, with `sync` (group commit, one fsync shared by
//! every waiting batch) and `batched` (ack on write). Each iteration submits
//! a window of batches at once, as concurrent publishers would, and waits for
//! every `done`. `storage_prune`: the same with 100 rooms at their retention
//! limit, so every append also prunes the room's oldest message (the steady
//! state of a busy hub; `benches/storage_soak.rs` watches its memory and
//! disk over minutes).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roomhub::config::Durability;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{Message, RoomName, UserId};
use roomhub::storage::{HistoryStore, SledStore, WriteBatch, WriteOp};
use serde_json::value::RawValue;
use std::sync::mpsc;
use std::time::Duration;

fn append(c: &mut Criterion) {
    let room = RoomName::parse("bench").unwrap();
    let user = UserId::parse("u").unwrap();
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(100))).unwrap();
    let mut group = c.benchmark_group("storage_append");
    for durability in [Durability::Sync, Durability::Batched] {
        for window in [1u64, 64] {
            let dir = tempfile::tempdir().unwrap();
            // No commit delay: this measures the group commit itself.
            let store = SledStore::open(dir.path(), durability, Duration::ZERO).unwrap();
            let mut offset = 0u64;
            group.throughput(Throughput::Elements(window));
            let id = BenchmarkId::new(
                format!("{durability:?}").to_lowercase(),
                format!("in_flight_{window}"),
            );
            group.bench_function(id, |b| {
                b.iter(|| {
                    let (tx, rx) = mpsc::channel();
                    for _ in 0..window {
                        offset += 1;
                        let message = Message {
                            kind: MessageTag,
                            room: &room,
                            offset,
                            id: "id",
                            user: &user,
                            data: &data,
                            ts: 0,
                        }
                        .encode();
                        let tx = tx.clone();
                        store.write(
                            WriteBatch {
                                room: room.clone(),
                                epoch: 1,
                                generation: store.generation(),
                                ring: 1000,
                                ops: vec![WriteOp::Append { message, key: None }],
                            },
                            Box::new(move |r| tx.send(r).unwrap()),
                        );
                    }
                    for _ in 0..window {
                        rx.recv().unwrap().unwrap();
                    }
                })
            });
            store.close().unwrap();
        }
    }
    group.finish();
}

/// Appends to 100 rooms at their limit of 100 messages: each append prunes.
fn prune(c: &mut Criterion) {
    const ROOMS: usize = 100;
    const KEEP: u64 = 100;
    const WINDOW: usize = 1600; // 16 in flight per room
    let rooms: Vec<RoomName> = (0..ROOMS)
        .map(|i| RoomName::parse(&format!("bench-{i}")).unwrap())
        .collect();
    let user = UserId::parse("u").unwrap();
    let data = RawValue::from_string(format!("\"{}\"", "x".repeat(100))).unwrap();
    let mut group = c.benchmark_group("storage_prune");
    group.throughput(Throughput::Elements(WINDOW as u64));
    for durability in [Durability::Sync, Durability::Batched] {
        let dir = tempfile::tempdir().unwrap();
        let store = SledStore::open(dir.path(), durability, Duration::ZERO).unwrap();
        let mut last = vec![0u64; ROOMS];
        let id = BenchmarkId::new(
            format!("{durability:?}").to_lowercase(),
            "100_rooms_at_limit",
        );
        group.bench_function(id, |b| {
            b.iter(|| {
                let (tx, rx) = mpsc::channel();
                for i in (0..ROOMS).cycle().take(WINDOW) {
                    last[i] += 1;
                    let offset = last[i];
                    let message = Message {
                        kind: MessageTag,
                        room: &rooms[i],
                        offset,
                        id: "id",
                        user: &user,
                        data: &data,
                        ts: 0,
                    }
                    .encode();
                    let mut ops = vec![WriteOp::Append { message, key: None }];
                    if offset > KEEP {
                        ops.push(WriteOp::Prune {
                            from: offset - KEEP,
                            to: offset - KEEP + 1,
                        });
                    }
                    let tx = tx.clone();
                    store.write(
                        WriteBatch {
                            room: rooms[i].clone(),
                            epoch: 1,
                            generation: store.generation(),
                            ring: KEEP,
                            ops,
                        },
                        Box::new(move |r| tx.send(r).unwrap()),
                    );
                }
                for _ in 0..WINDOW {
                    rx.recv().unwrap().unwrap();
                }
            })
        });
        store.close().unwrap();
    }
    group.finish();
}

criterion_group!(benches, append, prune);
criterion_main!(benches);

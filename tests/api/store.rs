//! One conformance suite for every `HistoryStore` implementation.

use roomhub::config::Durability;
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{EncodedMessage, Message, RoomName, UserId};
use roomhub::storage::{
    ExpiryScan, HistoryStore, MemoryStore, SledStore, Take, WriteBatch, WriteOp,
};
use serde_json::value::RawValue;
use std::sync::mpsc;
use std::time::Duration;

pub(crate) fn message(room: &RoomName, offset: u64, ts: u64) -> EncodedMessage {
    let user = UserId::parse("u").unwrap();
    let data = RawValue::from_string(format!("{{\"n\":{offset}}}")).unwrap();
    Message {
        kind: MessageTag,
        room,
        offset,
        id: "id",
        user: &user,
        data: &data,
        ts,
    }
    .encode()
}

pub(crate) fn write(store: &dyn HistoryStore, room: &RoomName, epoch: u64, ops: Vec<WriteOp>) {
    write_ring(store, room, epoch, 1000, ops)
}

/// Writes one batch to a room whose ring has `ring` slots; waits for it.
pub(crate) fn write_ring(
    store: &dyn HistoryStore,
    room: &RoomName,
    epoch: u64,
    ring: u64,
    ops: Vec<WriteOp>,
) {
    let (tx, rx) = mpsc::channel();
    store.write(
        WriteBatch {
            room: room.clone(),
            epoch,
            generation: store.generation(),
            ring,
            ops,
        },
        Box::new(move |r| tx.send(r).unwrap()),
    );
    rx.recv_timeout(Duration::from_secs(10))
        .expect("done is called")
        .expect("write succeeds");
}

fn offsets(messages: &[EncodedMessage]) -> Vec<u64> {
    messages.iter().map(|m| m.offset).collect()
}

fn conformance(store: &dyn HistoryStore) {
    let room = RoomName::parse("conf").unwrap();
    let fresh = store.load_room(&room, 10).unwrap();
    assert_eq!(
        (fresh.epoch, fresh.last_offset, fresh.first_offset),
        (None, 0, 1)
    );
    let ops = (1..=20)
        .map(|o| WriteOp::Append {
            message: message(&room, o, 1000 + o),
            key: (o == 5).then(|| "k5".to_string()),
        })
        .collect();
    write(store, &room, 77, ops);
    let snap = store.load_room(&room, 3).unwrap();
    assert_eq!(
        (snap.epoch, snap.last_offset, snap.first_offset),
        (Some(77), 20, 1)
    );
    assert_eq!(offsets(&snap.tail), vec![18, 19, 20]);
    assert_eq!(snap.keys.len(), 1);
    assert_eq!(
        (
            snap.keys[0].key.as_str(),
            snap.keys[0].offset,
            snap.keys[0].ts
        ),
        ("k5", 5, 1005)
    );
    assert_eq!(
        offsets(&store.read_range(&room, 3, 9, 3, Take::Oldest).unwrap()),
        vec![3, 4, 5]
    );
    assert_eq!(
        offsets(&store.read_range(&room, 3, 9, 3, Take::Newest).unwrap()),
        vec![7, 8, 9]
    );
    assert!(store
        .read_range(&room, 9, 3, 3, Take::Newest)
        .unwrap()
        .is_empty());
    let m = &store.read_range(&room, 4, 4, 1, Take::Oldest).unwrap()[0];
    assert!(m.as_str().contains(r#""data":{"n":4}"#));
    assert_eq!(store.first_unexpired(&room, 1, 1010).unwrap(), 10);
    assert_eq!(store.first_unexpired(&room, 1, 99999).unwrap(), 21);
    write(
        store,
        &room,
        77,
        vec![
            WriteOp::Prune { from: 1, to: 10 },
            WriteOp::ForgetKeys(vec!["k5".into()]),
        ],
    );
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!((snap.first_offset, snap.last_offset), (10, 20));
    assert_eq!(snap.tail.len(), 11);
    assert!(snap.keys.is_empty());
    // What a failed write may have left is cut off; the header follows.
    let truncated = RoomName::parse("conf-truncated").unwrap();
    let ops = (1..=5)
        .map(|o| WriteOp::Append {
            message: message(&truncated, o, 1000 + o),
            key: Some(format!("key{o}")),
        })
        .collect();
    write(store, &truncated, 9, ops);
    write(store, &truncated, 9, vec![WriteOp::Truncate { after: 3 }]);
    let snap = store.load_room(&truncated, 100).unwrap();
    assert_eq!((snap.last_offset, offsets(&snap.tail)), (3, vec![1, 2, 3]));
    assert_eq!(snap.keys.len(), 3, "keys of the cut offsets are gone");
    assert!(snap.damage.is_none());
    // A header written on its own (a damaged log moving to a new epoch).
    write(store, &truncated, 10, vec![WriteOp::SetHeader { last: 3 }]);
    let snap = store.load_room(&truncated, 100).unwrap();
    assert_eq!((snap.epoch, snap.last_offset), (Some(10), 3));
    // Rooms do not see each other, even when one name extends the other.
    let other = RoomName::parse("conf2").unwrap();
    assert_eq!(store.load_room(&other, 10).unwrap().epoch, None);
    // The TTL sweep's scan: rooms whose oldest retained message is older
    // than the cutoff, in name order, a bounded step at a time.
    let names = |scan: &ExpiryScan| -> Vec<String> {
        scan.rooms.iter().map(|r| r.as_str().to_owned()).collect()
    };
    // Whether a step stopped before the end of the store.
    let next = |scan: &ExpiryScan| scan.next.is_some();
    let young = store.rooms_with_expired(None, 1005, 100, 100).unwrap();
    assert_eq!(
        (names(&young), next(&young)),
        (vec!["conf-truncated".into()], false)
    );
    let both = store.rooms_with_expired(None, 99_999, 100, 100).unwrap();
    assert_eq!(names(&both), vec!["conf", "conf-truncated"]);
    // One log per step: the next step carries on where this one stopped.
    let first = store.rooms_with_expired(None, 99_999, 1, 100).unwrap();
    assert_eq!((names(&first), next(&first)), (vec!["conf".into()], true));
    let second = store
        .rooms_with_expired(first.next.as_ref(), 99_999, 1, 100)
        .unwrap();
    assert_eq!(
        (names(&second), next(&second)),
        (vec!["conf-truncated".into()], false)
    );
    // At most `limit` rooms per step.
    let one = store.rooms_with_expired(None, 99_999, 100, 1).unwrap();
    assert_eq!((names(&one), next(&one)), (vec!["conf".into()], true));
    store.flush().unwrap();
    let id = store.node_id(None).unwrap();
    assert_eq!(store.node_id(None).unwrap(), id, "the node id is kept");
}

#[test]
fn memory_store_conforms() {
    conformance(&MemoryStore::new());
}

#[test]
fn sled_store_conforms_and_keeps_data_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    for durability in [Durability::Sync, Durability::Batched] {
        let path = dir.path().join(format!("{durability:?}"));
        let store = SledStore::open(&path, durability, Duration::ZERO).unwrap();
        conformance(&store);
        let id = store.node_id(None).unwrap();
        store.close().unwrap();
        drop(store);
        let store = SledStore::open(&path, durability, Duration::ZERO).unwrap();
        let snap = store
            .load_room(&RoomName::parse("conf").unwrap(), 100)
            .unwrap();
        assert_eq!(
            (snap.epoch, snap.first_offset, snap.last_offset),
            (Some(77), 10, 20)
        );
        assert_eq!(store.node_id(None).unwrap(), id);
    }
}

/// sled keeps each room's messages in a ring of `ring` slots: appends past
/// the limit overwrite the oldest (no prune needed), prunes delete only slots
/// no newer offset took over, and a re-layout to another size keeps the
/// newest that fit, offsets unchanged.
#[test]
fn sled_rings_overwrite_prune_and_relayout() {
    let dir = tempfile::tempdir().unwrap();
    let store = SledStore::open(dir.path(), Durability::Sync, Duration::ZERO).unwrap();
    let room = RoomName::parse("ring").unwrap();
    let batch = |ops: Vec<WriteOp>, ring: u64| {
        let (tx, rx) = mpsc::channel();
        store.write(
            WriteBatch {
                room: room.clone(),
                epoch: 3,
                generation: store.generation(),
                ring,
                ops,
            },
            Box::new(move |r| tx.send(r).unwrap()),
        );
        rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    };
    let append = |o: u64| WriteOp::Append {
        message: message(&room, o, 1000 + o),
        key: None,
    };
    batch((1..=8).map(append).collect(), 5);
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!((snap.first_offset, snap.last_offset, snap.ring), (4, 8, 5));
    assert_eq!(offsets(&snap.tail), vec![4, 5, 6, 7, 8]);
    assert!(snap.damage.is_none(), "{:?}", snap.damage);
    assert_eq!(
        offsets(&store.read_range(&room, 1, 100, 100, Take::Oldest).unwrap()),
        vec![4, 5, 6, 7, 8]
    );
    // Append 9 and prune what the room's limit (5) drops: slot of 4 is 9's.
    batch(vec![append(9), WriteOp::Prune { from: 4, to: 5 }], 5);
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!(offsets(&snap.tail), vec![5, 6, 7, 8, 9]);
    // A TTL-style prune of the two oldest.
    batch(vec![WriteOp::Prune { from: 5, to: 7 }], 5);
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!((snap.first_offset, offsets(&snap.tail)), (7, vec![7, 8, 9]));
    assert_eq!(store.first_unexpired(&room, 1, 1008).unwrap(), 8);
    // A smaller ring keeps the newest two; a larger one keeps them all.
    batch(vec![WriteOp::Relayout], 2);
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!((snap.ring, offsets(&snap.tail)), (2, vec![8, 9]));
    assert!(snap.damage.is_none(), "{:?}", snap.damage);
    batch(vec![WriteOp::Relayout], 50);
    batch((10..=12).map(append).collect(), 50);
    let snap = store.load_room(&room, 100).unwrap();
    assert_eq!(
        (snap.ring, offsets(&snap.tail)),
        (50, vec![8, 9, 10, 11, 12])
    );
    assert!(snap.damage.is_none(), "{:?}", snap.damage);
}

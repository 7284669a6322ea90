//! The protocol codec: decoding a client publish, encoding a message once.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roomhub::protocol::server::MessageTag;
use roomhub::protocol::{decode, Message, RoomName, UserId};
use serde_json::value::RawValue;
use std::hint::black_box;

fn codec(c: &mut Criterion) {
    let frame = format!(
        r#"{{"type":"publish","room":"general","data":{{"text":"{}"}},"ref":"r-12345","key":"k-1"}}"#,
        "x".repeat(100)
    );
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_publish", |b| {
        b.iter(|| decode(black_box(&frame)).unwrap())
    });
    let room = RoomName::parse("general").unwrap();
    let user = UserId::parse("alice").unwrap();
    let data = RawValue::from_string(format!(r#"{{"text":"{}"}}"#, "x".repeat(100))).unwrap();
    group.bench_function("encode_message", |b| {
        b.iter(|| {
            Message {
                kind: MessageTag,
                room: &room,
                offset: black_box(42),
                id: "0123456789abcdef0123456789abcdef",
                user: &user,
                data: &data,
                ts: 1_700_000_000_000,
            }
            .encode()
        })
    });
    group.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);

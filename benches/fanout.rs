//! Room fan-out: one publish through the real room actor (in-memory store,
//! so no disk) to N member sessions, timed until the publish is acked, by
//! which time the room has handed the frame to every member. Members are
//! frame sinks that count what they take, so this is the room's cost (encode
//! once, offer to N sessions) without sockets. Reported as deliveries
//! (elements) per second.

use actix::prelude::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roomhub::config::Settings;
use roomhub::metrics::Metrics;
use roomhub::outbound::{FrameSink, Outbound, SessionLink, Taken, WireFrames};
use roomhub::protocol::{RoomName, SessionId, UserId};
use roomhub::room::{Join, Publish, PublishReply, RoomContext, RoomRegistry};
use roomhub::storage::MemoryStore;
use serde_json::value::RawValue;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

/// A member session reduced to counting the frames it is offered.
#[derive(Default)]
struct Tally {
    frames: AtomicU64,
}

impl FrameSink for Tally {
    fn take(&self, frames: &WireFrames) -> Taken {
        self.frames
            .fetch_add(frames.count() as u64, Ordering::Relaxed);
        Taken::All
    }
}

/// Where the members' notices (never sent here) would go.
struct Notices;

impl Actor for Notices {
    type Context = Context<Self>;
}

impl Handler<Outbound> for Notices {
    type Result = ();

    fn handle(&mut self, _msg: Outbound, _ctx: &mut Context<Self>) {}
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("room_fanout");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let data = RawValue::from_string(format!(r#"{{"text":"{}"}}"#, "x".repeat(88))).unwrap();
    let system = System::new();
    let registry = system.block_on(async {
        RoomRegistry::new(RoomContext {
            settings: Arc::new(Settings::default()),
            store: Arc::new(MemoryStore::new()),
            metrics: Metrics::new(),
            cluster: None,
            events: None,
        })
    });
    for members in [10u64, 1_000, 10_000] {
        let name = RoomName::parse(&format!("bench-{members}")).unwrap();
        let tally = Arc::new(Tally::default());
        let room = system.block_on(async {
            let room = registry.get_or_start(&name);
            // One user for every member: presence changes (and the
            // `user_joined` frames they fan out) happen once, not N times.
            let user = UserId::parse("bench").unwrap();
            let notices = Notices.start().recipient();
            for _ in 0..members {
                room.send(Join {
                    session: SessionId::random(),
                    user: user.clone(),
                    link: SessionLink::new(tally.clone(), notices.clone()),
                    since: None,
                    history: 0,
                    reference: None,
                })
                .await
                .expect("room running")
                .expect("joined");
            }
            room
        });
        let user = UserId::parse("publisher").unwrap();
        group.throughput(Throughput::Elements(members));
        group.bench_function(BenchmarkId::from_parameter(members), |b| {
            b.iter_custom(|iters| {
                system.block_on(async {
                    let began = Instant::now();
                    for _ in 0..iters {
                        let goal = tally.frames.load(Ordering::Relaxed) + members;
                        let (tx, rx) = oneshot::channel();
                        room.do_send(Publish {
                            user: user.clone(),
                            data: data.clone(),
                            key: None,
                            reply: PublishReply::Api(tx),
                        });
                        rx.await.expect("acked").expect("stored");
                        // Fanned out before the ack.
                        assert_eq!(tally.frames.load(Ordering::Relaxed), goal);
                    }
                    began.elapsed()
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);

//! End-to-end broadcast over loopback WebSockets: a hub process (the built
//! `roomhub` binary, `batched` durability, limits lifted), one room with
//! 1 000 subscribers and one publisher. An iteration publishes a burst and
//! waits until every subscriber has received every message of it; reported
//! as deliveries (elements) per second. Bounded: 10 samples of ≤ 5 s each.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use futures_util::{SinkExt, StreamExt};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SUBSCRIBERS: u64 = 1_000;
const ROOM: &str = "e2e";
/// The longest one round may take before the bench gives up.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// The hub under test; killed when dropped.
struct Hub {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hub_binary() -> PathBuf {
    match option_env!("CARGO_BIN_EXE_roomhub") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/release/roomhub"),
    }
}

/// Lets this process and the hub it starts hold the sockets of the run.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn start_hub() -> Hub {
    raise_nofile_limit();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(hub_binary())
        .current_dir(dir.path())
        .env("ROOMHUB_SERVER__BIND", "127.0.0.1:0")
        .env("ROOMHUB_STORAGE__DATA_DIR", dir.path().join("data"))
        .env("ROOMHUB_STORAGE__DURABILITY", "batched")
        .env("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1000000")
        .env("ROOMHUB_LIMITS__PUBLISH_BURST", "1000000")
        .env("ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP", "100000")
        .env("ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "100000")
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", hub_binary().display()));
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let addr = loop {
        match lines.next() {
            Some(Ok(line)) => {
                if let Some(rest) = line.strip_prefix("roomhub listening on http://") {
                    break rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                }
            }
            _ => {
                let _ = child.kill();
                panic!("the hub did not start");
            }
        }
    };
    // Keep draining stdout so the hub never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Hub {
        child,
        addr,
        _dir: dir,
    }
}

async fn connect_and_join(addr: &str, user: &str) -> Ws {
    let url = format!("ws://{addr}/ws?user={user}");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect");
    let join = format!(r#"{{"type":"join","room":"{ROOM}","history":0}}"#);
    ws.send(Message::Text(join)).await.expect("send join");
    while let Some(frame) = ws.next().await {
        if let Message::Text(text) = frame.expect("frame") {
            if text.starts_with(r#"{"type":"joined""#) {
                return ws;
            }
        }
    }
    panic!("no joined for {user}");
}

/// Messages received by all subscribers, and the count that ends a round.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    goal: AtomicU64,
    done: Notify,
}

fn e2e(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let hub = start_hub();
    let tally = Arc::new(Tally::default());
    let mut publisher = runtime.block_on(async {
        for i in 0..SUBSCRIBERS {
            let mut ws = connect_and_join(&hub.addr, &format!("sub-{i}")).await;
            let tally = tally.clone();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = ws.next().await {
                    if let Message::Text(text) = frame {
                        if text.starts_with(r#"{"type":"message""#) {
                            let n = tally.received.fetch_add(1, Ordering::Relaxed) + 1;
                            if n == tally.goal.load(Ordering::Relaxed) {
                                tally.done.notify_one();
                            }
                        }
                    }
                }
            });
        }
        connect_and_join(&hub.addr, "publisher").await
    });
    let publish = format!(
        r#"{{"type":"publish","room":"{ROOM}","data":{{"text":"{}"}}}}"#,
        "x".repeat(88)
    );
    let mut group = c.benchmark_group("e2e_broadcast");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for burst in [1u64, 64] {
        group.throughput(Throughput::Elements(SUBSCRIBERS * burst));
        let id = BenchmarkId::new(
            format!("{SUBSCRIBERS}_subscribers"),
            format!("burst_{burst}"),
        );
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let began = Instant::now();
                    for _ in 0..iters {
                        let goal = tally.received.load(Ordering::Relaxed) + SUBSCRIBERS * burst;
                        tally.goal.store(goal, Ordering::Relaxed);
                        for _ in 0..burst {
                            publisher
                                .feed(Message::Text(publish.clone()))
                                .await
                                .expect("publish");
                        }
                        publisher.flush().await.expect("publish");
                        tokio::time::timeout(ROUND_TIMEOUT, tally.done.notified())
                            .await
                            .expect("every subscriber received the burst in time");
                        // The publisher's own copies and acks: read them so its
                        // socket never backs up.
                        let mut own = 0;
                        while own < burst {
                            match publisher.next().await {
                                Some(Ok(Message::Text(t))) if t.starts_with(r#"{"type":"ack""#) => {
                                    own += 1
                                }
                                Some(Ok(_)) => {}
                                other => panic!("publisher connection ended: {other:?}"),
                            }
                        }
                    }
                    began.elapsed()
                })
            })
        });
    }
    group.finish();
    drop(publisher);
    drop(hub);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

criterion_group!(benches, e2e);
criterion_main!(benches);

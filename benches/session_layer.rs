//! The session layer alone, side by side (issue 4): two minimal broadcast
//! servers that differ only in how a WebSocket session is held.
//!
//! - `actors`: actix-web + actix-web-actors. Each connection is a
//!   `WebsocketContext` actor; a broadcaster actor holds their `Recipient`s and
//!   `try_send`s every published frame (the publisher's `ByteString`, shared)
//!   to each; the session does `ctx.text(frame)`.
//! - `actix_ws`: actix-web + actix-ws. Each connection is an `actix_ws::Session`
//!   plus a task reading its `MessageStream`; a broadcaster task holds the
//!   `Session`s and calls `session.text(frame)` on each with the same shared
//!   frame.
//!
//! Neither has rooms, a store or a protocol: what is left is the session layer
//! and the HTTP/1 dispatcher both share. Workload as in `benches/e2e.rs`: one
//! publisher, 1 000 subscribers over loopback (tokio-tungstenite); an
//! iteration publishes a burst (1, 16 or 64 frames) and waits until every
//! subscriber has every frame; reported as deliveries per second.
//!
//! Each server runs on its own actix `System` in a background thread with one
//! worker. When the process may use two CPUs or more, the server's worker is
//! pinned to the first and the clients (this thread) to the second, like the
//! hub and the load tool in BENCHMARKS.md. Wall-clock deliveries/s is bound by
//! the clients, so the bench also prints the server worker thread's CPU time
//! per delivery (`pthread_getcpuclockid`), summed over every iteration run.
//!
//! `SESSION_LAYER_IDLE=2000 cargo bench --bench session_layer` also measures
//! memory per idle connection: each server in a child process (this binary,
//! re-run), VmRSS before and after that many connections.

use actix::prelude::*;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use actix_web_actors::ws as actors_ws;
use bytestring::ByteString;
use criterion::{BenchmarkId, Criterion, Throughput};
use futures_util::{SinkExt, StreamExt};
use std::cell::Cell;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

const SUBSCRIBERS: u64 = 1_000;
/// The longest one round may take before the bench gives up.
const ROUND_TIMEOUT: Duration = Duration::from_secs(10);
/// What the server sends a subscriber once it is in the broadcast list.
const JOINED: &str = "joined";
/// Runs this binary as one server only (for the idle-memory measurement).
const SERVE_ENV: &str = "SESSION_LAYER_SERVE";
const IDLE_ENV: &str = "SESSION_LAYER_IDLE";

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Layer {
    Actors,
    ActixWs,
}

impl Layer {
    fn name(self) -> &'static str {
        match self {
            Layer::Actors => "actors",
            Layer::ActixWs => "actix_ws",
        }
    }

    fn from_name(name: &str) -> Layer {
        match name {
            "actors" => Layer::Actors,
            "actix_ws" => Layer::ActixWs,
            other => panic!("unknown session layer {other}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Server 1: actix-web-actors.

#[derive(Message)]
#[rtype(result = "()")]
struct Frame(ByteString);

#[derive(Message)]
#[rtype(result = "()")]
struct Join(Recipient<Frame>);

#[derive(Message)]
#[rtype(result = "()")]
struct Publish(ByteString);

#[derive(Default)]
struct ActorBroadcaster {
    sessions: Vec<Recipient<Frame>>,
}

impl Actor for ActorBroadcaster {
    type Context = Context<Self>;
}

impl Handler<Join> for ActorBroadcaster {
    type Result = ();
    fn handle(&mut self, msg: Join, _: &mut Context<Self>) {
        let _ = msg.0.try_send(Frame(ByteString::from_static(JOINED)));
        self.sessions.push(msg.0);
    }
}

impl Handler<Publish> for ActorBroadcaster {
    type Result = ();
    fn handle(&mut self, msg: Publish, _: &mut Context<Self>) {
        // A full mailbox drops the frame (the round then times out): the
        // sessions' mailboxes are sized so that a burst of 64 never fills one.
        self.sessions.retain(|session| {
            !matches!(
                session.try_send(Frame(msg.0.clone())),
                Err(SendError::Closed(_))
            )
        });
    }
}

struct ActorSession {
    broadcaster: Addr<ActorBroadcaster>,
    subscribe: bool,
}

impl Actor for ActorSession {
    type Context = actors_ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(1024);
        if self.subscribe {
            self.broadcaster.do_send(Join(ctx.address().recipient()));
        }
    }
}

impl Handler<Frame> for ActorSession {
    type Result = ();
    fn handle(&mut self, msg: Frame, ctx: &mut Self::Context) {
        ctx.text(msg.0);
    }
}

impl StreamHandler<Result<actors_ws::Message, actors_ws::ProtocolError>> for ActorSession {
    fn handle(
        &mut self,
        msg: Result<actors_ws::Message, actors_ws::ProtocolError>,
        ctx: &mut Self::Context,
    ) {
        match msg {
            Ok(actors_ws::Message::Text(text)) => self.broadcaster.do_send(Publish(text)),
            Ok(actors_ws::Message::Ping(bytes)) => ctx.pong(&bytes),
            Ok(actors_ws::Message::Close(_)) | Err(_) => ctx.stop(),
            Ok(_) => {}
        }
    }
}

async fn actors_endpoint(
    req: HttpRequest,
    body: web::Payload,
    broadcaster: web::Data<Addr<ActorBroadcaster>>,
) -> Result<HttpResponse, actix_web::Error> {
    let session = ActorSession {
        broadcaster: broadcaster.get_ref().clone(),
        subscribe: req.query_string() == "sub",
    };
    actors_ws::start(session, &req, body)
}

// ---------------------------------------------------------------------------
// Server 2: actix-ws.

enum WsCommand {
    Join(actix_ws::Session),
    Publish(ByteString),
}

async fn ws_broadcaster(mut commands: mpsc::UnboundedReceiver<WsCommand>) {
    let mut sessions: Vec<actix_ws::Session> = Vec::new();
    while let Some(command) = commands.recv().await {
        match command {
            WsCommand::Join(mut session) => {
                if session.text(JOINED).await.is_ok() {
                    sessions.push(session);
                }
            }
            WsCommand::Publish(frame) => {
                // `text` waits only when the session's channel (32 frames in
                // actix-ws) is full, i.e. within a burst of 64.
                let mut closed = false;
                for session in sessions.iter_mut() {
                    closed |= session.text(frame.clone()).await.is_err();
                }
                if closed {
                    let mut kept = Vec::with_capacity(sessions.len());
                    for mut session in sessions.drain(..) {
                        // An empty text frame would reach the client: probe
                        // with a pong instead, which the clients ignore.
                        if session.pong(b"").await.is_ok() {
                            kept.push(session);
                        }
                    }
                    sessions = kept;
                }
            }
        }
    }
}

async fn actix_ws_endpoint(
    req: HttpRequest,
    body: web::Payload,
    broadcaster: web::Data<mpsc::UnboundedSender<WsCommand>>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, mut session, mut stream) = actix_ws::handle(&req, body)?;
    if req.query_string() == "sub" {
        let _ = broadcaster.send(WsCommand::Join(session.clone()));
    }
    let broadcaster = broadcaster.get_ref().clone();
    actix_web::rt::spawn(async move {
        while let Some(Ok(msg)) = stream.recv().await {
            match msg {
                actix_ws::Message::Text(text) => {
                    let _ = broadcaster.send(WsCommand::Publish(text));
                }
                actix_ws::Message::Ping(bytes) => {
                    let ponged = session.pong(&bytes).await;
                    if ponged.is_err() {
                        break;
                    }
                }
                actix_ws::Message::Close(_) => break,
                _ => {}
            }
        }
        let _ = session.close(None).await;
    });
    Ok(response)
}

// ---------------------------------------------------------------------------
// Running a server.

/// The server's worker thread: its CPU clock and thread id, once it has
/// started.
struct WorkerClock(AtomicI64, AtomicI64);

impl WorkerClock {
    const UNSET: i64 = i64::MIN;

    /// Called on the worker thread: records its CPU clock and pins it.
    fn record(&self, pin_to: Option<usize>) {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: plain syscalls on the calling thread and a local.
        unsafe {
            if libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) == 0 {
                self.0.store(clock as i64, Ordering::SeqCst);
            }
            self.1.store(libc::gettid() as i64, Ordering::SeqCst);
        }
        if let Some(cpu) = pin_to {
            pin_current_thread(cpu);
        }
    }

    fn cpu_ns(&self) -> u64 {
        let clock = self.0.load(Ordering::SeqCst);
        assert_ne!(clock, Self::UNSET, "the server's worker has not started");
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: reads a clock into a local struct.
        let rc = unsafe { libc::clock_gettime(clock as libc::clockid_t, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime on the server's worker");
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// The worker's system (kernel) CPU time in clock ticks, from
    /// /proc/self/task/<tid>/stat (field 15, `stime`).
    fn system_ticks(&self) -> u64 {
        let tid = self.1.load(Ordering::SeqCst);
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat"))
            .expect("the worker's stat");
        // The fields after the command name, which is in parentheses.
        let rest = &stat[stat.rfind(')').expect("stat") + 2..];
        rest.split_whitespace()
            .nth(12)
            .and_then(|f| f.parse().ok())
            .expect("stime")
    }
}

struct Server {
    addr: SocketAddr,
    clock: Arc<WorkerClock>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn stop(mut self, runtime: &tokio::runtime::Runtime) {
        // The stop command is a channel send; any runtime can drive it.
        runtime.block_on(self.handle.stop(false));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn start_server(layer: Layer, pin_to: Option<usize>) -> Server {
    let clock = Arc::new(WorkerClock(
        AtomicI64::new(WorkerClock::UNSET),
        AtomicI64::new(0),
    ));
    let (tx, rx) = std::sync::mpsc::channel();
    let worker_clock = clock.clone();
    let thread = std::thread::Builder::new()
        .name(format!("server-{}", layer.name()))
        .spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let builder = match layer {
                    Layer::Actors => HttpServer::new(move || {
                        worker_clock.record(pin_to);
                        let broadcaster = ActorBroadcaster::default().start();
                        App::new()
                            .app_data(web::Data::new(broadcaster))
                            .route("/ws", web::get().to(actors_endpoint))
                    })
                    .workers(1)
                    .disable_signals()
                    .backlog(4096)
                    .shutdown_timeout(1)
                    .bind("127.0.0.1:0")
                    .map(|b| (b.addrs()[0], b.run())),
                    Layer::ActixWs => HttpServer::new(move || {
                        worker_clock.record(pin_to);
                        let (commands, rx) = mpsc::unbounded_channel();
                        // Unconstrained: tokio's cooperative budget would
                        // otherwise make the loop yield every 128 sends, so
                        // that each session writes each frame on its own.
                        actix_web::rt::spawn(tokio::task::unconstrained(ws_broadcaster(rx)));
                        App::new()
                            .app_data(web::Data::new(commands))
                            .route("/ws", web::get().to(actix_ws_endpoint))
                    })
                    .workers(1)
                    .disable_signals()
                    .backlog(4096)
                    .shutdown_timeout(1)
                    .bind("127.0.0.1:0")
                    .map(|b| (b.addrs()[0], b.run())),
                };
                let (addr, server) = builder.expect("bind 127.0.0.1:0");
                tx.send((addr, server.handle()))
                    .expect("report the address");
                let _ = server.await;
            })
        })
        .expect("server thread");
    let (addr, handle) = rx.recv().expect("the server did not start");
    Server {
        addr,
        clock,
        handle,
        thread: Some(thread),
    }
}

// ---------------------------------------------------------------------------
// Machine helpers.

/// The CPUs this process may run on.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; the syscall fills it in.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| libc::CPU_ISSET(cpu, &set))
            .collect()
    }
}

fn pin_current_thread(cpu: usize) {
    // SAFETY: as above; pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Lets this process hold the sockets of the run (both ends of each).
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

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .expect("VmRSS")
}

// ---------------------------------------------------------------------------
// Clients.

async fn connect(addr: SocketAddr, subscribe: bool) -> Ws {
    let url = if subscribe {
        format!("ws://{addr}/ws?sub")
    } else {
        format!("ws://{addr}/ws")
    };
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connect");
    if subscribe {
        match ws.next().await {
            Some(Ok(Message::Text(text))) if text == JOINED => {}
            other => panic!("expected {JOINED}, got {other:?}"),
        }
    }
    ws
}

/// Frames received by all subscribers, and the count that ends a round.
#[derive(Default)]
struct Tally {
    received: AtomicU64,
    goal: AtomicU64,
    done: Notify,
}

fn bench_layer(c: &mut Criterion, layer: Layer, cpus: &[usize]) {
    let (server_cpu, client_cpu) = match cpus {
        [first, second, ..] => (Some(*first), Some(*second)),
        _ => (None, None),
    };
    let server = start_server(layer, server_cpu);
    if let Some(cpu) = client_cpu {
        pin_current_thread(cpu);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tally = Arc::new(Tally::default());
    let (mut publisher, readers) = runtime.block_on(async {
        let mut readers = Vec::new();
        for _ in 0..SUBSCRIBERS {
            let mut ws = connect(server.addr, true).await;
            let tally = tally.clone();
            readers.push(tokio::spawn(async move {
                while let Some(Ok(frame)) = ws.next().await {
                    if let Message::Text(_) = frame {
                        let n = tally.received.fetch_add(1, Ordering::Relaxed) + 1;
                        if n == tally.goal.load(Ordering::Relaxed) {
                            tally.done.notify_one();
                        }
                    }
                }
            }));
        }
        (connect(server.addr, false).await, readers)
    });
    // About the size of a roomhub `message` event with 100 bytes of data.
    let frame = format!(
        r#"{{"type":"message","room":"bench","offset":1,"data":{{"text":"{}"}}}}"#,
        "x".repeat(88)
    );

    let mut group = c.benchmark_group(format!("session_layer/{}", layer.name()));
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    // 16 as well as 64: actix's StreamHandler yields after 16 frames from one
    // stream (the publisher's), so the actors server fans a burst of 64 out in
    // groups of 16, four socket writes per subscriber, while an actix-ws
    // session's channel holds 32 frames: two writes. At 16 both write once.
    for burst in [1u64, 16, 64] {
        let deliveries = SUBSCRIBERS * burst;
        group.throughput(Throughput::Elements(deliveries));
        let id = BenchmarkId::new(
            format!("{SUBSCRIBERS}_subscribers"),
            format!("burst_{burst}"),
        );
        // Server CPU and wall time over every iteration criterion runs.
        let cpu_ns = Cell::new(0u64);
        let system_ticks = Cell::new(0u64);
        let wall_ns = Cell::new(0u64);
        let delivered = Cell::new(0u64);
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                runtime.block_on(async {
                    let cpu_before = server.clock.cpu_ns();
                    let system_before = server.clock.system_ticks();
                    let began = Instant::now();
                    for _ in 0..iters {
                        let goal = tally.received.load(Ordering::Relaxed) + deliveries;
                        tally.goal.store(goal, Ordering::Relaxed);
                        for _ in 0..burst {
                            publisher
                                .feed(Message::Text(frame.clone()))
                                .await
                                .expect("publish");
                        }
                        publisher.flush().await.expect("publish");
                        tokio::time::timeout(ROUND_TIMEOUT, tally.done.notified())
                            .await
                            .expect("every subscriber received the burst in time");
                    }
                    let elapsed = began.elapsed();
                    cpu_ns.set(cpu_ns.get() + server.clock.cpu_ns() - cpu_before);
                    system_ticks
                        .set(system_ticks.get() + server.clock.system_ticks() - system_before);
                    wall_ns.set(wall_ns.get() + elapsed.as_nanos() as u64);
                    delivered.set(delivered.get() + iters * deliveries);
                    elapsed
                })
            })
        });
        if delivered.get() == 0 {
            continue; // filtered out
        }
        let n = delivered.get() as f64;
        // SAFETY: sysconf has no preconditions.
        let tick_ns = 1e9 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        println!(
            "session_layer/{}/burst_{burst}: server worker CPU {:.0} ns per delivery \
             ({:.2} M deliveries/s per server core; {:.0} % of it system time), \
             busy {:.0} % of wall time, over {} deliveries",
            layer.name(),
            cpu_ns.get() as f64 / n,
            n / cpu_ns.get().max(1) as f64 * 1e3,
            system_ticks.get() as f64 * tick_ns / cpu_ns.get().max(1) as f64 * 100.0,
            cpu_ns.get() as f64 / wall_ns.get().max(1) as f64 * 100.0,
            delivered.get(),
        );
    }
    group.finish();

    runtime.block_on(async {
        let _ = publisher.close(None).await;
    });
    for reader in readers {
        reader.abort();
    }
    drop(publisher);
    server.stop(&runtime);
    runtime.shutdown_timeout(Duration::from_secs(1));
}

// ---------------------------------------------------------------------------
// Idle memory: each server in a child process, connections from this one.

/// Child mode: serve until stdin closes.
fn serve_only(layer: Layer) {
    let server = start_server(layer, None);
    // Let the worker start before the parent's baseline reading.
    while server.clock.0.load(Ordering::SeqCst) == WorkerClock::UNSET {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("listening {}", server.addr);
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    server.stop(&runtime);
}

fn idle_memory(connections: usize) {
    let exe = std::env::current_exe().expect("current exe");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for layer in [Layer::Actors, Layer::ActixWs] {
        let mut child = Command::new(&exe)
            .env(SERVE_ENV, layer.name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server process");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let addr: SocketAddr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(addr) = line.strip_prefix("listening ") {
                        break addr.parse().expect("address");
                    }
                }
                _ => panic!("the server process did not start"),
            }
        };
        std::thread::sleep(Duration::from_millis(200));
        let before = vm_rss_kib(child.id());
        let clients = runtime.block_on(async {
            let mut clients = Vec::with_capacity(connections);
            for _ in 0..connections {
                clients.push(connect(addr, true).await);
            }
            clients
        });
        std::thread::sleep(Duration::from_millis(500));
        let after = vm_rss_kib(child.id());
        println!(
            "session_layer/{}/idle: VmRSS {:.1} MB -> {:.1} MB with {connections} idle connections: {:.1} KiB per connection",
            layer.name(),
            before as f64 / 1024.0,
            after as f64 / 1024.0,
            (after.saturating_sub(before)) as f64 / connections as f64,
        );
        drop(clients);
        drop(child.stdin.take());
        let _ = child.wait();
    }
}

fn main() {
    raise_nofile_limit();
    if let Ok(layer) = std::env::var(SERVE_ENV) {
        serve_only(Layer::from_name(&layer));
        return;
    }
    let cpus = allowed_cpus();
    let mut criterion = Criterion::default().configure_from_args();
    for layer in [Layer::Actors, Layer::ActixWs] {
        bench_layer(&mut criterion, layer, &cpus);
    }
    criterion.final_summary();
    if let Some(connections) = std::env::var(IDLE_ENV).ok().and_then(|n| n.parse().ok()) {
        idle_memory(connections);
    }
}

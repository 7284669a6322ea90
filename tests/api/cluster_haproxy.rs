//! A rolling restart behind a real haproxy: three real roomhub nodes on one
//! real nats-server (JetStream), haproxy running `config/cluster/haproxy.cfg`
//! (with this test's ports) in front, and every client connected through
//! haproxy. While two publishers publish without pause, each node in turn is
//! drained (SIGTERM), waited for, started again and waited for. Clients that
//! are told to go (or dropped) reconnect through haproxy and resume with
//! `since`; publishes that got no ack are retried with the same `key`. In the
//! end every subscriber has seen exactly the acked messages, once each, in
//! order.

use crate::helpers::{free_port, TestApp, WAIT};
use crate::nats::{spawn_node, wait_ready, NatsServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The shipped config, run with this test's ports.
const HAPROXY_CFG: &str = include_str!("../../config/cluster/haproxy.cfg");
const ROOM: &str = "rolling";
/// Big messages for the stalled clients to not read (see `stalled_client`).
const BALLAST: &str = "ballast";
const SUBSCRIBERS: usize = 6;
const PUBLISHERS: usize = 2;
/// Each publisher publishes at least this many, and goes on until the rolling
/// restart is over (at most `MAX_PER_PUBLISHER`).
const MIN_PER_PUBLISHER: usize = 300;
const MAX_PER_PUBLISHER: usize = 2000;
/// Between one ack and the next publish.
const PACE: Duration = Duration::from_millis(8);
/// Nothing at all (the hub pings every second here) for this long: the
/// connection is treated as dead.
const SILENCE: Duration = Duration::from_secs(5);
/// How long the whole exercise may take, per client.
const BUDGET: Duration = Duration::from_secs(120);

fn haproxy_bin() -> &'static str {
    [
        "/usr/sbin/haproxy",
        "/usr/local/sbin/haproxy",
        "/usr/bin/haproxy",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).is_file())
    .unwrap_or("haproxy")
}

/// `haproxy -n 2000 -f <cfg> -db` as a child process, killed on drop.
struct HaProxy {
    port: u16,
    child: Child,
    log: Arc<Mutex<String>>,
    _dir: TempDir,
}

fn replace_once(text: &mut String, from: &str, to: &str) {
    assert_eq!(
        text.matches(from).count(),
        1,
        "config/cluster/haproxy.cfg should contain `{from}` exactly once"
    );
    *text = text.replacen(from, to, 1);
}

impl HaProxy {
    fn start(nodes: [u16; 3]) -> HaProxy {
        let port = free_port();
        let mut cfg = HAPROXY_CFG.to_owned();
        replace_once(&mut cfg, "bind :8080", &format!("bind 127.0.0.1:{port}"));
        for (i, node) in nodes.iter().enumerate() {
            let server = format!("server node{} 127.0.0.1:", i + 1);
            let shipped = format!("{server}{}\n", 8081 + i);
            replace_once(&mut cfg, &shipped, &format!("{server}{node}\n"));
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).expect("write haproxy.cfg");
        // `-n`: the production connection limit needs more fds than a test
        // may have (and haproxy refuses to start without them).
        let check = Command::new(haproxy_bin())
            .args(["-n", "2000", "-c"])
            .arg("-f")
            .arg(&path)
            .output()
            .expect("run haproxy -c (is haproxy installed? .ci/test installs it)");
        assert!(
            check.status.success(),
            "haproxy -c: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
        let mut child = Command::new(haproxy_bin())
            .args(["-n", "2000", "-f"])
            .arg(&path)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start haproxy");
        let log = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        for pipe in [
            Box::new(stdout) as Box<dyn std::io::Read + Send>,
            Box::new(stderr),
        ] {
            let sink = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    let mut log = sink.lock().unwrap();
                    log.push_str(&line);
                    log.push('\n');
                }
            });
        }
        HaProxy {
            port,
            child,
            log,
            _dir: dir,
        }
    }

    fn ws_url(&self, user: &str) -> String {
        format!("ws://127.0.0.1:{}/ws?user={user}", self.port)
    }

    fn http_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits until the frontend accepts and `/readyz` through it answers 200.
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("haproxy status") {
                panic!("haproxy exited with {status}:\n{}", self.log());
            }
            let status = reqwest::get(self.http_url("/readyz"))
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0);
            if status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "haproxy /readyz stayed {status}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// How many log lines contain `text` so far.
    fn count(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .lines()
            .filter(|l| l.contains(text))
            .count()
    }

    /// Waits until more than `before` log lines contain `text` (e.g. haproxy
    /// reporting a server DOWN or UP); returns how long that took.
    async fn wait_for_log(&self, text: &str, before: usize, within: Duration) -> Duration {
        let started = Instant::now();
        while self.count(text) <= before {
            assert!(
                started.elapsed() < within,
                "haproxy did not log `{text}` within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        started.elapsed()
    }

    /// What haproxy logged about `/ws` requests: (final status → count,
    /// requests retried on another node).
    fn upgrade_summary(&self) -> (BTreeMap<String, usize>, usize) {
        let mut statuses = BTreeMap::new();
        let mut redispatched = 0;
        for line in self.log().lines().filter(|l| l.contains("GET /ws")) {
            let words: Vec<&str> = line.split_whitespace().collect();
            // httplog: … Tq/Tw/Tc/Tr/Ta status bytes - - flags act/fe/be/srv/retries …
            let Some(at) = words.iter().position(|w| w.matches('/').count() == 4) else {
                continue;
            };
            if let Some(status) = words.get(at + 1) {
                *statuses.entry(status.to_string()).or_insert(0) += 1;
            }
            if let Some(conns) = words.get(at + 6) {
                if conns.rsplit('/').next().is_some_and(|r| r.starts_with('+')) {
                    redispatched += 1;
                }
            }
        }
        (statuses, redispatched)
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One WebSocket connection through haproxy.
struct Conn {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    node: String,
}

/// What a connection gave next.
enum Got {
    Frame(Value),
    /// It ended: "close 1001", "dropped: …", "ended", "silent".
    Gone(String),
}

impl Conn {
    /// Connects and reads `welcome`; the error says why it failed (for counting).
    async fn open(url: &str) -> Result<Conn, String> {
        let (ws, _) = match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url)).await
        {
            Err(_) => return Err("connect timed out".into()),
            Ok(Err(tungstenite::Error::Http(response))) => {
                return Err(format!("http {}", response.status().as_u16()))
            }
            Ok(Err(tungstenite::Error::Io(e))) => return Err(format!("io {:?}", e.kind())),
            Ok(Err(e)) => return Err(format!("handshake: {e}")),
            Ok(Ok(pair)) => pair,
        };
        let mut conn = Conn {
            ws,
            node: String::new(),
        };
        match conn.recv().await {
            Got::Frame(welcome) if welcome["type"] == "welcome" => {
                conn.node = welcome["node"].as_str().unwrap_or_default().to_owned();
                Ok(conn)
            }
            Got::Frame(other) => panic!("expected welcome, got {other}"),
            Got::Gone(why) => Err(format!("gone before welcome: {why}")),
        }
    }

    /// Connects, retrying (with a short back-off) whatever refuses or fails.
    async fn open_retrying(
        url: &str,
        refusals: &mut BTreeMap<String, usize>,
        until: Instant,
    ) -> Conn {
        let mut backoff = Duration::from_millis(50);
        loop {
            match Conn::open(url).await {
                Ok(conn) => return conn,
                Err(why) => *refusals.entry(why).or_insert(0) += 1,
            }
            assert!(
                Instant::now() < until,
                "could not connect through haproxy: {refusals:?}"
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(400));
        }
    }

    async fn send(&mut self, frame: &Value) -> Result<(), String> {
        self.ws
            .send(Message::Text(frame.to_string()))
            .await
            .map_err(|e| format!("send: {e}"))
    }

    /// The next JSON frame, or how the connection ended.
    async fn recv(&mut self) -> Got {
        loop {
            match tokio::time::timeout(SILENCE, self.ws.next()).await {
                Err(_) => return Got::Gone("silent".into()),
                Ok(Some(Ok(Message::Text(text)))) => {
                    return Got::Frame(serde_json::from_str(&text).expect("frames are JSON"))
                }
                Ok(Some(Ok(Message::Close(frame)))) => {
                    let code = frame.map(|f| u16::from(f.code)).unwrap_or(1005);
                    return Got::Gone(format!("close {code}"));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Got::Gone(format!("dropped: {e}")),
                Ok(None) => return Got::Gone("ended".into()),
            }
        }
    }
}

/// How one of a client's connections went.
#[derive(Debug)]
struct Stint {
    node: String,
    /// Messages in `joined.history` (after `since` when resuming).
    resumed_with: usize,
    /// `None` while it lasts.
    ended: Option<String>,
    saw_shutdown: bool,
}

/// A member of the room that only reads, and resumes after every loss.
struct Subscriber {
    name: String,
    epoch: Value,
    /// Offsets and data of every room message, in the order received.
    offsets: Vec<u64>,
    data: Vec<Value>,
    stints: Vec<Stint>,
    refusals: BTreeMap<String, usize>,
    /// Joins answered with an error (e.g. `unavailable`), retried.
    join_errors: Vec<Value>,
    /// Waited before reconnecting, as real clients back off (and so that
    /// messages pile up to be resumed with `since`).
    backoff: Duration,
}

impl Subscriber {
    fn last(&self) -> u64 {
        self.offsets.iter().copied().max().unwrap_or(0)
    }

    fn record(&mut self, message: &Value) {
        self.offsets
            .push(message["offset"].as_u64().expect("message offset"));
        self.data.push(message["data"].clone());
    }

    /// Connects and joins for the first time (before anything is published).
    async fn join_first(hub: &str, name: String, backoff: Duration) -> (Subscriber, Conn) {
        let mut refusals = BTreeMap::new();
        let until = Instant::now() + WAIT;
        let mut conn = Conn::open_retrying(hub, &mut refusals, until).await;
        conn.send(&json!({"type": "join", "room": ROOM, "ref": "j"}))
            .await
            .expect("send join");
        let joined = loop {
            match conn.recv().await {
                Got::Frame(f) if f["ref"] == "j" => break f,
                Got::Frame(_) => continue,
                Got::Gone(why) => panic!("{name}: gone before joined: {why}"),
            }
        };
        assert_eq!(joined["type"], "joined", "{joined}");
        assert_eq!(
            joined["history"],
            json!([]),
            "the room starts empty: {joined}"
        );
        let stint = Stint {
            node: conn.node.clone(),
            resumed_with: 0,
            ended: None,
            saw_shutdown: false,
        };
        let subscriber = Subscriber {
            name,
            epoch: joined["epoch"].clone(),
            offsets: Vec::new(),
            data: Vec::new(),
            stints: vec![stint],
            refusals,
            join_errors: Vec::new(),
            backoff,
        };
        (subscriber, conn)
    }

    /// Reconnects and resumes with `since` until it has a `joined`.
    async fn resume(&mut self, hub: &str, until: Instant) -> Conn {
        tokio::time::sleep(self.backoff).await;
        loop {
            let mut conn = Conn::open_retrying(hub, &mut self.refusals, until).await;
            let join = json!({"type": "join", "room": ROOM, "ref": "j",
                "since": {"epoch": self.epoch, "offset": self.last()}});
            let mut stint = Stint {
                node: conn.node.clone(),
                resumed_with: 0,
                ended: None,
                saw_shutdown: false,
            };
            let reply = match conn.send(&join).await {
                Err(why) => Err(why),
                Ok(()) => loop {
                    match conn.recv().await {
                        Got::Frame(f) if f["ref"] == "j" => break Ok(f),
                        Got::Frame(f) if f["type"] == "shutdown" => stint.saw_shutdown = true,
                        Got::Frame(_) => continue,
                        Got::Gone(why) => break Err(why),
                    }
                },
            };
            match reply {
                Ok(joined) if joined["type"] == "joined" => {
                    assert_eq!(
                        joined["epoch"], self.epoch,
                        "{}: epoch changed: {joined}",
                        self.name
                    );
                    assert_eq!(
                        joined["recovered"],
                        true,
                        "{} resumed after {} on {}: {joined}",
                        self.name,
                        self.last(),
                        conn.node
                    );
                    let history = joined["history"].as_array().expect("history").clone();
                    stint.resumed_with = history.len();
                    for message in &history {
                        self.record(message);
                    }
                    self.stints.push(stint);
                    return conn;
                }
                Ok(error) => {
                    // e.g. `unavailable` while a room catches up: try again.
                    self.join_errors.push(error);
                    stint.ended = Some("join refused".into());
                }
                Err(why) => stint.ended = Some(format!("before joined: {why}")),
            }
            self.stints.push(stint);
            assert!(
                Instant::now() < until,
                "{}: never resumed: {:?}",
                self.name,
                self.stints
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads until it has seen `target` (once known), resuming after losses.
    async fn run(
        mut self,
        hub: String,
        mut conn: Conn,
        mut target: watch::Receiver<Option<u64>>,
    ) -> Subscriber {
        let until = Instant::now() + BUDGET;
        loop {
            if let Some(target) = *target.borrow_and_update() {
                if self.last() >= target {
                    return self;
                }
            }
            assert!(
                Instant::now() < until,
                "{}: not caught up (last {}, target {:?}): {:?}",
                self.name,
                self.last(),
                *target.borrow(),
                self.stints
            );
            let got = tokio::select! {
                got = conn.recv() => got,
                _ = target.changed() => continue,
            };
            match got {
                Got::Frame(f) if f["type"] == "message" && f["room"] == ROOM => self.record(&f),
                Got::Frame(f) if f["type"] == "shutdown" => {
                    assert_eq!(f["reconnect"], true, "{f}");
                    self.stints.last_mut().unwrap().saw_shutdown = true;
                }
                Got::Frame(f) if f["type"] == "error" => {
                    // An unprompted error about the room: join it again.
                    self.stints.last_mut().unwrap().ended = Some(format!("error {f}"));
                    conn = self.resume(&hub, until).await;
                }
                Got::Frame(_) => {}
                Got::Gone(why) => {
                    self.stints.last_mut().unwrap().ended = Some(why);
                    conn = self.resume(&hub, until).await;
                }
            }
        }
    }
}

/// Publishes `{"from": name, "n": n}` with key `name-n`, one at a time,
/// retrying every unacked publish (same key) on a new connection.
struct Publisher {
    name: String,
    /// Every ack: (n, offset), in publish order (a retried `n` is acked once).
    acks: Vec<(usize, u64)>,
    reconnects: usize,
    refusals: BTreeMap<String, usize>,
    /// Errors that answered a publish (then retried).
    refused_publishes: BTreeMap<String, usize>,
    /// Publishes retried because the connection ended before the reply.
    retried_after_loss: usize,
    shutdown_frames: usize,
}

impl Publisher {
    async fn connect(&mut self, hub: &str, until: Instant) -> Conn {
        loop {
            let mut conn = Conn::open_retrying(hub, &mut self.refusals, until).await;
            let join = json!({"type": "join", "room": ROOM, "ref": "j", "history": 0});
            if conn.send(&join).await.is_ok() {
                loop {
                    match conn.recv().await {
                        Got::Frame(f) if f["ref"] == "j" && f["type"] == "joined" => return conn,
                        Got::Frame(f) if f["ref"] == "j" => {
                            *self
                                .refused_publishes
                                .entry(format!("join: {}", f["code"]))
                                .or_insert(0) += 1;
                            break;
                        }
                        Got::Frame(_) => continue,
                        Got::Gone(_) => break,
                    }
                }
            }
            self.reconnects += 1;
            assert!(Instant::now() < until, "{}: cannot join", self.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn run(
        mut self,
        hub: String,
        enough: Arc<AtomicBool>,
        acked: Arc<AtomicUsize>,
    ) -> Publisher {
        let until = Instant::now() + BUDGET;
        let mut conn = Some(self.connect(&hub, until).await);
        let mut n = 0;
        while n < MAX_PER_PUBLISHER && !(n >= MIN_PER_PUBLISHER && enough.load(Ordering::SeqCst)) {
            let key = format!("{}-{n}", self.name);
            let frame = json!({"type": "publish", "room": ROOM, "ref": key, "key": key,
                "data": {"from": self.name, "n": n}});
            loop {
                assert!(
                    Instant::now() < until,
                    "{}: publish {n} never acked",
                    self.name
                );
                let mut c = match conn.take() {
                    Some(c) => c,
                    None => {
                        self.reconnects += 1;
                        self.connect(&hub, until).await
                    }
                };
                let reply = match c.send(&frame).await {
                    Err(why) => Err(why),
                    Ok(()) => loop {
                        match c.recv().await {
                            Got::Frame(f) if f["ref"] == key.as_str() => break Ok(f),
                            Got::Frame(f) if f["type"] == "shutdown" => self.shutdown_frames += 1,
                            Got::Frame(_) => continue,
                            Got::Gone(why) => break Err(why),
                        }
                    },
                };
                match reply {
                    Ok(ack) if ack["type"] == "ack" => {
                        let offset = ack["offset"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("ack without offset: {ack}"));
                        self.acks.push((n, offset));
                        acked.fetch_add(1, Ordering::SeqCst);
                        conn = Some(c);
                        break;
                    }
                    Ok(error) => {
                        let code = error["code"].as_str().unwrap_or_default().to_owned();
                        *self.refused_publishes.entry(code.clone()).or_insert(0) += 1;
                        match code.as_str() {
                            "rate_limited" => {
                                let wait = error["retry_after_ms"].as_u64().unwrap_or(100);
                                tokio::time::sleep(Duration::from_millis(wait)).await;
                                conn = Some(c);
                            }
                            // Nothing was committed, or it was and the retry
                            // (same key) is acked with its offset: a new
                            // connection either way.
                            "unavailable" | "shutdown" | "internal" => {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            _ => panic!("{}: publish {n} refused: {error}", self.name),
                        }
                    }
                    Err(_) => self.retried_after_loss += 1,
                }
            }
            n += 1;
            tokio::time::sleep(PACE).await;
        }
        self
    }
}

/// Waits until a fresh connection through haproxy lands on `node` (leastconn
/// sends new connections to the node with the fewest, i.e. one just back).
async fn wait_in_rotation(haproxy: &HaProxy, node: &str) -> Duration {
    let started = Instant::now();
    let deadline = started + WAIT;
    let mut refusals = BTreeMap::new();
    loop {
        let probe = Conn::open_retrying(&haproxy.ws_url("probe"), &mut refusals, deadline).await;
        if probe.node == node {
            return started.elapsed();
        }
        drop(probe);
        assert!(
            Instant::now() < deadline,
            "haproxy never sent a connection to {node}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A client straight on `node` that asks for megabytes of history and reads
/// none of it, as slow clients do: the node's drain cannot finish while its
/// socket is open (until heartbeat.timeout_ms cuts it off), so the node stays
/// up answering `/readyz` 503, and haproxy must take it out for that alone.
async fn stalled_client(node: &TestApp) -> WebSocketStream<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = tokio::time::timeout(WAIT, socket.connect(node.addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let url = format!("ws://{}/ws?user=stalled", node.addr);
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, stream))
        .await
        .expect("handshake timed out")
        .expect("handshake");
    let join = json!({"type": "join", "room": BALLAST, "ref": "j", "history": 0});
    ws.send(Message::Text(join.to_string()))
        .await
        .expect("send join");
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("joined timed out")
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = frame {
            let frame: Value = serde_json::from_str(&text).expect("JSON");
            if frame["ref"] == "j" {
                assert_eq!(frame["type"], "joined", "{frame}");
                break;
            }
        }
    }
    // 40 × 200 KB: more than the kernel buffers on both sides can hold.
    let history = json!({"type": "history", "room": BALLAST, "limit": 200}).to_string();
    for _ in 0..40 {
        ws.send(Message::Text(history.clone()))
            .await
            .expect("send history");
    }
    // Unread bytes arriving: the node is answering (and soon stuck writing).
    let fd = std::os::fd::AsRawFd::as_raw_fd(ws.get_ref());
    let deadline = Instant::now() + WAIT;
    loop {
        let mut unread: libc::c_int = 0;
        unsafe { libc::ioctl(fd, libc::FIONREAD, &mut unread) };
        if unread >= 2048 {
            return ws;
        }
        assert!(Instant::now() < deadline, "no history arrived");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn node_id(app: &TestApp) -> String {
    let (status, stats) = app.get_json("/api/stats").await;
    assert_eq!(status, 200, "{stats}");
    stats["node"].as_str().expect("node").to_owned()
}

async fn connections(app: &TestApp) -> u64 {
    app.get_json("/api/stats").await.1["connections"]
        .as_u64()
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_behind_haproxy_loses_and_duplicates_nothing() {
    let started = Instant::now();
    let nats = NatsServer::start();
    let ports = [free_port(), free_port(), free_port()];
    assert_eq!(ports.iter().collect::<BTreeSet<_>>().len(), 3, "{ports:?}");
    let mut nodes = Vec::new();
    // Heartbeats slow enough that the stalled client below (which reads
    // nothing) is not cut off before haproxy has seen the drain.
    let heartbeat = [
        ("ROOMHUB_HEARTBEAT__INTERVAL_MS", "1000"),
        ("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "10000"),
    ];
    for port in ports {
        nodes.push(spawn_node(&nats, Some(port), &heartbeat).await);
    }
    let mut ids = Vec::new();
    for node in &nodes {
        ids.push(node_id(node).await);
    }
    let mut haproxy = HaProxy::start(ports);
    haproxy.wait_ready().await;
    let pad = "x".repeat(10_000);
    for n in 0..20 {
        let resp = nodes[0]
            .post(
                &format!("/api/rooms/{BALLAST}/messages"),
                json!({"data": {"n": n, "pad": pad}}),
            )
            .await;
        assert_eq!(resp.status(), 201);
    }

    // Subscribers join before anything is published, so each must see it all.
    let mut subscribers = Vec::new();
    let (target_tx, target_rx) = watch::channel(None);
    for i in 0..SUBSCRIBERS {
        let name = format!("sub{i}");
        let backoff = Duration::from_millis(20 + 60 * i as u64);
        let (subscriber, conn) =
            Subscriber::join_first(&haproxy.ws_url(&name), name.clone(), backoff).await;
        let hub = haproxy.ws_url(&name);
        subscribers.push(tokio::spawn(subscriber.run(hub, conn, target_rx.clone())));
    }
    let enough = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for i in 0..PUBLISHERS {
        let publisher = Publisher {
            name: format!("pub{i}"),
            acks: Vec::new(),
            reconnects: 0,
            refusals: BTreeMap::new(),
            refused_publishes: BTreeMap::new(),
            retried_after_loss: 0,
            shutdown_frames: 0,
        };
        let hub = haproxy.ws_url(&publisher.name);
        publishers.push(tokio::spawn(publisher.run(
            hub,
            enough.clone(),
            acked.clone(),
        )));
    }

    // The rolling restart, one node at a time, while the publishers publish.
    let mut restarts = Vec::new();
    for i in 0..nodes.len() {
        // A slow client keeps the drain going, as on a busy node: haproxy
        // must take the node out on its /readyz 503 alone, and meanwhile send
        // reconnecting clients elsewhere. (Without progress the node would
        // cut it off after heartbeat.timeout_ms.)
        let stalled = stalled_client(&nodes[i]).await;
        let progress = acked.load(Ordering::SeqCst) + 40;
        let deadline = Instant::now() + WAIT;
        while acked.load(Ordering::SeqCst) < progress {
            assert!(
                Instant::now() < deadline,
                "publishing stalled before restarting node {i}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Through haproxy (the stalled client aside).
        let clients = connections(&nodes[i]).await.saturating_sub(1);
        assert!(clients > 0, "node {i} has no clients to move");
        let acked_before = acked.load(Ordering::SeqCst);
        let (down, up) = (
            format!("roomhub_nodes/node{} is DOWN", i + 1),
            format!("roomhub_nodes/node{} is UP", i + 1),
        );
        let (downs, ups) = (haproxy.count(&down), haproxy.count(&up));
        let stopping = Instant::now();
        unsafe { libc::kill(nodes[i].pid() as i32, libc::SIGTERM) };
        // A check every 500 ms, every 250 ms once failing, fall 2: out within
        // 0.75 s of the drain (plus slack for a loaded machine).
        haproxy
            .wait_for_log(&down, downs, Duration::from_secs(3))
            .await;
        let marked_down = stopping.elapsed();
        let reason = haproxy
            .log()
            .lines()
            .rfind(|l| l.contains(&down))
            .unwrap()
            .to_owned();
        assert!(
            reason.contains("code: 503"),
            "taken out for its 503 ({marked_down:?} after SIGTERM): {reason}\n{}",
            nodes[i].log.lock().unwrap()
        );
        let readyz = reqwest::get(nodes[i].url("/readyz"))
            .await
            .map(|r| r.status().as_u16());
        assert_eq!(readyz.ok(), Some(503), "node {i} is still draining");
        drop(stalled);
        let status = tokio::task::block_in_place(|| nodes[i].wait_exit());
        let drained_in = stopping.elapsed();
        assert!(
            status.success(),
            "node {i}: {status}:\n{}",
            nodes[i].log.lock().unwrap()
        );
        tokio::task::block_in_place(|| nodes[i].restart());
        wait_ready(&nodes[i], true).await;
        let ready_in = stopping.elapsed();
        assert_eq!(
            node_id(&nodes[i]).await,
            ids[i],
            "the node id is kept in the data dir"
        );
        // rise 2: back in rotation within about a second of being ready.
        let back_in = haproxy.wait_for_log(&up, ups, Duration::from_secs(5)).await;
        let probe_in = wait_in_rotation(&haproxy, &ids[i]).await;
        restarts.push(format!(
            "{}: {clients} connections; marked DOWN (503) {marked_down:?} after SIGTERM, exited \
             after {drained_in:?}, ready after {ready_in:?}, marked UP {back_in:?} later, new \
             connections there {probe_in:?} later; {} acks meanwhile",
            ids[i],
            acked.load(Ordering::SeqCst) - acked_before
        ));
    }
    enough.store(true, Ordering::SeqCst);

    // Every publisher's keys map to exactly one offset.
    let mut by_offset: BTreeMap<u64, Value> = BTreeMap::new();
    let mut finished = Vec::new();
    for task in publishers {
        let publisher = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("publishers did not finish")
            .expect("publisher task");
        let mut per_key: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for (n, offset) in &publisher.acks {
            per_key.entry(*n).or_default().insert(*offset);
        }
        assert!(per_key.len() >= MIN_PER_PUBLISHER);
        assert_eq!(
            per_key.keys().copied().collect::<Vec<_>>(),
            (0..per_key.len()).collect::<Vec<_>>(),
            "{}: every n acked",
            publisher.name
        );
        let mut previous = 0;
        for (n, offsets) in &per_key {
            assert_eq!(
                offsets.len(),
                1,
                "{}-{n} acked with different offsets: {offsets:?}",
                publisher.name
            );
            let offset = *offsets.first().unwrap();
            assert!(
                offset > previous,
                "{}-{n}: acks out of order",
                publisher.name
            );
            previous = offset;
            let data = json!({"from": publisher.name, "n": n});
            if let Some(other) = by_offset.insert(offset, data.clone()) {
                panic!("offset {offset} acked for {other} and {data}");
            }
        }
        finished.push(publisher);
    }
    let expected: Vec<u64> = by_offset.keys().copied().collect();
    let last = *expected.last().expect("something was acked");
    target_tx.send(Some(last)).expect("subscribers listen");

    let mut done = Vec::new();
    for task in subscribers {
        let subscriber = tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("a subscriber did not catch up")
            .expect("subscriber task");
        done.push(subscriber);
    }
    for s in &done {
        let duplicates = s.offsets.len() - s.offsets.iter().collect::<BTreeSet<_>>().len();
        assert_eq!(
            duplicates, 0,
            "{} got {duplicates} duplicates: {:?}",
            s.name, s.stints
        );
        assert!(
            s.offsets.windows(2).all(|w| w[0] < w[1]),
            "{}: offsets out of order: {:?}",
            s.name,
            s.offsets
                .windows(2)
                .filter(|w| w[0] >= w[1])
                .collect::<Vec<_>>()
        );
        let missing: Vec<_> = expected.iter().filter(|o| !s.offsets.contains(o)).collect();
        let extra: Vec<_> = s
            .offsets
            .iter()
            .filter(|o| !by_offset.contains_key(o))
            .collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "{}: missing {missing:?}, not acked {extra:?}; stints {:?}",
            s.name,
            s.stints
        );
        assert_eq!(s.offsets, expected);
        for (offset, data) in s.offsets.iter().zip(&s.data) {
            assert_eq!(&by_offset[offset], data, "{}: data at {offset}", s.name);
        }
        // Every acked message's data exactly once.
        let seen: BTreeSet<String> = s.data.iter().map(|d| d.to_string()).collect();
        assert_eq!(seen.len(), s.data.len(), "{}: a message twice", s.name);
        assert_eq!(seen.len(), by_offset.len());
    }

    // What happened, for whoever reads the output (--nocapture).
    let resumes: usize = done.iter().map(|s| s.stints.len() - 1).sum();
    let (upgrades, redispatched) = haproxy.upgrade_summary();
    eprintln!("cluster_haproxy: {:?} in all", started.elapsed());
    for line in &restarts {
        eprintln!("  restart {line}");
    }
    eprintln!(
        "  {} messages acked ({}), last offset {last}; {SUBSCRIBERS} subscribers resumed {resumes} times",
        by_offset.len(),
        finished.iter().map(|p| format!("{} {}", p.name, p.acks.len())).collect::<Vec<_>>().join(", ")
    );
    for s in &done {
        eprintln!(
            "  {}: {} messages; refusals {:?}; join errors {:?}",
            s.name,
            s.offsets.len(),
            s.refusals,
            s.join_errors
        );
        for stint in &s.stints {
            eprintln!(
                "    on {}: {} messages on resuming, shutdown frame: {}, ended: {}",
                stint.node,
                stint.resumed_with,
                stint.saw_shutdown,
                stint.ended.as_deref().unwrap_or("-")
            );
        }
    }
    for p in &finished {
        eprintln!(
            "  {}: {} acks, {} reconnects, {} retried after a lost connection, {} shutdown frames, \
             refused publishes {:?}, refused connections {:?}",
            p.name,
            p.acks.len(),
            p.reconnects,
            p.retried_after_loss,
            p.shutdown_frames,
            p.refused_publishes,
            p.refusals
        );
    }
    eprintln!(
        "  haproxy /ws log: final statuses {upgrades:?}, {redispatched} retried on another node"
    );
    let log = haproxy.log();
    let changes = log
        .lines()
        .filter(|l| l.starts_with("Server ") && (l.contains(" is DOWN") || l.contains(" is UP")));
    for line in changes {
        eprintln!("  haproxy: {line}");
    }
    // Every restart must have moved clients, or the test proved nothing.
    assert!(resumes >= 3, "{restarts:?}");
}

//! Test harness: runs the real `roomhub` binary on an ephemeral loopback port
//! with its own temp data dir, and talks to it with real WebSocket and HTTP
//! clients. Every wait has a timeout; nothing sleeps to synchronize.

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const API_KEY: &str = "test-api-key";
/// How long any single expected event may take.
pub const WAIT: Duration = Duration::from_secs(10);

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_roomhub")
}

pub struct TestApp {
    pub addr: SocketAddr,
    _dir: Arc<TempDir>,
    env: Vec<(String, String)>,
    child: Child,
    pub log: Arc<Mutex<String>>,
}

impl TestApp {
    pub async fn spawn() -> TestApp {
        Self::spawn_with(&[]).await
    }

    /// Starts the hub with extra `ROOMHUB_…` variables.
    pub async fn spawn_with(env: &[(&str, &str)]) -> TestApp {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::start(dir, env)
    }

    fn start(dir: Arc<TempDir>, env: Vec<(String, String)>) -> TestApp {
        let data_dir = dir.path().join("data");
        let mut cmd = Command::new(bin());
        cmd.current_dir(dir.path())
            .env("ROOMHUB_SERVER__BIND", "127.0.0.1:0")
            .env("ROOMHUB_STORAGE__DATA_DIR", &data_dir)
            .env("ROOMHUB_AUTH__API_KEY", API_KEY)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start roomhub");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            while let Some(Ok(line)) = lines.next() {
                if let Some(rest) = line.strip_prefix("roomhub listening on http://") {
                    let addr = rest
                        .split_whitespace()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    let _ = tx.send(addr);
                }
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("roomhub did not start:\n{}", log.lock().unwrap());
            }
        };
        TestApp {
            addr,
            _dir: dir,
            env,
            child,
            log,
        }
    }

    /// The hub's data dir (its own, or the one `ROOMHUB_STORAGE__DATA_DIR` named).
    pub fn data_dir(&self) -> std::path::PathBuf {
        self.env
            .iter()
            .find(|(k, _)| k == "ROOMHUB_STORAGE__DATA_DIR")
            .map(|(_, v)| v.into())
            .unwrap_or_else(|| self._dir.path().join("data"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub async fn connect(&self, query: &str) -> TestClient {
        TestClient::connect(&format!("ws://{}/ws?{}", self.addr, query)).await
    }

    /// SIGTERM, then waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait_exit()
    }

    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "roomhub did not exit:\n{}",
                self.log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sets (or replaces) a variable for the next `restart`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts the hub again on the same data dir (after `terminate` or `kill9`).
    pub fn restart(&mut self) {
        let next = Self::start(self._dir.clone(), self.env.clone());
        // Replace without running Drop on a live child twice.
        let old = std::mem::replace(self, next);
        drop(old);
    }

    pub fn http(&self) -> reqwest::Client {
        reqwest::Client::new()
    }

    /// POSTs `body` to `path` with the API key.
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http()
            .post(self.url(path))
            .bearer_auth(API_KEY)
            .json(&body)
            .send()
            .await
            .expect("http post")
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        reqwest::get(self.url("/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// One unlabelled counter or gauge from `/metrics`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics")) as u64
    }

    pub async fn get_json(&self, path: &str) -> (u16, Value) {
        let resp = self
            .http()
            .get(self.url(path))
            .bearer_auth(API_KEY)
            .send()
            .await
            .expect("http get");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The hub's side of a failing test.
            let log = self.log.lock().map(|l| l.clone()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            eprintln!("--- roomhub log (last lines) ---\n{}", tail.join("\n"));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct TestClient {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub welcome: Value,
    next_ref: u64,
}

impl TestClient {
    pub async fn connect(url: &str) -> TestClient {
        let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .expect("connect timed out")
            .expect("websocket connect");
        let mut client = TestClient {
            ws,
            welcome: Value::Null,
            next_ref: 0,
        };
        client.welcome = client.next().await;
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        client
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_text(&frame.to_string()).await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::Text(text.to_owned()))
            .await
            .expect("send");
    }

    pub async fn send_raw(&mut self, message: Message) {
        self.ws.send(message).await.expect("send");
    }

    /// The next JSON frame (control frames are answered and skipped).
    pub async fn next(&mut self) -> Value {
        match self.next_message().await {
            Message::Text(text) => serde_json::from_str(&text).expect("frames are JSON"),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next text frame as sent, unparsed (for frames a `Value` cannot hold).
    pub async fn next_text(&mut self) -> String {
        match self.next_message().await {
            Message::Text(text) => text,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// Sends `text` (a frame carrying `"ref":"<reference>"`) and returns the
    /// text of the reply that echoes it, unparsed.
    pub async fn request_text(&mut self, text: &str, reference: &str) -> String {
        self.send_text(text).await;
        let echo = format!(r#""ref":"{reference}""#);
        loop {
            let reply = self.next_text().await;
            if reply.contains(&echo) {
                return reply;
            }
        }
    }

    async fn next_message(&mut self) -> Message {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let item = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for a frame");
            match item {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(message)) => return message,
                Some(Err(e)) => panic!("websocket error: {e}"),
                None => panic!("connection ended"),
            }
        }
    }

    /// The next JSON frame, or `None` once the connection has ended.
    pub async fn try_next(&mut self) -> Option<Value> {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).ok(),
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return None,
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Skips frames until one of type `kind` arrives.
    pub async fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let frame = self.next().await;
            if frame["type"] == kind {
                return frame;
            }
        }
    }

    /// Sends `frame` with a fresh `ref` and returns the reply carrying it.
    pub async fn request(&mut self, mut frame: Value) -> Value {
        self.next_ref += 1;
        let reference = format!("r{}", self.next_ref);
        frame["ref"] = json!(reference);
        self.send(frame).await;
        loop {
            let reply = self.next().await;
            if reply["ref"] == reference.as_str() {
                return reply;
            }
        }
    }

    pub async fn join(&mut self, room: &str) -> Value {
        let joined = self.request(json!({"type": "join", "room": room})).await;
        assert_eq!(joined["type"], "joined", "{joined}");
        joined
    }

    /// Publishes and waits for the ack; returns the offset.
    pub async fn publish(&mut self, room: &str, data: Value) -> u64 {
        let ack = self
            .request(json!({"type": "publish", "room": room, "data": data}))
            .await;
        assert_eq!(ack["type"], "ack", "{ack}");
        ack["offset"].as_u64().expect("ack offset")
    }

    /// Waits for the server to close; returns the close code.
    pub async fn closed(&mut self) -> u16 {
        loop {
            let deadline = tokio::time::Instant::now() + WAIT;
            match tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("timed out waiting for close")
            {
                Some(Ok(Message::Close(frame))) => {
                    return frame.map(|f| u16::from(f.code)).unwrap_or(1005)
                }
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return 1006,
            }
        }
    }

    /// Drops the TCP connection without a close frame.
    pub fn drop_abruptly(self) {
        use std::os::fd::AsRawFd;
        if let MaybeTlsStream::Plain(tcp) = self.ws.get_ref() {
            unsafe { libc::shutdown(tcp.as_raw_fd(), libc::SHUT_RDWR) };
        }
    }

    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            }))
            .await;
    }
}

/// Offsets of a list of message frames.
pub fn offsets(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .expect("a list of messages")
        .iter()
        .map(|m| m["offset"].as_u64().expect("offset"))
        .collect()
}

/// A loopback port that was free a moment ago: for a hub that must come back
/// on the same port after `restart()` (pass it as `ROOMHUB_SERVER__BIND`), or
/// for a helper process such as chromedriver.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Reads until the reply carrying `reference` (an `ack`); `true` if the
/// `message` with `data` arrived before it. The message is read either way.
pub async fn message_before_ack(c: &mut TestClient, data: &Value, reference: &str) -> bool {
    let mut seen = false;
    loop {
        let f = c.next().await;
        if f["type"] == "message" && &f["data"] == data {
            seen = true;
        }
        if f["ref"] == reference {
            assert_eq!(f["type"], "ack", "{f}");
            break;
        }
    }
    let first = seen;
    while !seen {
        let f = c.next().await;
        seen = f["type"] == "message" && &f["data"] == data;
    }
    first
}

/// The hub's resident memory, from /proc.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

//! A real NATS cluster for the tests: several `nats-server -js` processes on
//! loopback, routed to each other (one cluster name), each with its own
//! JetStream store in a temp dir and a monitoring port. Tests kill a server
//! (SIGKILL) and start it again on the same ports and store, ask the
//! monitoring endpoints who leads JetStream, and ask JetStream itself who
//! leads a stream. Every wait is bounded; the only sleeps are poll intervals.

use super::helpers::{free_port, TestApp};
use super::nats::{nats_server_bin, FAST_HEARTBEAT};
use serde_json::Value;
use std::fs::File;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long JetStream may take to elect a leader (meta or stream) on a busy
/// two-core machine.
pub const ELECTION: Duration = Duration::from_secs(30);
/// Between polls of a bounded wait.
const POLL: Duration = Duration::from_millis(100);

struct Member {
    name: String,
    port: u16,
    route_port: u16,
    http_port: u16,
    /// The JetStream store (`store/`) and the server's log (`server.log`).
    dir: TempDir,
    child: Option<Child>,
}

pub struct NatsCluster {
    members: Vec<Member>,
}

impl NatsCluster {
    /// Starts `size` routed servers and waits until JetStream has a meta
    /// leader (without one no stream can be made).
    pub async fn start(size: usize) -> NatsCluster {
        let mut cluster = NatsCluster {
            members: (0..size)
                .map(|i| Member {
                    name: format!("nats-{i}"),
                    port: free_port(),
                    route_port: free_port(),
                    http_port: free_port(),
                    dir: tempfile::tempdir().expect("temp dir"),
                    child: None,
                })
                .collect(),
        };
        for i in 0..size {
            cluster.launch(i);
        }
        cluster.wait_meta_leader().await;
        cluster
    }

    /// Every server's client URL, comma-separated (`cluster.nats_url`).
    pub fn url_list(&self) -> String {
        (0..self.members.len())
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.members[i].port)
    }

    /// The server's name (`nats-<i>`), as JetStream reports leaders.
    pub fn name(&self, i: usize) -> &str {
        &self.members[i].name
    }

    fn index_of(&self, name: &str) -> Option<usize> {
        self.members.iter().position(|m| m.name == name)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    fn running(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.members.len()).filter(|&i| self.is_running(i))
    }

    fn launch(&mut self, i: usize) {
        let routes = self
            .members
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, m)| format!("nats://127.0.0.1:{}", m.route_port))
            .collect::<Vec<_>>()
            .join(",");
        let member = &mut self.members[i];
        let log = File::create(member.dir.path().join("server.log")).expect("server log");
        let child = Command::new(nats_server_bin())
            .args(["-js", "-a", "127.0.0.1", "-n", &member.name])
            .args(["-p", &member.port.to_string()])
            .args(["-m", &member.http_port.to_string()])
            .args(["--cluster_name", "roomhub-test"])
            .args([
                "--cluster",
                &format!("nats://127.0.0.1:{}", member.route_port),
            ])
            .args(["--routes", &routes])
            .arg("-sd")
            .arg(member.dir.path().join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        member.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", member.port)).is_err() {
            assert!(Instant::now() < deadline, "{} did not start", member.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs server `i` (by its PID): a crash.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Starts server `i` again on the same ports with the same store.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.launch(i);
    }

    /// The last lines of server `i`'s log (for failure messages).
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.members[i].dir.path().join("server.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(20).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// GETs a monitoring endpoint of server `i` (`None`: it did not answer).
    async fn monitor(&self, i: usize, path: &str) -> Option<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.members[i].http_port);
        let answer = tokio::time::timeout(Duration::from_secs(2), async {
            reqwest::get(&url).await.ok()?.json::<Value>().await.ok()
        })
        .await;
        answer.ok().flatten()
    }

    /// The JetStream meta leader, if every running server agrees on one.
    pub async fn meta_leader(&self) -> Option<usize> {
        let mut leader = None;
        for i in self.running() {
            let jsz = self.monitor(i, "/jsz").await?;
            let name = jsz["meta_cluster"]["leader"].as_str().unwrap_or_default();
            let found = self.index_of(name)?;
            if leader.is_some_and(|l| l != found) || !self.is_running(found) {
                return None;
            }
            leader = Some(found);
        }
        leader
    }

    /// Waits (bounded) for a meta leader every running server agrees on.
    pub async fn wait_meta_leader(&self) -> usize {
        let deadline = Instant::now() + ELECTION;
        loop {
            if let Some(leader) = self.meta_leader().await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "no JetStream meta leader within {ELECTION:?}:\n{}",
                self.log_tail(0)
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// A client of the running servers.
    async fn client(&self) -> async_nats::Client {
        let urls: Vec<String> = self.running().map(|i| self.url(i)).collect();
        tokio::time::timeout(
            Duration::from_secs(5),
            async_nats::ConnectOptions::new()
                .request_timeout(Some(Duration::from_secs(2)))
                .connect(urls),
        )
        .await
        .expect("connecting to the NATS cluster timed out")
        .expect("connect to the NATS cluster")
    }

    /// `$JS.API.STREAM.INFO.<stream>` as JetStream answers it (its stream
    /// leader answers), or `None` while nobody answers (no leader).
    pub async fn stream_info(&self, stream: &str) -> Option<Value> {
        let client = self.client().await;
        let answer = client
            .request(format!("$JS.API.STREAM.INFO.{stream}"), "".into())
            .await
            .ok()?;
        let info: Value = serde_json::from_slice(&answer.payload).ok()?;
        info.get("error").is_none().then_some(info)
    }

    /// The server leading `stream` now, if it has a leader.
    pub async fn stream_leader(&self, stream: &str) -> Option<usize> {
        let info = self.stream_info(stream).await?;
        let leader = self.index_of(info["cluster"]["leader"].as_str()?)?;
        self.is_running(leader).then_some(leader)
    }

    /// Waits (bounded) until `stream` has a leader among the running servers.
    pub async fn wait_stream_leader(&self, stream: &str) -> usize {
        let deadline = Instant::now() + ELECTION;
        loop {
            if let Some(leader) = self.stream_leader(stream).await {
                return leader;
            }
            assert!(
                Instant::now() < deadline,
                "{stream} had no leader within {ELECTION:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// The running server a client named `name` is connected to (`/connz`).
    pub async fn server_of_client(&self, name: &str) -> Option<usize> {
        for i in self.running() {
            let Some(connz) = self.monitor(i, "/connz?limit=1024").await else {
                continue;
            };
            let connections = connz["connections"].as_array().cloned().unwrap_or_default();
            if connections.iter().any(|c| c["name"] == name) {
                return Some(i);
            }
        }
        None
    }

    /// How many messages server `i`'s copy of `stream` holds (`/jsz`).
    pub async fn stored_on(&self, i: usize, stream: &str) -> Option<u64> {
        let jsz = self.monitor(i, "/jsz?streams=true").await?;
        jsz["account_details"]
            .as_array()?
            .iter()
            .flat_map(|a| a["stream_detail"].as_array().cloned().unwrap_or_default())
            .find(|s| s["name"] == stream)?["state"]["messages"]
            .as_u64()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// Starts a roomhub node against `url_list` (a comma-separated list of the
/// NATS cluster's servers) with streams of 3 replicas, and waits until it
/// is ready.
pub async fn spawn_node_on(url_list: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut env: Vec<(&str, &str)> = vec![
        ("ROOMHUB_CLUSTER__NATS_URL", url_list),
        ("ROOMHUB_CLUSTER__REPLICAS", "3"),
    ];
    env.extend(FAST_HEARTBEAT);
    // Tests publish in bursts; the limits have their own tests.
    env.extend([
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "1000"),
    ]);
    env.extend_from_slice(extra);
    let app = TestApp::spawn_with(&env).await;
    wait_ready_within(&app, ELECTION).await;
    app
}

/// Waits until `/readyz` answers 200, within `bound`; returns how long it took.
pub async fn wait_ready_within(app: &TestApp, bound: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let status = tokio::time::timeout(Duration::from_secs(2), reqwest::get(app.url("/readyz")))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if status == 200 {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < bound,
            "readyz stayed {status} for {bound:?}:\n{}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(POLL).await;
    }
}

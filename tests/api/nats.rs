//! The NATS harness: a real `nats-server -js` on a free loopback port with
//! its JetStream store in a temp dir, which tests can stop (SIGKILL) and
//! start again on the same port and store. `.ci/test` installs Debian's
//! `nats-server` when it is missing.

use super::helpers::{free_port, TestApp, WAIT};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

pub(crate) fn nats_server_bin() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file());
    on_path.expect("nats-server not found: run .ci/test, which installs Debian's nats-server")
}

pub struct NatsServer {
    pub port: u16,
    /// The HTTP monitoring port (`-m`), when started with one.
    pub monitor: Option<u16>,
    dir: TempDir,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_with_monitor(None)
    }

    /// With monitoring on `monitor` (`/varz`), when given.
    pub fn start_with_monitor(monitor: Option<u16>) -> NatsServer {
        let mut server = NatsServer {
            monitor,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new(nats_server_bin())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .args(self.monitor.map(|m| format!("-m={m}")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + WAIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server at once (a crash, or a lost link as nodes see it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a paused (SIGSTOPped) server too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): its connections stay open but nothing
    /// answers, as with a stalled or overloaded server.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("nats-server is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} nats-server");
    }

    /// Starts it again on the same port, with the same JetStream store.
    pub fn restart(&mut self) {
        self.stop();
        self.launch();
    }

    /// Starts it again on the same port with an empty JetStream store: NATS
    /// lost everything it kept.
    pub fn restart_empty(&mut self) {
        self.stop();
        for entry in std::fs::read_dir(self.dir.path()).expect("store dir") {
            let path = entry.expect("entry").path();
            let _ = std::fs::remove_dir_all(&path).or_else(|_| std::fs::remove_file(&path));
        }
        self.launch();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Heartbeats short enough that presence of a dead node clears in seconds.
pub const FAST_HEARTBEAT: [(&str, &str); 2] = [
    ("ROOMHUB_HEARTBEAT__INTERVAL_MS", "500"),
    ("ROOMHUB_HEARTBEAT__TIMEOUT_MS", "1500"),
];

/// Starts a roomhub node of the cluster on `nats`, on `bind` (a fixed port
/// when the node must come back on it) or an ephemeral port.
pub async fn spawn_node(nats: &NatsServer, bind: Option<u16>, extra: &[(&str, &str)]) -> TestApp {
    let url = nats.url();
    let bind = bind.map(|port| format!("127.0.0.1:{port}"));
    let mut env: Vec<(&str, &str)> = vec![("ROOMHUB_CLUSTER__NATS_URL", &url)];
    env.extend(FAST_HEARTBEAT);
    // Tests publish in bursts; the limits have their own tests.
    env.extend([
        ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1000"),
        ("ROOMHUB_LIMITS__PUBLISH_BURST", "1000"),
    ]);
    if let Some(bind) = &bind {
        env.push(("ROOMHUB_SERVER__BIND", bind));
    }
    env.extend_from_slice(extra);
    let app = TestApp::spawn_with(&env).await;
    wait_ready(&app, true).await;
    app
}

/// Waits until `/readyz` answers 200 (`true`) or 503 (`false`).
pub async fn wait_ready(app: &TestApp, ready: bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = reqwest::get(app.url("/readyz"))
            .await
            .map(|r| r.status().as_u16())
            .unwrap_or(0);
        if (status == 200) == ready {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readyz stayed {status}:\n{}",
            app.log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

//! The browser client (`web/`), end to end in real headless Chromium driven
//! over WebDriver (Debian's `chromium` and `chromium-driver`; no downloaded
//! browsers). Each test starts its own chromedriver on a free loopback port
//! and ends it (by PID) when done. Every wait polls the DOM every 100 ms up to
//! [`DOM_WAIT`]; nothing sleeps to synchronize.
//!
//! `cargo test --test api web_client::screenshot -- --ignored` also writes
//! the README's screenshots (`docs/chat.png`, `docs/chat-phone.png`).

use crate::helpers::{free_port, TestApp};
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use serde_json::{json, Value};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// How long any DOM condition may take to come true.
const DOM_WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(100);
/// WebDriver's Enter key.
const ENTER: &str = "\u{E007}";

/// At most one of these tests drives browsers at a time (the machine is small).
static BROWSERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A chromedriver process of this test; killed (by PID) on drop.
struct Driver {
    child: Child,
    port: u16,
    dir: Arc<TempDir>,
}

/// Opens browsers on a [`Driver`]; remembers them so that they are closed
/// even when the test panics.
#[derive(Clone)]
struct Browsers {
    port: u16,
    dir: Arc<TempDir>,
    open: Arc<Mutex<Vec<Client>>>,
}

impl Driver {
    async fn start() -> Driver {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the web client test needs Debian's headless Chromium. \
                 Install it with `apt-get install -y chromium chromium-driver` (.ci/test does)."
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .arg(format!(
                "--log-path={}",
                dir.path().join("chromedriver.log").display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        let driver = Driver {
            child,
            port,
            dir: Arc::new(dir),
        };
        let deadline = Instant::now() + DOM_WAIT;
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(POLL).await;
        }
        driver
    }

    fn log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("chromedriver.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Browsers {
    /// A new browser (its own Chromium and fresh profile) with a window of
    /// `width` × `height` CSS pixels.
    async fn open(&self, width: u32, height: u32) -> Page {
        let n = self.open.lock().unwrap().len();
        let profile = self.dir.path().join(format!("profile-{n}"));
        let caps = json!({
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    "--disable-dev-shm-usage",
                    format!("--user-data-dir={}", profile.display()),
                    format!("--window-size={width},{height}"),
                ],
            },
        });
        let mut caps = caps;
        if width < 600 {
            // A phone: Chromium's windows are never that narrow, so emulate one.
            caps["goog:chromeOptions"]["mobileEmulation"] = json!({
                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0, "touch": true},
            });
        }
        let caps = match caps {
            Value::Object(map) => map,
            _ => unreachable!(),
        };
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = tokio::time::timeout(
            Duration::from_secs(60),
            ClientBuilder::new(connector)
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{}", self.port)),
        )
        .await
        .expect("Chromium did not start in 60 s")
        .unwrap_or_else(|e| panic!("WebDriver session: {e}"));
        self.open.lock().unwrap().push(client.clone());
        Page { client }
    }

    /// Ends every browser session (and with it its Chromium).
    async fn close_all(&self) {
        let clients: Vec<Client> = self.open.lock().unwrap().drain(..).collect();
        for client in clients {
            let _ = tokio::time::timeout(Duration::from_secs(15), client.close()).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Its browsers are closed by now (`with_browsers`): SIGTERM, then SIGKILL.
        let pid = self.child.id() as i32;
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One browser window on the chat page.
struct Page {
    client: Client,
}

impl Page {
    async fn goto(&self, url: &str) {
        self.client.goto(url).await.expect("navigate");
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) in the page.
    async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Polls `script` until it returns something truthy; returns that.
    async fn wait(&self, what: &str, script: &str, args: Vec<Value>) -> Value {
        let deadline = Instant::now() + DOM_WAIT;
        loop {
            let value = self.js(script, args.clone()).await;
            let truthy = match &value {
                Value::Null => false,
                Value::Bool(b) => *b,
                Value::Number(n) => n.as_f64() != Some(0.0),
                Value::String(s) => !s.is_empty(),
                Value::Array(_) | Value::Object(_) => true,
            };
            if truthy {
                return value;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {DOM_WAIT:?} waiting for: {what}\npage state: {}",
                    self.describe().await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Enough of the page to see what went wrong.
    async fn describe(&self) -> Value {
        self.js(
            r#"const q = (s) => document.querySelector(s);
               return {
                 url: location.href,
                 state: q('#conn-state') && q('#conn-state').textContent,
                 presence: [...document.querySelectorAll('#presence li')].map(e => e.dataset.user),
                 typing: q('#typing') && q('#typing').textContent,
                 notice: q('#notice') && !q('#notice').hidden ? q('#notice').textContent : null,
                 messages: [...document.querySelectorAll('.message-list .msg')].slice(-30)
                   .map(e => (e.dataset.offset || 'pending') + ' ' + e.dataset.user + ': '
                        + e.querySelector('.msg-text').textContent),
               };"#,
            vec![],
        )
        .await
    }

    async fn wait_connected(&self) {
        self.wait(
            "the page is connected",
            "return document.querySelector('#conn-state').dataset.state === 'open'",
            vec![],
        )
        .await;
    }

    async fn wait_present(&self, user: &str) {
        self.wait(
            &format!("{user} in the presence list"),
            "return !!document.querySelector(`#presence li[data-user=\"${CSS.escape(arguments[0])}\"]`)",
            vec![json!(user)],
        )
        .await;
    }

    /// Offsets of the messages shown in `room`, top to bottom.
    async fn offsets(&self, room: &str) -> Vec<u64> {
        let value = self
            .js(
                "return [...document.querySelectorAll(
                   `.message-list[data-room=\"${CSS.escape(arguments[0])}\"] .msg[data-offset]`)]
                   .map(e => Number(e.dataset.offset))",
                vec![json!(room)],
            )
            .await;
        serde_json::from_value(value).expect("offsets")
    }

    /// How many delivered messages in `room` show exactly `text`.
    async fn count_text(&self, room: &str, text: &str) -> u64 {
        self.js(COUNT_TEXT, vec![json!(room), json!(text)])
            .await
            .as_u64()
            .expect("a count")
    }

    async fn wait_text(&self, room: &str, text: &str) {
        self.wait(
            &format!("message {text:?} in {room}"),
            COUNT_TEXT,
            vec![json!(room), json!(text)],
        )
        .await;
    }

    async fn type_text(&self, text: &str) {
        let input = self
            .client
            .find(Locator::Css("#composer-input"))
            .await
            .expect("the composer");
        input.send_keys(text).await.expect("typing");
    }

    async fn send(&self, text: &str) {
        self.type_text(&format!("{text}{ENTER}")).await;
    }

    async fn screenshot(&self, path: &Path) {
        let png = self.client.screenshot().await.expect("screenshot");
        std::fs::write(path, png).expect("write screenshot");
    }
}

const COUNT_TEXT: &str = "return [...document.querySelectorAll(
      `.message-list[data-room=\"${CSS.escape(arguments[0])}\"] .msg[data-offset] .msg-text`)]
      .filter(e => e.textContent === arguments[1]).length";

/// Runs `body` with a chromedriver, then ends every browser it opened and
/// the driver, also when `body` panics (a browser left behind would outlive
/// the test).
async fn with_browsers<F, Fut>(body: F)
where
    F: FnOnce(Browsers) -> Fut,
    Fut: Future<Output = ()>,
{
    let _one_at_a_time = BROWSERS.lock().await;
    let driver = Driver::start().await;
    let browsers = Browsers {
        port: driver.port,
        dir: driver.dir.clone(),
        open: Arc::default(),
    };
    let outcome = AssertUnwindSafe(body(browsers.clone()))
        .catch_unwind()
        .await;
    browsers.close_all().await;
    if outcome.is_err() {
        eprintln!("chromedriver log (tail):\n{}", driver.log());
    }
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn publish(app: &TestApp, room: &str, user: &str, text: &str) -> u64 {
    let resp = app
        .post(
            &format!("/api/rooms/{room}/messages"),
            json!({"user": user, "data": {"text": text}}),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "publish {text:?}");
    let body: Value = resp.json().await.expect("json");
    body["offset"].as_u64().expect("offset")
}

fn assert_strictly_increasing(offsets: &[u64], who: &str) {
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "{who} shows offsets out of order or twice: {offsets:?}"
    );
}

#[tokio::test]
async fn two_pages_chat_see_presence_and_typing_render_text_and_survive_a_restart() {
    let port = free_port();
    let bind = format!("127.0.0.1:{port}");
    let mut app = TestApp::spawn_with(&[("ROOMHUB_SERVER__BIND", &bind)]).await;
    let first = publish(&app, "lobby", "server", "welcome to the lobby").await;
    let room_url = |user: &str| format!("http://{bind}/?user={user}&room=lobby");

    with_browsers(|browsers| async move {
        let alice = browsers.open(1100, 800).await;
        // Bob is on a phone-sized screen.
        let bob = browsers.open(390, 844).await;

        alice.goto(&room_url("alice")).await;
        alice.wait_connected().await;
        alice.wait_text("lobby", "welcome to the lobby").await;
        bob.goto(&room_url("bob")).await;
        bob.wait_connected().await;
        bob.wait_text("lobby", "welcome to the lobby").await;
        assert_eq!(bob.offsets("lobby").await, vec![first]);
        // Chromium offers permessage-deflate by itself: both pages negotiated
        // it, and the message they just rendered came compressed.
        let metrics = app.metrics().await;
        let counter = |name: &str| -> u64 {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
                .unwrap_or(0)
        };
        assert!(
            counter("roomhub_compressed_connections_total") >= 2,
            "{metrics}"
        );
        assert!(counter("roomhub_messages_delivered_compressed_total") >= 1);

        // Presence: each sees both (alice learns of bob from user_joined).
        alice.wait_present("bob").await;
        bob.wait_present("alice").await;
        bob.wait_present("bob").await;

        // Typing shows on the other page, then the message replaces it.
        alice.type_text("hello bob").await;
        bob.wait(
            "\"alice is typing…\" on bob's page",
            "return document.querySelector('#typing').textContent.includes('alice is typing')",
            vec![],
        )
        .await;
        alice.type_text(ENTER).await;
        bob.wait_text("lobby", "hello bob").await;
        alice.wait_text("lobby", "hello bob").await;
        bob.wait(
            "the typing line clears",
            "return document.querySelector('#typing').textContent === ''",
            vec![],
        )
        .await;
        bob.send("hi alice").await;
        alice.wait_text("lobby", "hi alice").await;

        // Markup in a message is shown as text, never run as HTML.
        let evil = "<img src=x onerror=alert(1)>";
        alice.send(evil).await;
        for (who, page) in [("alice", &alice), ("bob", &bob)] {
            page.wait_text("lobby", evil).await;
            let imgs = page
                .js(
                    "return document.querySelectorAll('#messages img').length",
                    vec![],
                )
                .await;
            assert_eq!(imgs, json!(0), "{who}'s message list holds an <img>");
            let html = page
                .js(
                    "const all = [...document.querySelectorAll('.msg[data-offset] .msg-text')];
                     return all[all.length - 1].innerHTML",
                    vec![],
                )
                .await;
            assert_eq!(html, json!("&lt;img src=x onerror=alert(1)&gt;"), "{who}");
        }

        // The hub restarts on the same port and data dir while both pages
        // are open: they reconnect by themselves and resume with `since`.
        let status = app.terminate();
        assert!(status.success(), "hub exit: {status:?}");
        for page in [&alice, &bob] {
            page.wait(
                "the page notices the hub is gone",
                "return document.querySelector('#conn-state').dataset.state !== 'open'",
                vec![],
            )
            .await;
        }
        // Published while disconnected: waits in the queue, goes out once.
        alice.send("sent while offline").await;
        alice
            .wait(
                "a pending message",
                "return document.querySelectorAll('.msg.pending').length === 1",
                vec![],
            )
            .await;
        app.restart();
        assert_eq!(app.addr.port(), port, "the hub came back on its port");
        let outage: Vec<String> = (1..=5).map(|i| format!("during the outage {i}")).collect();
        for text in &outage {
            publish(&app, "lobby", "server", text).await;
        }
        for page in [&alice, &bob] {
            page.wait_connected().await;
            for text in outage
                .iter()
                .map(String::as_str)
                .chain(["sent while offline"])
            {
                page.wait_text("lobby", text).await;
            }
        }
        alice
            .wait(
                "the queued message is acked",
                "return document.querySelectorAll('.msg.pending').length === 0",
                vec![],
            )
            .await;
        // And live traffic flows again.
        bob.send("back again").await;
        alice.wait_text("lobby", "back again").await;
        bob.wait_text("lobby", "back again").await;
        alice.wait_present("bob").await;

        for (who, page) in [("alice", &alice), ("bob", &bob)] {
            for text in outage.iter().map(String::as_str).chain([
                "sent while offline",
                "hello bob",
                "hi alice",
                evil,
                "back again",
            ]) {
                assert_eq!(page.count_text("lobby", text).await, 1, "{who}: {text:?}");
            }
            let offsets = page.offsets("lobby").await;
            assert_strictly_increasing(&offsets, who);
            let newest = offsets.last().copied().unwrap_or_default();
            assert_eq!(
                offsets,
                (first..=newest).collect::<Vec<_>>(),
                "{who} misses a message"
            );
        }
    })
    .await;
}

#[tokio::test]
async fn scrolling_back_loads_older_history() {
    let app = TestApp::spawn().await;
    let total = 120u64;
    for i in 1..=total {
        let user = if i % 3 == 0 { "dave" } else { "erin" };
        assert_eq!(
            publish(&app, "archive", user, &format!("message {i}")).await,
            i
        );
    }
    let url = app.url("/?user=carol&room=archive");
    with_browsers(|browsers| async move {
        let carol = browsers.open(1000, 700).await;
        carol.goto(&url).await;
        carol.wait_connected().await;
        carol.wait_text("archive", "message 120").await;
        // The join brought the newest page only.
        let shown = carol.offsets("archive").await;
        assert_eq!(shown, (71..=total).collect::<Vec<_>>());

        // Scrolling to the top loads older pages until the first message.
        carol
            .wait(
                "older messages down to offset 1",
                "const s = document.getElementById('scroller');
                 s.scrollTop = 0;
                 s.dispatchEvent(new Event('scroll'));
                 return !!document.querySelector('.msg[data-offset=\"1\"]')
                   && !document.getElementById('history-start').hidden",
                vec![],
            )
            .await;
        let shown = carol.offsets("archive").await;
        assert_eq!(shown, (1..=total).collect::<Vec<_>>());
        carol.wait_text("archive", "message 1").await;
    })
    .await;
}

/// A name from the link that the hub would refuse is explained on the
/// sign-in form (it used to show the form again without a word).
#[tokio::test]
async fn a_name_the_hub_cannot_use_is_explained() {
    let app = TestApp::spawn().await;
    let url = app.url("/?user=Alice%20Smith&room=lobby");
    with_browsers(|browsers| async move {
        let page = browsers.open(1000, 700).await;
        page.goto(&url).await;
        let problem = page
            .wait(
                "the reason the name cannot be used",
                "const p = document.getElementById('login-problem');
                 return !document.getElementById('login').hidden && !p.hidden && p.textContent",
                vec![],
            )
            .await;
        let problem = problem.as_str().unwrap_or_default().to_owned();
        assert!(
            problem.contains("Alice Smith") && problem.contains("no spaces"),
            "{problem}"
        );
    })
    .await;
}

/// With a connect hook, a backend's session cookie reaches the hook as the
/// page's WebSocket connects, and the hook decides who the user is
/// (whatever name the page asked for).
#[tokio::test]
async fn the_pages_cookie_reaches_the_connect_hook_which_names_the_user() {
    use crate::hooks::{Backend, SECRET};
    let backend = Backend::start(|got| {
        let cookie = got.body["headers"]["cookie"].as_str().unwrap_or_default();
        if cookie.contains("app_session=carol-s3cret") {
            (200, json!({"user": "carol"}), Duration::ZERO)
        } else {
            (401, json!({}), Duration::ZERO)
        }
    });
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_HOOKS__SECRET", SECRET),
        ("ROOMHUB_HOOKS__CONNECT_URL", &backend.url("/connect")),
    ])
    .await;
    let (origin, chat) = (app.url("/healthz"), app.url("/?user=guest&room=lobby"));
    with_browsers(|browsers| async move {
        let page = browsers.open(1000, 700).await;
        // The backend's login would set this cookie for the hub's site.
        page.goto(&origin).await;
        page.js("document.cookie = 'app_session=carol-s3cret; path=/'", vec![])
            .await;
        page.goto(&chat).await;
        page.wait_connected().await;
        page.wait(
            "the hook's user in the room's presence",
            "return [...document.querySelectorAll('#presence li')].some(e => e.dataset.user === 'carol')",
            vec![],
        )
        .await;
    })
    .await;
    let connects: Vec<_> = backend
        .got()
        .into_iter()
        .filter(|g| g.body["event"] == "connect")
        .collect();
    assert!(!connects.is_empty(), "the connect hook was called");
    assert!(connects.iter().all(|g| g.body["headers"]["cookie"]
        .as_str()
        .is_some_and(|c| c.contains("app_session=carol-s3cret"))));
}

/// Writes `docs/chat.png` and `docs/chat-phone.png` (run by hand).
#[tokio::test]
#[ignore = "writes the README's screenshots; run with --ignored"]
async fn screenshot() {
    let app = TestApp::spawn().await;
    let lines = [
        ("erin", "Morning! Is the deploy still on for 10:00?"),
        (
            "dave",
            "Yes. Staging is green, I'm rolling out to the first region now.",
        ),
        ("dave", "Migrations ran in 4 s, no locks."),
        ("erin", "Nice! I'll watch the dashboards."),
        ("alice", "Joining late, catching up on the thread."),
        (
            "dave",
            "<b>this stays plain text</b> — markup is never rendered",
        ),
    ];
    for (user, text) in lines {
        publish(&app, "deploys", user, text).await;
    }
    publish(&app, "random", "erin", "lunch?").await;
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).expect("docs dir");
    let base = app.url("/");
    with_browsers(|browsers| async move {
        let alice = browsers.open(1200, 720).await;
        let dave = browsers.open(390, 760).await;
        alice.goto(&format!("{base}?user=alice&room=random")).await;
        alice.wait_connected().await;
        alice.goto(&format!("{base}?user=alice&room=deploys")).await;
        alice.wait_connected().await;
        alice
            .wait_text("deploys", "Migrations ran in 4 s, no locks.")
            .await;
        // A second room as a tab.
        alice
            .js(
                "const f = document.getElementById('join-form');
                 document.getElementById('join-room').value = 'random';
                 f.requestSubmit();
                 document.querySelector('#rooms li[data-room=\"deploys\"] .room-pick').click();",
                vec![],
            )
            .await;
        dave.goto(&format!("{base}?user=dave&room=deploys")).await;
        dave.wait_connected().await;
        alice.wait_present("dave").await;
        dave.type_text("Region two is").await;
        alice
            .wait(
                "dave typing",
                "return document.querySelector('#typing').textContent.includes('dave')",
                vec![],
            )
            .await;
        alice.send("Thanks both!").await;
        dave.wait_text("deploys", "Thanks both!").await;
        alice.wait_text("deploys", "Thanks both!").await;
        dave.wait_present("alice").await;
        alice.screenshot(&docs.join("chat.png")).await;
        dave.screenshot(&docs.join("chat-phone.png")).await;
    })
    .await;
}

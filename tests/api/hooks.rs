//! Backend hooks (PROTOCOL.md "Backend hooks"): a real HTTP backend runs in
//! the test process (actix-web on a free loopback port, on its own thread),
//! scripted per test, and records every request it gets; the hub is the
//! real binary.

use crate::helpers::{bin, TestApp, WAIT};
use ring::hmac;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const SECRET: &str = "hook-secret";

/// One request the backend got.
#[derive(Debug, Clone)]
pub(crate) struct Got {
    path: String,
    headers: Vec<(String, String)>,
    raw: Vec<u8>,
    pub(crate) body: Value,
}

impl Got {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// What the backend answers: status, JSON body, and a delay before it.
type Script = dyn Fn(&Got) -> (u16, Value, Duration) + Send + Sync;

pub(crate) struct Backend {
    addr: std::net::SocketAddr,
    got: Arc<Mutex<Vec<Got>>>,
    server: actix_web::dev::ServerHandle,
}

impl Backend {
    pub(crate) fn start(
        script: impl Fn(&Got) -> (u16, Value, Duration) + Send + Sync + 'static,
    ) -> Backend {
        use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
        let script: Arc<Script> = Arc::new(script);
        let got = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind backend");
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (script2, got2) = (script.clone(), got.clone());
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    let (script, got) = (script2.clone(), got2.clone());
                    App::new().default_service(web::to(move |req: HttpRequest, raw: web::Bytes| {
                        let (script, got) = (script.clone(), got.clone());
                        async move {
                            let request = Got {
                                path: req.path().to_owned(),
                                headers: req
                                    .headers()
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect(),
                                body: serde_json::from_slice(&raw).unwrap_or(Value::Null),
                                raw: raw.to_vec(),
                            };
                            let (status, answer, delay) = script(&request);
                            got.lock().unwrap().push(request);
                            if !delay.is_zero() {
                                // The scripted backend being slow, not a wait.
                                actix_web::rt::time::sleep(delay).await;
                            }
                            HttpResponse::build(
                                actix_web::http::StatusCode::from_u16(status).unwrap(),
                            )
                            .json(answer)
                        }
                    }))
                })
                .workers(1)
                .listen(listener)
                .expect("listen")
                .run();
                tx.send(server.handle()).unwrap();
                let _ = server.await;
            });
        });
        let server = rx.recv_timeout(WAIT).expect("backend started");
        Backend { addr, got, server }
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub(crate) fn got(&self) -> Vec<Got> {
        self.got.lock().unwrap().clone()
    }

    /// Waits (bounded polling) until the requests so far satisfy `done`.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Got]) -> bool) -> Vec<Got> {
        let deadline = Instant::now() + WAIT;
        loop {
            let got = self.got();
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "backend never got {what}: {got:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let server = self.server.clone();
        std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(server.stop(false));
        });
    }
}

fn ok(body: Value) -> (u16, Value, Duration) {
    (200, body, Duration::ZERO)
}

/// Checks a request's signature with the secret, as a backend would.
fn signed(got: &Got) -> bool {
    let Some(signature) = got.header("x-roomhub-signature") else {
        return false;
    };
    let Some(hex) = signature.strip_prefix("sha256=") else {
        return false;
    };
    let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag: Vec<u8> = (0..hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    hex.len() == 64
        && hex.bytes().all(|b| !b.is_ascii_uppercase())
        && hmac::verify(&key, &got.raw, &tag).is_ok()
}

async fn hub(hooks: &[(&str, String)], extra: &[(&str, &str)]) -> TestApp {
    let mut env: Vec<(&str, &str)> = vec![("ROOMHUB_HOOKS__SECRET", SECRET)];
    env.extend(hooks.iter().map(|(k, v)| (*k, v.as_str())));
    env.extend(extra);
    TestApp::spawn_with(&env).await
}

fn check_config(env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin())
        .current_dir(dir.path())
        .arg("check-config")
        .env_remove("ROOMHUB_CONFIG")
        .envs(env.iter().copied())
        .output()
        .expect("run roomhub");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

#[test]
fn a_hook_url_without_a_secret_or_a_bad_hook_setting_stops_start_up() {
    let url = "http://127.0.0.1:9/hook";
    for key in ["CONNECT_URL", "PUBLISH_URL", "EVENTS_URL"] {
        let var = format!("ROOMHUB_HOOKS__{key}");
        let (code, text) = check_config(&[(&var, url)]);
        assert_eq!(code, Some(2), "{var}: {text}");
        assert!(text.contains("hooks.secret"), "{var}: {text}");
    }
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[
                ("ROOMHUB_HOOKS__CONNECT_URL", "ftp://x/y"),
                ("ROOMHUB_HOOKS__SECRET", "s"),
            ],
            "hooks.connect_url",
        ),
        (
            &[
                ("ROOMHUB_HOOKS__EVENTS_URL", "not a url"),
                ("ROOMHUB_HOOKS__SECRET", "s"),
            ],
            "hooks.events_url",
        ),
        (
            &[("ROOMHUB_HOOKS__EVENTS", "message,room_burst")],
            "hooks.events",
        ),
        (&[("ROOMHUB_HOOKS__TIMEOUT_MS", "0")], "hooks.timeout_ms"),
    ];
    for (env, key) in cases {
        let (code, text) = check_config(env);
        assert_eq!(code, Some(2), "{env:?}: {text}");
        assert!(text.contains(key), "{env:?}: {key} not in {text}");
    }
    // Valid, and the secret is never printed.
    let (code, text) = check_config(&[
        ("ROOMHUB_HOOKS__PUBLISH_URL", url),
        ("ROOMHUB_HOOKS__SECRET", "do-not-print"),
        ("ROOMHUB_HOOKS__EVENTS", "message,user_joined"),
    ]);
    assert_eq!(code, Some(0), "{text}");
    assert!(!text.contains("do-not-print"), "{text}");
    assert!(text.contains("<redacted>"), "{text}");
}

// ---- connect ---------------------------------------------------------------

/// The status and `Retry-After` of a refused upgrade.
async fn refused(app: &TestApp, query: &str) -> (u16, Option<String>) {
    let url = format!("ws://{}/ws?{query}", app.addr);
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("upgrade timed out")
    {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => (
            response.status().as_u16(),
            response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
        ),
        other => panic!("expected a refusal, got {:?}", other.map(|_| "an upgrade")),
    }
}

#[tokio::test]
async fn the_connect_hook_names_the_user_and_sees_query_and_headers_but_no_token() {
    let backend = Backend::start(|_| ok(json!({"user": "alice"})));
    // No anonymous access and no JWT secret: only the hook lets anyone in.
    let app = hub(
        &[("ROOMHUB_HOOKS__CONNECT_URL", backend.url("/connect"))],
        &[("ROOMHUB_AUTH__ANONYMOUS", "false")],
    )
    .await;
    let url = format!(
        "ws://{}/ws?user=bob&room=lobby&token=secret-token&x=1",
        app.addr
    );
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    let headers = request.headers_mut();
    headers.insert("cookie", "session=abc".parse().unwrap());
    headers.insert("origin", "http://example.test".parse().unwrap());
    headers.insert("user-agent", "hook-test".parse().unwrap());
    headers.insert("x-other", "not forwarded".parse().unwrap());
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("connect timed out")
        .expect("upgrade accepted");
    use futures_util::StreamExt;
    let welcome = tokio::time::timeout(WAIT, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let welcome: Value = serde_json::from_str(welcome.to_text().unwrap()).unwrap();
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "alice", "the backend's user, not ?user=");
    let got = backend.got();
    assert_eq!(got.len(), 1, "{got:#?}");
    let event = &got[0];
    assert_eq!(event.path, "/connect");
    assert!(signed(event), "signature does not verify: {event:#?}");
    assert_eq!(event.header("content-type"), Some("application/json"));
    assert!(event.header("authorization").is_none());
    let body = &event.body;
    assert_eq!(body["event"], "connect");
    assert_eq!(body["node"], welcome["node"]);
    assert_eq!(body["ip"], "127.0.0.1");
    assert_eq!(body["user"], "bob");
    assert_eq!(
        body["query"],
        json!({"user": "bob", "room": "lobby", "x": "1"})
    );
    assert_eq!(
        body["headers"],
        json!({"cookie": "session=abc", "origin": "http://example.test", "user-agent": "hook-test"})
    );
    assert!(!String::from_utf8_lossy(&event.raw).contains("secret-token"));
}

#[tokio::test]
async fn the_connect_hook_may_limit_rooms_and_a_token_is_checked_first() {
    let backend = Backend::start(|got| {
        // The token's subject reaches the backend as `user`.
        let user = got.body["user"].as_str().unwrap_or("nobody").to_owned();
        ok(json!({"user": format!("{user}-2"), "rooms": ["team-*"]}))
    });
    let app = hub(
        &[("ROOMHUB_HOOKS__CONNECT_URL", backend.url("/c"))],
        &[("ROOMHUB_AUTH__JWT_SECRET", "jwt")],
    )
    .await;
    let exp = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs())
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "carol", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"jwt"),
    )
    .unwrap();
    let mut client = app.connect(&format!("token={token}")).await;
    assert_eq!(client.welcome["user"], "carol-2");
    client.join("team-a").await;
    let refused_join = client
        .request(json!({"type": "join", "room": "other"}))
        .await;
    assert_eq!(refused_join["code"], "forbidden", "{refused_join}");
    // A bad token is refused before the backend is asked.
    assert_eq!(refused(&app, "token=forged").await.0, 401);
    assert_eq!(backend.got().len(), 1);
}

#[tokio::test]
async fn connect_refusals_and_failures_fail_closed() {
    let backend = Backend::start(|got| match got.body["user"].as_str() {
        Some("u401") => (401, json!({}), Duration::ZERO),
        Some("u403") => (403, json!({}), Duration::ZERO),
        Some("u500") => (500, json!({}), Duration::ZERO),
        Some("bad") => ok(json!({"user": "no spaces allowed"})),
        _ => (200, json!({"user": "late"}), Duration::from_secs(3)),
    });
    let app = hub(
        &[("ROOMHUB_HOOKS__CONNECT_URL", backend.url("/c"))],
        &[("ROOMHUB_HOOKS__TIMEOUT_MS", "300")],
    )
    .await;
    assert_eq!(refused(&app, "user=u401").await, (401, None));
    assert_eq!(refused(&app, "user=u403").await, (403, None));
    for user in ["u500", "bad", "slow"] {
        let (status, retry) = refused(&app, &format!("user={user}")).await;
        assert_eq!(status, 503, "{user}");
        assert!(retry.is_some(), "{user}: no Retry-After");
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("roomhub_hook_calls_total{hook=\"connect\"} 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("roomhub_hook_failures_total{hook=\"connect\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("roomhub_hook_latency_seconds_count{hook=\"connect\"} 5"));
}

// ---- publish ---------------------------------------------------------------

/// The publish hook's script: by `data.text`.
fn moderate(got: &Got) -> (u16, Value, Duration) {
    match got.body["data"]["text"].as_str().unwrap_or("") {
        "replace" => ok(json!({"data": {"text": "replaced"}})),
        "forbid" => (403, json!({"message": "not here"}), Duration::ZERO),
        "forbid-quietly" => (403, json!({}), Duration::ZERO),
        "fail" => (500, json!({}), Duration::ZERO),
        "too-big" => ok(json!({"data": {"text": "x".repeat(200)}})),
        "timeout" => (200, json!({}), Duration::from_secs(3)),
        "slow" => (200, json!({}), Duration::from_millis(400)),
        _ => ok(json!({})),
    }
}

async fn publish_hub(backend: &Backend, timeout_ms: &str) -> TestApp {
    hub(
        &[("ROOMHUB_HOOKS__PUBLISH_URL", backend.url("/publish"))],
        &[
            ("ROOMHUB_HOOKS__TIMEOUT_MS", timeout_ms),
            ("ROOMHUB_LIMITS__MAX_MESSAGE_BYTES", "100"),
        ],
    )
    .await
}

#[tokio::test]
async fn the_publish_hook_approves_replaces_or_refuses_before_an_offset() {
    let backend = Backend::start(moderate);
    let app = publish_hub(&backend, "300").await;
    let mut watcher = app.connect("user=watcher").await;
    watcher.join("r").await;
    let mut c = app.connect("user=pat").await;
    c.join("r").await;
    let publish = |text: &str| json!({"type": "publish", "room": "r", "data": {"text": text}});
    let ack = c
        .request(json!({"type": "publish", "room": "r", "data": {"text": "hi"}, "key": "k1"}))
        .await;
    assert_eq!(ack["offset"], 1, "{ack}");
    assert_eq!(c.request(publish("replace")).await["offset"], 2);
    let expect = [
        ("forbid", "forbidden", Some("not here")),
        ("forbid-quietly", "forbidden", None),
        ("fail", "unavailable", None),
        ("timeout", "unavailable", None),
        ("too-big", "too_large", None),
    ];
    for (text, code, message) in expect {
        let reply = c.request(publish(text)).await;
        assert_eq!(reply["type"], "error", "{text}: {reply}");
        assert_eq!(reply["code"], code, "{text}: {reply}");
        if let Some(message) = message {
            assert_eq!(reply["message"], message, "{reply}");
        }
    }
    // Nothing refused was stored: the next offset follows the last stored.
    assert_eq!(c.request(publish("after")).await["offset"], 3);
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let m = watcher.next_of("message").await;
        seen.push(m["data"]["text"].clone());
    }
    assert_eq!(seen, [json!("hi"), json!("replaced"), json!("after")]);
    let got = backend.got();
    let first = &got[0];
    assert!(signed(first), "{first:#?}");
    assert_eq!(
        first.body,
        json!({"event": "publish", "node": c.welcome["node"], "room": "r", "user": "pat",
               "data": {"text": "hi"}, "key": "k1"})
    );
    // HTTP API publishes (the backend's own) skip the hook.
    let calls = backend.got().len();
    let api = app
        .post("/api/rooms/r/messages", json!({"data": {"text": "forbid"}}))
        .await;
    assert!(api.status().is_success(), "{}", api.status());
    assert_eq!(watcher.next_of("message").await["data"]["text"], "forbid");
    assert_eq!(backend.got().len(), calls);
}

#[tokio::test]
async fn publishes_keep_their_order_per_room_and_a_slow_room_holds_back_only_itself() {
    let backend = Backend::start(moderate);
    // Room a's first publish waits 400 ms for its approval, well within the timeout.
    let app = publish_hub(&backend, "5000").await;
    let mut c = app.connect("user=pat").await;
    c.join("a").await;
    c.join("b").await;
    for (i, (room, text)) in [("a", "slow"), ("a", "a2"), ("a", "a3"), ("b", "b1")]
        .iter()
        .enumerate()
    {
        c.send(json!({"type": "publish", "room": room, "data": {"text": text}, "ref": format!("p{i}")}))
            .await;
    }
    let mut acks = Vec::new();
    let mut messages = Vec::new();
    while acks.len() < 4 {
        let frame = c.next().await;
        match frame["type"].as_str() {
            Some("ack") => acks.push(frame["ref"].as_str().unwrap().to_owned()),
            Some("message") => messages.push(frame["data"]["text"].as_str().unwrap().to_owned()),
            _ => {}
        }
    }
    // Room b was not held back by room a's slow approval.
    assert_eq!(acks, ["p3", "p0", "p1", "p2"]);
    let in_a: Vec<&String> = messages.iter().filter(|t| t.as_str() != "b1").collect();
    assert_eq!(in_a, ["slow", "a2", "a3"]);
}

// ---- events ----------------------------------------------------------------

/// The events of these requests, in order, each once (a retried batch repeats ids).
fn unique_events(got: &[Got]) -> Vec<Value> {
    let mut seen = std::collections::HashSet::new();
    got.iter()
        .flat_map(|g| g.body["events"].as_array().cloned().unwrap_or_default())
        .filter(|e| seen.insert(e["id"].clone()))
        .collect()
}

fn ids(got: &Got) -> Vec<Value> {
    got.body["events"]
        .as_array()
        .map(|events| events.iter().map(|e| e["id"].clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn events_arrive_signed_in_batches_in_order_and_a_failed_batch_is_retried_with_its_ids() {
    // The first request fails; every later one is taken.
    let calls = Arc::new(Mutex::new(0));
    let counter = calls.clone();
    let backend = Backend::start(move |_| {
        let mut n = counter.lock().unwrap();
        *n += 1;
        if *n == 1 {
            (500, json!({}), Duration::ZERO)
        } else {
            ok(json!({}))
        }
    });
    let app = hub(
        &[("ROOMHUB_HOOKS__EVENTS_URL", backend.url("/events"))],
        &[(
            "ROOMHUB_HOOKS__EVENTS",
            "session_connected,session_disconnected,room_occupied,room_vacated,user_joined,user_left,message",
        )],
    )
    .await;
    let mut c = app.connect("user=ev").await;
    c.join("room-e").await;
    let offset = c.publish("room-e", json!({"text": "hello"})).await;
    c.request(json!({"type": "leave", "room": "room-e"})).await;
    let node = c.welcome["node"].clone();
    c.close().await;
    let types = [
        "session_connected",
        "room_occupied",
        "user_joined",
        "message",
        "user_left",
        "room_vacated",
        "session_disconnected",
    ];
    // The first request was refused, so the events are those of the others.
    let got = backend
        .wait_for("every event", |got| {
            got.len() > 1 && unique_events(&got[1..]).len() >= types.len()
        })
        .await;
    for g in &got {
        assert!(signed(g), "{g:#?}");
        assert_eq!(g.body["node"], node);
    }
    // The failed batch came again with the same ids (maybe more after them).
    let (first, second) = (ids(&got[0]), ids(&got[1]));
    assert!(
        !first.is_empty() && second.starts_with(&first),
        "{first:?} then {second:?}"
    );
    let events = unique_events(&got[1..]);
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, types, "{events:#?}");
    let by = |t: &str| events.iter().find(|e| e["type"] == t).unwrap().clone();
    let session = by("session_connected")["session"].clone();
    assert!(session.is_string());
    assert_eq!(by("session_connected")["user"], "ev");
    assert_eq!(by("session_connected")["ip"], "127.0.0.1");
    assert_eq!(by("session_disconnected")["session"], session);
    assert_eq!(by("session_disconnected")["code"], 1000);
    assert_eq!(by("room_occupied")["room"], "room-e");
    assert_eq!(by("user_joined")["user"], "ev");
    let message = by("message");
    assert_eq!(message["offset"], offset);
    assert_eq!(message["data"], json!({"text": "hello"}));
    assert_eq!(message["user"], "ev");
    assert!(message["id"].is_string() && message["ts"].is_u64());
    assert!(
        got.len() < 2 + types.len(),
        "events were batched: {} requests",
        got.len()
    );
}

#[tokio::test]
async fn while_the_events_backend_fails_the_oldest_events_beyond_the_queue_are_dropped_and_counted()
{
    let backend = Backend::start(|_| (503, json!({}), Duration::ZERO));
    let app = hub(
        &[("ROOMHUB_HOOKS__EVENTS_URL", backend.url("/events"))],
        &[("ROOMHUB_HOOKS__QUEUE", "3")],
    )
    .await;
    for i in 0..4 {
        let c = app.connect(&format!("user=u{i}")).await;
        c.close().await;
    }
    // 8 events through a queue of 3.
    let deadline = Instant::now() + WAIT;
    loop {
        let metrics = app.metrics().await;
        // The failure is counted when the backend's 503 comes back, which
        // may be after the queue has filled.
        if metrics.contains("roomhub_hook_events_dropped_total 5")
            && metrics.contains("roomhub_hook_events_queued 3")
            && metrics.contains("roomhub_hook_failures_total{hook=\"events\"}")
        {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Retried, not given up on.
    backend.wait_for("a retry", |got| got.len() >= 2).await;
}

#[tokio::test]
async fn a_stopping_node_sends_the_events_of_its_drain() {
    let backend = Backend::start(|_| ok(json!({})));
    let mut app = hub(
        &[("ROOMHUB_HOOKS__EVENTS_URL", backend.url("/events"))],
        &[],
    )
    .await;
    let mut c = app.connect("user=last").await;
    c.join("r").await;
    let status = app.terminate();
    assert!(status.success(), "{status:?}");
    let events = unique_events(&backend.got());
    let left = events
        .iter()
        .find(|e| e["type"] == "session_disconnected")
        .unwrap_or_else(|| panic!("{events:#?}"));
    // 1001: the drain's close code.
    assert_eq!(left["code"], 1001, "{left}");
    assert!(
        events.iter().any(|e| e["type"] == "room_vacated"),
        "{events:#?}"
    );
}

#[tokio::test]
async fn connect_hook_calls_in_flight_are_bounded_and_the_excess_is_refused_at_once() {
    // Held 3 s each: long enough to fill every slot, well within the timeout.
    let backend = Backend::start(|_| (200, json!({"user": "held"}), Duration::from_secs(3)));
    let app = hub(
        &[("ROOMHUB_HOOKS__CONNECT_URL", backend.url("/c"))],
        &[
            ("ROOMHUB_HOOKS__TIMEOUT_MS", "20000"),
            ("ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "5000"),
        ],
    )
    .await;
    // roomhub::hooks::connect::MAX_CONNECT_CALLS
    const SLOTS: usize = 256;
    let url = format!("ws://{}/ws", app.addr);
    let held: Vec<_> = (0..SLOTS)
        .map(|_| tokio::spawn(tokio_tungstenite::connect_async(url.clone())))
        .collect();
    backend
        .wait_for("every slot's call", |got| got.len() == SLOTS)
        .await;
    let (status, retry) = refused(&app, "user=one-too-many").await;
    assert_eq!(status, 503);
    assert!(retry.is_some());
    // Refused while every held call is still waiting: not queued behind them.
    assert!(held.iter().all(|upgrade| !upgrade.is_finished()));
    assert!(app
        .metrics()
        .await
        .contains("roomhub_rejected_upgrades_total{reason=\"hook_busy\"} 1"));
    for upgrade in held {
        let (ws, _) = upgrade.await.unwrap().expect("held upgrades are accepted");
        drop(ws);
    }
}

// ---- cluster ---------------------------------------------------------------

/// A backend taking every batch, and two nodes on one nats-server sending it
/// these event types.
async fn two_nodes(events: &str) -> (Backend, crate::nats::NatsServer, TestApp, TestApp) {
    use crate::nats::{spawn_node, NatsServer};
    let backend = Backend::start(|_| ok(json!({})));
    let nats = NatsServer::start();
    let url = backend.url("/events");
    let env = [
        ("ROOMHUB_HOOKS__SECRET", SECRET),
        ("ROOMHUB_HOOKS__EVENTS_URL", url.as_str()),
        ("ROOMHUB_HOOKS__EVENTS", events),
    ];
    let a = spawn_node(&nats, None, &env).await;
    let b = spawn_node(&nats, None, &env).await;
    (backend, nats, a, b)
}

/// Connects a late session to each node and waits until both nodes'
/// reports of them (and what `also` asks for) arrived, so each node's
/// earlier events are in (a node's events arrive in order); returns every
/// other event once, with the node that sent it.
async fn reports_after_late_sessions(
    backend: &Backend,
    a: &TestApp,
    b: &TestApp,
    also: impl Fn(&[Value]) -> bool,
) -> Vec<(Value, Value)> {
    let _late_a = a.connect("user=late-a").await;
    let _late_b = b.connect("user=late-b").await;
    let got = backend
        .wait_for("both nodes' later events", |got| {
            let events = unique_events(got);
            ["late-a", "late-b"]
                .iter()
                .all(|u| events.iter().any(|e| e["user"] == *u))
                && also(&events)
        })
        .await;
    let mut seen_ids = std::collections::HashSet::new();
    let mut reports = Vec::new();
    for g in &got {
        for e in g.body["events"].as_array().unwrap() {
            if e["type"] != "session_connected" && seen_ids.insert(e["id"].clone()) {
                reports.push((g.body["node"].clone(), e.clone()));
            }
        }
    }
    reports
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_a_message_event_comes_once_from_the_node_that_took_it() {
    let (backend, _nats, a, b) = two_nodes("message,session_connected").await;
    let mut reader = b.connect("user=reader").await;
    reader.join("shared").await;
    let mut writer = a.connect("user=writer").await;
    writer.join("shared").await;
    let mut offsets = Vec::new();
    for n in 0..3 {
        offsets.push(writer.publish("shared", json!({"n": n})).await);
        reader.next_of("message").await;
    }
    // A later event on node b: its events arrive in order, so any `message`
    // event of b's would be in by then.
    let late = b.connect("user=late").await;
    let (node_a, node_b) = (writer.welcome["node"].clone(), late.welcome["node"].clone());
    let got = backend
        .wait_for("b's later event and a's messages", |got| {
            let events = unique_events(got);
            let late_seen = events.iter().any(|e| e["user"] == "late");
            let messages = events.iter().filter(|e| e["type"] == "message").count();
            late_seen && messages >= 3
        })
        .await;
    for g in &got {
        for e in g.body["events"].as_array().unwrap() {
            if e["type"] == "message" {
                assert_eq!(
                    g.body["node"], node_a,
                    "a message event from {}",
                    g.body["node"]
                );
            }
        }
    }
    assert_ne!(node_a, node_b);
    let messages: Vec<Value> = unique_events(&got)
        .into_iter()
        .filter(|e| e["type"] == "message")
        .collect();
    let seen: Vec<&Value> = messages.iter().map(|m| &m["offset"]).collect();
    let expected: Vec<Value> = offsets.iter().map(|o| json!(o)).collect();
    assert_eq!(seen, expected.iter().collect::<Vec<_>>(), "{messages:#?}");
    assert!(messages.iter().all(|m| m["user"] == "writer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_a_user_joining_or_leaving_is_reported_once_by_its_node() {
    let (backend, _nats, a, b) = two_nodes("session_connected,user_joined,user_left").await;
    let mut x = a.connect("user=x").await;
    x.join("p").await;
    let mut y = b.connect("user=y").await;
    y.join("p").await;
    // Each node hears of the other's user (and tells its members)...
    let seen = x.next_of("user_joined").await;
    assert_eq!(seen["user"], "y");
    y.request(json!({"type": "leave", "room": "p"})).await;
    assert_eq!(x.next_of("user_left").await["user"], "y");
    // ...but only the user's own node reports it. Later events on both
    // nodes close the window: each node's events arrive in order.
    let (node_a, node_b) = (x.welcome["node"].clone(), y.welcome["node"].clone());
    // (A room's first events may be held a moment: see README.)
    let reports: Vec<(Value, Value, Value)> =
        reports_after_late_sessions(&backend, &a, &b, |events| {
            events
                .iter()
                .any(|e| e["type"] == "user_joined" && e["user"] == "x")
        })
        .await
        .into_iter()
        .map(|(node, e)| (node, e["type"].clone(), e["user"].clone()))
        .collect();
    // In order per node; the two nodes' batches may interleave.
    let of = |node: &Value| -> Vec<(Value, Value, Value)> {
        reports.iter().filter(|r| &r.0 == node).cloned().collect()
    };
    assert_eq!(
        [of(&node_a), of(&node_b)].concat(),
        [
            (node_a.clone(), json!("user_joined"), json!("x")),
            (node_b.clone(), json!("user_joined"), json!("y")),
            (node_b, json!("user_left"), json!("y")),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_cluster_mode_a_room_occupied_and_vacated_is_reported_once_for_the_cluster() {
    let (backend, nats, a, b) = two_nodes("session_connected,room_occupied,room_vacated").await;
    // Both nodes serve the room (a read starts and syncs it) before anyone joins.
    for node in [&a, &b] {
        let (status, _) = node.get_json("/api/rooms/occ/messages").await;
        assert_eq!(status, 200);
    }
    // The room's presence announcements, as node b hears them.
    let subject = roomhub::cluster::Subjects::new("roomhub", 8)
        .events(&roomhub::protocol::RoomName::parse("occ").unwrap());
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let mut announced = client.subscribe(subject).await.expect("subscribe");
    client.flush().await.expect("flush");
    let mut x = a.connect("user=x").await;
    x.join("occ").await;
    // Joins one after the other: y joins once x's presence went out (two
    // first joins within one NATS round trip would both see an empty room).
    tokio::time::timeout(WAIT, async {
        use futures_util::StreamExt;
        while let Some(event) = announced.next().await {
            if String::from_utf8_lossy(&event.payload).contains("\"x\"") {
                return;
            }
        }
    })
    .await
    .expect("x's presence announced");
    let mut y = b.connect("user=y").await;
    y.join("occ").await;
    assert_eq!(x.next_of("user_joined").await["user"], "y");
    // y leaves first (x is still there), then x: the room is empty.
    y.request(json!({"type": "leave", "room": "occ"})).await;
    assert_eq!(x.next_of("user_left").await["user"], "y");
    x.request(json!({"type": "leave", "room": "occ"})).await;
    let (node_a, node_b) = (x.welcome["node"].clone(), y.welcome["node"].clone());
    let reports: Vec<(Value, Value)> = reports_after_late_sessions(&backend, &a, &b, |_| true)
        .await
        .into_iter()
        .map(|(node, e)| (node, e["type"].clone()))
        .collect();
    assert_ne!(node_a, node_b);
    // Once each, from the node whose user made the room occupied / empty.
    assert_eq!(
        reports,
        [
            (node_a.clone(), json!("room_occupied")),
            (node_a, json!("room_vacated")),
        ]
    );
}

/// First joins on two nodes at the same moment (each node sees an empty
/// room) and last leaves at the same moment (each still sees the other's
/// user): one `room_occupied` and one `room_vacated` for the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_mode_racing_first_joins_and_last_leaves_are_reported_once() {
    const ROOMS: usize = 5;
    let (backend, _nats, a, b) = two_nodes("room_occupied,room_vacated").await;
    let mut x = a.connect("user=x").await;
    let mut y = b.connect("user=y").await;
    for n in 0..ROOMS {
        let room = format!("race-{n}");
        let (jx, jy) = tokio::join!(x.join(&room), y.join(&room));
        assert_eq!(
            (&jx["type"], &jy["type"]),
            (&json!("joined"), &json!("joined"))
        );
    }
    for n in 0..ROOMS {
        let room = format!("race-{n}");
        let leave = |room: &str| json!({"type": "leave", "room": room});
        tokio::join!(x.request(leave(&room)), y.request(leave(&room)));
    }
    let got = backend
        .wait_for("every room occupied and vacated", |got| {
            let events = unique_events(got);
            (0..ROOMS).all(|n| {
                let room = format!("race-{n}");
                events
                    .iter()
                    .any(|e| e["type"] == "room_vacated" && e["room"] == room.as_str())
            })
        })
        .await;
    // Anything else would come within the race window: wait it out.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let events = unique_events(&backend.got());
    for n in 0..ROOMS {
        let room = format!("race-{n}");
        let of = |kind: &str| {
            events
                .iter()
                .filter(|e| e["type"] == kind && e["room"] == room.as_str())
                .count()
        };
        assert_eq!(
            (of("room_occupied"), of("room_vacated")),
            (1, 1),
            "{room}: {got:?}"
        );
    }
}

/// A node dies with a user in a room two other nodes serve: both report
/// the user's departure (nobody else can), with the same id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_cluster_mode_a_dead_nodes_user_left_carries_the_same_id_from_every_node() {
    use crate::nats::spawn_node;
    let (backend, nats, a, b) = two_nodes("user_left,room_vacated").await;
    let url = backend.url("/events");
    let env = [
        ("ROOMHUB_HOOKS__SECRET", SECRET),
        ("ROOMHUB_HOOKS__EVENTS_URL", url.as_str()),
        ("ROOMHUB_HOOKS__EVENTS", "user_left,room_vacated"),
    ];
    let mut c = spawn_node(&nats, None, &env).await;
    let mut x = a.connect("user=x").await;
    let mut y = b.connect("user=y").await;
    let mut z = c.connect("user=z").await;
    x.join("crash").await;
    y.join("crash").await;
    z.join("crash").await;
    for watcher in [&mut x, &mut y] {
        while watcher.next_of("user_joined").await["user"] != "z" {}
    }
    c.kill9();
    let got = backend
        .wait_for("z's departure from both nodes", |got| {
            let nodes: std::collections::BTreeSet<String> = got
                .iter()
                .filter(|g| {
                    g.body["events"]
                        .as_array()
                        .is_some_and(|es| es.iter().any(|e| e["user"] == "z"))
                })
                .map(|g| g.body["node"].to_string())
                .collect();
            nodes.len() == 2
        })
        .await;
    let left: Vec<&Value> = got
        .iter()
        .flat_map(|g| g.body["events"].as_array().unwrap())
        .filter(|e| e["type"] == "user_left" && e["user"] == "z")
        .collect();
    assert!(left.len() >= 2, "{left:?}");
    assert!(left.iter().all(|e| e["id"] == left[0]["id"]), "{left:?}");
    assert_eq!(
        unique_events(&got)
            .iter()
            .filter(|e| e["user"] == "z")
            .count(),
        1
    );
    // The room still has x and y: nobody reports it vacated.
    assert!(!unique_events(&got)
        .iter()
        .any(|e| e["type"] == "room_vacated"));
}

//! Every HTTP route, with its 401 and 400 cases.

use crate::helpers::*;
use serde_json::{json, Value};

#[tokio::test]
async fn health_readiness_stats_metrics_and_the_page() {
    let app = TestApp::spawn().await;
    assert_eq!(
        reqwest::get(app.url("/healthz")).await.unwrap().status(),
        200
    );
    assert_eq!(
        reqwest::get(app.url("/readyz")).await.unwrap().status(),
        200
    );
    let page = reqwest::get(app.url("/")).await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(page.text().await.unwrap().contains("roomhub"));
    assert_eq!(
        reqwest::get(app.url("/no/such/file"))
            .await
            .unwrap()
            .status(),
        404
    );

    let mut c = app.connect("user=alice&room=one").await;
    c.next_of("joined").await;
    let (status, stats) = app.get_json("/api/stats").await;
    assert_eq!(status, 200);
    assert_eq!(stats["connections"], 1);
    assert_eq!(stats["rooms"], 1);
    assert_eq!(stats["node"], c.welcome["node"]);
    assert!(stats["uptime_secs"].as_u64().is_some());
    let (_, rooms) = app.get_json("/api/rooms").await;
    assert_eq!(
        rooms,
        json!({"rooms": [{"room": "one", "users": 1, "sessions": 1}]})
    );

    let metrics = app.metrics().await;
    for name in [
        "roomhub_connections 1",
        "roomhub_rooms 1",
        "roomhub_messages_published_total",
        "roomhub_messages_delivered_total",
        "roomhub_errors_total{code=\"bad_request\"}",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
}

#[tokio::test]
async fn publishing_through_the_api_reaches_websocket_clients() {
    let app = TestApp::spawn().await;
    let mut c = app.connect("user=alice").await;
    c.join("news").await;
    let resp = app
        .post(
            "/api/rooms/news/messages",
            json!({"data": {"headline": "hi"}}),
        )
        .await;
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"offset": 1}));
    let m = c.next_of("message").await;
    assert_eq!(
        (m["user"].clone(), m["data"].clone()),
        (json!("server"), json!({"headline": "hi"}))
    );
    // As a named user, with null data, with an idempotency key.
    let resp = app
        .post(
            "/api/rooms/news/messages",
            json!({"data": null, "user": "bot", "key": "k"}),
        )
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"offset": 2}));
    let resp = app
        .post(
            "/api/rooms/news/messages",
            json!({"data": null, "user": "bot", "key": "k"}),
        )
        .await;
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({"offset": 2}));
    let m = c.next_of("message").await;
    assert_eq!(
        (m["user"].clone(), m["data"].clone()),
        (json!("bot"), Value::Null)
    );
}

#[tokio::test]
async fn history_over_http_pages_both_ways() {
    let app = TestApp::spawn().await;
    for i in 0..30 {
        app.post("/api/rooms/log/messages", json!({"data": i}))
            .await;
    }
    let (status, page) = app.get_json("/api/rooms/log/messages?limit=5").await;
    assert_eq!(status, 200);
    assert_eq!(page["room"], "log");
    assert!(page["epoch"].as_u64().is_some());
    assert_eq!(offsets(&page["messages"]), (26..=30).collect::<Vec<_>>());
    let (_, page) = app
        .get_json("/api/rooms/log/messages?before=26&limit=5")
        .await;
    assert_eq!(offsets(&page["messages"]), (21..=25).collect::<Vec<_>>());
    let (_, page) = app
        .get_json("/api/rooms/log/messages?since=3&limit=4")
        .await;
    assert_eq!(offsets(&page["messages"]), vec![4, 5, 6, 7]);
    let (_, page) = app.get_json("/api/rooms/log/messages?since=30").await;
    assert_eq!(page["messages"], json!([]));
}

#[tokio::test]
async fn direct_messages_through_the_api() {
    let app = TestApp::spawn().await;
    let mut bob = app.connect("user=bob").await;
    let resp = app
        .post("/api/users/bob/messages", json!({"data": {"note": 1}}))
        .await;
    assert_eq!(resp.status(), 202);
    let d = bob.next().await;
    assert_eq!(
        (d["type"].clone(), d["from"].clone(), d["data"].clone()),
        (json!("direct"), json!("server"), json!({"note": 1}))
    );
}

#[tokio::test]
async fn the_api_key_is_required() {
    let app = TestApp::spawn().await;
    let http = app.http();
    for (method, path) in [
        // Room names are private data: the list needs the key (stats do not).
        ("GET", "/api/rooms"),
        ("GET", "/api/rooms/r/messages"),
        ("POST", "/api/rooms/r/messages"),
        ("POST", "/api/users/u/messages"),
    ] {
        let req = |key: Option<&str>| {
            let mut r = http
                .request(method.parse().unwrap(), app.url(path))
                .json(&json!({"data": 1}));
            if let Some(k) = key {
                r = r.bearer_auth(k);
            }
            r
        };
        assert_eq!(
            req(None).send().await.unwrap().status(),
            401,
            "{method} {path}"
        );
        let wrong = req(Some("wrong")).send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        assert_eq!(
            wrong.json::<Value>().await.unwrap()["error"],
            "unauthorized"
        );
    }
    assert_eq!(
        reqwest::get(app.url("/api/stats")).await.unwrap().status(),
        200,
        "counts stay public"
    );
    // RFC 7235: the scheme is case-insensitive.
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let resp = http
            .get(app.url("/api/rooms"))
            .header("authorization", format!("{scheme} {API_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{scheme}");
    }
    // With no key configured, those routes always answer 401.
    let keyless = TestApp::spawn_with(&[("ROOMHUB_AUTH__API_KEY", "")]).await;
    let resp = keyless
        .http()
        .get(keyless.url("/api/rooms/r/messages"))
        .bearer_auth("")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
}

#[tokio::test]
async fn bad_input_gets_400_with_a_json_error_never_500() {
    let app = TestApp::spawn_with(&[("ROOMHUB_LIMITS__MAX_MESSAGE_BYTES", "50")]).await;
    let http = app.http();
    let post = |path: &str, body: &str| {
        http.post(app.url(path))
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
    };
    for (path, body) in [
        ("/api/rooms/r/messages", "not json"),
        ("/api/rooms/r/messages", "[1]"),
        ("/api/rooms/r/messages", "{}"),
        ("/api/rooms/r/messages", r#"{"data":1,"user":"bad user"}"#),
        ("/api/rooms/r/messages", r#"{"data":1,"user":5}"#),
        ("/api/rooms/r/messages", r#"{"data":1,"key":""}"#),
        (
            "/api/rooms/r/messages",
            &format!(r#"{{"data":"{}"}}"#, "x".repeat(100)),
        ),
        ("/api/rooms/bad%20room/messages", r#"{"data":1}"#),
        ("/api/users/bad%20user/messages", r#"{"data":1}"#),
        ("/api/users/u/messages", r#"{"nodata":1}"#),
    ] {
        let resp = post(path, body).await.unwrap();
        assert_eq!(resp.status(), 400, "{path} {body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"], "bad_request", "{path} {body}");
    }
    for query in ["limit=0", "limit=201", "limit=x", "before=-1", "since=abc"] {
        let (status, err) = app
            .get_json(&format!("/api/rooms/r/messages?{query}"))
            .await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(err["error"], "bad_request");
    }
    // A body over the size limit is a bad body too: 400 with JSON, not a bare 413.
    let huge = format!(r#"{{"data":"{}"}}"#, "x".repeat(2 << 20));
    for path in ["/api/rooms/r/messages", "/api/users/u/messages"] {
        let resp = post(path, &huge).await.unwrap();
        assert_eq!(resp.status(), 400, "{path}");
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], "bad_request");
    }
    let (status, _) = app.get_json("/api/rooms/bad%20room/messages").await;
    assert_eq!(status, 400);
    assert_eq!(
        reqwest::get(app.url("/healthz")).await.unwrap().status(),
        200
    );
}

/// A body that trickles in is not waited for forever: 408 for the routes
/// that read one, the plain answer for the others, and either way the
/// connection is closed (it used to be held for as long as the client liked).
#[tokio::test]
async fn a_request_body_that_trickles_in_gets_an_answer_and_is_closed() {
    let app = TestApp::spawn_with(&[("ROOMHUB_SERVER__BODY_TIMEOUT_MS", "1000")]).await;
    let authorized = format!("authorization: Bearer {API_KEY}\r\n");
    let cases = [
        (
            "POST /api/rooms/slow/messages",
            authorized.as_str(),
            "content-length: 200",
            "408",
        ),
        (
            "POST /api/rooms/slow/messages",
            authorized.as_str(),
            "transfer-encoding: chunked",
            "408",
        ),
        (
            "POST /api/users/u/messages",
            authorized.as_str(),
            "transfer-encoding: chunked",
            "408",
        ),
        // Answered without reading the body: the body must not hold the connection either.
        (
            "POST /api/rooms/slow/messages",
            "",
            "transfer-encoding: chunked",
            "401",
        ),
        ("GET /healthz", "", "transfer-encoding: chunked", "200"),
    ];
    for (request, auth, framing, status) in cases {
        let answer = trickle(&app, request, auth, framing).await;
        let case = format!("{request} {auth:?} {framing}");
        let answer = answer.unwrap_or_else(|partial| {
            panic!("{case}: the connection is still open after {WAIT:?}: {partial:?}")
        });
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{case}: {answer:?}"
        );
        if status == "408" {
            assert!(answer.contains("request_timeout"), "{case}: {answer:?}");
        }
    }
    // The hub still answers, and a body sent at once keeps its connection.
    let (status, _) = app.get_json("/api/rooms/slow/messages").await;
    assert_eq!(status, 200);
}

/// Sends `request`'s head and then its body one byte every 100 ms (at most
/// 200 of them, far slower than the timeout allows); returns everything the
/// hub sent once it closed the connection, or `Err` with what it sent so far
/// if it was still open after `WAIT`.
async fn trickle(
    app: &TestApp,
    request: &str,
    auth: &str,
    framing: &str,
) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let head = format!(
        "{request} HTTP/1.1\r\nhost: x\r\n{auth}content-type: application/json\r\n{framing}\r\n\r\n"
    );
    writer.write_all(head.as_bytes()).await.unwrap();
    let chunked = framing.starts_with("transfer");
    let sender = tokio::spawn(async move {
        let mut every = tokio::time::interval(std::time::Duration::from_millis(100));
        for _ in 0..200 {
            every.tick().await;
            let piece: &[u8] = if chunked { b"1\r\n \r\n" } else { b" " };
            if writer.write_all(piece).await.is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    // A reset (the hub closed while we were still sending) ends it too.
    let read = tokio::time::timeout(WAIT, reader.read_to_end(&mut answer)).await;
    sender.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    read.map(|_| answer.clone()).map_err(|_| answer)
}

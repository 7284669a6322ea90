//! A flood of rooms gives its memory back: rooms created by joins and
//! stopped when their members left must not keep the hub's RSS up, and
//! repeated floods must not ratchet it (issue: glibc kept what a burst freed).

use crate::helpers::*;
use serde_json::json;
use std::time::{Duration, Instant};

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse().ok())
        .unwrap_or(0)
}

/// Opens `conns` connections, each joining `per` rooms of its own; returns
/// the hub's RSS with all of them open.
async fn flood(app: &TestApp, round: usize, conns: usize, per: usize) -> u64 {
    let mut clients = Vec::with_capacity(conns);
    for i in 0..conns {
        let mut c = app.connect(&format!("user=f{i}")).await;
        for r in 0..per {
            c.send(json!({"type": "join", "room": format!("flood-{round}-{i}-{r}"), "history": 0}))
                .await;
        }
        for _ in 0..per {
            c.next_of("joined").await;
        }
        clients.push(c);
    }
    let peak = rss_kb(app.pid());
    for c in clients {
        c.close().await;
    }
    peak
}

/// Waits (bounded) until every room has stopped and the RSS is at most
/// `ceiling` KiB; returns the last RSS seen.
async fn settles_below(app: &TestApp, ceiling: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let (_, stats) = app.get_json("/api/stats").await;
        let rss = rss_kb(app.pid());
        if (stats["rooms"] == 0 && rss <= ceiling) || Instant::now() > deadline {
            return rss;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn a_flood_of_rooms_gives_its_memory_back() {
    let app = TestApp::spawn_with(&[
        ("ROOMHUB_ROOMS__IDLE_TIMEOUT_MS", "500"),
        ("ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP", "100000"),
        ("ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "100000"),
    ])
    .await;
    let start = rss_kb(app.pid());
    let peak = flood(&app, 1, 300, 32).await;
    let grew = peak.saturating_sub(start);
    assert!(grew > 20_000, "9 600 rooms took only {grew} KiB");
    let ceiling = start + grew / 3;
    let after = settles_below(&app, ceiling).await;
    assert!(
        after <= ceiling,
        "RSS {start} KiB → {peak} KiB with 9 600 rooms → {after} KiB after they stopped"
    );
    // A second flood ends where the first did: no ratchet.
    let peak2 = flood(&app, 2, 300, 32).await;
    let after2 = settles_below(&app, ceiling).await;
    eprintln!("RSS KiB: start {start}, flood {peak} → {after}, again {peak2} → {after2}");
    assert!(
        after2 <= ceiling,
        "second flood: {peak2} KiB → {after2} KiB (first ended at {after} KiB)"
    );
}

//! `roomhub load` against a real hub: a short, small run whose counts must
//! add up, with nothing lost. Correctness only; speed is BENCHMARKS.md's job.

use crate::helpers::{bin, TestApp};
use serde_json::Value;
use std::process::Command;

/// Limits high enough that the load run is never throttled.
const UNTHROTTLED: [(&str, &str); 4] = [
    ("ROOMHUB_LIMITS__PUBLISH_PER_SEC", "1000000"),
    ("ROOMHUB_LIMITS__PUBLISH_BURST", "1000000"),
    ("ROOMHUB_LIMITS__MAX_CONNECTIONS_PER_IP", "100000"),
    ("ROOMHUB_LIMITS__HANDSHAKES_PER_IP_PER_SEC", "100000"),
];

fn load(app: &TestApp, extra: &[&str]) -> Value {
    let url = format!("ws://{}", app.addr);
    let output = Command::new(bin())
        .args(["load", "--url", &url, "--json", "--threads", "2"])
        .args(extra)
        .output()
        .expect("run roomhub load");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "roomhub load failed: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn u(summary: &Value, key: &str) -> u64 {
    summary[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} in {summary}"))
}

#[tokio::test]
async fn a_max_rate_run_delivers_every_acked_message_to_every_member() {
    let app = TestApp::spawn_with(&UNTHROTTLED).await;
    let s = load(
        &app,
        &[
            "--clients",
            "20",
            "--rooms",
            "2",
            "--duration",
            "2",
            "--window",
            "8",
        ],
    );
    assert_eq!(u(&s, "connected"), 20, "{s}");
    assert_eq!(u(&s, "connect_failed"), 0, "{s}");
    let acked = u(&s, "acked");
    assert!(acked > 0, "{s}");
    assert_eq!(u(&s, "sent"), acked, "every publish is acked: {s}");
    assert_eq!(u(&s, "errors"), 0, "{s}");
    // One publisher per room, ten members per room (the publisher included).
    assert_eq!(u(&s, "expected_deliveries"), acked * 10, "{s}");
    assert_eq!(u(&s, "deliveries"), acked * 10, "{s}");
    assert_eq!(u(&s, "lost"), 0, "{s}");
    assert_eq!(u(&s, "duplicates"), 0, "{s}");
    assert_eq!(u(&s, "out_of_order"), 0, "{s}");
    assert_eq!(u(&s, "disconnected"), 0, "{s}");
    assert_eq!(s["latency"]["count"].as_u64(), Some(acked * 10), "{s}");
    assert!(
        u(&s["latency"], "p50_us") <= u(&s["latency"], "p99_us"),
        "{s}"
    );
}

#[tokio::test]
async fn a_paced_run_publishes_at_the_rate_asked() {
    let app = TestApp::spawn_with(&UNTHROTTLED).await;
    // All publishers at the same instants, then spread over the period.
    for spread in [None, Some("--spread")] {
        let mut args = vec![
            "--clients",
            "20",
            "--rooms",
            "2",
            "--publishers",
            "2",
            "--rate",
            "20",
            "--duration",
            "2",
            "--room-prefix",
            if spread.is_some() {
                "spread"
            } else {
                "aligned"
            },
        ];
        args.extend(spread);
        let s = load(&app, &args);
        // 2 rooms × 2 publishers × 20/s × 2 s = 160, give or take a tick;
        // never the thousands an unpaced run would send (a slow machine may
        // send fewer).
        let acked = u(&s, "acked");
        assert!((80..=170).contains(&acked), "{spread:?}: {s}");
        assert_eq!(u(&s, "sent"), acked, "{spread:?}: {s}");
        assert_eq!(u(&s, "deliveries"), acked * 10, "{spread:?}: {s}");
        assert_eq!(u(&s, "lost"), 0, "{spread:?}: {s}");
    }
}

#[tokio::test]
async fn unbounded_runs_are_refused() {
    for args in [["--duration", "3601"], ["--clients", "100001"]] {
        let output = Command::new(bin())
            .args(["load", "--url", "ws://127.0.0.1:9"])
            .args(args)
            .output()
            .expect("run roomhub load");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

//! Prometheus metrics: one registry per app, so tests and benches running
//! several apps in one process do not share counters.

use crate::protocol::ErrorCode;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};
use std::time::Duration;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub connections: IntGauge,
    pub rooms: IntGauge,
    pub messages_published: IntCounter,
    pub messages_delivered: IntCounter,
    /// Connections that negotiated permessage-deflate.
    pub compressed_connections: IntCounter,
    /// Frames delivered compressed (a part of what the hub sends: room
    /// messages and the session's own frames, over the size threshold).
    pub messages_delivered_compressed: IntCounter,
    pub direct_messages: IntCounter,
    /// Messages pruned because they outlived `history.ttl_secs`.
    pub messages_expired: IntCounter,
    /// Rooms not running that the TTL sweep started to prune their history.
    pub rooms_swept: IntCounter,
    pub slow_consumer_disconnects: IntCounter,
    pub rate_limited: IntCounter,
    pub abuse_disconnects: IntCounter,
    pub heartbeat_timeouts: IntCounter,
    pub token_expiries: IntCounter,
    pub stalled_sockets_cut: IntCounter,
    pub cluster_link_up: IntGauge,
    pub cluster_link_losses: IntCounter,
    /// Records of room logs heard live (only rooms this node serves).
    pub cluster_live_records: IntCounter,
    /// Records of room logs read by direct get (catch-up, gaps, checks).
    pub cluster_read_records: IntCounter,
    /// Appends that lost the race to another node's record and were retried.
    pub cluster_append_conflicts: IntCounter,
    pub cluster_presence_waits_cut: IntCounter,
    /// Events waiting for `hooks.events_url`.
    pub hook_events_queued: IntGauge,
    pub hook_events_dropped: IntCounter,
    rejected_upgrades: IntCounterVec,
    errors: IntCounterVec,
    hook_calls: IntCounterVec,
    hook_failures: IntCounterVec,
    hook_latency: HistogramVec,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        // Names and labels are constants, so registration cannot fail.
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let errors = IntCounterVec::new(
            Opts::new("roomhub_errors_total", "error frames sent, by code"),
            &["code"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(errors.clone()))
            .expect("unique metric");
        for code in ErrorCode::ALL {
            errors.with_label_values(&[code.as_str()]);
        }
        let rejected_upgrades = IntCounterVec::new(
            Opts::new(
                "roomhub_rejected_upgrades_total",
                "WebSocket upgrades refused before the upgrade, by reason",
            ),
            &["reason"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(rejected_upgrades.clone()))
            .expect("unique metric");
        let by_hook = |name: &str, help: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &["hook"]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let hook_calls = by_hook("roomhub_hook_calls_total", "backend hook requests, by hook");
        let hook_failures = by_hook(
            "roomhub_hook_failures_total",
            "backend hook requests with no answer in time, or an answer that is no verdict (a status other than 2xx, 401 or 403, or a malformed body), by hook",
        );
        let hook_latency = HistogramVec::new(
            HistogramOpts::new(
                "roomhub_hook_latency_seconds",
                "time from sending a backend hook request to its whole answer (or failure), by hook",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["hook"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(hook_latency.clone()))
            .expect("unique metric");
        Self {
            hook_events_queued: gauge(
                "roomhub_hook_events_queued",
                "events waiting to be sent to hooks.events_url",
            ),
            hook_events_dropped: counter(
                "roomhub_hook_events_dropped_total",
                "events dropped because hooks.queue was full (the oldest go first)",
            ),
            hook_calls,
            hook_failures,
            hook_latency,
            connections: gauge("roomhub_connections", "open WebSocket connections"),
            rooms: gauge("roomhub_rooms", "room actors alive on this node"),
            messages_published: counter(
                "roomhub_messages_published_total",
                "messages stored (acked)",
            ),
            messages_delivered: counter(
                "roomhub_messages_delivered_total",
                "message frames handed to sessions",
            ),
            compressed_connections: counter(
                "roomhub_compressed_connections_total",
                "WebSocket connections that negotiated permessage-deflate",
            ),
            messages_delivered_compressed: counter(
                "roomhub_messages_delivered_compressed_total",
                "frames sent compressed (permessage-deflate, over the size threshold): room messages and a session's own frames",
            ),
            direct_messages: counter(
                "roomhub_direct_messages_total",
                "direct messages handed to sessions",
            ),
            messages_expired: counter(
                "roomhub_messages_expired_total",
                "messages pruned because they outlived history.ttl_secs",
            ),
            rooms_swept: counter(
                "roomhub_rooms_swept_total",
                "idle rooms the TTL sweep started so they prune their expired history",
            ),
            slow_consumer_disconnects: counter(
                "roomhub_slow_consumer_disconnects_total",
                "sessions closed with 1013 because they could not keep up",
            ),
            rate_limited: counter(
                "roomhub_rate_limited_total",
                "frames refused with rate_limited",
            ),
            abuse_disconnects: counter(
                "roomhub_abuse_disconnects_total",
                "sessions closed with 1008 after sustained abuse",
            ),
            heartbeat_timeouts: counter(
                "roomhub_heartbeat_timeouts_total",
                "sessions closed because the peer went silent",
            ),
            token_expiries: counter(
                "roomhub_token_expiries_total",
                "sessions closed with 1008 because their token expired",
            ),
            stalled_sockets_cut: counter(
                "roomhub_stalled_sockets_cut_total",
                "connections shut down because their peer stopped reading",
            ),
            cluster_link_up: gauge(
                "roomhub_cluster_link_up",
                "1 while this node is linked to NATS (cluster mode), else 0",
            ),
            cluster_link_losses: counter(
                "roomhub_cluster_link_losses_total",
                "times this node lost its link to NATS",
            ),
            cluster_live_records: counter(
                "roomhub_cluster_live_records_total",
                "room log records heard live (only rooms this node serves)",
            ),
            cluster_read_records: counter(
                "roomhub_cluster_read_records_total",
                "room log records read from JetStream (catch-up, gaps, checks)",
            ),
            cluster_append_conflicts: counter(
                "roomhub_cluster_append_conflicts_total",
                "appends to a room log that another node's record beat, then retried",
            ),
            cluster_presence_waits_cut: counter(
                "roomhub_cluster_presence_waits_cut_total",
                "rooms that answered their first joins before every live node said who is there (a node did not answer within 500 ms)",
            ),
            rejected_upgrades,
            errors,
            registry,
        }
    }

    pub fn error(&self, code: ErrorCode) {
        self.errors.with_label_values(&[code.as_str()]).inc();
    }

    /// Counts an upgrade refused with `reason` (e.g. `rate_limited`, `unauthorized`).
    pub fn rejected_upgrade(&self, reason: &str) {
        self.rejected_upgrades.with_label_values(&[reason]).inc();
    }

    /// Counts one backend hook request and how long it took.
    pub fn hook_called(&self, hook: &str, took: Duration, failed: bool) {
        self.hook_calls.with_label_values(&[hook]).inc();
        if failed {
            self.hook_failures.with_label_values(&[hook]).inc();
        }
        self.hook_latency
            .with_label_values(&[hook])
            .observe(took.as_secs_f64());
    }

    /// Counts a failure found after the call was counted (a malformed 2xx answer).
    pub fn hook_unusable_answer(&self, hook: &str) {
        self.hook_failures.with_label_values(&[hook]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Writing to a Vec cannot fail, and every metric is valid.
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("metrics encode");
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

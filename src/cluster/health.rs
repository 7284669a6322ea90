//! Whether publishes can be committed right now, as seen from this node.
//!
//! A NATS connection that is "connected" is not enough: a stalled server
//! (stopped, overloaded, its JetStream gone) keeps the TCP link open while
//! every publish times out. So a task makes a JetStream round trip every
//! [`PROBE_EVERY`]; the link counts as up only while these succeed.

use async_nats::Client;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

/// JetStream's account info request: cheap, and answered by JetStream itself.
const INFO: &str = "$JS.API.INFO";
/// How often the JetStream round trip is made.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How long one round trip may take before it counts as failed.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Failed round trips in a row before the link counts as down: one slow
/// answer on a busy machine must not flip readiness.
const FAILURES_TO_FAIL: u32 = 2;

/// The last verdict of the probe (shared with the task that makes it).
#[derive(Default)]
pub(super) struct JetStreamHealth {
    ok: AtomicBool,
}

impl JetStreamHealth {
    pub(super) fn is_ok(&self) -> bool {
        self.ok.load(Ordering::SeqCst)
    }

    /// Probes until the health is dropped (the cluster link with it).
    pub(super) fn start(client: Client) -> Arc<JetStreamHealth> {
        let health = Arc::new(JetStreamHealth::default());
        tokio::spawn(probe(client, Arc::downgrade(&health)));
        health
    }
}

async fn probe(client: Client, health: Weak<JetStreamHealth>) {
    let mut failures = 0u32;
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let answered = matches!(
            tokio::time::timeout(PROBE_TIMEOUT, client.request(INFO, "".into())).await,
            Ok(Ok(_))
        );
        let Some(health) = health.upgrade() else {
            return;
        };
        failures = if answered { 0 } else { failures + 1 };
        let ok = failures == 0 || (health.is_ok() && failures < FAILURES_TO_FAIL);
        if health.ok.swap(ok, Ordering::SeqCst) != ok {
            if ok {
                tracing::info!("cluster log answers again: publishes can be committed");
            } else {
                tracing::warn!("cluster log does not answer: publishes cannot be committed");
            }
        }
    }
}

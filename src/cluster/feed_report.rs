//! One line per change for the whole node, not one per room: when NATS is in
//! trouble every live room loses its cluster feed at once, and a line per
//! room (per retry) buries the log. Rooms count their feed's losses and
//! repairs here; a task writes the totals every [`REPORT_EVERY`], only when
//! something changed.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

const REPORT_EVERY: Duration = Duration::from_secs(5);

#[derive(Default)]
pub(super) struct FeedReport {
    lost: AtomicUsize,
    repaired: AtomicUsize,
}

impl FeedReport {
    /// Reports until the report is dropped (the cluster link with it).
    pub(super) fn start() -> Arc<FeedReport> {
        let report = Arc::new(FeedReport::default());
        tokio::spawn(run(Arc::downgrade(&report)));
        report
    }

    pub(super) fn lost(&self) {
        self.lost.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn repaired(&self) {
        self.repaired.fetch_add(1, Ordering::Relaxed);
    }
}

async fn run(report: Weak<FeedReport>) {
    let mut every = tokio::time::interval(REPORT_EVERY);
    loop {
        every.tick().await;
        let Some(report) = report.upgrade() else {
            return;
        };
        let lost = report.lost.swap(0, Ordering::Relaxed);
        let repaired = report.repaired.swap(0, Ordering::Relaxed);
        if lost > 0 {
            tracing::warn!(
                rooms = lost,
                "{lost} rooms lost their cluster feed; repairing"
            );
        }
        if repaired > 0 {
            tracing::info!(rooms = repaired, "{repaired} rooms' cluster feeds repaired");
        }
    }
}

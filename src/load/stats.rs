//! Counters and latency histograms shared by every client of a load run.
//!
//! Clients count locally and fold their counts into [`Shared`] in batches
//! ([`Local::flush`]), so a delivery costs no shared write; the totals are
//! exact once every client has flushed.

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Latencies are kept from 1 µs to 10 minutes with 3 significant digits.
const MAX_LATENCY_US: u64 = 600_000_000;
/// A client folds its counts in after this many deliveries (or when idle).
const FLUSH_EVERY: usize = 256;

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// What every client adds to.
pub struct Shared {
    pub connected: AtomicUsize,
    pub connect_failed: AtomicUsize,
    pub sent: AtomicU64,
    pub acked: AtomicU64,
    pub errors: AtomicU64,
    pub delivered: AtomicU64,
    /// Publishers that stopped publishing and have every publish answered.
    pub publishers_done: AtomicUsize,
    /// Acked publishes per room, for the expected delivery count.
    pub room_acked: Vec<AtomicU64>,
    /// Connected members per room.
    pub room_members: Vec<AtomicU64>,
    latency: Mutex<Latency>,
}

struct Latency {
    interval: Histogram<u64>,
    total: Histogram<u64>,
}

impl Shared {
    pub fn new(rooms: usize) -> Self {
        Self {
            connected: AtomicUsize::new(0),
            connect_failed: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            publishers_done: AtomicUsize::new(0),
            room_acked: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            room_members: (0..rooms).map(|_| AtomicU64::new(0)).collect(),
            latency: Mutex::new(Latency {
                interval: histogram(),
                total: histogram(),
            }),
        }
    }

    /// Deliveries the acked publishes owe to the connected members.
    pub fn expected_deliveries(&self) -> u64 {
        self.room_acked
            .iter()
            .zip(&self.room_members)
            .map(|(a, m)| a.load(Ordering::Relaxed) * m.load(Ordering::Relaxed))
            .sum()
    }

    /// The p99 of the latencies recorded since the last call, then starts anew.
    pub fn take_interval_p99(&self) -> Option<u64> {
        let mut latency = self.latency.lock();
        let p99 = (!latency.interval.is_empty()).then(|| latency.interval.value_at_quantile(0.99));
        latency.interval.reset();
        p99
    }

    pub fn latency_summary(&self) -> LatencySummary {
        let latency = self.latency.lock();
        LatencySummary::of(&latency.total)
    }
}

/// One client's not yet folded-in counts.
pub struct Local {
    latencies: Vec<u64>,
    delivered: u64,
}

impl Default for Local {
    fn default() -> Self {
        Self::new()
    }
}

impl Local {
    pub fn new() -> Self {
        Self {
            latencies: Vec::new(),
            delivered: 0,
        }
    }

    /// Records one delivery sent at `sent_us` (unix µs) and received at `now_us`.
    pub fn delivery(&mut self, shared: &Shared, sent_us: Option<u64>, now_us: u64) {
        self.delivered += 1;
        if let Some(sent) = sent_us {
            self.latencies.push(now_us.saturating_sub(sent).max(1));
        }
        if self.latencies.len() >= FLUSH_EVERY || self.delivered as usize >= FLUSH_EVERY {
            self.flush(shared);
        }
    }

    /// Folds the counts into `shared` if there are any.
    pub fn flush(&mut self, shared: &Shared) {
        if self.delivered == 0 && self.latencies.is_empty() {
            return;
        }
        shared
            .delivered
            .fetch_add(self.delivered, Ordering::Relaxed);
        self.delivered = 0;
        if !self.latencies.is_empty() {
            let mut latency = shared.latency.lock();
            for &l in &self.latencies {
                let l = l.min(MAX_LATENCY_US);
                latency.interval.saturating_record(l);
                latency.total.saturating_record(l);
            }
            self.latencies.clear();
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_us: h.mean(),
            p50_us: h.value_at_quantile(0.50),
            p90_us: h.value_at_quantile(0.90),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Microseconds as a short human figure ("850 µs", "3.2 ms", "1.40 s").
pub fn human_us(us: u64) -> String {
    match us {
        0..=999 => format!("{us} µs"),
        1_000..=999_999 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.2} s", us as f64 / 1e6),
    }
}

/// A rate as a short human figure ("850", "85.3 k", "4.12 M").
pub fn human_rate(per_sec: f64) -> String {
    if per_sec >= 1e6 {
        format!("{:.2} M", per_sec / 1e6)
    } else if per_sec >= 1e3 {
        format!("{:.1} k", per_sec / 1e3)
    } else {
        format!("{per_sec:.0}")
    }
}

/// The offsets one member saw, relative to the room's offset when it joined.
#[derive(Default)]
pub struct Seen {
    bits: Vec<u64>,
}

impl Seen {
    /// Marks `index`; false if it was already marked.
    pub fn insert(&mut self, index: u64) -> bool {
        let (word, bit) = ((index / 64) as usize, index % 64);
        if word >= self.bits.len() {
            self.bits.resize(word + 1, 0);
        }
        let fresh = self.bits[word] & (1 << bit) == 0;
        self.bits[word] |= 1 << bit;
        fresh
    }

    pub fn contains(&self, index: u64) -> bool {
        let (word, bit) = ((index / 64) as usize, index % 64);
        self.bits.get(word).is_some_and(|w| w & (1 << bit) != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seen_marks_each_index_once() {
        let mut seen = Seen::default();
        assert!(seen.insert(0));
        assert!(seen.insert(130));
        assert!(!seen.insert(130));
        assert!(seen.contains(0) && seen.contains(130));
        assert!(!seen.contains(1) && !seen.contains(10_000));
    }

    #[test]
    fn locals_fold_into_the_totals() {
        let shared = Shared::new(1);
        let mut local = Local::new();
        for i in 0..300 {
            local.delivery(&shared, Some(1_000), 1_000 + i);
        }
        local.flush(&shared);
        assert_eq!(shared.delivered.load(Ordering::Relaxed), 300);
        let summary = shared.latency_summary();
        assert_eq!(summary.count, 300);
        assert!(summary.max_us >= 299 && summary.p50_us >= 100);
        assert!(shared.take_interval_p99().is_some());
        assert!(shared.take_interval_p99().is_none());
    }

    #[test]
    fn human_figures() {
        assert_eq!(human_us(850), "850 µs");
        assert_eq!(human_us(3_200), "3.2 ms");
        assert_eq!(human_rate(4_120_000.0), "4.12 M");
        assert_eq!(human_rate(85_300.0), "85.3 k");
    }
}

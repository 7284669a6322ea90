//! Rate and connection limits, built from `limits.*` with governor.
//!
//! - [`FrameLimiter`]: a token bucket per connection (publish + typing +
//!   direct), and the same shape for counting a connection's rejected frames
//!   (sustained abuse closes it with 1008).
//! - [`IpLimits`]: upgrade attempts per IP per second and concurrent
//!   connections per IP, checked before the upgrade (HTTP 429). Its memory is
//!   bounded: the connection counts drop entries at zero, and [`IpLimits::sweep`]
//!   forgets idle handshake buckets.
//!
//! Generic over governor's clock so tests can drive time by hand.

use crate::config::LimitSettings;
use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Rejected frames a connection may send within [`ABUSE_WINDOW`] before it is
/// closed with 1008: generous for buggy clients, fatal for floods.
pub const ABUSE_THRESHOLD: u32 = 50;
pub const ABUSE_WINDOW: Duration = Duration::from_secs(10);

/// Joins (and history reads of rooms not joined) a connection may make per
/// second, after a burst of at least [`JOIN_BURST`]: each may start a room
/// actor, so churning through room names must not be free. An addition to
/// CONFIG's limits, fixed rather than configurable.
pub const JOINS_PER_SEC: u32 = 10;
pub const JOIN_BURST: u32 = 64;

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n.max(1)).expect("at least 1")
}

/// A token bucket: `check` either takes a token or says how long to wait.
pub struct FrameLimiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    clock: C,
}

impl FrameLimiter<DefaultClock> {
    /// The publish + typing + direct bucket of one connection; starts full.
    pub fn publishes(limits: &LimitSettings) -> Self {
        Self::per_second(
            limits.publish_per_sec,
            limits.publish_burst,
            DefaultClock::default(),
        )
    }

    /// The join bucket: every room of `max_rooms_per_connection` can be joined at once.
    pub fn joins(limits: &LimitSettings) -> Self {
        let burst = JOIN_BURST.max(limits.max_rooms_per_connection.min(u32::MAX as usize) as u32);
        Self::per_second(JOINS_PER_SEC, burst, DefaultClock::default())
    }

    /// Counts rejected frames: [`ABUSE_THRESHOLD`] per [`ABUSE_WINDOW`].
    pub fn abuse() -> Self {
        Self::per_window(ABUSE_THRESHOLD, ABUSE_WINDOW, DefaultClock::default())
    }
}

impl<C: Clock> FrameLimiter<C> {
    pub fn per_second(per_sec: u32, burst: u32, clock: C) -> Self {
        let quota = Quota::per_second(nonzero(per_sec)).allow_burst(nonzero(burst));
        Self {
            limiter: RateLimiter::direct_with_clock(quota, &clock),
            clock,
        }
    }

    pub fn per_window(count: u32, window: Duration, clock: C) -> Self {
        let period = window / count.max(1);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(nonzero(count)))
            .allow_burst(nonzero(count));
        Self {
            limiter: RateLimiter::direct_with_clock(quota, &clock),
            clock,
        }
    }

    /// Takes a token, or returns how long until one is available.
    pub fn check(&self) -> Result<(), Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

/// Why an upgrade was refused before it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IpRefusal {
    #[error("too many connection attempts from this address; slow down")]
    TooManyHandshakes,
    #[error("too many open connections from this address")]
    TooManyConnections,
}

pub struct IpLimits<C: Clock = DefaultClock> {
    handshakes: RateLimiter<IpAddr, DefaultKeyedStateStore<IpAddr>, C, NoOpMiddleware<C::Instant>>,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
    max_open: u32,
}

/// Holds one of an IP's connection slots; dropping it frees the slot.
pub struct ConnectionPermit {
    ip: IpAddr,
    open: Arc<Mutex<HashMap<IpAddr, u32>>>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut open = self.open.lock();
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

impl IpLimits<DefaultClock> {
    pub fn new(limits: &LimitSettings) -> Self {
        Self::with_clock(limits, &DefaultClock::default())
    }
}

impl<C: Clock> IpLimits<C> {
    pub fn with_clock(limits: &LimitSettings, clock: &C) -> Self {
        let quota = Quota::per_second(nonzero(limits.handshakes_per_ip_per_sec));
        Self {
            handshakes: RateLimiter::dashmap_with_clock(quota, clock),
            open: Arc::default(),
            max_open: limits.max_connections_per_ip,
        }
    }

    /// Admits one upgrade from `ip`, or says why not.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnectionPermit, IpRefusal> {
        self.handshakes
            .check_key(&ip)
            .map_err(|_| IpRefusal::TooManyHandshakes)?;
        let mut open = self.open.lock();
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max_open {
            return Err(IpRefusal::TooManyConnections);
        }
        *count += 1;
        Ok(ConnectionPermit {
            ip,
            open: self.open.clone(),
        })
    }

    /// Forgets handshake buckets that are full again (idle addresses).
    pub fn sweep(&self) {
        self.handshakes.retain_recent();
        self.handshakes.shrink_to_fit();
    }

    /// Addresses tracked (handshake buckets, open-connection counts).
    pub fn tracked(&self) -> (usize, usize) {
        (self.handshakes.len(), self.open.lock().len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    #[test]
    fn the_bucket_starts_full_then_refills_at_the_rate() {
        let clock = FakeRelativeClock::default();
        let limiter = FrameLimiter::per_second(10, 3, clock.clone());
        for _ in 0..3 {
            assert!(limiter.check().is_ok());
        }
        let wait = limiter.check().unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        clock.advance(Duration::from_millis(100));
        assert!(limiter.check().is_ok());
        assert!(limiter.check().is_err());
    }

    #[test]
    fn the_abuse_window_allows_the_threshold_then_refuses() {
        let clock = FakeRelativeClock::default();
        let abuse = FrameLimiter::per_window(5, Duration::from_secs(10), clock.clone());
        for _ in 0..5 {
            assert!(abuse.check().is_ok());
        }
        assert!(abuse.check().is_err());
        clock.advance(Duration::from_secs(10));
        for _ in 0..5 {
            assert!(abuse.check().is_ok());
        }
    }

    #[test]
    fn ip_limits_count_open_connections_and_forget_idle_addresses() {
        let limits = LimitSettings {
            max_connections_per_ip: 2,
            handshakes_per_ip_per_sec: 100,
            ..LimitSettings::default()
        };
        let ip_limits = IpLimits::new(&limits);
        let ip: IpAddr = "127.0.0.9".parse().unwrap();
        let a = ip_limits.admit(ip).unwrap();
        let _b = ip_limits.admit(ip).unwrap();
        assert_eq!(
            ip_limits.admit(ip).err(),
            Some(IpRefusal::TooManyConnections)
        );
        drop(a);
        assert!(ip_limits.admit(ip).is_ok());
        assert_eq!(ip_limits.tracked().1, 1);
        // Many distinct addresses do not stay in memory once closed.
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(ip_limits.admit(ip).unwrap());
        }
        assert_eq!(ip_limits.tracked().1, 1);
    }

    #[test]
    fn handshake_buckets_of_idle_addresses_are_swept() {
        let clock = FakeRelativeClock::default();
        let limits = LimitSettings {
            handshakes_per_ip_per_sec: 10,
            ..LimitSettings::default()
        };
        let ip_limits = IpLimits::with_clock(&limits, &clock);
        for i in 0..10_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            drop(ip_limits.admit(ip).unwrap());
        }
        assert_eq!(ip_limits.tracked().0, 10_000);
        clock.advance(Duration::from_secs(1));
        ip_limits.sweep();
        assert_eq!(ip_limits.tracked(), (0, 0));
    }
}

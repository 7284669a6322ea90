//! The state every request handler and session shares.

use crate::auth::Authenticator;
use crate::config::Settings;
use crate::directory::SessionDirectory;
use crate::limits::IpLimits;
use crate::metrics::Metrics;
use crate::room::RoomRegistry;
use crate::storage::HistoryStore;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub node_id: String,
    pub registry: RoomRegistry,
    pub directory: Arc<SessionDirectory>,
    pub metrics: Metrics,
    pub store: Arc<dyn HistoryStore>,
    pub auth: Authenticator,
    pub ip_limits: IpLimits,
    pub started: Instant,
    draining: AtomicBool,
    open_sockets: Arc<AtomicUsize>,
}

/// Counts one upgraded socket until its last bytes are sent and it is
/// closed (not merely until its session actor stops).
pub struct SocketGuard(Arc<AtomicUsize>);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    pub fn new(
        settings: Arc<Settings>,
        node_id: String,
        store: Arc<dyn HistoryStore>,
        metrics: Metrics,
    ) -> Self {
        let registry = RoomRegistry::new(crate::room::RoomContext {
            settings: settings.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
        });
        Self {
            auth: Authenticator::new(&settings.auth),
            ip_limits: IpLimits::new(&settings.limits),
            settings,
            node_id,
            registry,
            directory: Arc::default(),
            metrics,
            store,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            open_sockets: Arc::default(),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn socket_opened(&self) -> SocketGuard {
        self.open_sockets.fetch_add(1, Ordering::SeqCst);
        SocketGuard(self.open_sockets.clone())
    }

    /// Upgraded connections not yet closed.
    pub fn open_sockets(&self) -> usize {
        self.open_sockets.load(Ordering::SeqCst)
    }
}

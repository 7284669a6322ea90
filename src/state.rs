//! The state every request handler and session shares.

use crate::config::Settings;
use crate::directory::SessionDirectory;
use crate::metrics::Metrics;
use crate::room::RoomRegistry;
use crate::storage::HistoryStore;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub struct AppState {
    pub settings: Arc<Settings>,
    pub node_id: String,
    pub registry: RoomRegistry,
    pub directory: Arc<SessionDirectory>,
    pub metrics: Metrics,
    pub store: Arc<dyn HistoryStore>,
    pub started: Instant,
    draining: AtomicBool,
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
            settings,
            node_id,
            registry,
            directory: Arc::default(),
            metrics,
            store,
            started: Instant::now(),
            draining: AtomicBool::new(false),
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }
}

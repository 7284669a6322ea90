//! The state every request handler and session shares.

use crate::auth::Authenticator;
use crate::cluster::{Cluster, DirectRecord};
use crate::config::Settings;
use crate::directory::SessionDirectory;
use crate::hooks::Hooks;
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
    /// Present in cluster mode.
    pub cluster: Option<Arc<Cluster>>,
    /// Backend hooks (`hooks.*`); each `None` unless its URL is set.
    pub hooks: Hooks,
    pub started: Instant,
    draining: AtomicBool,
    open_sockets: Arc<AtomicUsize>,
    /// The most upgraded connections open at once since the last look (for
    /// `crate::heap`).
    peak_sockets: AtomicUsize,
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
        cluster: Option<Arc<Cluster>>,
        hooks: Hooks,
    ) -> Self {
        let registry = RoomRegistry::new(crate::room::RoomContext {
            settings: settings.clone(),
            store: store.clone(),
            metrics: metrics.clone(),
            cluster: cluster.clone(),
            events: hooks.events.clone(),
        });
        Self {
            auth: Authenticator::new(&settings.auth),
            ip_limits: IpLimits::new(&settings.limits),
            cluster,
            hooks,
            settings,
            node_id,
            registry,
            directory: Arc::default(),
            metrics,
            store,
            started: Instant::now(),
            draining: AtomicBool::new(false),
            open_sockets: Arc::default(),
            peak_sockets: AtomicUsize::new(0),
        }
    }

    /// Ready for new connections: not draining, the store can write, and
    /// linked in cluster mode.
    pub fn is_ready(&self) -> bool {
        self.not_ready_because().is_none()
    }

    /// Why the node is not ready (for `/readyz`), if it is not.
    pub fn not_ready_because(&self) -> Option<&'static str> {
        if self.is_draining() {
            Some("draining")
        } else if !self.store.writable() {
            Some("the history store cannot write")
        } else if !self.cluster.as_ref().is_none_or(|c| c.is_linked()) {
            Some("cluster link down")
        } else {
            None
        }
    }

    /// Delivers an encoded `direct` frame to every session of `user` on this
    /// node and, in cluster mode, on every other node. Returns how many
    /// sessions on this node took it.
    pub fn send_direct(
        &self,
        user: &crate::protocol::UserId,
        frame: &bytestring::ByteString,
    ) -> usize {
        if let Some(cluster) = &self.cluster {
            cluster.send_direct(&DirectRecord {
                node: cluster.node_id().to_owned(),
                user: user.as_str().to_owned(),
                frame: frame.to_string(),
            });
        }
        let delivered = self.directory.send_to_user(user, frame);
        self.metrics.direct_messages.inc_by(delivered as u64);
        delivered
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn socket_opened(&self) -> SocketGuard {
        let open = self.open_sockets.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak_sockets.fetch_max(open, Ordering::Relaxed);
        SocketGuard(self.open_sockets.clone())
    }

    /// Upgraded connections not yet closed.
    pub fn open_sockets(&self) -> usize {
        self.open_sockets.load(Ordering::SeqCst)
    }

    /// The most connections open at once since the last call.
    pub fn take_peak_sockets(&self) -> usize {
        self.peak_sockets
            .swap(self.open_sockets(), Ordering::Relaxed)
    }
}

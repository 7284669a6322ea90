//! Wiring: opens the store, builds the shared state, binds the listener (port
//! 0 works: [`Application::local_addr`] tells the port) and runs until the
//! shutdown future resolves, then drains.

use crate::cluster::Cluster;
use crate::config::Settings;
use crate::http;
use crate::metrics::Metrics;
use crate::state::AppState;
use crate::storage::{HistoryStore, SledStore};
use actix_web::{dev::Server, web, App, HttpServer};
use anyhow::Context as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

pub struct Application {
    addr: SocketAddr,
    server: Server,
    state: web::Data<AppState>,
    store: Arc<SledStore>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Application> {
        let settings = Arc::new(settings);
        let data_dir = &settings.storage.data_dir;
        let store = Arc::new(
            SledStore::open(data_dir, settings.storage.durability)
                .with_context(|| format!("opening the store in {}", data_dir.display()))?,
        );
        let node_id = store
            .node_id(settings.server.node_id.as_deref())
            .context("reading the node id")?;
        let metrics = Metrics::new();
        let cluster = match settings.cluster.nats_url.as_str() {
            "" => None,
            url => Some(Arc::new(
                Cluster::connect(&settings, &node_id, metrics.clone())
                    .await
                    .with_context(|| format!("starting the cluster link to {url}"))?,
            )),
        };
        let state = web::Data::new(AppState::new(
            settings.clone(),
            node_id,
            store.clone() as Arc<dyn HistoryStore>,
            metrics,
            cluster.clone(),
        ));
        if let Some(cluster) = cluster {
            actix_web::rt::spawn(crate::cluster::relay_directs(
                cluster,
                state.directory.clone(),
            ));
        }
        let listener = TcpListener::bind(settings.server.bind)
            .with_context(|| format!("binding {}", settings.server.bind))?;
        let addr = listener.local_addr()?;
        let app_state = state.clone();
        let server = HttpServer::new(move || {
            App::new()
                .app_data(app_state.clone())
                .configure(http::routes)
        })
        // Record each connection's socket so the session watchdog can cut off
        // a peer that stopped reading (see `session::watchdog`). Must come
        // before `listen`, which takes the callback as it is then.
        .on_connect(|conn, data| {
            use std::os::fd::AsRawFd;
            if let Some(tcp) = conn.downcast_ref::<actix_web::rt::net::TcpStream>() {
                // Frames are small and written as they come: with Nagle on, a
                // frame written while the previous one is unacknowledged waits
                // for the peer's delayed ACK (40 ms on Linux).
                if let Err(error) = tcp.set_nodelay(true) {
                    tracing::debug!(%error, "TCP_NODELAY not set");
                }
                data.insert(crate::session::Connection::new(tcp.as_raw_fd()));
            }
        })
        .listen(listener)?
        // Signals are ours (see `shutdown`): actix would stop without draining.
        .disable_signals()
        .shutdown_timeout(1)
        .run();
        Ok(Application {
            addr,
            server,
            state,
            store,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node_id(&self) -> &str {
        &self.state.node_id
    }

    /// Serves until `shutdown` resolves, then drains and flushes.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let handle = self.server.handle();
        let server = actix_web::rt::spawn(self.server);
        // Forget idle per-IP handshake buckets so many distinct addresses
        // cannot grow memory without bound.
        let state = self.state.clone();
        let sweeper = actix_web::rt::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            loop {
                every.tick().await;
                state.ip_limits.sweep();
            }
        });
        shutdown.await;
        crate::shutdown::drain_sessions(&self.state).await;
        // Give the close frames a moment to leave before the workers stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweeper.abort();
        handle.stop(true).await;
        let _ = server.await;
        self.store.close().context("flushing the store")?;
        if let Some(cluster) = &self.state.cluster {
            // The rooms' last presence updates (everyone left) go out now.
            cluster.flush().await;
        }
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

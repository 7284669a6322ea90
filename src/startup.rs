//! Wiring: opens the store, builds the shared state, binds the listener (port
//! 0 works: [`Application::local_addr`] tells the port) and runs until the
//! shutdown future resolves, then drains.

use crate::cluster::Cluster;
use crate::config::Settings;
use crate::http;
use crate::metrics::Metrics;
use crate::room::expiry_sweep::ExpirySweep;
use crate::state::AppState;
use crate::storage::{HistoryStore, SledStore};
use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config, IntoServiceFactory as _, ServiceFactoryExt as _};
use actix_web::{dev::AppConfig, dev::Server, middleware::from_fn, web, App};
use anyhow::Context as _;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

/// The longest a stopping node waits for its events hook to take the last events.
const EVENTS_FLUSH: Duration = Duration::from_secs(2);

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
            SledStore::open(
                data_dir,
                settings.storage.durability,
                Duration::from_micros(settings.storage.commit_delay_us),
            )
            .with_context(|| format!("opening the store in {}", data_dir.display()))?,
        );
        let node_id = store
            .node_id(settings.server.node_id.as_deref())
            .context("reading the node id")?;
        let metrics = Metrics::new();
        let cluster = match settings.cluster.nats_url.trim() {
            "" => None,
            url => Some(
                Cluster::connect(&settings, &node_id, metrics.clone())
                    .await
                    .with_context(|| format!("starting the cluster link to {url}"))?,
            ),
        };
        let hooks = crate::hooks::Hooks::new(&settings.hooks, &node_id, &metrics)?;
        let state = web::Data::new(AppState::new(
            settings.clone(),
            node_id,
            store.clone() as Arc<dyn HistoryStore>,
            metrics,
            cluster.clone(),
            hooks,
        ));
        state.hooks.start();
        if let Some(cluster) = cluster {
            // Weak: the state holds the cluster link.
            let reporting = Arc::downgrade(&state.clone().into_inner());
            cluster.set_reporter(Box::new(move || {
                reporting
                    .upgrade()
                    .map(|state| crate::http::node_report(&state))
                    .unwrap_or_default()
            }));
            let registry = state.registry.clone();
            cluster.set_serving(Box::new(move |room| registry.is_running(room)));
            actix_web::rt::spawn(crate::cluster::relay_directs(
                cluster,
                state.directory.clone(),
            ));
        }
        let listener = TcpListener::bind(settings.server.bind)
            .with_context(|| format!("binding {}", settings.server.bind))?;
        let addr = listener.local_addr()?;
        let server = serve(listener, state.clone())?;
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
        // And give the heap back to the OS once a burst of rooms or
        // connections is gone (`crate::heap`).
        let state = self.state.clone();
        let sweeper = actix_web::rt::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(10));
            let mut trimmer = crate::heap::Trimmer::default();
            loop {
                every.tick().await;
                state.ip_limits.sweep();
                let peak = state.registry.take_peak() + state.take_peak_sockets();
                let live = state.registry.count() + state.open_sockets();
                if trimmer.observe(peak, live) {
                    let _ = tokio::task::spawn_blocking(crate::heap::trim).await;
                }
            }
        });
        // Idle rooms' expired history leaves the disk too (standalone: in
        // cluster mode the streams expire records themselves, and a room's
        // local copy is pruned whenever the room runs).
        let expiry_sweep = match self.state.cluster {
            None => ExpirySweep::start(self.state.registry.clone()),
            Some(_) => None,
        };
        shutdown.await;
        // No room is started for the sweep while the node drains.
        if let Some(sweep) = &expiry_sweep {
            sweep.stop_starting();
        }
        crate::shutdown::drain_sessions(&self.state).await;
        // The drain's `session_disconnected` events (and any others) get a
        // short while to reach the backend; a failing one does not hold the exit.
        if let Some(events) = &self.state.hooks.events {
            let deadline = tokio::time::Instant::now() + EVENTS_FLUSH;
            while !events.is_empty() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        // Give the close frames a moment to leave before the workers stop.
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweeper.abort();
        handle.stop(true).await;
        let _ = server.await;
        if let Some(sweep) = expiry_sweep {
            sweep.stop().await;
        }
        if let Err(error) = self.store.close() {
            // The drain still ends: what could be flushed is, and the store's
            // writer has logged what could not (never anything acked in
            // `sync`; in `batched`, rooms move to a new epoch at next start).
            tracing::error!(%error, "the store could not flush everything at stop");
        }
        if let Some(cluster) = &self.state.cluster {
            // The rooms' last presence updates (everyone left) go out now.
            cluster.flush().await;
        }
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

/// The HTTP server, built from its parts the way `actix_web::HttpServer`
/// builds it (same timeouts, graceful-shutdown signal, one worker per core),
/// plus the one thing `HttpServer` cannot do: an upgrade service. A request
/// with `Upgrade: websocket` goes, with its TCP socket, to
/// `session::serve_upgrade`, and the connection's HTTP/1 dispatcher ends
/// there; every other request goes to the route table.
fn serve(listener: TcpListener, state: web::Data<AppState>) -> anyhow::Result<Server> {
    let addr = listener.local_addr()?;
    let builder = actix_server::Server::build();
    let shutdown_signal = builder.graceful_shutdown_signal();
    let server = builder
        .listen("roomhub", listener, move || {
            let app_state = state.clone();
            let upgrade_state = state.clone();
            let signal = shutdown_signal.clone();
            let app = App::new()
                .app_data(app_state)
                // The request head has a timeout (below); bodies get theirs
                // in the handlers that read them, and one left unread
                // closes its connection rather than being drained forever.
                .wrap(from_fn(http::close_after_unread_body))
                // An expectation other than 100-continue is refused first (417).
                .wrap(from_fn(crate::expectation::refuse_unmet))
                .configure(http::routes)
                .into_factory()
                .map_err(|err| err.error_response());
            HttpService::build()
                .graceful_shutdown_signal(move || {
                    let signal = signal.clone();
                    async move { signal.notified().await }
                })
                // actix-web's defaults (`HttpServer::new`).
                .keep_alive(KeepAlive::default())
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .h1_allow_half_closed(true)
                .local_addr(addr)
                .upgrade(fn_service(move |(req, framed)| {
                    let state = upgrade_state.clone();
                    async move {
                        crate::session::serve_upgrade(state, req, framed).await;
                        Ok::<_, actix_http::Error>(())
                    }
                }))
                // Nothing reads the app config (host, address): its default will do.
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })?
        // Signals are ours (see `shutdown`): actix would stop without draining.
        .disable_signals()
        .shutdown_timeout(1)
        .run();
    Ok(server)
}

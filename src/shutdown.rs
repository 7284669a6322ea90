//! Stopping: the trigger (SIGTERM/SIGINT, or any future a test hands in) and
//! the ordered drain.
//!
//! actix-web's own graceful stop only waits for workers, and WebSocket
//! streams never end by themselves, so the drain is ours:
//! readiness 503 and no new upgrades → every session gets `shutdown` and
//! close 1001 → wait for them up to `server.shutdown_grace_ms` → stop the
//! HTTP server → flush the store (in `startup`).

use crate::outbound::Outbound;
use crate::state::AppState;
use std::time::{Duration, Instant};

/// Resolves on the first SIGTERM or SIGINT.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            tracing::error!("cannot listen for signals; stop with SIGKILL");
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received: draining"),
            _ = int.recv() => tracing::info!("SIGINT received: draining"),
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Tells every session to go and waits, up to the grace period, until they have.
pub async fn drain_sessions(state: &AppState) {
    state.start_draining();
    let grace = Duration::from_millis(state.settings.server.shutdown_grace_ms);
    let deadline = Instant::now() + grace;
    state.directory.tell_all(Outbound::Drain);
    // A socket is done once its session has sent its last bytes (the
    // close frame included) and dropped the connection; a client that stopped
    // reading keeps it until the grace runs out. There is no event to await
    // across the worker threads, so look every few milliseconds.
    while state.open_sockets() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let left = state.open_sockets();
    if left > 0 {
        tracing::warn!(
            sockets = left,
            "grace period over; dropping the remaining connections"
        );
    }
}

//! Backend hooks (PROTOCOL.md, "Backend hooks"; `hooks.*`): the connect
//! authorizer, publish approval and the events webhook. All off unless their
//! URLs are set; then every request is signed ([`signature`]), bounded in
//! time, and counted ([`client`]).

pub mod client;
pub mod connect;
pub mod events;
pub mod publish;
pub mod signature;

use crate::config::HookSettings;
use crate::metrics::Metrics;
use client::HookClient;
use connect::ConnectHook;
use events::{EventKind, EventQueue};
use publish::PublishHook;
use std::sync::Arc;
use std::time::Duration;

/// The hooks that are set.
#[derive(Default)]
pub struct Hooks {
    pub connect: Option<ConnectHook>,
    pub publish: Option<PublishHook>,
    pub events: Option<Arc<EventQueue>>,
    /// The client and URL of `events`, until [`Hooks::start`] takes them.
    events_sender: parking_lot::Mutex<Option<(Arc<HookClient>, String)>>,
}

impl Hooks {
    pub fn new(settings: &HookSettings, node: &str, metrics: &Metrics) -> anyhow::Result<Self> {
        let urls = [
            &settings.connect_url,
            &settings.publish_url,
            &settings.events_url,
        ];
        if urls.iter().all(|u| u.is_empty()) {
            return Ok(Self::default());
        }
        let client = Arc::new(
            HookClient::new(
                &settings.secret,
                Duration::from_millis(settings.timeout_ms),
                metrics.clone(),
            )
            .map_err(|e| anyhow::anyhow!("building the hooks' HTTP client: {e}"))?,
        );
        let set = |url: &String| (!url.is_empty()).then(|| url.clone());
        let events = set(&settings.events_url).map(|url| {
            let queue = EventQueue::new(&settings.events, settings.queue, node, metrics.clone());
            (Arc::new(queue), url)
        });
        Ok(Self {
            connect: set(&settings.connect_url).map(|url| ConnectHook::new(client.clone(), url)),
            publish: set(&settings.publish_url)
                .map(|url| PublishHook::new(client.clone(), url, node)),
            events: events.as_ref().map(|(queue, _)| queue.clone()),
            events_sender: parking_lot::Mutex::new(events.map(|(_, url)| (client, url))),
        })
    }

    /// Starts sending events (on the runtime this is called on).
    pub fn start(&self) {
        if let (Some(queue), Some((client, url))) = (&self.events, self.events_sender.lock().take())
        {
            actix_web::rt::spawn(queue.clone().deliver(client, url));
        }
    }

    /// Queues an event if `hooks.events` wants its type; `fields` is only
    /// built then.
    pub fn emit(&self, kind: EventKind, fields: impl FnOnce() -> serde_json::Value) {
        emit(self.events.as_ref(), kind, fields);
    }
}

/// [`Hooks::emit`] for holders of the queue alone (rooms).
pub fn emit(
    events: Option<&Arc<EventQueue>>,
    kind: EventKind,
    fields: impl FnOnce() -> serde_json::Value,
) {
    if let Some(queue) = events.filter(|q| q.wants(kind)) {
        queue.push(kind, fields());
    }
}

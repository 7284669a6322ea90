//! The link to NATS: one client per node (async-nats reconnects by itself),
//! the partition streams that hold the rooms' logs (`partitions`, `log`),
//! and core subjects for what need not be kept (presence, typing, direct
//! messages).
//!
//! Nothing here holds room state: rooms read, follow and append to their
//! log through the methods in `log.rs`.

use super::feed_report::FeedReport;
use super::health::JetStreamHealth;
use super::nodes::{Liveness, NodeRecord, Nodes};
use super::partitions::{Partitions, StreamSettings};
use super::records::{DirectRecord, RoomEvent};
use super::subjects::Subjects;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use async_nats::jetstream;
use async_nats::{Client, ServerAddr};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long JetStream API calls (stream lookups and updates) may take.
const API_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster link is down")]
    LinkDown,
    #[error("cluster log: {0}")]
    Log(String),
    /// Nothing in NATS took the publish ("no responders"): the room's
    /// partition stream has no leader right now (JetStream is electing one,
    /// e.g. after a NATS server died) or is missing. Nothing was stored.
    #[error(
        "no responders: the cluster log's stream has no leader right now (JetStream \
         may be electing one after a NATS server went away) or is missing; try again"
    )]
    NoResponders,
    /// The publish went to JetStream but no answer came: it may or may not
    /// have been committed. Only a retry with the same `key` is safe.
    #[error(
        "the outcome is unknown: the cluster log did not answer in time ({0}), so the \
         message may have been committed; retry with the same key (a retry without \
         one may duplicate it)"
    )]
    OutcomeUnknown(String),
}

impl ClusterError {
    /// Whether nothing was committed (the answer `unavailable` means that
    /// unless the message says otherwise).
    pub fn not_committed(&self) -> bool {
        matches!(
            self,
            ClusterError::LinkDown | ClusterError::Log(_) | ClusterError::NoResponders
        )
    }
}

/// The NATS servers of `cluster.nats_url`: one address or a comma-separated
/// list (`nats://10.0.0.1:4222,nats://10.0.0.2:4222`), blanks around each
/// trimmed. The client connects to any of them and moves to another when
/// its server goes away (it also learns the cluster's other servers from
/// the one it is connected to).
pub fn server_addrs(list: &str) -> Result<Vec<ServerAddr>, String> {
    let list = list.trim();
    if list.is_empty() {
        return Err("names no NATS server".into());
    }
    list.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, server)| {
            if server.is_empty() {
                return Err(format!(
                    "entry {} of the comma-separated list is empty (a stray comma?)",
                    i + 1
                ));
            }
            server.parse::<ServerAddr>().map_err(|e| {
                format!(
                    "{server:?} is not a NATS server address ({e}); \
                     e.g. nats://127.0.0.1:4222"
                )
            })
        })
        .collect()
}

pub struct Cluster {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    node_id: String,
    health: Arc<JetStreamHealth>,
    partitions: Arc<Partitions>,
    feeds: Arc<FeedReport>,
    /// Raised whenever core NATS messages may have been lost (a reconnect,
    /// a subscription too slow for its buffer): live feeds read what they
    /// may have missed.
    link_generation: Arc<AtomicU64>,
    /// Rooms left in the stream-per-room layout have been moved (see
    /// `migrate.rs`): until then this node serves no room.
    migrated: AtomicBool,
    /// The other nodes' heartbeats and goodbyes.
    nodes: Arc<Nodes>,
    /// This node's counts, as it answers `?scope=cluster` queries.
    reporter: std::sync::OnceLock<Reporter>,
    /// Whether a room runs on this node, as it answers `nodes.serving`.
    serving: std::sync::OnceLock<Serving>,
    heartbeat_timeout: Duration,
    /// This process's boot id (see `NodeRecord::boot`).
    boot: u64,
}

/// This node's counts for a cluster-wide answer (`/api/stats`, `/api/rooms`).
pub type Reporter = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Whether the room (by name) runs on this node.
pub type Serving = Box<dyn Fn(&str) -> bool + Send + Sync>;

impl Cluster {
    /// Starts the link. It does not wait for NATS: a node may start while
    /// NATS is down, answers `/readyz` 503 and links up when NATS is there.
    pub async fn connect(
        settings: &Settings,
        node_id: &str,
        metrics: Metrics,
    ) -> Result<Arc<Cluster>, ClusterError> {
        let url = settings.cluster.nats_url.trim();
        let servers =
            server_addrs(url).map_err(|e| ClusterError::Log(format!("cluster.nats_url {e}")))?;
        let link_generation = Arc::new(AtomicU64::new(0));
        let generation = link_generation.clone();
        let client = async_nats::ConnectOptions::new()
            .name(format!("roomhub {node_id}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // No request (JetStream API calls included) waits longer than this.
            .request_timeout(Some(API_TIMEOUT))
            // Bounded back-off so a node heals within a second or two of NATS returning.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .event_callback(move |event| {
                let metrics = metrics.clone();
                let generation = generation.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            metrics.cluster_link_up.set(1);
                            generation.fetch_add(1, Ordering::SeqCst);
                        }
                        async_nats::Event::SlowConsumer(_) => {
                            generation.fetch_add(1, Ordering::SeqCst);
                        }
                        async_nats::Event::Disconnected => {
                            metrics.cluster_link_up.set(0);
                            metrics.cluster_link_losses.inc();
                        }
                        _ => {}
                    }
                    tracing::info!(%event, "cluster link");
                }
            })
            .connect(servers)
            .await
            .map_err(|e| ClusterError::Log(format!("connecting to {url}: {e}")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(API_TIMEOUT);
        let ttl = settings.history.ttl_secs;
        let dedup = settings.history.dedup_window_secs.max(1);
        let subjects = Subjects::new(
            &settings.cluster.subject_prefix,
            settings.cluster.partitions,
        );
        let streams = StreamSettings {
            max_per_room: settings.history.max_per_room as i64,
            max_age: Duration::from_secs(ttl),
            // JetStream refuses a dedup window longer than the stream's max age.
            dedup_window: Duration::from_secs(if ttl > 0 { dedup.min(ttl) } else { dedup }),
            replicas: settings.cluster.replicas,
        };
        let cluster = Arc::new(Cluster {
            migrated: AtomicBool::new(false),
            health: JetStreamHealth::start(client.clone()),
            partitions: Partitions::start(js.clone(), subjects.clone(), streams),
            client,
            feeds: FeedReport::start(),
            js,
            subjects,
            node_id: node_id.to_owned(),
            link_generation,
            nodes: Arc::new(Nodes::default()),
            reporter: std::sync::OnceLock::new(),
            serving: std::sync::OnceLock::new(),
            heartbeat_timeout: Duration::from_millis(settings.heartbeat.timeout_ms),
            boot: rand::random::<u64>().max(1),
        });
        tokio::spawn(migrate_when_linked(Arc::downgrade(&cluster)));
        let heartbeat = &settings.heartbeat;
        let every =
            Duration::from_millis(heartbeat.interval_ms.min(heartbeat.timeout_ms / 2).max(1));
        tokio::spawn(super::nodes::run(Arc::downgrade(&cluster), every));
        Ok(cluster)
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connected, JetStream answers and the partition streams are there:
    /// publishes can be committed.
    pub fn is_linked(&self) -> bool {
        self.partitions_ready() && self.migrated.load(Ordering::SeqCst)
    }

    /// The log can be read and written (rooms also wait for the migration).
    pub(super) fn partitions_ready(&self) -> bool {
        self.is_connected() && self.health.is_ok() && self.partitions.ready()
    }

    /// Publishes to the rooms of `partition` can be committed: linked, or
    /// linked but for other partitions' streams (an election elsewhere).
    pub fn is_linked_for(&self, partition: u32) -> bool {
        self.partition_ready(partition) && self.migrated.load(Ordering::SeqCst)
    }

    /// `partition`'s stream can be read and written.
    pub(super) fn partition_ready(&self, partition: u32) -> bool {
        self.is_connected()
            && self.health.is_ok()
            && (self.partitions.ready() || self.partitions.answering(partition))
    }

    pub(super) fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub(super) fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// The creation time of `partition`'s stream as last seen (0: unknown):
    /// a room log read under one incarnation is gone in the next.
    pub fn incarnation(&self, partition: u32) -> u64 {
        self.partitions.incarnation(partition)
    }

    /// A partition stream was found missing: check them all now.
    pub(super) fn partition_missing(&self) {
        self.partitions.check_soon();
    }

    /// Raised whenever live records may have been lost on the way.
    pub fn link_generation(&self) -> u64 {
        self.link_generation.load(Ordering::SeqCst)
    }

    pub(super) async fn subscribe(
        &self,
        subject: String,
    ) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.client
            .subscribe(subject)
            .await
            .map(RuntimeBound::new)
            .map_err(|e| ClusterError::Log(e.to_string()))
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// A room's live feed of its log stopped (counted, reported once for all rooms).
    pub fn feed_lost(&self) {
        self.feeds.lost();
    }

    /// A room's live feed of its log runs again.
    pub fn feed_repaired(&self) {
        self.feeds.repaired();
    }

    /// Presence and typing of the room from the other nodes.
    pub async fn room_events(
        &self,
        room: &RoomName,
    ) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.subscribe(self.subjects.events(room)).await
    }

    /// Sends without waiting; a lost event is repaired by the next refresh.
    pub fn send_room_event(&self, room: &RoomName, event: &RoomEvent) {
        self.publish_core(self.subjects.events(room), event);
    }

    pub async fn directs(&self) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.subscribe(self.subjects.direct()).await
    }

    pub fn send_direct(&self, record: &DirectRecord) {
        self.publish_core(self.subjects.direct(), record);
    }

    /// Core NATS messages (presence, heartbeats, answers) can go: connected
    /// and NATS answering (a stalled server would only pile them up), even
    /// while a JetStream partition elects a leader.
    pub(super) fn can_publish_core(&self) -> bool {
        self.is_connected() && self.health.is_ok()
    }

    fn publish_core(&self, subject: String, value: &impl serde::Serialize) {
        if !self.can_publish_core() {
            return;
        }
        let Ok(payload) = serde_json::to_vec(value) else {
            return;
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(error) = client.publish(subject, payload.into()).await {
                tracing::debug!(%error, "cluster event not sent");
            }
        });
    }

    /// What this node knows of `node` (heartbeats, goodbye).
    pub fn liveness(&self, node: &str) -> Liveness {
        self.nodes.liveness(node)
    }

    /// The boot id `node` last said in its heartbeat (0: never heard).
    pub fn boot_of(&self, node: &str) -> u64 {
        self.nodes.boot_of(node)
    }

    /// The other nodes heard of within `heartbeat.timeout_ms`.
    pub fn live_nodes(&self) -> usize {
        Instant::now()
            .checked_sub(self.heartbeat_timeout)
            .map_or(0, |cutoff| self.nodes.live(cutoff))
    }

    pub(super) fn nodes(&self) -> &Nodes {
        &self.nodes
    }

    /// Sets how this node answers the others' `?scope=cluster` queries.
    pub fn set_reporter(&self, reporter: Reporter) {
        let _ = self.reporter.set(reporter);
    }

    /// This node's own counts (`null` before `set_reporter`).
    pub fn report(&self) -> serde_json::Value {
        self.reporter.get().map(|r| r()).unwrap_or_default()
    }

    /// Sets how this node tells whether it serves a room (`nodes.serving`).
    pub fn set_serving(&self, serving: Serving) {
        let _ = self.serving.set(serving);
    }

    /// Answers another node's "who serves this room?" with "nobody here"
    /// when the room does not run on this node (when it does, the room
    /// answers with its presence on the room's events subject).
    pub(super) fn answer_serving(&self, ask: async_nats::Message) {
        let (Some(reply), Some(serving)) = (ask.reply, self.serving.get()) else {
            return;
        };
        let Ok(room) = std::str::from_utf8(&ask.payload) else {
            return;
        };
        if !serving(room) {
            self.publish_core(
                reply.to_string(),
                &serde_json::json!({ "node": self.node_id }),
            );
        }
    }

    /// Asks every node whether it serves `room`; the nodes that do not
    /// answer on the returned subscription (`{"node": …}`).
    pub async fn ask_serving(&self, room: &RoomName) -> Option<async_nats::Subscriber> {
        let inbox = self.client.new_inbox();
        let answers = self.client.subscribe(inbox.clone()).await.ok()?;
        self.client
            .publish_with_reply(
                self.subjects.nodes_serving(),
                inbox,
                room.as_str().to_owned().into_bytes().into(),
            )
            .await
            .ok()?;
        Some(answers)
    }

    pub(super) fn answer_query(&self, query: async_nats::Message) {
        let Some(reply) = query.reply else {
            return;
        };
        if query.payload.as_ref() == self.node_id.as_bytes() {
            return;
        }
        self.publish_core(reply.to_string(), &self.report());
    }

    /// The counts of every other live node (each answers once; waits until
    /// as many answered as nodes are live, or `wait` passed).
    pub async fn gather(&self, wait: Duration) -> Vec<serde_json::Value> {
        let expected = Instant::now()
            .checked_sub(self.heartbeat_timeout)
            .map(|cutoff| self.nodes.live(cutoff))
            .unwrap_or(0);
        if expected == 0 || !self.is_linked() {
            return Vec::new();
        }
        let inbox = self.client.new_inbox();
        let Ok(mut answers) = self.client.subscribe(inbox.clone()).await else {
            return Vec::new();
        };
        let sent = self
            .client
            .publish_with_reply(
                self.subjects.nodes_query(),
                inbox,
                self.node_id.clone().into_bytes().into(),
            )
            .await;
        if sent.is_err() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(wait, async {
            while let Some(answer) = answers.next().await {
                if let Ok(value) = serde_json::from_slice(&answer.payload) {
                    out.push(value);
                }
                if out.len() >= expected {
                    return;
                }
            }
        })
        .await;
        out
    }

    /// This node's heartbeat (`alive`) or `goodbye`.
    pub(super) fn send_node_record(&self, kind: &str) {
        let record = NodeRecord {
            node: self.node_id.clone(),
            kind: kind.to_owned(),
            boot: self.boot,
        };
        self.publish_core(self.subjects.nodes_alive(), &record);
    }

    /// Sends what is buffered (the last presence updates of a drain) and
    /// tells the other nodes this one is gone.
    pub async fn flush(&self) {
        if self.is_linked() {
            if let Ok(payload) = serde_json::to_vec(&NodeRecord {
                node: self.node_id.clone(),
                kind: "goodbye".into(),
                boot: self.boot,
            }) {
                let _ = self
                    .client
                    .publish(self.subjects.nodes_alive(), payload.into())
                    .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
        }
    }
}

/// Moves the rooms of the stream-per-room layout once the partition streams
/// are there, then lets the node serve; retried until it succeeds.
async fn migrate_when_linked(cluster: std::sync::Weak<Cluster>) {
    loop {
        let Some(link) = cluster.upgrade() else {
            return;
        };
        if link.partitions_ready() {
            match link.migrate_legacy_rooms().await {
                Ok(_) => {
                    link.migrated.store(true, Ordering::SeqCst);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, "moving rooms to the partition streams; retrying")
                }
            }
        }
        drop(link);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A NATS subscription that can be dropped anywhere. async-nats unsubscribes
/// on drop by spawning a task, which panics outside a tokio runtime, and actix
/// drops actors (with their streams) as an arbiter stops, after its runtime
/// context is gone. This remembers the runtime it was made in and enters it
/// to drop.
pub struct RuntimeBound<S> {
    inner: Option<S>,
    runtime: tokio::runtime::Handle,
}

impl<S> RuntimeBound<S> {
    fn new(inner: S) -> Self {
        Self {
            inner: Some(inner),
            runtime: tokio::runtime::Handle::current(),
        }
    }
}

impl<S: futures_util::Stream + Unpin> futures_util::Stream for RuntimeBound<S> {
    type Item = S::Item;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<S::Item>> {
        match self.inner.as_mut() {
            Some(inner) => inner.poll_next_unpin(cx),
            None => std::task::Poll::Ready(None),
        }
    }
}

impl<S> Drop for RuntimeBound<S> {
    fn drop(&mut self) {
        let _entered = self.runtime.enter();
        self.inner.take();
    }
}

#[cfg(test)]
mod tests {
    use super::server_addrs;

    #[test]
    fn nats_url_is_one_server_or_a_comma_separated_list() {
        let one = server_addrs("nats://127.0.0.1:4222").unwrap();
        assert_eq!(one.len(), 1);
        let three =
            server_addrs(" nats://127.0.0.1:4222, nats://127.0.0.1:4223 ,127.0.0.1:4224").unwrap();
        let ports: Vec<u16> = three.iter().map(|s| s.port()).collect();
        assert_eq!(ports, [4222, 4223, 4224]);
        for bad in [
            "",
            " ",
            "nats://a:1,,nats://b:2",
            "nats://a:1,",
            "http://a:1",
        ] {
            assert!(server_addrs(bad).is_err(), "{bad:?} accepted");
        }
        let error = server_addrs("nats://a:1, ,nats://b:2").unwrap_err();
        assert!(
            error.contains("entry 2") && error.contains("empty"),
            "{error}"
        );
    }
}

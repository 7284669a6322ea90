//! The link to NATS: one client per node (async-nats reconnects by itself),
//! a JetStream stream per room as the room's cluster log, and core subjects
//! for what need not be kept (presence, typing, direct messages).
//!
//! Nothing here holds room state: rooms ask for their log's bounds, follow it
//! with an ordered consumer and append through a [`LogAppender`].

use super::feed_report::FeedReport;
use super::health::JetStreamHealth;
use super::records::{DirectRecord, RoomEvent};
use super::subjects::Subjects;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::protocol::RoomName;
use async_nats::jetstream::{self, consumer, stream};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a publish may wait for JetStream's ack before it is refused.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long JetStream API calls (stream lookups, consumer creation) may take.
const API_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug, Clone, thiserror::Error)]
pub enum ClusterError {
    #[error("the cluster link is down")]
    LinkDown,
    #[error("cluster log: {0}")]
    Log(String),
    /// The publish went to JetStream but no answer came: it may or may not
    /// have been committed. Only a retry with the same `key` is safe.
    #[error(
        "the outcome is unknown: the cluster log did not answer in time ({0}), so the \
         message may have been committed; retry with the same key (a retry without \
         one may duplicate it)"
    )]
    OutcomeUnknown(String),
    /// JetStream stored the publish but this node has not applied it yet.
    #[error(
        "committed at offset {0}, but this node has not applied it in time; retry \
         with the same key for its ack (a retry without one duplicates it)"
    )]
    NotApplied(u64),
}

impl ClusterError {
    fn log(e: impl std::fmt::Display) -> Self {
        ClusterError::Log(e.to_string())
    }

    /// Whether nothing was committed (the answer `unavailable` means that
    /// unless the message says otherwise).
    pub fn not_committed(&self) -> bool {
        matches!(self, ClusterError::LinkDown | ClusterError::Log(_))
    }
}

/// A room's cluster log as it stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// The stream's creation time in unix ms: the same on every node, new if
    /// the stream is ever deleted and made again (its offsets restart).
    pub epoch: u64,
    /// The oldest retained offset (`last + 1` when nothing is retained).
    pub first: u64,
    pub last: u64,
}

/// A message as JetStream delivered it.
pub type LogMessage = Result<jetstream::Message, consumer::push::OrderedError>;

pub struct Cluster {
    client: Client,
    js: jetstream::Context,
    subjects: Subjects,
    node_id: String,
    max_per_room: i64,
    max_age: Duration,
    dedup_window: Duration,
    replicas: usize,
    health: Arc<JetStreamHealth>,
    feeds: Arc<FeedReport>,
}

impl Cluster {
    /// Starts the link. It does not wait for NATS: a node may start while
    /// NATS is down, answers `/readyz` 503 and links up when NATS is there.
    pub async fn connect(
        settings: &Settings,
        node_id: &str,
        metrics: Metrics,
    ) -> Result<Cluster, ClusterError> {
        let url = &settings.cluster.nats_url;
        let client = async_nats::ConnectOptions::new()
            .name(format!("roomhub {node_id}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            // Bounded back-off so a node heals within a second or two of NATS returning.
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(1000))
            })
            .event_callback(move |event| {
                let metrics = metrics.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => metrics.cluster_link_up.set(1),
                        async_nats::Event::Disconnected => {
                            metrics.cluster_link_up.set(0);
                            metrics.cluster_link_losses.inc();
                        }
                        _ => {}
                    }
                    tracing::info!(%event, "cluster link");
                }
            })
            .connect(url.as_str())
            .await
            .map_err(|e| ClusterError::Log(format!("connecting to {url}: {e}")))?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(API_TIMEOUT);
        let ttl = settings.history.ttl_secs;
        let dedup = settings.history.dedup_window_secs.max(1);
        Ok(Cluster {
            health: JetStreamHealth::start(client.clone()),
            client,
            feeds: FeedReport::start(),
            js,
            subjects: Subjects::new(&settings.cluster.subject_prefix),
            node_id: node_id.to_owned(),
            max_per_room: settings.history.max_per_room as i64,
            replicas: settings.cluster.replicas,
            max_age: Duration::from_secs(ttl),
            // JetStream refuses a dedup window longer than the stream's max age.
            dedup_window: Duration::from_secs(if ttl > 0 { dedup.min(ttl) } else { dedup }),
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Connected, and JetStream answers: publishes can be committed.
    pub fn is_linked(&self) -> bool {
        self.is_connected() && self.health.is_ok()
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

    fn stream_config(&self, room: &RoomName) -> stream::Config {
        stream::Config {
            name: self.subjects.stream(room),
            description: Some(format!("roomhub room {room}")),
            subjects: vec![self.subjects.log(room)],
            max_messages: self.max_per_room,
            max_age: self.max_age,
            duplicate_window: self.dedup_window,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        }
    }

    /// The room's log bounds, making its stream if it has none yet.
    pub async fn log_bounds(&self, room: &RoomName) -> Result<LogBounds, ClusterError> {
        if !self.is_linked() {
            return Err(ClusterError::LinkDown);
        }
        let config = self.stream_config(room);
        let name = config.name.clone();
        let stream = match self.js.get_or_create_stream(config).await {
            Ok(stream) => stream,
            // Another node made it at the same moment (JetStream then says
            // "already in use" or "subjects overlap", 10058/10065): use theirs.
            Err(error) => self
                .js
                .get_stream(name)
                .await
                .map_err(|_| ClusterError::log(error))?,
        };
        let info = stream.cached_info();
        let epoch = (info.created.unix_timestamp_nanos() / 1_000_000).max(1) as u64;
        let last = info.state.last_sequence;
        let first = if info.state.messages == 0 {
            last + 1
        } else {
            info.state.first_sequence
        };
        Ok(LogBounds { epoch, first, last })
    }

    /// Every record of the room's log from offset `from` on, in order, then
    /// live. The ordered consumer re-creates itself after a lost link and
    /// resumes after the last record it handed out.
    pub async fn follow(
        &self,
        room: &RoomName,
        from: u64,
    ) -> Result<RuntimeBound<consumer::push::Ordered>, ClusterError> {
        let stream = self
            .js
            .get_stream(self.subjects.stream(room))
            .await
            .map_err(ClusterError::log)?;
        let consumer = stream
            .create_consumer(consumer::push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from.max(1),
                },
                ..Default::default()
            })
            .await
            .map_err(ClusterError::log)?;
        consumer
            .messages()
            .await
            .map(RuntimeBound::new)
            .map_err(ClusterError::log)
    }

    /// A writer for the room's log that keeps the order it is given.
    pub fn appender(&self, room: &RoomName) -> LogAppender {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run_appender(
            self.js.clone(),
            self.client.clone(),
            self.subjects.log(room),
            rx,
        ));
        LogAppender { tx }
    }

    /// Presence and typing of the room from the other nodes.
    pub async fn room_events(
        &self,
        room: &RoomName,
    ) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.client
            .subscribe(self.subjects.events(room))
            .await
            .map(RuntimeBound::new)
            .map_err(ClusterError::log)
    }

    /// Sends without waiting; a lost event is repaired by the next refresh.
    pub fn send_room_event(&self, room: &RoomName, event: &RoomEvent) {
        self.publish_core(self.subjects.events(room), event);
    }

    pub async fn directs(&self) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.client
            .subscribe(self.subjects.direct())
            .await
            .map(RuntimeBound::new)
            .map_err(ClusterError::log)
    }

    pub fn send_direct(&self, record: &DirectRecord) {
        self.publish_core(self.subjects.direct(), record);
    }

    fn publish_core(&self, subject: String, value: &impl serde::Serialize) {
        if !self.is_linked() {
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

    /// Sends what is buffered (the last presence updates of a drain).
    pub async fn flush(&self) {
        if self.is_linked() {
            let _ = tokio::time::timeout(Duration::from_secs(1), self.client.flush()).await;
        }
    }
}

/// What to do with an append's outcome: the offset it was committed at (the
/// first one, for a repeated idempotency key), or why it was not.
pub type AppendDone = Box<dyn FnOnce(Result<u64, ClusterError>) + Send>;

struct Append {
    payload: Bytes,
    key: Option<String>,
    done: AppendDone,
}

/// Appends to one room's cluster log, in the order `append` is called.
pub struct LogAppender {
    tx: mpsc::UnboundedSender<Append>,
}

impl LogAppender {
    /// `key` becomes the `Nats-Msg-Id`, so JetStream de-duplicates a repeat
    /// cluster-wide within the dedup window and acks it with the first offset.
    pub fn append(&self, payload: Vec<u8>, key: Option<String>, done: AppendDone) {
        let append = Append {
            payload: payload.into(),
            key,
            done,
        };
        if let Err(mpsc::error::SendError(append)) = self.tx.send(append) {
            (append.done)(Err(ClusterError::LinkDown));
        }
    }
}

/// One task per room: hands publishes to the client in order (so one room's
/// appends from this node keep their order) and reports acks in that order.
async fn run_appender(
    js: jetstream::Context,
    client: Client,
    subject: String,
    mut rx: mpsc::UnboundedReceiver<Append>,
) {
    let mut in_flight = FuturesOrdered::new();
    loop {
        tokio::select! {
            next = rx.recv() => {
                let Some(append) = next else { break };
                if client.connection_state() != async_nats::connection::State::Connected {
                    (append.done)(Err(ClusterError::LinkDown));
                    continue;
                }
                let mut headers = HeaderMap::new();
                if let Some(key) = &append.key {
                    headers.insert(async_nats::header::NATS_MESSAGE_ID, key.as_str());
                }
                // An error here means the client never took the publish.
                let sent = js
                    .publish_with_headers(subject.clone(), headers, append.payload)
                    .await;
                let done = append.done;
                in_flight.push_back(async move {
                    let result = match sent {
                        Err(e) => Err(ClusterError::log(e)),
                        Ok(ack) => match tokio::time::timeout(ACK_TIMEOUT, ack).await {
                            Ok(Ok(ack)) => Ok(ack.sequence),
                            Ok(Err(e)) => Err(ack_failure(e)),
                            Err(_) => Err(ClusterError::OutcomeUnknown("no ack".into())),
                        },
                    };
                    (result, done)
                });
            }
            Some((result, done)) = in_flight.next(), if !in_flight.is_empty() => done(result),
        }
    }
    while let Some((result, done)) = in_flight.next().await {
        done(result);
    }
}

/// Why a publish that was handed to NATS got no ack. Without an answer (a
/// timeout, or the reply subscription gone with the connection) JetStream
/// may have stored it; an answer that refuses it means it was not.
fn ack_failure(error: jetstream::context::PublishError) -> ClusterError {
    use jetstream::context::PublishErrorKind;
    match error.kind() {
        PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
            ClusterError::OutcomeUnknown(error.to_string())
        }
        _ => ClusterError::log(error),
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

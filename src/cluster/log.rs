//! A room's cluster log: one subject in its partition's stream.
//!
//! - **Append** with optimistic concurrency: a record is stored only if the
//!   room's newest record is still the one the writer applied
//!   (`Nats-Expected-Last-Subject-Sequence`). So records are in one order,
//!   their offsets contiguous, and every writer has applied all before its
//!   own: its idempotency check is the cluster's. A writer that loses the
//!   race reads what it missed and tries again.
//! - **Read** by direct get (no consumer): the room's newest record, or the
//!   next one after a stream sequence.
//! - **Live**: JetStream republishes each stored record on the room's live
//!   subject (core NATS), to which only the nodes serving the room listen.

use super::nats::{Cluster, ClusterError, RuntimeBound};
use super::subjects::RoomLog;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{DirectGetError, DirectGetErrorKind};
use async_nats::HeaderMap;
use bytes::Bytes;
use std::time::Duration;

/// How long a publish may wait for JetStream's answer.
const ACK_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a direct get may take.
const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// A record of a room's log as stored: its stream sequence and payload.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub seq: u64,
    pub payload: Bytes,
}

/// Why an append was not acked.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AppendError {
    /// Another record came first: read it and try again.
    #[error("another record was appended first")]
    Conflict,
    /// JetStream refused it or never took it: not stored.
    #[error(transparent)]
    NotStored(ClusterError),
    /// Sent, but no answer: it may have been stored.
    #[error(transparent)]
    Unknown(ClusterError),
}

impl Cluster {
    /// Where `room`'s log lives.
    pub fn room_log(&self, room: &crate::protocol::RoomName) -> RoomLog {
        self.subjects().room_log(room)
    }

    /// Appends `payload` after the record at stream sequence `expected` (0:
    /// the room's log holds no record): its stream sequence once stored.
    pub async fn append(
        &self,
        log: &RoomLog,
        expected: u64,
        payload: Bytes,
    ) -> Result<u64, AppendError> {
        if !self.partition_ready(log.partition) {
            return Err(AppendError::NotStored(ClusterError::LinkDown));
        }
        let mut headers = HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        let ack = self
            .jetstream()
            .publish_with_headers(log.subject.clone(), headers, payload)
            .await
            // The client never took it.
            .map_err(|e| AppendError::NotStored(ClusterError::Log(e.to_string())))?;
        match tokio::time::timeout(ACK_TIMEOUT, ack).await {
            Ok(Ok(ack)) => Ok(ack.sequence),
            Ok(Err(error)) => Err(match error.kind() {
                PublishErrorKind::WrongLastSequence => AppendError::Conflict,
                PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => {
                    AppendError::Unknown(ClusterError::OutcomeUnknown(error.to_string()))
                }
                // async-nats reports "no responders" as a missing stream:
                // no server took it, so nothing was stored. With replicated
                // streams this is mostly a stream without a leader for the
                // seconds JetStream takes to elect one.
                PublishErrorKind::StreamNotFound => {
                    self.partition_missing();
                    AppendError::NotStored(ClusterError::NoResponders)
                }
                _ => AppendError::NotStored(ClusterError::Log(error.to_string())),
            }),
            Err(_) => Err(AppendError::Unknown(ClusterError::OutcomeUnknown(
                "no answer".into(),
            ))),
        }
    }

    /// The room's newest record, if its log holds any.
    pub async fn last_record(&self, log: &RoomLog) -> Result<Option<StoredRecord>, ClusterError> {
        self.direct_get(log, None).await
    }

    /// The room's first record after stream sequence `seq`, if any.
    pub async fn record_after(
        &self,
        log: &RoomLog,
        seq: u64,
    ) -> Result<Option<StoredRecord>, ClusterError> {
        self.direct_get(log, Some(seq + 1)).await
    }

    async fn direct_get(
        &self,
        log: &RoomLog,
        from: Option<u64>,
    ) -> Result<Option<StoredRecord>, ClusterError> {
        if !self.partition_ready(log.partition) {
            return Err(ClusterError::LinkDown);
        }
        let stream = self
            .jetstream()
            .get_stream_no_info(&log.stream)
            .await
            .map_err(|e| ClusterError::Log(e.to_string()))?;
        let read = async {
            let message = match from {
                None => stream.direct_get_last_for_subject(&log.subject).await?,
                Some(seq) => {
                    let raw = stream
                        .direct_get_next_for_subject(&log.subject, Some(seq))
                        .await?;
                    return Ok(StreamMessage::try_from(raw.message).map_err(|e| e.to_string()));
                }
            };
            Ok(Ok(message))
        };
        let found: Result<Result<StreamMessage, String>, DirectGetError> =
            match tokio::time::timeout(READ_TIMEOUT, read).await {
                Ok(found) => found,
                Err(_) => return Err(ClusterError::Log("reading the log timed out".into())),
            };
        match found {
            Ok(Ok(message)) => Ok(Some(StoredRecord {
                seq: message.sequence,
                payload: message.payload,
            })),
            Ok(Err(malformed)) => Err(ClusterError::Log(malformed)),
            Err(error) => match error.kind() {
                DirectGetErrorKind::NotFound => Ok(None),
                DirectGetErrorKind::ErrorResponse(status, _) if status.as_u16() == 503 => {
                    // No responders: the partition stream is not there.
                    self.partition_missing();
                    Err(ClusterError::Log(error.to_string()))
                }
                _ => Err(ClusterError::Log(error.to_string())),
            },
        }
    }

    /// The room's records as JetStream stores them, live (core NATS: none
    /// arrives while the link is down; see [`Cluster::link_generation`]).
    pub async fn live(
        &self,
        log: &RoomLog,
    ) -> Result<RuntimeBound<async_nats::Subscriber>, ClusterError> {
        self.subscribe(log.live.clone()).await
    }
}

/// The stream sequence JetStream republished a live record with.
pub fn live_sequence(message: &async_nats::Message) -> Option<u64> {
    message
        .headers
        .as_ref()?
        .get(async_nats::header::NATS_SEQUENCE)?
        .as_str()
        .parse()
        .ok()
}

//! Moving a cluster from the stream-per-room layout (roomhub before
//! partitions: a JetStream stream `<prefix>_room_<hash>` per room, whose
//! sequence numbers were the room's offsets and whose creation time was its
//! epoch) to the partition streams, keeping every retained message with its
//! offset, epoch, id, `ts` and idempotency key.
//!
//! Every node runs it as it links up, before it reports ready; nodes doing
//! it at once are safe, as every record is appended after the one the
//! migrating node saw (the same optimistic concurrency as publishes), and a
//! migration cut short resumes after the newest record already moved. A room
//! is moved when its new log holds its old log's newest offset in the old
//! epoch; its old stream is then deleted.

use super::log::AppendError;
use super::nats::{Cluster, ClusterError};
use super::records::{LogBatch, LogRecord};
use super::subjects::RoomLog;
use async_nats::jetstream::stream::Stream;
use bytes::Bytes;
use futures_util::TryStreamExt;
use std::borrow::Cow;

/// Records are cut at this size (NATS refuses payloads over 1 MiB by default).
const MAX_RECORD_BYTES: usize = 256 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("listing the old room streams: {0}")]
    List(String),
    #[error("room stream {stream}: {why}")]
    Room { stream: String, why: String },
}

fn room_error(stream: &str, why: impl std::fmt::Display) -> MigrateError {
    MigrateError::Room {
        stream: stream.to_owned(),
        why: why.to_string(),
    }
}

/// A message of an old room stream.
struct OldMessage {
    offset: u64,
    payload: Bytes,
    key: Option<String>,
}

impl Cluster {
    /// Moves every room still in the stream-per-room layout; how many moved.
    pub(super) async fn migrate_legacy_rooms(&self) -> Result<usize, MigrateError> {
        let prefix = self.subjects().legacy_stream_prefix();
        let names: Vec<String> = self
            .jetstream()
            .stream_names()
            .try_collect()
            .await
            .map_err(|e| MigrateError::List(e.to_string()))?;
        let mut moved = 0;
        for name in names.into_iter().filter(|n| n.starts_with(&prefix)) {
            let stream = match self.jetstream().get_stream(&name).await {
                Ok(stream) => stream,
                // Moved and deleted by another node meanwhile.
                Err(_) => continue,
            };
            self.migrate_room(stream).await?;
            moved += 1;
        }
        if moved > 0 {
            tracing::info!(
                rooms = moved,
                "moved rooms from the stream-per-room layout to the partition streams"
            );
        }
        Ok(moved)
    }

    async fn migrate_room(&self, mut stream: Stream) -> Result<(), MigrateError> {
        let name = stream.cached_info().config.name.clone();
        let info = stream
            .info()
            .await
            .map_err(|e| room_error(&name, e))?
            .clone();
        let epoch = (info.created.unix_timestamp_nanos() / 1_000_000).max(1) as u64;
        let description = info.config.description.clone().unwrap_or_default();
        // The old layout named the room in the stream's description.
        let Some(room) = description
            .strip_prefix("roomhub room ")
            .and_then(|r| crate::protocol::RoomName::parse(r).ok())
        else {
            return Err(room_error(&name, "no room name in its description"));
        };
        let log = self.room_log(&room);
        if self.subjects().legacy_stream(&room) != name {
            return Err(room_error(&name, "its name does not match its room"));
        }
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        loop {
            // Where the new log stands: resume after what is already moved.
            let newest = self
                .last_record(&log)
                .await
                .map_err(|e| room_error(&name, e))?;
            let (expected, have) = match &newest {
                None => (0, first.saturating_sub(1)),
                Some(record) => match LogBatch::decode(&record.payload) {
                    Ok(batch) if batch.epoch == epoch => (record.seq, batch.last()),
                    _ => {
                        // The room was used in the new layout already: its
                        // new log wins, the old one is left for an operator.
                        tracing::warn!(%room, stream = %name, "not moved: the room already has a log in the partition streams");
                        return Ok(());
                    }
                },
            };
            if have >= last || info.state.messages == 0 {
                break;
            }
            let messages = read_old(&stream, &name, (have + 1).max(first), last).await?;
            match self.append_moved(&log, epoch, expected, &messages).await {
                Ok(()) => break,
                // Another node moves it at the same moment: look again.
                Err(AppendError::Conflict) => continue,
                Err(error) => return Err(room_error(&name, error)),
            }
        }
        self.jetstream()
            .delete_stream(&name)
            .await
            .map_err(|e| room_error(&name, e))?;
        tracing::info!(%room, messages = info.state.messages, "room moved to the partition streams");
        Ok(())
    }

    /// Appends `messages` (consecutive runs of offsets) as records, each
    /// after the previous one.
    async fn append_moved(
        &self,
        log: &RoomLog,
        epoch: u64,
        mut expected: u64,
        messages: &[OldMessage],
    ) -> Result<(), AppendError> {
        let mut start = 0;
        while start < messages.len() {
            let mut end = start + 1;
            let mut bytes = messages[start].payload.len();
            while end < messages.len()
                && messages[end].offset == messages[end - 1].offset + 1
                && bytes + messages[end].payload.len() < MAX_RECORD_BYTES
            {
                bytes += messages[end].payload.len();
                end += 1;
            }
            let mut records = Vec::new();
            for old in &messages[start..end] {
                let mut record = LogRecord::decode(&old.payload)
                    .map_err(|e| AppendError::NotStored(ClusterError::Log(e.to_string())))?;
                record.key = old.key.as_deref().map(Cow::Borrowed);
                records.push(record);
            }
            let batch = LogBatch {
                epoch,
                first: messages[start].offset,
                batch: Cow::Borrowed("migrated"),
                after: Some(expected),
                messages: records,
            };
            let payload = serde_json::to_vec(&batch)
                .map_err(|e| AppendError::NotStored(ClusterError::Log(e.to_string())))?;
            expected = self.append(log, expected, payload.into()).await?;
            start = end;
        }
        Ok(())
    }
}

/// The old stream's messages from `from` to `to` (sequences missing from
/// it, deleted or not ours, are skipped).
async fn read_old(
    stream: &Stream,
    name: &str,
    from: u64,
    to: u64,
) -> Result<Vec<OldMessage>, MigrateError> {
    let mut messages = Vec::new();
    for seq in from..=to {
        let message = match stream.get_raw_message(seq).await {
            Ok(message) => message,
            Err(error) if error.to_string().contains("no message found") => continue,
            Err(error) => return Err(room_error(name, error)),
        };
        if LogRecord::decode(&message.payload).is_err() {
            tracing::warn!(
                stream = name,
                seq,
                "not moved: a record that is not roomhub's"
            );
            continue;
        }
        let key = message
            .headers
            .get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.as_str().to_owned());
        messages.push(OldMessage {
            offset: seq,
            payload: message.payload,
            key,
        });
    }
    Ok(messages)
}

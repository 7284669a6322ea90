//! The partition streams: `cluster.partitions` JetStream streams that hold
//! every room's log, one subject per room, with per-subject retention
//! (`history.max_per_room` records per room, `history.ttl_secs` max age).
//! Nothing is made per room: a room's log starts with its first record.
//!
//! A task keeps the streams there: it makes a missing one (a new cluster, or
//! a NATS that lost its store), brings one whose settings changed up to date,
//! and records each stream's creation time, its **incarnation**. A stream
//! made anew means every room log in it is gone: rooms compare the
//! incarnation they caught up under with the current one and move to a new
//! epoch when it changed (`src/room/replica.rs`).

use super::subjects::Subjects;
use async_nats::jetstream::{self, stream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::Notify;

/// How often the streams are checked while all is well.
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// After a failed check (NATS away, JetStream electing a leader).
const RETRY_EVERY: Duration = Duration::from_millis(250);

/// What every partition stream is made with (the same on every node).
#[derive(Debug, Clone)]
pub(super) struct StreamSettings {
    pub max_per_room: i64,
    pub max_age: Duration,
    pub dedup_window: Duration,
    pub replicas: usize,
}

pub(super) struct Partitions {
    /// Each partition stream's creation time (unix ms) as last seen; 0 until known.
    incarnations: Vec<AtomicU64>,
    /// Every partition stream is there and known.
    ready: AtomicBool,
    /// Each partition stream answered the last check (a replicated stream
    /// without a leader does not, while the others go on).
    answering: Vec<AtomicBool>,
    /// Wakes the keeper at once (a reconnect, a stream found missing).
    check_now: Arc<Notify>,
}

impl Partitions {
    pub(super) fn start(
        js: jetstream::Context,
        subjects: Subjects,
        settings: StreamSettings,
    ) -> Arc<Partitions> {
        let partitions = Arc::new(Partitions {
            incarnations: (0..subjects.partitions())
                .map(|_| AtomicU64::new(0))
                .collect(),
            ready: AtomicBool::new(false),
            answering: (0..subjects.partitions())
                .map(|_| AtomicBool::new(false))
                .collect(),
            check_now: Arc::new(Notify::new()),
        });
        tokio::spawn(keep(js, subjects, settings, Arc::downgrade(&partitions)));
        partitions
    }

    /// Every partition stream is there and known.
    pub(super) fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// `partition`'s stream answered the last check.
    pub(super) fn answering(&self, partition: u32) -> bool {
        self.answering
            .get(partition as usize)
            .is_some_and(|a| a.load(Ordering::SeqCst))
    }

    pub(super) fn incarnation(&self, partition: u32) -> u64 {
        self.incarnations
            .get(partition as usize)
            .map_or(0, |i| i.load(Ordering::SeqCst))
    }

    /// Checks the streams now (after a reconnect, or when one was missing).
    pub(super) fn check_soon(&self) {
        self.check_now.notify_one();
    }
}

fn config(subjects: &Subjects, settings: &StreamSettings, partition: u32) -> stream::Config {
    stream::Config {
        name: subjects.partition_stream(partition),
        description: Some(format!("roomhub room logs, partition {partition}")),
        subjects: vec![subjects.partition_subjects(partition)],
        max_messages_per_subject: settings.max_per_room,
        max_age: settings.max_age,
        duplicate_window: settings.dedup_window,
        discard: stream::DiscardPolicy::Old,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        allow_direct: true,
        republish: Some(stream::Republish {
            source: subjects.partition_subjects(partition),
            destination: subjects.partition_live_mapping(partition),
            headers_only: false,
        }),
        ..Default::default()
    }
}

/// Whether a stream as found differs from what it should be in what we set
/// and JetStream lets us change (not its republishing, fixed at creation).
fn outdated(found: &stream::Config, wanted: &stream::Config) -> bool {
    found.max_messages_per_subject != wanted.max_messages_per_subject
        || found.max_age != wanted.max_age
        || found.duplicate_window != wanted.duplicate_window
        || found.num_replicas != wanted.num_replicas
        || !found.allow_direct
}

/// The partition's stream, made if missing and updated if outdated: its
/// creation time in unix ms.
async fn ensure(js: &jetstream::Context, wanted: stream::Config) -> Result<u64, String> {
    let name = wanted.name.clone();
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                jetstream::context::GetStreamErrorKind::JetStream(_)
            ) =>
        {
            match js.get_or_create_stream(wanted.clone()).await {
                Ok(stream) => stream,
                // Another node made it at the same moment: use theirs.
                Err(_) => js.get_stream(&name).await.map_err(|e| e.to_string())?,
            }
        }
        Err(error) => return Err(error.to_string()),
    };
    let update = outdated(&stream.cached_info().config, &wanted);
    if update {
        tracing::warn!(stream = %name, "the partition stream's settings differ from this node's: updating them");
        js.update_stream(wanted).await.map_err(|e| e.to_string())?;
        stream.info().await.map_err(|e| e.to_string())?;
    }
    let created = stream.cached_info().created.unix_timestamp_nanos() / 1_000_000;
    Ok(created.max(1) as u64)
}

async fn keep(
    js: jetstream::Context,
    subjects: Subjects,
    settings: StreamSettings,
    partitions: Weak<Partitions>,
) {
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        let Some(partitions) = partitions.upgrade() else {
            return;
        };
        let mut all = true;
        let mut error = None;
        let mut made_anew = Vec::new();
        // Every partition is checked, at once, so one without a leader (an
        // election in a replicated NATS) holds back only its rooms.
        let checks = (0..subjects.partitions())
            .map(|partition| ensure(&js, config(&subjects, &settings, partition)));
        let results = futures_util::future::join_all(checks).await;
        for (partition, result) in (0..subjects.partitions()).zip(results) {
            let answering = &partitions.answering[partition as usize];
            match result {
                Ok(created) => {
                    let slot = &partitions.incarnations[partition as usize];
                    let before = slot.swap(created, Ordering::SeqCst);
                    if before != 0 && before != created {
                        made_anew.push(partition);
                    }
                    answering.store(true, Ordering::SeqCst);
                }
                Err(e) => {
                    answering.store(false, Ordering::SeqCst);
                    all = false;
                    error = Some(e);
                }
            }
        }
        if !made_anew.is_empty() {
            tracing::warn!(
                partitions = ?made_anew,
                "partition streams were made anew (NATS lost its store?): the rooms in them move to a new epoch"
            );
        }
        if partitions.ready.swap(all, Ordering::SeqCst) != all && all {
            tracing::info!(
                partitions = subjects.partitions(),
                "cluster log: every partition stream is there"
            );
        }
        match (all, failing_since) {
            (true, _) => failing_since = None,
            (false, None) => {
                failing_since = Some(std::time::Instant::now());
                tracing::debug!(error = ?error, "cluster log: partition streams not checked yet");
            }
            (false, Some(since)) if since.elapsed() > Duration::from_secs(10) => {
                tracing::warn!(error = ?error, "cluster log: partition streams still cannot be checked");
                failing_since = Some(std::time::Instant::now());
            }
            _ => {}
        }
        let wait = if all { CHECK_EVERY } else { RETRY_EVERY };
        let check_now = partitions.check_now.clone();
        drop(partitions);
        let _ = tokio::time::timeout(wait, check_now.notified()).await;
    }
}

//! Room history logs: the [`HistoryStore`] trait and its implementations.
//!
//! - [`sled_store::SledStore`] (the default): one sled database, each room's
//!   messages in a ring of slots ([`keys`]), written by a
//!   single writer thread that group-commits (many rooms' appends share one
//!   flush), so no actor ever waits on disk to write; it checks room logs as
//!   they load, and recovers by itself from write failures (a full disk).
//! - [`lifecycle`]: the store's runs (incarnations), clean closes and the seal,
//!   which tell after a crash or damage which rooms must move to a new epoch.
//! - [`memory::MemoryStore`]: the same contract in memory, for benches and tests.
//! - [`migrate`]: the store-format version and its upgrade steps (`migrations/`).
//!
//! Invariants every implementation keeps: a room's offsets are assigned by its
//! room actor and appended in order; a room's epoch never changes once made;
//! a batch's operations become visible together, and `done` runs only once the
//! batch is as durable as the configured [`Durability`] demands.

pub mod headers;
pub mod keys;
pub mod lifecycle;
pub mod memory;
pub mod migrate;
pub mod sled_store;
mod writer;

use crate::config::Durability;
use crate::protocol::{EncodedMessage, RoomName};
use std::sync::Arc;

pub use memory::MemoryStore;
pub use sled_store::SledStore;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("storage I/O failed: {0}")]
    Io(Arc<sled::Error>),
    /// The store cannot write now (a full disk, an I/O error): nothing of the
    /// failed writes is acked or shown; it recovers by itself.
    #[error("the history store cannot write: {0}")]
    Unavailable(String),
    /// A write made before the store recovered from a failure: refused, so
    /// nothing queued against the failed state can land after the recovery.
    #[error("a write from before the store recovered")]
    Stale,
    #[error("the store holds data it cannot read: {0}")]
    Corrupt(String),
    /// The data dir cannot be opened as a roomhub store.
    #[error("the data dir cannot be opened: {0}")]
    Damaged(String),
    #[error("the store's format version {found} is newer than this binary supports ({supported}); run a newer roomhub")]
    FormatTooNew { found: u32, supported: u32 },
    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// Whether the failure is the store's state (disk full, I/O, recovering)
    /// rather than bad data: clients are told `unavailable`, not `internal`.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Io(_) | StoreError::Unavailable(_) | StoreError::Stale | StoreError::Closed
        )
    }
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Io(Arc::new(e))
    }
}

/// A remembered idempotency key: the first offset published under it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupEntry {
    pub key: String,
    pub offset: u64,
    pub ts: u64,
}

/// What a room actor needs to start serving: its log's state and newest messages.
#[derive(Debug, Clone)]
pub struct RoomSnapshot {
    /// `None`: the room has no log yet; the caller makes an epoch, which the
    /// first [`WriteOp::Append`] records with the log.
    pub epoch: Option<u64>,
    /// The newest offset ever assigned (0 if none).
    pub last_offset: u64,
    /// The oldest retained offset (`last_offset + 1` when nothing is retained).
    pub first_offset: u64,
    /// Up to the requested number of newest messages, oldest first.
    pub tail: Vec<EncodedMessage>,
    pub keys: Vec<DedupEntry>,
    /// The log was found inconsistent (why): the room must move to a new
    /// epoch. `tail` holds what is still readable, and `last_offset` is at
    /// least every offset ever found, so none is handed out again.
    pub damage: Option<String>,
    /// A damaged log's retained offsets whose message is missing or cannot
    /// be read (never served; the room marks them [`WriteOp::MarkLost`]).
    pub lost: Vec<u64>,
    /// The size of the log's ring of slots (0: no log, or a store without
    /// rings); a room whose retention differs asks for [`WriteOp::Relayout`].
    pub ring: u64,
}

/// One change to a room's log.
#[derive(Debug, Clone)]
pub enum WriteOp {
    /// Appends the next message, remembering its idempotency key if any.
    Append {
        message: EncodedMessage,
        key: Option<String>,
    },
    /// Deletes the messages with offsets in `from..to`.
    Prune { from: u64, to: u64 },
    /// Replaces an unreadable message with a marker that keeps its place
    /// (the log stays a run of consecutive offsets) and is never served.
    MarkLost { offset: u64 },
    /// Forgets idempotency keys whose window has passed.
    ForgetKeys(Vec<String>),
    /// Deletes every message (and idempotency key) after `after` and makes
    /// `after` the log's newest offset: what a failed write may have left.
    Truncate { after: u64 },
    /// Writes the log's header now (epoch of the batch, newest offset `last`),
    /// e.g. when a damaged log moves to a new epoch.
    SetHeader { last: u64 },
    /// Moves the log into a ring of the batch's `ring` slots (after
    /// `history.max_per_room` changed), keeping the newest messages that fit.
    Relayout,
}

/// Changes to one room, applied atomically and in submission order.
#[derive(Debug, Clone)]
pub struct WriteBatch {
    pub room: RoomName,
    pub epoch: u64,
    /// The store generation the room's view of its log comes from
    /// ([`HistoryStore::generation`]); a batch from an older one is refused
    /// with [`StoreError::Stale`].
    pub generation: u64,
    /// How many messages the room keeps (`history.max_per_room`): the size
    /// of its ring of slots when its log is created or re-laid.
    pub ring: u64,
    pub ops: Vec<WriteOp>,
}

/// Called once when a batch is durable (or failed). Runs on the writer's
/// thread, so it must only hand the result on (e.g. to an actor's mailbox).
pub type WriteDone = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// What one step of the TTL sweep found ([`HistoryStore::rooms_with_expired`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpiryScan {
    /// Rooms whose oldest retained message has expired.
    pub rooms: Vec<RoomName>,
    /// Where the next step continues (past the last log looked at, even one
    /// that could not be read); `None` when this step reached the end of
    /// the store (the next one starts over).
    pub next: Option<SweepCursor>,
}

/// A place in the store's rooms, opaque to all but the store that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SweepCursor(pub(crate) Vec<u8>);

/// Which way [`HistoryStore::read_range`] takes `limit` messages from a range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    Oldest,
    Newest,
}

/// A room history log. Reads block: callers run them on a blocking thread
/// (`web::block`/`spawn_blocking`), never on an actor's thread. Writes never block.
pub trait HistoryStore: Send + Sync + 'static {
    fn load_room(&self, room: &RoomName, tail: usize) -> Result<RoomSnapshot, StoreError>;

    /// Messages with offsets in `from..=to`, at most `limit` of them taken from
    /// the oldest or newest end, returned oldest first.
    fn read_range(
        &self,
        room: &RoomName,
        from: u64,
        to: u64,
        limit: usize,
        take: Take,
    ) -> Result<Vec<EncodedMessage>, StoreError>;

    /// The first offset at or after `from` whose message is at least `cutoff_ts`
    /// (unix ms) old, or `last + 1` if none is: where a TTL prune stops.
    fn first_unexpired(
        &self,
        room: &RoomName,
        from: u64,
        cutoff_ts: u64,
    ) -> Result<u64, StoreError>;

    /// One step of the TTL sweep (`room::expiry_sweep`): looks at the logs
    /// of at most `scan` rooms, in name order after `after` (from the first
    /// when `None`), and returns up to `limit` of those whose oldest retained
    /// message is older than `cutoff_ts` (unix ms).
    fn rooms_with_expired(
        &self,
        after: Option<&SweepCursor>,
        cutoff_ts: u64,
        scan: usize,
        limit: usize,
    ) -> Result<ExpiryScan, StoreError>;

    /// Queues a batch; `done` runs once it is durable per [`Durability`].
    fn write(&self, batch: WriteBatch, done: WriteDone);

    /// Blocks until everything written so far is on disk.
    fn flush(&self) -> Result<(), StoreError>;

    /// This node's id, made on first use and kept with the data.
    fn node_id(&self, wanted: Option<&str>) -> Result<String, StoreError>;

    fn durability(&self) -> Durability;

    /// False while writes fail (disk full, I/O errors) until the store has
    /// recovered by itself; `/readyz` answers 503 meanwhile.
    fn writable(&self) -> bool {
        true
    }

    /// Raised each time the store recovers from a write failure: rooms whose
    /// view is older reload it before they write again.
    fn generation(&self) -> u64 {
        0
    }
}

/// A new epoch: random, nonzero and below 2^53 so JavaScript clients keep it exact.
pub fn new_epoch() -> u64 {
    use rand::Rng;
    rand::thread_rng().gen_range(1..(1u64 << 53))
}

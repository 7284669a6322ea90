//! roomhub: a self-hosted realtime hub (rooms, history with resume, presence,
//! direct messages) over WebSockets.
//!
//! Code map, in reading order:
//! - [`protocol`]: PURE wire types, codec, names, error and close codes.
//! - [`config`]: layered settings (docs/configuration.md), validated before anything starts.
//! - [`storage`]: the history log trait, sled (each room's messages in a
//!   ring of slots, headers written only when the ring cannot tell them
//!   (`storage::headers`), group commit in bounded batches, recovery from
//!   write failures, checks as logs load) and
//!   in-memory implementations, the store's runs (which rooms move to a new
//!   epoch after a crash or damage), store-format migrations.
//! - [`room`]: one actor per room, the only writer of its log (split by
//!   concern under `room/actor/`: publish, fan-out, reads, and in cluster
//!   mode append, feed, replica, presence, and hook reports settled across
//!   nodes); the registry; the TTL sweep that starts stopped rooms holding
//!   expired messages so they prune them (`room::expiry_sweep`).
//! - [`hooks`]: the backend hooks: connect authorizer, publish approval,
//!   signed event batches (one queue per node, at least once, in order).
//! - [`cluster`]: cluster mode over NATS: a fixed set of JetStream partition
//!   streams holds the room logs, one subject per room (offsets = subject
//!   sequences, optimistic appends, direct-get catch-up, a republished live
//!   feed); the upgrade from the stream-per-room layout; node liveness and
//!   presence by change, typing, directs on core NATS (`cluster::nodes`).
//! - [`outbound`]: the one non-blocking way frames reach sessions; a
//!   broadcast is encoded once, and compressed once for the members that
//!   negotiated permessage-deflate (`outbound::deflate`).
//! - [`deflate`]: raw deflate per RFC 7692 with no context kept between
//!   messages: compress a payload, inflate one under a size limit.
//! - [`directory`]: sessions by user, for direct messages and the drain.
//! - [`session`]: the WebSocket session; owns its TCP socket after the upgrade
//!   (the only code that touches a WebSocket connection); `session::deflate`
//!   negotiates permessage-deflate, the frame reader inflates under the limit.
//! - [`http`]: the route table: `/ws`, health, metrics, the HTTP API, the web client.
//! - [`expectation`]: the `Expect` header: 417 for what actix-http does not meet.
//! - [`auth`], [`limits`]: who a client is (JWT, API key), and the governor
//!   rate limits and per-IP bounds; [`state`]: what the handlers share.
//! - [`metrics`], [`telemetry`]: Prometheus counters, tracing setup.
//! - [`heap`]: gives freed heap back to the OS after a burst of rooms or
//!   connections (glibc keeps it otherwise).
//! - [`shutdown`], [`startup`]: the drain, and wiring the app together.
//! - [`load`]: `roomhub load`, a WebSocket load generator (a client of the hub, not part of it).
//!
//! Absent on purpose: sessions never touch the store or the cluster; rooms
//! never touch sockets.

pub mod auth;
pub mod cluster;
pub mod config;
pub mod deflate;
pub mod directory;
pub mod expectation;
pub mod heap;
pub mod hooks;
pub mod http;
pub mod limits;
pub mod load;
pub mod metrics;
pub mod outbound;
pub mod protocol;
pub mod room;
pub mod session;
pub mod shutdown;
pub mod startup;
pub mod state;
pub mod storage;
pub mod telemetry;

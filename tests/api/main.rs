//! One integration test binary; a module per feature, sharing `helpers`.

mod cluster;
mod cluster_faults;
mod cluster_haproxy;
mod cluster_migrate;
mod cluster_shape;
mod codec_props;
mod compression;
mod config;
mod docs;
mod helpers;
mod history;
mod hooks;
mod hostile_transport;
mod http_api;
mod load_tool;
mod nats;
mod persistence;
mod poison;
mod protection;
mod protocol;
mod room_flood;
mod rooms;
mod store;
mod store_faults;
mod transport;
mod web_client;

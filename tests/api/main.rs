//! One integration test binary; a module per feature, sharing `helpers`.

mod codec_props;
mod config;
mod helpers;
mod history;
mod http_api;
mod load_tool;
mod persistence;
mod protection;
mod protocol;
mod rooms;
mod store;
mod transport;
mod web_client;

//! One integration test binary; a module per feature, sharing `helpers`.

mod config;
mod helpers;
mod history;
mod http_api;
mod persistence;
mod protocol;
mod rooms;
mod store;

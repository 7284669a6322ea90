//! The route table (docs/protocol.md, "HTTP routes") and nothing else: each handler lives
//! in the module for its concern, and errors map to statuses in [`error`].

mod api;
mod bodies;
mod error;
mod health;
mod scope;
mod unread_body;
mod web_client;

use actix_web::web;

pub use api::node_report;
pub use bodies::{DirectBody, PublishBody};
pub use error::ApiError;
pub use unread_body::close_after_unread_body;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.app_data(
        web::QueryConfig::default()
            .error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
    )
    .app_data(
        web::PathConfig::default().error_handler(|e, _| ApiError::BadRequest(e.to_string()).into()),
    )
    .route("/ws", web::get().to(crate::session::ws_route))
    .route("/healthz", web::get().to(health::healthz))
    .route("/readyz", web::get().to(health::readyz))
    .route("/metrics", web::get().to(health::metrics))
    .route("/api/stats", web::get().to(api::stats))
    .route("/api/rooms", web::get().to(api::rooms))
    .service(
        web::resource("/api/rooms/{room}/messages")
            .route(web::get().to(api::room_history))
            .route(web::post().to(api::publish_to_room)),
    )
    .route(
        "/api/users/{user}/messages",
        web::post().to(api::direct_to_user),
    )
    .route("/", web::get().to(web_client::index))
    .default_service(web::to(web_client::asset));
}

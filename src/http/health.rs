//! Liveness, readiness and metrics.

use crate::state::AppState;
use actix_web::{web, HttpResponse};

pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "status": "ok" }))
}

/// 503 while draining, while the store cannot write (a full disk), and in
/// cluster mode while the cluster link is down.
pub async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.not_ready_because() {
        Some(why) => HttpResponse::ServiceUnavailable().json(serde_json::json!({ "status": why })),
        None => HttpResponse::Ok().json(serde_json::json!({ "status": "ready" })),
    }
}

pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render())
}

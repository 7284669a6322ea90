//! `GET /ws`: every check that can refuse a connection runs before the
//! upgrade (draining 503, origin 403, per-IP 429, token 401, bad query 400),
//! so nothing is upgraded that would be closed at once. Then the session
//! actor starts, with its response body counted by the outbound ledger.

use super::actor::WsSession;
use super::watchdog::{self, Connection};
use crate::auth::AuthError;
use crate::protocol::RoomName;
use crate::state::AppState;
use actix_http::ws::Codec;
use actix_web::{http::header, http::StatusCode, web, HttpRequest, HttpResponse};
use actix_web_actors::ws;
use futures_util::StreamExt;
use serde::Deserialize;
use std::time::Duration;

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    room: Option<String>,
}

fn refuse(state: &AppState, status: StatusCode, code: &str, message: &str) -> HttpResponse {
    state.metrics.rejected_upgrade(code);
    let mut response = HttpResponse::build(status);
    if matches!(
        status,
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
    ) {
        response.insert_header((header::RETRY_AFTER, "1"));
    }
    response.json(serde_json::json!({ "error": code, "message": message }))
}

pub async fn ws_route(
    req: HttpRequest,
    stream: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    if state.is_draining() {
        return Ok(refuse(
            &state,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the node is draining",
        ));
    }
    let origins = &state.settings.auth.allowed_origins;
    if !origins.is_empty() {
        // Browsers always send Origin; other clients may not, and are let through.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| origins.iter().any(|a| a == o));
            if !allowed {
                return Ok(refuse(
                    &state,
                    StatusCode::FORBIDDEN,
                    "forbidden_origin",
                    "this origin may not connect",
                ));
            }
        }
    }
    let permit = match req.peer_addr() {
        Some(peer) => match state.ip_limits.admit(peer.ip()) {
            Ok(permit) => Some(permit),
            Err(e) => {
                return Ok(refuse(
                    &state,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &e.to_string(),
                ))
            }
        },
        None => None,
    };
    let Ok(query) = web::Query::<WsQuery>::from_query(req.query_string()) else {
        return Ok(refuse(
            &state,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "malformed query string",
        ));
    };
    let identity = match state
        .auth
        .identify(query.token.as_deref(), query.user.as_deref())
    {
        Ok(identity) => identity,
        Err(e @ AuthError::BadUser(_)) => {
            return Ok(refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
            ))
        }
        Err(e) => {
            return Ok(refuse(
                &state,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &e.to_string(),
            ))
        }
    };
    let room = match query.room.as_deref().map(RoomName::parse).transpose() {
        Ok(room) => room,
        Err(e) => {
            return Ok(refuse(
                &state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
            ))
        }
    };
    let mut response = ws::handshake(&req)?;
    let state_guard = state.socket_opened();
    let state_ref = state.clone();
    let session = WsSession::new(state.into_inner(), identity, room, req.peer_addr(), permit);
    let codec = Codec::new().max_size(session.max_frame_bytes());
    let taken = session.outbound_counter();
    if let Some(connection) = req.conn_data::<Connection>() {
        // The drain counts this socket until the connection itself is gone.
        connection.hold(state_guard);
        let heartbeat = &state_ref.settings.heartbeat;
        let watch = watchdog::watch(
            connection,
            session.progress(),
            Duration::from_millis(heartbeat.interval_ms),
            Duration::from_millis(heartbeat.timeout_ms),
        );
        let metrics = state_ref.metrics.clone();
        actix_web::rt::spawn(async move {
            if watch.await {
                metrics.stalled_sockets_cut.inc();
                tracing::warn!("cut off a connection whose peer stopped reading");
            }
        });
    }
    let body = ws::WebsocketContext::with_codec(session, stream, codec).map(move |chunk| {
        // What the HTTP layer pulls here has left the session's queue.
        if let Ok(bytes) = &chunk {
            taken.set(taken.get() + bytes.len() as u64);
        }
        chunk
    });
    Ok(response.streaming(body))
}

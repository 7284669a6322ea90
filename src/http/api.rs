//! The HTTP API for backends: stats, rooms, publish, direct, history.
//! Handlers only check input and ask the room or the directory.

use super::bodies::{read_body, DirectBody, PublishBody};
use super::scope::{Scope, ScopeParams};
use super::ApiError;
use crate::auth::api_key_matches;
use crate::protocol::{encode, RoomName, ServerFrame, UserId, MAX_HISTORY_PAGE};
use crate::room::{HistoryQuery, Publish, PublishReply, RoomError};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use bytestring::ByteString;
use serde::Deserialize;

/// The author of messages published through the API without a `user`.
const SERVER_USER: &str = "server";

/// Checks `Authorization: Bearer <auth.api_key>`; an empty key refuses all.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let header = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if api_key_matches(header, &state.settings.auth.api_key) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn room_from(path: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(path).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn room_error(e: RoomError) -> ApiError {
    match e {
        RoomError::Unavailable(_) => ApiError::Unavailable(e.to_string()),
        _ => ApiError::Internal(e.to_string()),
    }
}

/// The largest POST body: room for the largest `data` and its envelope.
fn body_limit(state: &AppState) -> usize {
    state
        .settings
        .limits
        .max_frame_bytes
        .max(state.settings.limits.max_message_bytes + 4096)
}

fn body_timeout(state: &AppState) -> std::time::Duration {
    std::time::Duration::from_millis(state.settings.server.body_timeout_ms)
}

pub async fn stats(
    state: web::Data<AppState>,
    params: web::Query<ScopeParams>,
) -> Result<HttpResponse, ApiError> {
    if params.scope()? == Scope::Cluster {
        let view = ClusterView::gather(&state).await;
        let rooms = view.rooms();
        return Ok(HttpResponse::Ok().json(serde_json::json!({
            "scope": "cluster",
            "nodes": view.nodes,
            "connections": view.connections,
            "rooms": rooms.len(),
            "users": rooms.iter().map(|r| r.users).sum::<usize>(),
            "sessions": rooms.iter().map(|r| r.sessions).sum::<usize>(),
        })));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "node": state.node_id,
        "connections": state.directory.session_count(),
        "rooms": state.registry.count(),
        "uptime_secs": state.started.elapsed().as_secs(),
    })))
}

/// Room names can be private (`dm:alice:bob`), so the list needs the API key;
/// `/api/stats` (counts only) stays public.
pub async fn rooms(
    req: HttpRequest,
    state: web::Data<AppState>,
    params: web::Query<ScopeParams>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    if params.scope()? == Scope::Cluster {
        let view = ClusterView::gather(&state).await;
        return Ok(HttpResponse::Ok().json(serde_json::json!({
            "scope": "cluster",
            "nodes": view.nodes,
            "rooms": view.rooms(),
        })));
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({ "rooms": state.registry.summaries() })))
}

/// What one node reports for `?scope=cluster` (its answer to the others).
pub fn node_report(state: &AppState) -> serde_json::Value {
    serde_json::json!({
        "node": state.node_id,
        "connections": state.directory.session_count(),
        "rooms": state.registry.summaries(),
    })
}

/// This node's counts and those of the other live nodes.
struct ClusterView {
    nodes: Vec<String>,
    connections: usize,
    rooms: Vec<crate::room::RoomSummary>,
}

impl ClusterView {
    async fn gather(state: &AppState) -> ClusterView {
        let mut reports = vec![node_report(state)];
        if let Some(cluster) = &state.cluster {
            reports.extend(cluster.gather(std::time::Duration::from_secs(1)).await);
        }
        let mut view = ClusterView {
            nodes: Vec::new(),
            connections: 0,
            rooms: Vec::new(),
        };
        for report in reports {
            let Some(node) = report["node"].as_str() else {
                continue;
            };
            if view.nodes.iter().any(|n| n == node) {
                continue;
            }
            view.nodes.push(node.to_owned());
            view.connections += report["connections"].as_u64().unwrap_or(0) as usize;
            if let Ok(rooms) = serde_json::from_value::<Vec<NodeRoom>>(report["rooms"].clone()) {
                view.rooms.extend(rooms.into_iter().filter_map(|r| {
                    Some(crate::room::RoomSummary {
                        room: RoomName::parse(&r.room).ok()?,
                        users: r.users,
                        sessions: r.sessions,
                    })
                }));
            }
        }
        view.nodes.sort();
        view
    }

    /// Each room once, its users and sessions summed over nodes (a user with
    /// sessions on two nodes counts on each).
    fn rooms(&self) -> Vec<crate::room::RoomSummary> {
        let mut by_room: std::collections::BTreeMap<RoomName, crate::room::RoomSummary> =
            Default::default();
        for r in &self.rooms {
            let entry = by_room
                .entry(r.room.clone())
                .or_insert_with(|| crate::room::RoomSummary {
                    room: r.room.clone(),
                    users: 0,
                    sessions: 0,
                });
            entry.users += r.users;
            entry.sessions += r.sessions;
        }
        by_room.into_values().collect()
    }
}

#[derive(Deserialize)]
struct NodeRoom {
    room: String,
    users: usize,
    sessions: usize,
}

#[derive(Deserialize)]
pub struct HistoryParams {
    since: Option<u64>,
    before: Option<u64>,
    limit: Option<usize>,
}

pub async fn room_history(
    req: HttpRequest,
    state: web::Data<AppState>,
    room: web::Path<String>,
    params: web::Query<HistoryParams>,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let room = room_from(&room)?;
    let limit = params
        .limit
        .unwrap_or(crate::protocol::client::DEFAULT_HISTORY_LIMIT);
    if !(1..=MAX_HISTORY_PAGE).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_HISTORY_PAGE}"
        )));
    }
    let query = HistoryQuery {
        after: params.since,
        before: params.before,
        limit,
    };
    let page = ask_room(&state, &room, query).await?;
    Ok(HttpResponse::Ok().json(HistoryResponse {
        room: &room,
        epoch: page.epoch,
        messages: &page.messages,
    }))
}

/// The history page as sent. Serialized straight to text, so each stored
/// message goes out byte for byte as stored: it is never parsed again on the
/// way out (`json!` would parse it into a `Value`, which fails, and panicked,
/// on data that `Value` cannot hold, such as data stored before publishes
/// were checked by `protocol::check_data`).
#[derive(serde::Serialize)]
struct HistoryResponse<'a> {
    room: &'a RoomName,
    epoch: u64,
    messages: &'a [crate::protocol::EncodedMessage],
}

/// Sends `query` to the room, asking the registry again if the room stopped
/// just as it was reached.
async fn ask_room(
    state: &AppState,
    room: &RoomName,
    query: HistoryQuery,
) -> Result<crate::room::HistoryPage, ApiError> {
    for _ in 0..3 {
        if let Ok(result) = state.registry.get_or_start(room).send(query).await {
            return result.map_err(room_error);
        }
    }
    Err(room_error(RoomError::Restarting))
}

pub async fn publish_to_room(
    req: HttpRequest,
    state: web::Data<AppState>,
    room: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    let room = room_from(&room)?;
    let body = read_body(payload, body_limit(&state), body_timeout(&state)).await?;
    let PublishBody { data, user, key } =
        PublishBody::parse(&body, state.settings.limits.max_message_bytes)?;
    let user = user.unwrap_or_else(|| UserId::parse(SERVER_USER).expect("a valid user id"));
    for _ in 0..3 {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let publish = Publish {
            user: user.clone(),
            data: data.clone(),
            key: key.clone(),
            reply: PublishReply::Api(tx),
        };
        // `send` rather than `do_send` so a room that stopped just now is retried.
        if state
            .registry
            .get_or_start(&room)
            .send(publish)
            .await
            .is_err()
        {
            continue;
        }
        return match rx.await {
            Ok(Ok(offset)) => {
                Ok(HttpResponse::Created().json(serde_json::json!({ "offset": offset })))
            }
            Ok(Err(e)) => Err(room_error(e)),
            Err(_) => Err(room_error(RoomError::Restarting)),
        };
    }
    Err(room_error(RoomError::Restarting))
}

pub async fn direct_to_user(
    req: HttpRequest,
    state: web::Data<AppState>,
    user: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let to = UserId::parse(&user).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let body = read_body(payload, body_limit(&state), body_timeout(&state)).await?;
    let DirectBody { data } = DirectBody::parse(&body, state.settings.limits.max_message_bytes)?;
    let from = UserId::parse(SERVER_USER).expect("a valid user id");
    let frame = ByteString::from(encode(&ServerFrame::Direct {
        from: &from,
        data: &data,
        ts: crate::room::actor::now_ms(),
    }));
    let delivered = state.send_direct(&to, &frame);
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "delivered": delivered })))
}

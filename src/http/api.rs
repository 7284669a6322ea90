//! The HTTP API for backends: stats, rooms, publish, direct, history.
//! Handlers only check input and ask the room or the directory.

use super::ApiError;
use crate::protocol::{encode, RoomName, ServerFrame, UserId, MAX_HISTORY_PAGE, MAX_REF_CHARS};
use crate::room::{HistoryQuery, Publish, PublishReply, RoomError};
use crate::state::AppState;
use actix_web::{web, HttpRequest, HttpResponse};
use bytestring::ByteString;
use serde::Deserialize;
use serde_json::value::RawValue;
use std::collections::HashMap;

/// The author of messages published through the API without a `user`.
const SERVER_USER: &str = "server";

/// Checks `Authorization: Bearer <auth.api_key>`; an empty key refuses all.
fn authorize(req: &HttpRequest, state: &AppState) -> Result<(), ApiError> {
    let key = &state.settings.auth.api_key;
    let given = req
        .headers()
        .get(actix_web::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if !key.is_empty() && constant_time_eq(given.as_bytes(), key.as_bytes()) => {
            Ok(())
        }
        _ => Err(ApiError::Unauthorized),
    }
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn room_from(path: &str) -> Result<RoomName, ApiError> {
    RoomName::parse(path).map_err(|e| ApiError::BadRequest(e.to_string()))
}

fn room_error(e: RoomError) -> ApiError {
    ApiError::Internal(e.to_string())
}

pub async fn stats(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({
        "node": state.node_id,
        "connections": state.directory.session_count(),
        "rooms": state.registry.count(),
        "uptime_secs": state.started.elapsed().as_secs(),
    }))
}

pub async fn rooms(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({ "rooms": state.registry.summaries() }))
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
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "room": room,
        "epoch": page.epoch,
        "messages": page.messages,
    })))
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

/// The fields of a POST body, each kept as raw JSON so `data` can be any
/// JSON (`null` included) and is never re-encoded.
fn body_fields(body: &[u8]) -> Result<HashMap<String, Box<RawValue>>, ApiError> {
    serde_json::from_slice(body)
        .map_err(|_| ApiError::BadRequest("the body must be a JSON object".into()))
}

fn data_field(
    fields: &mut HashMap<String, Box<RawValue>>,
    state: &AppState,
) -> Result<Box<RawValue>, ApiError> {
    let data = fields
        .remove("data")
        .ok_or_else(|| ApiError::BadRequest("`data` is required".into()))?;
    let max = state.settings.limits.max_message_bytes;
    if data.get().len() > max {
        return Err(ApiError::BadRequest(format!("`data` is over {max} bytes")));
    }
    Ok(data)
}

fn optional_string(
    fields: &HashMap<String, Box<RawValue>>,
    name: &str,
) -> Result<Option<String>, ApiError> {
    match fields.get(name).map(|raw| raw.get()) {
        None | Some("null") => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|_| ApiError::BadRequest(format!("`{name}` must be a string"))),
    }
}

pub async fn publish_to_room(
    req: HttpRequest,
    state: web::Data<AppState>,
    room: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    if state.is_draining() {
        return Err(ApiError::Draining);
    }
    let room = room_from(&room)?;
    let mut fields = body_fields(&body)?;
    let data = data_field(&mut fields, &state)?;
    let user = optional_string(&fields, "user")?
        .map(|u| UserId::parse(&u).map_err(|e| ApiError::BadRequest(e.to_string())))
        .transpose()?
        .unwrap_or_else(|| UserId::parse(SERVER_USER).expect("a valid user id"));
    let key = optional_string(&fields, "key")?;
    if key
        .as_ref()
        .is_some_and(|k| k.is_empty() || k.chars().count() > MAX_REF_CHARS)
    {
        return Err(ApiError::BadRequest(format!(
            "`key` is 1 to {MAX_REF_CHARS} characters"
        )));
    }
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
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    authorize(&req, &state)?;
    let to = UserId::parse(&user).map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mut fields = body_fields(&body)?;
    let data = data_field(&mut fields, &state)?;
    let from = UserId::parse(SERVER_USER).expect("a valid user id");
    let frame = ByteString::from(encode(&ServerFrame::Direct {
        from: &from,
        data: &data,
        ts: crate::room::actor::now_ms(),
    }));
    let delivered = state.directory.send_to_user(&to, &frame);
    state.metrics.direct_messages.inc_by(delivered as u64);
    Ok(HttpResponse::Accepted().json(serde_json::json!({ "delivered": delivered })))
}

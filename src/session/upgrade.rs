//! `GET /ws`: every check that can refuse a connection runs before the
//! upgrade (an unmet `Expect` 417, HTTP/1.0 or a request body 400, draining
//! 503, origin 403, per-IP 429, token 401, bad query 400), so nothing is
//! upgraded that would be closed at once.
//!
//! WebSocket upgrade requests never reach the route table: the HTTP/1 layer
//! hands them, with the TCP socket, to [`serve_upgrade`] (see `startup`),
//! which answers 101 and gives the socket to a new session actor; the HTTP
//! dispatcher and its buffers end there. [`ws_route`] is what a plain
//! `GET /ws` (no upgrade) gets: the same checks, then the handshake's refusal.
//! Both use [`admit`], which reads only the request head.

use super::actor::WsSession;
use super::socket::WsSocket;
use crate::auth::{AuthError, Identity};
use crate::hooks::connect::{ConnectEvent, ConnectHook, ConnectVerdict, FORWARDED_HEADERS};
use crate::http::ApiError;
use crate::limits::ConnectionPermit;
use crate::protocol::RoomName;
use crate::protocol::UserId;
use crate::state::AppState;
use actix::Actor as _;
use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody};
use actix_http::{h1, ws, ConnectionType, Method, Request, RequestHead, Response, Version};
use actix_web::{http::header, http::StatusCode, web, HttpRequest, HttpResponse, ResponseError};
use futures_util::SinkExt;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpStream;

#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    user: Option<String>,
    room: Option<String>,
}

/// What an admitted upgrade carries into its session.
pub struct Admission {
    pub identity: Identity,
    /// The room of `?room=`, joined right after `welcome`.
    pub room: Option<RoomName>,
    pub peer: Option<SocketAddr>,
    /// This connection's slot in its IP's count, freed when the session ends.
    pub permit: Option<ConnectionPermit>,
    /// With a connect hook: what to ask it; `identity` is provisional until then.
    pub connect: Option<ConnectEvent>,
}

/// Why an upgrade was refused: an HTTP status and a JSON body.
pub struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Refusal {
    pub fn response(&self) -> HttpResponse {
        let mut response = HttpResponse::build(self.status);
        if matches!(
            self.status,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE
        ) {
            response.insert_header((header::RETRY_AFTER, "1"));
        }
        response.json(serde_json::json!({ "error": self.code, "message": self.message }))
    }
}

/// A refusal, counted in `roomhub_rejected_upgrades_total`.
fn refuse(state: &AppState, status: StatusCode, code: &'static str, message: &str) -> Refusal {
    state.metrics.rejected_upgrade(code);
    Refusal {
        status,
        code,
        message: message.to_owned(),
    }
}

/// Every check that may refuse a connection, in order; `Err` is the answer
/// to send instead of the upgrade (already counted in `rejected_upgrades`).
pub fn admit(head: &RequestHead, state: &AppState) -> Result<Admission, Refusal> {
    if state.is_draining() {
        return Err(refuse(
            state,
            StatusCode::SERVICE_UNAVAILABLE,
            "draining",
            "the node is draining",
        ));
    }
    let origins = &state.settings.auth.allowed_origins;
    if !origins.is_empty() {
        // Browsers always send Origin; other clients may not, and are let through.
        if let Some(origin) = head.headers().get(header::ORIGIN) {
            let allowed = origin
                .to_str()
                .is_ok_and(|o| origins.iter().any(|a| a == o));
            if !allowed {
                return Err(refuse(
                    state,
                    StatusCode::FORBIDDEN,
                    "forbidden_origin",
                    "this origin may not connect",
                ));
            }
        }
    }
    let peer = head.peer_addr;
    let permit = match peer {
        Some(peer) => match state.ip_limits.admit(peer.ip()) {
            Ok(permit) => Some(permit),
            Err(e) => {
                return Err(refuse(
                    state,
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    &e.to_string(),
                ))
            }
        },
        None => None,
    };
    let query_string = head.uri.query().unwrap_or_default();
    let Ok(query) = web::Query::<WsQuery>::from_query(query_string) else {
        return Err(refuse(
            state,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "malformed query string",
        ));
    };
    let (token, user) = (query.token.as_deref(), query.user.as_deref());
    let mut connect = None;
    let identified = match &state.hooks.connect {
        None => state.auth.identify(token, user),
        Some(_) => state.auth.claim(token, user).map(|(user, expires_at)| {
            connect = Some(connect_event(head, state, user.as_ref()));
            Identity {
                // Replaced by the hook's user before anything uses it.
                user: user.unwrap_or_else(|| UserId::parse("pending").expect("a valid user id")),
                rooms: None,
                expires_at,
            }
        }),
    };
    let identity = match identified {
        Ok(identity) => identity,
        Err(e @ AuthError::BadUser(_)) => {
            return Err(refuse(
                state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
            ))
        }
        Err(e) => {
            return Err(refuse(
                state,
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                &e.to_string(),
            ))
        }
    };
    let room = match query.room.as_deref().map(RoomName::parse).transpose() {
        Ok(room) => room,
        Err(e) => {
            return Err(refuse(
                state,
                StatusCode::BAD_REQUEST,
                "bad_request",
                &e.to_string(),
            ))
        }
    };
    Ok(Admission {
        identity,
        room,
        peer,
        permit,
        connect,
    })
}

/// The connect hook's request for this upgrade (PROTOCOL.md, "Backend hooks").
fn connect_event(head: &RequestHead, state: &AppState, user: Option<&UserId>) -> ConnectEvent {
    let query_string = head.uri.query().unwrap_or_default();
    let mut query = web::Query::<BTreeMap<String, String>>::from_query(query_string)
        .map(web::Query::into_inner)
        .unwrap_or_default();
    // The token was checked here; the backend never sees it.
    query.remove("token");
    let headers = FORWARDED_HEADERS
        .iter()
        .filter_map(|&name| {
            let value = head.headers().get(name)?.to_str().ok()?;
            Some((name, value.to_owned()))
        })
        .collect();
    ConnectEvent {
        event: "connect",
        node: state.node_id.clone(),
        ip: head.peer_addr.map(|peer| peer.ip().to_string()),
        user: user.map(|u| u.as_str().to_owned()),
        query,
        headers,
    }
}

/// Asks the connect hook about an admitted upgrade; on acceptance the
/// identity is the backend's. Runs in the upgrade's own task, never in an
/// actor; the IP's slot is held for at most `hooks.timeout_ms` meanwhile.
async fn ask_connect_hook(
    state: &AppState,
    hook: &ConnectHook,
    admission: &mut Admission,
    event: ConnectEvent,
) -> Result<(), Refusal> {
    let Some(slot) = hook.slot() else {
        return Err(refuse(
            state,
            StatusCode::SERVICE_UNAVAILABLE,
            "hook_busy",
            "too many connections are being authorized; try again",
        ));
    };
    match hook.ask(&event, slot).await {
        ConnectVerdict::Accept { user, rooms } => {
            admission.identity.user = user;
            admission.identity.rooms = rooms;
            Ok(())
        }
        ConnectVerdict::Refuse(401) => Err(refuse(
            state,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the backend refused this connection",
        )),
        ConnectVerdict::Refuse(_) => Err(refuse(
            state,
            StatusCode::FORBIDDEN,
            "forbidden",
            "the backend refused this connection",
        )),
        ConnectVerdict::Unavailable(why) => {
            tracing::warn!(error = %why, "connect hook failed; upgrade refused");
            Err(refuse(
                state,
                StatusCode::SERVICE_UNAVAILABLE,
                "hook_unavailable",
                "the connection could not be authorized; try again",
            ))
        }
    }
}

/// `GET /ws` without `Upgrade: websocket` (upgrades go to [`serve_upgrade`]):
/// the same checks, then the handshake's own refusal.
pub async fn ws_route(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(refusal) = admit(req.head(), &state) {
        return refusal.response();
    }
    let refusal = match ws::handshake(req.head()) {
        Err(e) => e,
        // Unreachable in practice: the HTTP layer routes every request with
        // `Upgrade: websocket` to `serve_upgrade`.
        Ok(_) => ws::HandshakeError::NoWebsocketUpgrade,
    };
    refusal.error_response()
}

/// The HTTP/1 layer's upgrade service: a request with `Upgrade: websocket`
/// and its connection. Answers 101 and starts the session on this socket,
/// or answers what the route table would and closes the connection.
pub async fn serve_upgrade(
    state: web::Data<AppState>,
    req: Request,
    mut framed: Framed<TcpStream, h1::Codec>,
) {
    let head = req.head();
    // As the route table: only `GET /ws` upgrades (other paths 404, other
    // methods on /ws 405, before any check runs).
    let refusal: Response<BoxBody> = if head.uri.path() != "/ws" {
        ApiError::NotFound.error_response().into()
    } else if head.method != Method::GET {
        ws::HandshakeError::GetMethodRequired.into()
    } else if crate::expectation::unmet(head) {
        crate::expectation::refusal().into()
    } else if let Err(refusal) = well_formed(head, &state) {
        refusal.response().into()
    } else {
        match admit(head, &state) {
            Err(refusal) => refusal.response().into(),
            Ok(mut admission) => match ws::handshake(head) {
                Err(e) => e.into(),
                Ok(mut switching) => {
                    if let (Some(hook), Some(event)) =
                        (&state.hooks.connect, admission.connect.take())
                    {
                        if let Err(refusal) =
                            ask_connect_hook(&state, hook, &mut admission, event).await
                        {
                            return respond_and_close(framed, refusal.response().into()).await;
                        }
                    }
                    // Negotiated here, before the 101: the answer carries it.
                    let deflate = state.settings.websocket.compression
                        && super::deflate::accepts(head.headers());
                    if deflate {
                        switching.insert_header((
                            header::SEC_WEBSOCKET_EXTENSIONS,
                            super::deflate::RESPONSE,
                        ));
                    }
                    let (response, _) = switching.finish().into_parts();
                    let item = h1::Message::Item((response, BodySize::None));
                    if framed.send(item).await.is_err() {
                        return;
                    }
                    let parts = framed.into_parts();
                    start_session(
                        state.into_inner(),
                        admission,
                        parts.io,
                        &parts.read_buf,
                        deflate,
                    );
                    return;
                }
            },
        }
    };
    respond_and_close(framed, refusal).await;
}

/// What RFC 6455 §4.1 asks of the upgrade request beyond what actix-http's
/// handshake checks: HTTP/1.1 or later, and no body, since whatever follows
/// the request on the connection is read as WebSocket frames.
fn well_formed(head: &RequestHead, state: &AppState) -> Result<(), Refusal> {
    if head.version < Version::HTTP_11 {
        return Err(refuse(
            state,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a WebSocket upgrade needs HTTP/1.1",
        ));
    }
    let headers = head.headers();
    let sized_body = headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length.as_bytes() != b"0");
    if sized_body || headers.contains_key(header::TRANSFER_ENCODING) {
        return Err(refuse(
            state,
            StatusCode::BAD_REQUEST,
            "bad_request",
            "a WebSocket upgrade request has no body",
        ));
    }
    Ok(())
}

fn start_session(
    state: Arc<AppState>,
    admission: Admission,
    io: TcpStream,
    leftover: &[u8],
    deflate: bool,
) {
    // Frames are coalesced by the session itself; the kernel must not hold
    // them back waiting for acknowledgements.
    let _ = io.set_nodelay(true);
    let limits = &state.settings.limits;
    let compressed = deflate.then(|| {
        state.metrics.compressed_connections.inc();
        state.metrics.messages_delivered_compressed.clone()
    });
    let socket = WsSocket::new(
        io,
        leftover,
        limits.max_frame_bytes,
        limits.outbound_queue,
        compressed,
    );
    let guard = state.socket_opened();
    WsSession::new(state, admission, socket, guard).start();
}

/// Sends a whole response and closes the connection: after an upgrade
/// request the HTTP layer no longer serves it.
async fn respond_and_close(mut framed: Framed<TcpStream, h1::Codec>, response: Response<BoxBody>) {
    let (mut head, body) = response.into_parts();
    head.head_mut().set_connection_type(ConnectionType::Close);
    // Refusals are small in-memory bodies.
    let body = body.try_into_bytes().unwrap_or_default();
    let item = h1::Message::Item((head, BodySize::Sized(body.len() as u64)));
    if framed.send(item).await.is_err() {
        return;
    }
    if !body.is_empty() && framed.send(h1::Message::Chunk(Some(body))).await.is_err() {
        return;
    }
    let _ = framed.close().await;
}

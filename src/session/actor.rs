//! The session actor. Rooms reach it only through [`Outbound`] messages; it
//! reaches rooms only through the messages in `crate::room::messages`.

use super::ledger::OutboundLedger;
use crate::auth::Identity;
use crate::limits::{ConnectionPermit, FrameLimiter};
use crate::outbound::{error_frame, Outbound};
use crate::protocol::{
    decode, encode, ClientFrame, CloseCode, ErrorCode, RoomName, ServerFrame, SessionId, Since,
    UserId, PROTOCOL_VERSION,
};
use crate::room::{
    HistoryQuery, Join, Leave, PresenceQuery, Publish, PublishReply, RoomActor, RoomError, Typing,
};
use crate::state::AppState;
use actix::prelude::*;
use actix_http::ws::Item;
use actix_web_actors::ws;
use bytestring::ByteString;
use serde_json::value::RawValue;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often a join retries when its room stopped just as it was reached.
const JOIN_ATTEMPTS: usize = 3;

/// A text message arriving in fragments, kept until its last fragment.
enum Fragments {
    None,
    Text(Vec<u8>),
    Binary,
}

pub struct WsSession {
    id: SessionId,
    user: UserId,
    identity: Identity,
    state: Arc<AppState>,
    /// publish + typing + direct.
    publish_limiter: FrameLimiter,
    /// join, and history of rooms not joined.
    join_limiter: FrameLimiter,
    /// Rejected frames; running out closes the connection with 1008.
    abuse: FrameLimiter,
    ledger: OutboundLedger,
    /// This connection's slot in its IP's count, freed when the session ends.
    _permit: Option<ConnectionPermit>,
    closing: bool,
    peer: Option<SocketAddr>,
    /// Joined rooms (the room actors hold the authoritative membership).
    rooms: HashMap<RoomName, Addr<RoomActor>>,
    /// The room of `?room=`, joined right after `welcome`.
    auto_join: Option<RoomName>,
    last_heard: Instant,
    fragments: Fragments,
    close_reason: &'static str,
}

impl WsSession {
    pub fn new(
        state: Arc<AppState>,
        identity: Identity,
        auto_join: Option<RoomName>,
        peer: Option<SocketAddr>,
        permit: Option<ConnectionPermit>,
    ) -> Self {
        let limits = &state.settings.limits;
        // Counted here and uncounted in `Drop`, so the two always pair.
        state.metrics.connections.inc();
        Self {
            id: SessionId::random(),
            user: identity.user.clone(),
            identity,
            publish_limiter: FrameLimiter::publishes(limits),
            join_limiter: FrameLimiter::joins(limits),
            abuse: FrameLimiter::abuse(),
            ledger: OutboundLedger::new(limits.outbound_queue),
            _permit: permit,
            closing: false,
            state,
            peer,
            rooms: HashMap::new(),
            auto_join,
            last_heard: Instant::now(),
            fragments: Fragments::None,
            close_reason: "connection dropped",
        }
    }

    pub fn max_frame_bytes(&self) -> usize {
        self.state.settings.limits.max_frame_bytes
    }

    /// The counter the response body advances (see [`OutboundLedger`]).
    pub fn outbound_counter(&self) -> std::rc::Rc<std::cell::Cell<u64>> {
        self.ledger.counter()
    }

    /// Bytes written so far, for the watchdog.
    pub fn progress(&self) -> std::rc::Rc<std::cell::Cell<u64>> {
        self.ledger.progress()
    }

    fn outbox(ctx: &mut ws::WebsocketContext<Self>) -> Recipient<Outbound> {
        ctx.address().recipient()
    }

    /// The one way this session writes a frame: through the bounded ledger.
    fn write(&mut self, ctx: &mut ws::WebsocketContext<Self>, frame: impl Into<ByteString>) {
        if self.closing {
            return;
        }
        let frame = frame.into();
        if self.ledger.try_push(frame.len()) {
            ctx.text(frame);
        } else {
            self.state.metrics.slow_consumer_disconnects.inc();
            self.close(ctx, CloseCode::TooSlow);
        }
    }

    /// Reports a client error; too many of them in a short window close the
    /// connection with 1008.
    fn send_error(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) {
        self.send_error_after(ctx, reference, code, message, None);
    }

    fn send_error_after(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
        code: ErrorCode,
        message: &str,
        retry_after_ms: Option<u64>,
    ) {
        let frame = error_frame(
            &self.state.metrics,
            reference,
            code,
            message,
            retry_after_ms,
        );
        self.write(ctx, frame);
        let client_fault = !matches!(code, ErrorCode::Internal | ErrorCode::Unavailable);
        if client_fault && self.abuse.check().is_err() {
            self.state.metrics.abuse_disconnects.inc();
            tracing::warn!(session = %self.id, user = %self.user, "closing an abusive session");
            self.close(ctx, CloseCode::Policy);
        }
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.close_reason = code.reason();
        self.ledger.record(2 + code.reason().len());
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code.code()),
            description: Some(code.reason().into()),
        }));
        ctx.stop();
    }

    /// Takes a token for publish, typing or direct; else tells the client when to retry.
    fn within_rate(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
    ) -> bool {
        let checked = self.publish_limiter.check();
        self.rate_verdict(checked, ctx, reference)
    }

    /// Takes a token for a join (or a history read of a room not joined).
    fn within_join_rate(
        &mut self,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
    ) -> bool {
        let checked = self.join_limiter.check();
        self.rate_verdict(checked, ctx, reference)
    }

    fn rate_verdict(
        &mut self,
        checked: Result<(), Duration>,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
    ) -> bool {
        match checked {
            Ok(()) => true,
            Err(wait) => {
                self.state.metrics.rate_limited.inc();
                let retry = (wait.as_millis() as u64).max(1);
                self.send_error_after(
                    ctx,
                    reference,
                    ErrorCode::RateLimited,
                    "slow down",
                    Some(retry),
                );
                false
            }
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        match decode(text) {
            Ok(request) => self.dispatch(request.frame, request.reference, ctx),
            Err(e) => self.send_error(ctx, e.reference.as_deref(), e.code, &e.message),
        }
    }

    fn dispatch(
        &mut self,
        frame: ClientFrame,
        reference: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let r = reference.as_deref();
        match frame {
            ClientFrame::Join {
                room,
                since,
                history,
            } => {
                let history = history.unwrap_or(self.state.settings.history.replay);
                self.join(room, since, history, reference, ctx);
            }
            ClientFrame::Leave { room } => match self.rooms.remove(&room) {
                Some(addr) => {
                    addr.do_send(Leave { session: self.id });
                    self.ack(ctx, r);
                }
                None => self.send_error(ctx, r, ErrorCode::NotJoined, "not in this room"),
            },
            ClientFrame::Publish { room, data, key } => {
                if !self.data_fits(&data, r, ctx) || !self.within_rate(ctx, r) {
                    return;
                }
                let Some(addr) = self.joined(&room, r, ctx) else {
                    return;
                };
                addr.do_send(Publish {
                    user: self.user.clone(),
                    data,
                    key,
                    reply: PublishReply::Session {
                        session: self.id,
                        outbox: Self::outbox(ctx),
                        reference,
                    },
                });
            }
            ClientFrame::Typing { room, active } => {
                let Some(addr) = self.joined(&room, r, ctx) else {
                    return;
                };
                if !self.within_rate(ctx, r) {
                    return;
                }
                addr.do_send(Typing {
                    session: self.id,
                    active,
                });
                if r.is_some() {
                    self.ack(ctx, r);
                }
            }
            ClientFrame::Presence { room } => {
                let Some(addr) = self.joined(&room, r, ctx) else {
                    return;
                };
                addr.do_send(PresenceQuery {
                    session: self.id,
                    reference,
                });
            }
            ClientFrame::History {
                room,
                before,
                limit,
            } => self.history(room, before, limit, reference, ctx),
            ClientFrame::Direct { to, data } => {
                if !self.data_fits(&data, r, ctx) || !self.within_rate(ctx, r) {
                    return;
                }
                let frame = ByteString::from(encode(&ServerFrame::Direct {
                    from: &self.user,
                    data: &data,
                    ts: crate::room::actor::now_ms(),
                }));
                self.state.send_direct(&to, &frame);
                self.ack(ctx, r);
            }
            ClientFrame::Ping => self.write(ctx, encode(&ServerFrame::Pong { reference: r })),
        }
    }

    fn ack(&mut self, ctx: &mut ws::WebsocketContext<Self>, reference: Option<&str>) {
        let frame = encode(&ServerFrame::Ack {
            reference,
            offset: None,
        });
        self.write(ctx, frame);
    }

    fn data_fits(
        &mut self,
        data: &RawValue,
        r: Option<&str>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> bool {
        let max = self.state.settings.limits.max_message_bytes;
        if data.get().len() > max {
            self.send_error(
                ctx,
                r,
                ErrorCode::TooLarge,
                &format!("data is over {max} bytes"),
            );
            return false;
        }
        true
    }

    /// The room's actor if this session has joined it; else tells the client.
    fn joined(
        &mut self,
        room: &RoomName,
        r: Option<&str>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> Option<Addr<RoomActor>> {
        let addr = self.rooms.get(room).cloned();
        if addr.is_none() {
            self.send_error(ctx, r, ErrorCode::NotJoined, "join the room first");
        }
        addr
    }

    /// Whether the token allows this room (join and history); else tells the client.
    fn allowed(
        &mut self,
        room: &RoomName,
        r: Option<&str>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) -> bool {
        let allowed = self.identity.may_join(room);
        if !allowed {
            self.send_error(
                ctx,
                r,
                ErrorCode::Forbidden,
                "your token does not allow this room",
            );
        }
        allowed
    }

    fn join(
        &mut self,
        room: RoomName,
        since: Option<Since>,
        history: usize,
        reference: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if !self.allowed(&room, reference.as_deref(), ctx) {
            return;
        }
        let limit = self.state.settings.limits.max_rooms_per_connection;
        if !self.rooms.contains_key(&room) && self.rooms.len() >= limit {
            let message = format!("at most {limit} rooms per connection");
            return self.send_error(ctx, reference.as_deref(), ErrorCode::RoomLimit, &message);
        }
        if !self.within_join_rate(ctx, reference.as_deref()) {
            return;
        }
        let join = Join {
            session: self.id,
            user: self.user.clone(),
            outbox: Self::outbox(ctx),
            since,
            history,
            reference,
        };
        let registry = self.state.registry.clone();
        let attempt = async move {
            for _ in 0..JOIN_ATTEMPTS {
                let addr = registry.get_or_start(&room);
                // A closed mailbox means the room stopped as we reached it.
                if let Ok(result) = addr.send(join.clone()).await {
                    return (room, addr, join.reference, result);
                }
            }
            let addr = registry.get_or_start(&room);
            (room, addr, join.reference, Err(RoomError::Restarting))
        };
        // `wait`: later frames from this client (a publish right after the
        // join) are handled only once the join is done, and `joined` goes out
        // before any message of the room.
        ctx.wait(
            attempt.into_actor(self).map(
                |(room, addr, reference, result), act, ctx| match result {
                    Ok(joined) => {
                        act.rooms.insert(room, addr);
                        act.write(ctx, joined);
                    }
                    Err(e) => act.send_error(ctx, reference.as_deref(), e.code(), &e.to_string()),
                },
            ),
        );
    }

    fn history(
        &mut self,
        room: RoomName,
        before: Option<u64>,
        limit: usize,
        reference: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        if !self.allowed(&room, reference.as_deref(), ctx) {
            return;
        }
        if !self.rooms.contains_key(&room) && !self.within_join_rate(ctx, reference.as_deref()) {
            return;
        }
        let addr = match self.rooms.get(&room) {
            Some(addr) => addr.clone(),
            None => self.state.registry.get_or_start(&room),
        };
        let query = HistoryQuery {
            after: None,
            before,
            limit,
        };
        ctx.spawn(
            addr.send(query)
                .into_actor(self)
                .map(move |result, act, ctx| {
                    let r = reference.as_deref();
                    match result {
                        Ok(Ok(page)) => {
                            let frame = encode(&ServerFrame::History {
                                reference: r,
                                room: &room,
                                messages: &page.messages,
                            });
                            act.write(ctx, frame)
                        }
                        Ok(Err(e)) => act.send_error(ctx, r, e.code(), &e.to_string()),
                        Err(_) => act.send_error(
                            ctx,
                            r,
                            ErrorCode::Internal,
                            "the room is restarting; try again",
                        ),
                    }
                }),
        );
    }

    fn heartbeat(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let timeout = Duration::from_millis(self.state.settings.heartbeat.timeout_ms);
        if self.last_heard.elapsed() > timeout {
            self.state.metrics.heartbeat_timeouts.inc();
            self.close_reason = "heartbeat timeout";
            self.closing = true;
            ctx.stop();
        } else if !self.closing {
            self.ledger.record(0);
            ctx.ping(b"");
        }
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // The mailbox is the session's inbound queue from rooms: bounded, so a
        // session that cannot keep up is evicted instead of growing memory.
        ctx.set_mailbox_capacity(self.state.settings.limits.outbound_queue);
        self.state
            .directory
            .register(&self.user, self.id, Self::outbox(ctx));
        tracing::info!(session = %self.id, user = %self.user, peer = ?self.peer, "connection opened");
        let session = self.id.to_string();
        let welcome = encode(&ServerFrame::Welcome {
            session: &session,
            user: &self.user,
            node: &self.state.node_id,
            heartbeat_ms: self.state.settings.heartbeat.interval_ms,
            protocol: PROTOCOL_VERSION,
        });
        self.write(ctx, welcome);
        if let Some(expires_at) = self.identity.expires_at {
            let left = (expires_at * 1000).saturating_sub(crate::room::actor::now_ms());
            ctx.run_later(Duration::from_millis(left), |act, ctx| {
                act.state.metrics.token_expiries.inc();
                act.close(ctx, CloseCode::Policy);
                act.close_reason = "token expired";
            });
        }
        let interval = Duration::from_millis(self.state.settings.heartbeat.interval_ms);
        ctx.run_interval(interval, |act, ctx| act.heartbeat(ctx));
        if let Some(room) = self.auto_join.take() {
            let history = self.state.settings.history.replay;
            self.join(room, None, history, None, ctx);
        }
    }
}

/// Cleanup lives in `Drop`, not `stopped`: a connection cut at the socket
/// (see `watchdog`) drops the actor without stopping it.
impl Drop for WsSession {
    fn drop(&mut self) {
        for addr in self.rooms.values() {
            addr.do_send(Leave { session: self.id });
        }
        self.state.directory.unregister(&self.user, self.id);
        self.state.metrics.connections.dec();
        tracing::info!(session = %self.id, user = %self.user, reason = self.close_reason, "connection closed");
    }
}

impl Handler<Outbound> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        match msg {
            Outbound::Frame(frame) => self.write(ctx, frame),
            Outbound::Frames(frames) => {
                for frame in frames.iter() {
                    self.write(ctx, frame.clone());
                }
            }
            Outbound::Close(code) => {
                if code == CloseCode::TooSlow {
                    tracing::warn!(session = %self.id, user = %self.user, "closing a session that cannot keep up");
                }
                self.close(ctx, code)
            }
            Outbound::RoomClosed(room) => {
                if self.rooms.remove(&room).is_some() {
                    self.state.metrics.error(ErrorCode::Internal);
                    let message = format!("room {room} restarted; join it again");
                    let frame = encode(&ServerFrame::Error {
                        reference: None,
                        code: ErrorCode::Internal,
                        message: &message,
                        retry_after_ms: None,
                        room: Some(&room),
                    });
                    self.write(ctx, frame);
                }
            }
            Outbound::Drain => {
                let frame = encode(&ServerFrame::Shutdown {
                    reason: "draining",
                    reconnect: true,
                });
                self.write(ctx, frame);
                self.close(ctx, CloseCode::Draining);
            }
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, item: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_heard = Instant::now();
        let message = match item {
            Ok(message) => message,
            Err(ws::ProtocolError::Overflow) => return self.close(ctx, CloseCode::FrameTooBig),
            Err(e) => {
                tracing::debug!(session = %self.id, error = %e, "websocket protocol error");
                self.close_reason = "protocol error";
                return ctx.stop();
            }
        };
        match message {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => self.send_error(
                ctx,
                None,
                ErrorCode::BadRequest,
                "binary frames are not accepted; send JSON text",
            ),
            ws::Message::Ping(payload) => {
                self.ledger.record(payload.len());
                ctx.pong(&payload);
            }
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(_) => {
                self.close_reason = "closed by client";
                self.closing = true;
                ctx.close(None);
                ctx.stop();
            }
            ws::Message::Continuation(item) => self.on_fragment(item, ctx),
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl WsSession {
    /// Reassembles fragmented messages, within the same size limit as frames.
    fn on_fragment(&mut self, item: Item, ctx: &mut ws::WebsocketContext<Self>) {
        let limit = self.max_frame_bytes();
        let last = matches!(item, Item::Last(_));
        match item {
            Item::FirstText(bytes) => self.fragments = Fragments::Text(bytes.to_vec()),
            Item::FirstBinary(_) => self.fragments = Fragments::Binary,
            Item::Continue(bytes) | Item::Last(bytes) => {
                if let Fragments::Text(buffer) = &mut self.fragments {
                    buffer.extend_from_slice(&bytes);
                    if buffer.len() > limit {
                        return self.close(ctx, CloseCode::FrameTooBig);
                    }
                }
            }
        }
        if last {
            match std::mem::replace(&mut self.fragments, Fragments::None) {
                Fragments::Text(buffer) => match String::from_utf8(buffer) {
                    Ok(text) => self.on_text(&text, ctx),
                    Err(_) => self.send_error(
                        ctx,
                        None,
                        ErrorCode::InvalidJson,
                        "frames must be UTF-8 JSON",
                    ),
                },
                Fragments::Binary => self.send_error(
                    ctx,
                    None,
                    ErrorCode::BadRequest,
                    "binary frames are not accepted; send JSON text",
                ),
                Fragments::None => {}
            }
        }
    }
}

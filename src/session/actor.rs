//! The session actor. Rooms reach it only through [`Outbound`] messages; it
//! reaches rooms only through the messages in `crate::room::messages`.

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
    state: Arc<AppState>,
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
        user: UserId,
        auto_join: Option<RoomName>,
        peer: Option<SocketAddr>,
    ) -> Self {
        Self {
            id: SessionId::random(),
            user,
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

    fn outbox(ctx: &mut ws::WebsocketContext<Self>) -> Recipient<Outbound> {
        ctx.address().recipient()
    }

    fn send_error(
        &self,
        ctx: &mut ws::WebsocketContext<Self>,
        reference: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) {
        ctx.text(error_frame(&self.state.metrics, reference, code, message));
    }

    fn close(&mut self, ctx: &mut ws::WebsocketContext<Self>, code: CloseCode) {
        self.close_reason = code.reason();
        ctx.close(Some(ws::CloseReason {
            code: ws::CloseCode::from(code.code()),
            description: Some(code.reason().into()),
        }));
        ctx.stop();
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
                if !self.data_fits(&data, r, ctx) {
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
                if !self.data_fits(&data, r, ctx) {
                    return;
                }
                let frame = ByteString::from(encode(&ServerFrame::Direct {
                    from: &self.user,
                    data: &data,
                    ts: crate::room::actor::now_ms(),
                }));
                let delivered = self.state.directory.send_to_user(&to, &frame);
                self.state.metrics.direct_messages.inc_by(delivered as u64);
                self.ack(ctx, r);
            }
            ClientFrame::Ping => ctx.text(encode(&ServerFrame::Pong { reference: r })),
        }
    }

    fn ack(&self, ctx: &mut ws::WebsocketContext<Self>, reference: Option<&str>) {
        ctx.text(encode(&ServerFrame::Ack {
            reference,
            offset: None,
        }));
    }

    fn data_fits(
        &self,
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
        &self,
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

    fn join(
        &mut self,
        room: RoomName,
        since: Option<Since>,
        history: usize,
        reference: Option<String>,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let limit = self.state.settings.limits.max_rooms_per_connection;
        if !self.rooms.contains_key(&room) && self.rooms.len() >= limit {
            let message = format!("at most {limit} rooms per connection");
            return self.send_error(ctx, reference.as_deref(), ErrorCode::RoomLimit, &message);
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
                        ctx.text(joined);
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
                        Ok(Ok(page)) => ctx.text(encode(&ServerFrame::History {
                            reference: r,
                            room: &room,
                            messages: &page.messages,
                        })),
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
            self.close_reason = "heartbeat timeout";
            ctx.stop();
        } else {
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
        self.state.metrics.connections.inc();
        self.state
            .directory
            .register(&self.user, self.id, Self::outbox(ctx));
        tracing::info!(session = %self.id, user = %self.user, peer = ?self.peer, "connection opened");
        let session = self.id.to_string();
        ctx.text(encode(&ServerFrame::Welcome {
            session: &session,
            user: &self.user,
            node: &self.state.node_id,
            heartbeat_ms: self.state.settings.heartbeat.interval_ms,
            protocol: PROTOCOL_VERSION,
        }));
        let interval = Duration::from_millis(self.state.settings.heartbeat.interval_ms);
        ctx.run_interval(interval, |act, ctx| act.heartbeat(ctx));
        if let Some(room) = self.auto_join.take() {
            let history = self.state.settings.history.replay;
            self.join(room, None, history, None, ctx);
        }
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
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
            Outbound::Frame(frame) => ctx.text(frame),
            Outbound::Close(code) => {
                if code == CloseCode::TooSlow {
                    tracing::warn!(session = %self.id, user = %self.user, "closing a session that cannot keep up");
                }
                self.close(ctx, code)
            }
            Outbound::RoomClosed(room) => {
                if self.rooms.remove(&room).is_some() {
                    let message = format!("room {room} restarted; join it again");
                    self.send_error(ctx, None, ErrorCode::Internal, &message);
                }
            }
            Outbound::Drain => {
                ctx.text(encode(&ServerFrame::Shutdown {
                    reason: "draining",
                    reconnect: true,
                }));
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
            ws::Message::Ping(payload) => ctx.pong(&payload),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(_) => {
                self.close_reason = "closed by client";
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

//! The session actor. Rooms and the directory reach it through its
//! [`SessionLink`]: frames go straight into its connection's outbox (see
//! `super::outbox`), notices ([`Outbound`]) through its mailbox. It reaches
//! rooms only through the messages in `crate::room::messages`.
//!
//! It owns its connection ([`WsSocket`]): one actor item ([`Io`]) reads and
//! decodes client frames and sends what is queued, after every wake-up of
//! the actor, so everything the session writes while handling a batch of
//! client frames leaves in one socket write.

use super::frames::{Inbound, Violation};
use super::socket::WsSocket;
use super::upgrade::Admission;
use crate::auth::Identity;
use crate::hooks::events::EventKind;
use crate::hooks::publish::PublishVerdict;
use crate::limits::{ConnectionPermit, FrameLimiter};
use crate::outbound::{error_frame, FrameSink, Outbound, SessionLink};
use crate::protocol::{
    decode, encode, ClientFrame, CloseCode, ErrorCode, RoomName, ServerFrame, SessionId, Since,
    UserId, PROTOCOL_VERSION,
};
use crate::room::{
    HistoryQuery, Join, Leave, PresenceQuery, Publish, PublishReply, RoomActor, RoomError, Typing,
};
use crate::state::{AppState, SocketGuard};
use actix::prelude::*;
use actix_http::ws::{self, OpCode};
use bytestring::ByteString;
use serde_json::json;
use serde_json::value::RawValue;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

/// How often a join retries when its room stopped just as it was reached.
const JOIN_ATTEMPTS: usize = 3;

/// Client frames handled per wake-up before the session lets its mailbox
/// (e.g. a drain) and other tasks run, as actix's `StreamHandler` does.
const FRAMES_PER_POLL: usize = 64;

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
    /// The connection; taken when the session stops, to send what is left.
    socket: Option<WsSocket>,
    /// Counts the socket for the drain until its last bytes are sent.
    socket_guard: Option<SocketGuard>,
    /// The socket failed or was cut: nothing more can be sent.
    broken: bool,
    /// Inside the mailbox handler or [`Io`], which send before the actor
    /// sleeps; other writers schedule a [`Flush`].
    dispatching: bool,
    flush_scheduled: bool,
    /// See [`WsSession::link`].
    link: Option<SessionLink>,
    /// This connection's slot in its IP's count, freed when the session ends.
    _permit: Option<ConnectionPermit>,
    closing: bool,
    peer: Option<SocketAddr>,
    /// Joined rooms (the room actors hold the authoritative membership).
    rooms: HashMap<RoomName, Addr<RoomActor>>,
    /// The room of `?room=`, joined right after `welcome`.
    auto_join: Option<RoomName>,
    last_heard: Instant,
    close_reason: &'static str,
    /// The close code for `session_disconnected`: 1006 unless a close frame went either way.
    close_code: u16,
    /// Publishes waiting for the publish hook, per room (empty, and never
    /// allocated, without a publish hook).
    held: HashMap<RoomName, VecDeque<HeldPublish>>,
}

/// A client publish waiting for the publish hook's verdict.
struct HeldPublish {
    data: Box<RawValue>,
    key: Option<String>,
    reference: Option<String>,
}

impl WsSession {
    pub fn new(
        state: Arc<AppState>,
        admission: Admission,
        socket: WsSocket,
        socket_guard: SocketGuard,
    ) -> Self {
        let Admission {
            identity,
            room: auto_join,
            peer,
            permit,
            connect: _,
        } = admission;
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
            socket: Some(socket),
            socket_guard: Some(socket_guard),
            broken: false,
            dispatching: false,
            flush_scheduled: false,
            link: None,
            _permit: permit,
            closing: false,
            state,
            peer,
            rooms: HashMap::new(),
            auto_join,
            last_heard: Instant::now(),
            close_reason: "connection dropped",
            held: HashMap::new(),
            close_code: 1006,
        }
    }

    /// How rooms and the directory reach this session: frames straight
    /// into its socket's outbox, notices through its mailbox.
    fn link(&mut self, ctx: &mut Context<Self>) -> SessionLink {
        if let Some(link) = &self.link {
            return link.clone();
        }
        let frames: Arc<dyn FrameSink> = match &self.socket {
            Some(socket) => socket.outbox(),
            // Only after the session stopped, when nothing joins any more.
            None => Arc::new(Ended),
        };
        let link = SessionLink::new(frames, ctx.address().recipient());
        self.link = Some(link.clone());
        link
    }

    /// The one way this session writes a frame: through the bounded ledger.
    fn write(&mut self, ctx: &mut Context<Self>, frame: impl AsRef<str>) {
        if self.closing {
            return;
        }
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        if socket.push_text(frame.as_ref()) {
            self.flush_soon(ctx);
        } else {
            self.state.metrics.slow_consumer_disconnects.inc();
            self.close(ctx, CloseCode::TooSlow);
        }
    }

    /// Queues a control frame (never refused by the ledger).
    fn write_control(&mut self, ctx: &mut Context<Self>, op: OpCode, payload: &[u8]) {
        if let Some(socket) = self.socket.as_mut() {
            socket.push_control(op, payload);
            self.flush_soon(ctx);
        }
    }

    /// Makes sure what was just queued is sent before the actor sleeps.
    fn flush_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.dispatching && !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.spawn(Flush);
        }
    }

    /// Sends what is queued as far as the socket takes it; a failed socket
    /// stops the session.
    fn flush(&mut self, ctx: &mut Context<Self>, task: &mut std::task::Context<'_>) {
        let Some(socket) = self.socket.as_mut() else {
            return;
        };
        if let Poll::Ready(Err(e)) = socket.poll_flush(task) {
            tracing::debug!(session = %self.id, error = %e, "write failed");
            self.broken = true;
            self.closing = true;
            ctx.stop();
        }
    }

    /// Reads, decodes and handles client frames, then sends what is queued.
    fn poll_io(&mut self, ctx: &mut Context<Self>, task: &mut std::task::Context<'_>) -> Poll<()> {
        self.dispatching = true;
        let open = self.pump_inbound(ctx, task);
        self.dispatching = false;
        if !open {
            self.closing = true;
            ctx.stop();
            return Poll::Ready(());
        }
        self.flush(ctx, task);
        Poll::Pending
    }

    /// Handles every frame already read, then reads more while the socket
    /// has some (a few reads at most); `false` once the peer is gone.
    fn pump_inbound(&mut self, ctx: &mut Context<Self>, task: &mut std::task::Context<'_>) -> bool {
        let mut handled = 0;
        loop {
            loop {
                // `wait`: a join is under way and later frames wait for it.
                if self.closing || ctx.waiting() {
                    return true;
                }
                if handled == FRAMES_PER_POLL {
                    task.waker().wake_by_ref();
                    return true;
                }
                let Some(socket) = self.socket.as_mut() else {
                    return false;
                };
                match socket.next_frame() {
                    Ok(Some(frame)) => {
                        handled += 1;
                        self.on_frame(frame, ctx);
                    }
                    Ok(None) => break,
                    Err(violation) => {
                        self.violation(violation, ctx);
                        return true;
                    }
                }
            }
            let Some(socket) = self.socket.as_mut() else {
                return false;
            };
            match socket.poll_read(task) {
                Poll::Pending => return true,
                Poll::Ready(Ok(0)) => return false,
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    tracing::debug!(session = %self.id, error = %e, "read failed");
                    self.broken = true;
                    return false;
                }
            }
        }
    }

    /// Reports a client error; too many of them in a short window close the
    /// connection with 1008.
    fn send_error(
        &mut self,
        ctx: &mut Context<Self>,
        reference: Option<&str>,
        code: ErrorCode,
        message: &str,
    ) {
        self.send_error_after(ctx, reference, code, message, None);
    }

    fn send_error_after(
        &mut self,
        ctx: &mut Context<Self>,
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

    fn close(&mut self, ctx: &mut Context<Self>, code: CloseCode) {
        if self.closing {
            return;
        }
        self.closing = true;
        self.close_reason = code.reason();
        self.close_code = code.code();
        if let Some(socket) = self.socket.as_mut() {
            socket.push_close(Some(ws::CloseReason {
                code: ws::CloseCode::from(code.code()),
                description: Some(code.reason().into()),
            }));
        }
        ctx.stop();
    }

    /// Takes a token for publish, typing or direct; else tells the client when to retry.
    fn within_rate(&mut self, ctx: &mut Context<Self>, reference: Option<&str>) -> bool {
        let checked = self.publish_limiter.check();
        self.rate_verdict(checked, ctx, reference)
    }

    /// Takes a token for a join (or a history read of a room not joined).
    fn within_join_rate(&mut self, ctx: &mut Context<Self>, reference: Option<&str>) -> bool {
        let checked = self.join_limiter.check();
        self.rate_verdict(checked, ctx, reference)
    }

    fn rate_verdict(
        &mut self,
        checked: Result<(), Duration>,
        ctx: &mut Context<Self>,
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

    fn on_text(&mut self, text: &str, ctx: &mut Context<Self>) {
        match decode(text) {
            Ok(request) => self.dispatch(request.frame, request.reference, ctx),
            Err(e) => self.send_error(ctx, e.reference.as_deref(), e.code, &e.message),
        }
    }

    fn dispatch(&mut self, frame: ClientFrame, reference: Option<String>, ctx: &mut Context<Self>) {
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
                if self.state.hooks.publish.is_some() {
                    return self.hold_for_hook(room, data, key, reference, ctx);
                }
                self.send_publish(&addr, data, key, reference, ctx);
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

    fn send_publish(
        &mut self,
        addr: &Addr<RoomActor>,
        data: Box<RawValue>,
        key: Option<String>,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        addr.do_send(Publish {
            user: self.user.clone(),
            data,
            key,
            reply: PublishReply::Session {
                session: self.id,
                link: self.link(ctx),
                reference,
            },
        });
    }

    /// Queues a publish for the publish hook. Each room has its own FIFO:
    /// one call at a time per room keeps this connection's publishes to it
    /// in order, and a slow answer holds back only that room's.
    fn hold_for_hook(
        &mut self,
        room: RoomName,
        data: Box<RawValue>,
        key: Option<String>,
        reference: Option<String>,
        ctx: &mut Context<Self>,
    ) {
        let queue = self.held.entry(room.clone()).or_default();
        queue.push_back(HeldPublish {
            data,
            key,
            reference,
        });
        if queue.len() == 1 {
            self.ask_publish_hook(room, ctx);
        }
    }

    /// Calls the hook for the first publish held for `room`, in a spawned
    /// future whose verdict comes back to this actor.
    fn ask_publish_hook(&mut self, room: RoomName, ctx: &mut Context<Self>) {
        let (Some(hook), Some(held)) = (
            &self.state.hooks.publish,
            self.held.get(&room).and_then(VecDeque::front),
        ) else {
            return;
        };
        let call = hook.ask(&room, &self.user, &held.data, held.key.as_deref());
        ctx.spawn(
            call.into_actor(self)
                .map(move |verdict, act, ctx| act.publish_verdict(room, verdict, ctx)),
        );
    }

    fn publish_verdict(
        &mut self,
        room: RoomName,
        verdict: PublishVerdict,
        ctx: &mut Context<Self>,
    ) {
        let Some(queue) = self.held.get_mut(&room) else {
            return;
        };
        let Some(held) = queue.pop_front() else {
            return;
        };
        if queue.is_empty() {
            self.held.remove(&room);
        } else {
            self.ask_publish_hook(room.clone(), ctx);
        }
        let r = held.reference.as_deref();
        let data = match verdict {
            PublishVerdict::AsIs => held.data,
            PublishVerdict::Replace(data) => {
                // The backend's data is stored like a client's: same checks.
                if !self.data_fits(&data, r, ctx) {
                    return;
                }
                if let Err(e) = crate::protocol::check_data(&data) {
                    let message = format!("`data` from the backend: {e}");
                    return self.send_error(ctx, r, ErrorCode::BadRequest, &message);
                }
                data
            }
            PublishVerdict::Forbidden(message) => {
                let message = message
                    .as_deref()
                    .unwrap_or("the backend refused this message");
                return self.send_error(ctx, r, ErrorCode::Forbidden, message);
            }
            PublishVerdict::Unavailable(why) => {
                tracing::warn!(session = %self.id, error = %why, "publish hook failed; not stored");
                return self.send_error(
                    ctx,
                    r,
                    ErrorCode::Unavailable,
                    "the message could not be approved; try again",
                );
            }
        };
        // The session may have left the room while the hook was asked.
        let Some(addr) = self.joined(&room, r, ctx) else {
            return;
        };
        self.send_publish(&addr, data, held.key, held.reference, ctx);
    }

    fn ack(&mut self, ctx: &mut Context<Self>, reference: Option<&str>) {
        let frame = encode(&ServerFrame::Ack {
            reference,
            offset: None,
        });
        self.write(ctx, frame);
    }

    fn data_fits(&mut self, data: &RawValue, r: Option<&str>, ctx: &mut Context<Self>) -> bool {
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
        ctx: &mut Context<Self>,
    ) -> Option<Addr<RoomActor>> {
        let addr = self.rooms.get(room).cloned();
        if addr.is_none() {
            self.send_error(ctx, r, ErrorCode::NotJoined, "join the room first");
        }
        addr
    }

    /// Whether the token allows this room (join and history); else tells the client.
    fn allowed(&mut self, room: &RoomName, r: Option<&str>, ctx: &mut Context<Self>) -> bool {
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
        ctx: &mut Context<Self>,
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
            link: self.link(ctx),
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
                    // The room has written `joined`.
                    Ok(()) => {
                        act.rooms.insert(room, addr);
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
        ctx: &mut Context<Self>,
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

    fn heartbeat(&mut self, ctx: &mut Context<Self>) {
        let timeout = Duration::from_millis(self.state.settings.heartbeat.timeout_ms);
        let stalled = self
            .socket
            .as_ref()
            .and_then(WsSocket::stalled_for)
            .is_some_and(|stalled| stalled >= timeout);
        if stalled {
            // The peer has taken nothing for the whole timeout: it stopped
            // reading, and waiting longer would only hold memory.
            self.cut(ctx);
        } else if self.last_heard.elapsed() > timeout {
            self.state.metrics.heartbeat_timeouts.inc();
            self.close_reason = "heartbeat timeout";
            self.closing = true;
            ctx.stop();
        } else if !self.closing {
            self.write_control(ctx, OpCode::Ping, b"");
        }
    }

    /// Drops the connection without sending what is queued.
    fn cut(&mut self, ctx: &mut Context<Self>) {
        if let Some(socket) = self.socket.as_ref() {
            socket.cut();
        }
        self.state.metrics.stalled_sockets_cut.inc();
        tracing::warn!("cut off a connection whose peer stopped reading");
        self.broken = true;
        self.closing = true;
        ctx.stop();
    }
}

/// The session's I/O, polled after every wake-up of the actor: reads and
/// handles client frames, then sends what is queued. Never completes while
/// the connection is open.
struct Io;

impl ActorFuture<WsSession> for Io {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut WsSession,
        ctx: &mut Context<WsSession>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        act.poll_io(ctx, task)
    }
}

/// A one-off send, for frames written outside [`Io`] and the mailbox
/// handler (timers, replies to the session's own requests), which [`Io`]
/// may already have been polled past in this wake-up.
struct Flush;

impl ActorFuture<WsSession> for Flush {
    type Output = ();

    fn poll(
        self: Pin<&mut Self>,
        act: &mut WsSession,
        ctx: &mut Context<WsSession>,
        task: &mut std::task::Context<'_>,
    ) -> Poll<()> {
        act.flush_scheduled = false;
        act.flush(ctx, task);
        Poll::Ready(())
    }
}

/// The frame sink of a session that has ended.
struct Ended;

impl FrameSink for Ended {
    fn take(&self, _frames: &crate::outbound::WireFrames) -> crate::outbound::Taken {
        crate::outbound::Taken::Closed
    }
}

impl Actor for WsSession {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.spawn(Io);
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
        self.state.hooks.emit(EventKind::SessionConnected, || {
            json!({"session": session, "user": self.user,
                   "ip": self.peer.map(|p| p.ip().to_string())})
        });
        // After `welcome`: direct messages go straight to the socket.
        let link = self.link(ctx);
        self.state.directory.register(&self.user, self.id, link);
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

    /// The connection outlives the actor by as long as its last bytes (the
    /// close frame) take to leave, at most `heartbeat.timeout_ms` without
    /// progress; the drain counts it until then.
    fn stopped(&mut self, _ctx: &mut Self::Context) {
        let Some(socket) = self.socket.take() else {
            return;
        };
        if self.broken {
            // Rooms stop writing to it; the socket closes with their last link.
            socket.end();
            return;
        }
        let guard = self.socket_guard.take();
        let stall = Duration::from_millis(self.state.settings.heartbeat.timeout_ms);
        let metrics = self.state.metrics.clone();
        actix_web::rt::spawn(async move {
            if socket.linger(stall).await.is_err() {
                metrics.stalled_sockets_cut.inc();
                tracing::warn!("cut off a connection whose peer stopped reading");
            }
            drop(guard);
        });
    }
}

/// Cleanup lives in `Drop`, not `stopped`, so it happens however the actor
/// ends (including when its worker shuts down without stopping it).
impl Drop for WsSession {
    fn drop(&mut self) {
        for addr in self.rooms.values() {
            addr.do_send(Leave { session: self.id });
        }
        self.state.directory.unregister(&self.user, self.id);
        self.state.metrics.connections.dec();
        self.state.hooks.emit(
            EventKind::SessionDisconnected,
            || json!({"session": self.id.to_string(), "user": self.user, "code": self.close_code}),
        );
        tracing::info!(session = %self.id, user = %self.user, reason = self.close_reason, "connection closed");
    }
}

impl Handler<Outbound> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        // The mailbox is always followed by the actor's items, `Io` among
        // them, in the same wake-up: no `Flush` needed.
        self.dispatching = true;
        self.handle_outbound(msg, ctx);
        self.dispatching = false;
    }
}

impl WsSession {
    fn handle_outbound(&mut self, msg: Outbound, ctx: &mut Context<Self>) {
        match msg {
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

impl WsSession {
    fn on_frame(&mut self, frame: Inbound, ctx: &mut Context<Self>) {
        self.last_heard = Instant::now();
        match frame {
            Inbound::Text(text) => self.on_text(&text, ctx),
            Inbound::Binary => self.send_error(
                ctx,
                None,
                ErrorCode::BadRequest,
                "binary frames are not accepted; send JSON text",
            ),
            Inbound::Ping(payload) => self.write_control(ctx, OpCode::Pong, &payload),
            Inbound::Pong => {}
            Inbound::Close(reason) => {
                self.close_reason = "closed by client";
                // 1005: a close frame without a code.
                self.close_code = reason.map_or(1005, |r| u16::from(r.code));
                self.closing = true;
                if let Some(socket) = self.socket.as_mut() {
                    socket.push_close(None);
                }
                ctx.stop();
            }
        }
    }

    /// Fails the connection as RFC 6455 asks: a close frame with the
    /// violation's code (1002, 1007 or 1009), then the close.
    fn violation(&mut self, violation: Violation, ctx: &mut Context<Self>) {
        tracing::debug!(session = %self.id, error = %violation, "websocket protocol violation");
        self.close(ctx, violation.close_code());
    }
}

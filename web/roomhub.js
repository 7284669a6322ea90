// roomhub.js: a dependency-free browser client for the roomhub wire protocol
// (version 1). Copy this one file into your app and import it as an ES module:
//
//   import { RoomHub } from "./roomhub.js";
//   const hub = new RoomHub({ user: "alice" });      // or { token: "<jwt>" }
//   hub.on("message", (m) => console.log(m.room, m.offset, m.user, m.data));
//   hub.on("state", (s) => console.log(s.state, s.delayMs));
//   hub.connect();
//   await hub.join("lobby");
//   const offset = await hub.publish("lobby", { text: "hello" });
//
// What it does for you:
// - reconnects by itself (exponential backoff with jitter), also after a
//   `shutdown` frame, close 1001 (draining) and close 1013 (too slow);
// - re-joins every room with `since`, so the app gets exactly the messages it
//   missed: it tracks per room the epoch and the last offset delivered, and
//   drops any message whose offset is not above it;
// - keeps publishes made while disconnected in a bounded queue and sends them
//   with idempotency keys, so a retry never stores a message twice;
// - waits out `rate_limited` errors and retries the queued publishes.
//
// Events (hub.on(name, fn) returns a function that removes the listener):
//   state        {state: "connecting"|"open"|"reconnecting"|"closed", attempt, delayMs?, retryAt?, code?, reason?}
//   welcome      the welcome frame {session, user, node, heartbeat_ms, protocol}
//   joined       {room, epoch, offset, recovered, resumed, epochChanged, historyCount, presence}
//   message      {room, offset, id, user, data, ts, replayed}   (never twice, in offset order)
//   typing       {room, user, active}
//   presence     {room, users: [{user, sessions}]}  (after joined, user_joined, user_left, presence)
//   user_joined  {room, user}
//   user_left    {room, user}
//   direct       {from, data, ts}
//   ratelimited  {retryAfterMs}
//   error        an `error` frame no pending request claimed {code, message, ...}
//   left         {room}

const ROOM_RE = /^[A-Za-z0-9._:-]{1,128}$/;

/** An Error with the protocol's error `code` (e.g. "forbidden", "queue_full"). */
export class HubError extends Error {
  constructor(code, message, frame) {
    super(message || code);
    this.name = "HubError";
    this.code = code;
    this.frame = frame || null;
  }
}

/** A random id usable as an idempotency key (≤ 64 chars). */
export function randomKey() {
  if (globalThis.crypto && typeof globalThis.crypto.randomUUID === "function") {
    return globalThis.crypto.randomUUID();
  }
  let s = "";
  for (let i = 0; i < 4; i++) s += Math.random().toString(36).slice(2, 10);
  return s.slice(0, 32);
}

function defaultUrl() {
  const loc = globalThis.location;
  if (!loc) throw new Error("RoomHub: pass options.url outside a browser page");
  return (loc.protocol === "https:" ? "wss://" : "ws://") + loc.host + "/ws";
}

export class RoomHub {
  /**
   * @param {object} [options]
   * @param {string} [options.url]        WebSocket URL of /ws (default: this page's host)
   * @param {string} [options.user]       user id in anonymous mode
   * @param {string} [options.token]      a JWT (its `sub` is the user)
   * @param {number} [options.history]    recent messages on a fresh join (0–200; hub default if unset)
   * @param {number} [options.minDelayMs] first reconnect delay (default 500)
   * @param {number} [options.maxDelayMs] reconnect delay cap (default 15000)
   * @param {number} [options.maxQueue]   publishes waiting or unacked, at most (default 100)
   * @param {number} [options.maxInFlight] publishes sent and not yet acked, at most (default 16)
   * @param {number} [options.requestTimeoutMs] timeout of history/presence/ping requests (default 15000)
   * @param {typeof WebSocket} [options.WebSocket] a WebSocket implementation (default: the global one)
   */
  constructor(options = {}) {
    this.options = {
      minDelayMs: 500,
      maxDelayMs: 15000,
      maxQueue: 100,
      maxInFlight: 16,
      requestTimeoutMs: 15000,
      ...options,
    };
    this.url = this.options.url || defaultUrl();
    this.WebSocketImpl = this.options.WebSocket || globalThis.WebSocket;
    this.state = "closed";
    this.user = null; // set by `welcome`
    this.session = null;
    this._listeners = new Map();
    this._ws = null;
    this._wanted = false; // connect() called and close() not
    this._attempt = 0; // failed connection attempts in a row
    this._retryTimer = null;
    this._retryAt = 0;
    this._heartbeat = null;
    this._lastHeard = 0;
    this._nextRef = 0;
    this._requests = new Map(); // ref -> {kind, resolve, reject, timer, entry?}
    /** room -> {epoch, last, joined, presence: Map, joinWaiters: [], history} */
    this._rooms = new Map();
    this._queue = []; // publishes waiting to be sent: {room, data, key, resolve, reject}
    this._pausedUntil = 0; // rate limited until (ms since epoch)
    this._window = this.options.maxInFlight; // publishes sent but not acked, at most
    this._pauseTimer = null;
  }

  // ---- events ----------------------------------------------------------

  on(event, fn) {
    if (!this._listeners.has(event)) this._listeners.set(event, new Set());
    this._listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }

  off(event, fn) {
    const set = this._listeners.get(event);
    if (set) set.delete(fn);
  }

  _emit(event, detail) {
    const set = this._listeners.get(event);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(detail);
      } catch (e) {
        // A failing listener must not break the client.
        setTimeout(() => {
          throw e;
        });
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, attempt: this._attempt, ...extra });
  }

  // ---- connection ------------------------------------------------------

  /** Opens the connection (and keeps it open until close()). */
  connect() {
    this._wanted = true;
    if (this._ws) return this;
    this._clearRetry();
    this._open();
    return this;
  }

  /** Closes for good: no reconnect; queued publishes are rejected. */
  close() {
    this._wanted = false;
    this._clearRetry();
    this._stopHeartbeat();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      this._detach(ws);
      try {
        ws.close(1000, "bye");
      } catch (_) {
        /* ignore */
      }
    }
    this._failRequests(new HubError("closed", "the client was closed"));
    for (const p of this._queue.splice(0)) p.reject(new HubError("closed", "the client was closed"));
    for (const room of this._rooms.values()) {
      room.joined = false;
      for (const w of room.joinWaiters.splice(0)) w.reject(new HubError("closed", "the client was closed"));
    }
    this._setState("closed", { reason: "closed by the app" });
  }

  /** Skips the current backoff wait and tries to connect now. */
  reconnectNow() {
    if (!this._wanted || this._ws) return;
    this._clearRetry();
    this._open();
  }

  get connected() {
    return this.state === "open";
  }

  _open() {
    const params = new URLSearchParams();
    if (this.options.token) params.set("token", this.options.token);
    else if (this.options.user) params.set("user", this.options.user);
    const qs = params.toString();
    const url = this.url + (qs ? (this.url.includes("?") ? "&" : "?") + qs : "");
    this._setState("connecting");
    let ws;
    try {
      ws = new this.WebSocketImpl(url);
    } catch (e) {
      this._ws = null;
      this._scheduleReconnect({ code: 0, reason: String(e) });
      return;
    }
    this._ws = ws;
    this._welcomed = false;
    this._draining = false;
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {
      /* onclose follows */
    };
  }

  _detach(ws) {
    ws.onmessage = null;
    ws.onclose = null;
    ws.onerror = null;
  }

  _onClose(ws, code, reason) {
    if (ws !== this._ws) return;
    this._detach(ws);
    this._ws = null;
    this._lost({ code, reason });
  }

  /** The connection is gone: keep what can be resumed, then reconnect. */
  _lost(info) {
    this._stopHeartbeat();
    for (const room of this._rooms.values()) room.joined = false;
    // In-flight publishes go back into the queue (same key: no duplicates).
    for (const [ref, req] of this._requests) {
      if (req.kind === "publish") {
        this._requests.delete(ref);
        this._requeue(req.entry);
      }
    }
    this._failRequests(new HubError("disconnected", "the connection was lost"));
    if (this._wanted) this._scheduleReconnect(info);
    else this._setState("closed", info);
  }

  _scheduleReconnect(info = {}) {
    this._attempt += 1;
    const { minDelayMs, maxDelayMs } = this.options;
    const cap = Math.min(maxDelayMs, minDelayMs * 2 ** (this._attempt - 1));
    // "Equal jitter": half fixed, half random, so reconnects of many clients spread out.
    const delayMs = Math.round(cap / 2 + Math.random() * (cap / 2));
    this._retryAt = Date.now() + delayMs;
    this._clearRetry();
    this._retryTimer = setTimeout(() => {
      this._retryTimer = null;
      if (this._wanted && !this._ws) this._open();
    }, delayMs);
    this._setState("reconnecting", { delayMs, retryAt: this._retryAt, ...info });
  }

  _clearRetry() {
    if (this._retryTimer) clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  /** App-level liveness: ping when quiet; drop a connection that stays silent. */
  _startHeartbeat(intervalMs) {
    this._stopHeartbeat();
    const every = Math.max(1000, intervalMs || 10000);
    this._heartbeat = setInterval(() => {
      const quiet = Date.now() - this._lastHeard;
      if (quiet > every * 3) {
        const ws = this._ws;
        if (ws) {
          this._detach(ws);
          this._ws = null;
          try {
            ws.close(4000, "no answer");
          } catch (_) {
            /* ignore */
          }
          this._lost({ code: 1006, reason: "no answer from the hub" });
        }
      } else if (quiet > every) {
        this._send({ type: "ping" });
      }
    }, every);
  }

  _stopHeartbeat() {
    if (this._heartbeat) clearInterval(this._heartbeat);
    this._heartbeat = null;
  }

  _send(frame) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) return false;
    ws.send(JSON.stringify(frame));
    return true;
  }

  _ref() {
    this._nextRef += 1;
    return "c" + this._nextRef;
  }

  /** Sends a frame with a fresh ref; resolves with the reply. */
  _request(kind, frame, { timeout = true, entry, room } = {}) {
    return new Promise((resolve, reject) => {
      const ref = this._ref();
      const req = { kind, resolve, reject, entry, room, ref, timer: null };
      if (kind === "join") this._rooms.get(room).joinRef = ref;
      if (timeout) {
        req.timer = setTimeout(() => {
          this._requests.delete(ref);
          reject(new HubError("timeout", `no reply to ${kind}`));
        }, this.options.requestTimeoutMs);
      }
      this._requests.set(ref, req);
      if (!this._send({ ...frame, ref })) {
        clearTimeout(req.timer);
        this._requests.delete(ref);
        reject(new HubError("disconnected", "not connected"));
      }
    });
  }

  /** Ends every pending request. Joins are not rejected: their rooms are
   * re-joined on reconnect (or their waiters rejected by close()). */
  _failRequests(error) {
    for (const [ref, req] of this._requests) {
      clearTimeout(req.timer);
      this._requests.delete(ref);
      if (req.kind === "publish") req.entry.reject(error);
      else if (req.kind !== "join") req.reject(error);
    }
  }

  // ---- frames ----------------------------------------------------------

  _onFrame(ws, raw) {
    if (ws !== this._ws) return;
    this._lastHeard = Date.now();
    let f;
    try {
      f = JSON.parse(raw);
    } catch (_) {
      return;
    }
    if (!f || typeof f !== "object") return;
    const req = f.ref != null ? this._requests.get(f.ref) : undefined;
    if (req && f.type !== "message") {
      this._requests.delete(f.ref);
      clearTimeout(req.timer);
    }
    switch (f.type) {
      case "welcome":
        return this._onWelcome(f);
      case "joined":
        return this._onJoined(f);
      case "message":
        return this._deliver(f, false);
      case "ack":
        if (req && req.kind === "publish") {
          req.entry.resolve(f.offset);
          // After a rate limit the window opens up again, ack by ack.
          this._window = Math.min(this.options.maxInFlight, this._window * 2);
          this._flush();
        } else if (req) req.resolve(f);
        return;
      case "error":
        return this._onError(f, req);
      case "typing":
        if (this._rooms.has(f.room)) this._emit("typing", { room: f.room, user: f.user, active: !!f.active });
        return;
      case "user_joined":
      case "user_left":
        return this._onPresenceChange(f);
      case "presence": {
        const room = this._rooms.get(f.room);
        if (room) this._setPresence(f.room, room, f.users || []);
        if (req) req.resolve(f.users || []);
        return;
      }
      case "history":
        if (req) req.resolve(f.messages || []);
        return;
      case "direct":
        this._emit("direct", { from: f.from, data: f.data, ts: f.ts });
        return;
      case "pong":
        if (req) req.resolve(f);
        return;
      case "shutdown":
        // The node is draining; it closes with 1001 next and we reconnect.
        this._draining = true;
        return;
      default:
        return;
    }
  }

  _onWelcome(f) {
    this._welcomed = true;
    this._attempt = 0;
    // A new connection's rate-limit bucket starts full.
    this._pausedUntil = 0;
    this._window = this.options.maxInFlight;
    this.user = f.user;
    this.session = f.session;
    this._emit("welcome", f);
    this._setState("open", { user: f.user, session: f.session, node: f.node });
    this._startHeartbeat(f.heartbeat_ms);
    // Re-join every room, resuming with `since` where we know the epoch.
    for (const [name, room] of this._rooms) this._sendJoin(name, room);
  }

  _sendJoin(name, room) {
    const frame = { type: "join", room: name };
    if (room.epoch != null) frame.since = { epoch: room.epoch, offset: room.last };
    const history = room.history != null ? room.history : this.options.history;
    if (history != null) frame.history = history;
    room.resuming = room.epoch != null;
    this._request("join", frame, { timeout: false, room: name }).catch(() => {});
  }

  _onJoined(f) {
    const room = this._rooms.get(f.room);
    if (!room) return;
    const epochChanged = room.epoch != null && room.epoch !== f.epoch;
    if (room.epoch !== f.epoch) {
      room.epoch = f.epoch;
      room.last = 0;
    }
    room.joined = true;
    const detail = {
      room: f.room,
      epoch: f.epoch,
      offset: f.offset,
      recovered: !!f.recovered,
      resumed: !!room.resuming,
      epochChanged,
      historyCount: (f.history || []).length,
      presence: f.presence || [],
    };
    this._emit("joined", detail);
    for (const m of f.history || []) this._deliver({ ...m, room: f.room }, true);
    // Messages after `offset` come live; older ones we did not get are gone
    // (pruned) or were not asked for: do not ask for them on the next resume.
    if (f.offset > room.last) room.last = f.offset;
    this._setPresence(f.room, room, f.presence || []);
    for (const w of room.joinWaiters.splice(0)) w.resolve(detail);
    this._flush();
  }

  _deliver(m, replayed) {
    const room = this._rooms.get(m.room);
    if (!room || !room.joined) return;
    if (typeof m.offset !== "number" || m.offset <= room.last) return; // seen already
    room.last = m.offset;
    this._emit("message", { ...m, replayed });
  }

  _onError(f, req) {
    if (req) {
      if (req.kind === "publish") {
        if (f.code === "rate_limited") {
          this._requeue(req.entry);
          this._pause(f.retry_after_ms || 1000);
          return;
        }
        req.entry.reject(new HubError(f.code, f.message, f));
        this._flush();
        return;
      }
      if (req.kind === "join") {
        // Refused (forbidden, room_limit, …): forget the room.
        const room = this._rooms.get(req.room);
        if (room && room.joinRef === req.ref) {
          this._rooms.delete(req.room);
          const err = new HubError(f.code, f.message, f);
          for (const w of room.joinWaiters.splice(0)) w.reject(err);
          this._emit("left", { room: req.room, error: err });
          this._flush(); // rejects its queued publishes
        }
        return;
      }
      req.reject(new HubError(f.code, f.message, f));
      return;
    }
    // The hub tells a session whose room actor restarted to join again
    // (`room` names it; older hubs only said so in the message).
    const m = /^room (\S+) restarted/.exec(f.message || "");
    const restarted = f.room || (m && m[1]);
    if (restarted && this._rooms.has(restarted)) {
      const room = this._rooms.get(restarted);
      room.joined = false;
      this._sendJoin(restarted, room);
      return;
    }
    if (f.code === "rate_limited") {
      this._pause(f.retry_after_ms || 1000);
      return;
    }
    this._emit("error", f);
  }

  /** Rate limited: hold the queue for `ms`, then resume one at a time. */
  _pause(ms) {
    this._pausedUntil = Math.max(this._pausedUntil, Date.now() + ms);
    this._window = 1;
    this._emit("ratelimited", { retryAfterMs: ms });
    this._wakeAt(this._pausedUntil);
  }

  _wakeAt(at) {
    if (this._pauseTimer) clearTimeout(this._pauseTimer);
    this._pauseTimer = setTimeout(() => {
      this._pauseTimer = null;
      this._flush();
    }, Math.max(0, at - Date.now()) + 5);
  }

  _onPresenceChange(f) {
    const room = this._rooms.get(f.room);
    if (!room) return;
    if (f.type === "user_joined") {
      if (!room.presence.has(f.user)) room.presence.set(f.user, 1);
    } else {
      room.presence.delete(f.user);
    }
    this._emit(f.type, { room: f.room, user: f.user });
    this._emitPresence(f.room, room);
  }

  _setPresence(name, room, users) {
    room.presence = new Map(users.map((u) => [u.user, u.sessions]));
    this._emitPresence(name, room);
  }

  _emitPresence(name, room) {
    const users = [...room.presence].map(([user, sessions]) => ({ user, sessions }));
    users.sort((a, b) => a.user.localeCompare(b.user));
    this._emit("presence", { room: name, users });
  }

  // ---- publishing ------------------------------------------------------

  _flush() {
    if (this.state !== "open") return;
    if (Date.now() < this._pausedUntil) {
      if (!this._pauseTimer) this._wakeAt(this._pausedUntil);
      return;
    }
    const keep = [];
    let inflight = this._countInflight();
    while (this._queue.length && inflight < this._window) {
      const entry = this._queue.shift();
      const room = this._rooms.get(entry.room);
      if (!room) {
        entry.reject(new HubError("not_joined", "the room was left"));
        continue;
      }
      if (!room.joined) {
        keep.push(entry); // goes out once the (re-)join is done
        continue;
      }
      inflight += 1;
      const frame = { type: "publish", room: entry.room, data: entry.data, key: entry.key };
      this._request("publish", frame, { timeout: false, entry }).catch(() => {
        // Not sent (the socket is closing): keep it for the next connection.
        this._requeue(entry);
      });
    }
    for (const entry of keep) this._requeue(entry);
  }

  /** Puts a publish back into the queue, keeping the order they were made in. */
  _requeue(entry) {
    let i = this._queue.length;
    while (i > 0 && this._queue[i - 1].seq > entry.seq) i--;
    this._queue.splice(i, 0, entry);
  }

  /**
   * Publishes `data` to a joined room. Resolves with the message's offset once
   * the hub acked it (durable); rejects with a HubError carrying the code.
   * While disconnected the publish waits in a bounded queue.
   */
  publish(room, data, { key } = {}) {
    if (!this._rooms.has(room)) return Promise.reject(new HubError("not_joined", "join the room first"));
    const k = key || randomKey();
    if (k.length > 64) return Promise.reject(new HubError("bad_request", "key is over 64 chars"));
    return new Promise((resolve, reject) => {
      const pending = this._queue.length + this._countInflight();
      if (pending >= this.options.maxQueue) {
        reject(new HubError("queue_full", `more than ${this.options.maxQueue} publishes are waiting`));
        return;
      }
      this._seq = (this._seq || 0) + 1;
      this._queue.push({ room, data, key: k, seq: this._seq, resolve, reject });
      this._flush();
    });
  }

  /** How many publishes are not acked yet (queued or in flight). */
  get pending() {
    return this._queue.length + this._countInflight();
  }

  _countInflight() {
    let n = 0;
    for (const req of this._requests.values()) if (req.kind === "publish") n++;
    return n;
  }

  // ---- rooms -----------------------------------------------------------

  /**
   * Joins a room (now, or as soon as connected). Resolves with the `joined`
   * detail; the room's recent history arrives as `message` events.
   * @param {string} room
   * @param {{history?: number}} [opts] recent messages to replay on a fresh join
   */
  join(room, opts = {}) {
    if (!ROOM_RE.test(room)) return Promise.reject(new HubError("bad_request", "invalid room name"));
    let r = this._rooms.get(room);
    if (r && r.joined) {
      return Promise.resolve({ room, epoch: r.epoch, offset: r.last, recovered: true, resumed: true, epochChanged: false });
    }
    return new Promise((resolve, reject) => {
      if (!r) {
        r = { epoch: null, last: 0, joined: false, presence: new Map(), joinWaiters: [], history: opts.history };
        this._rooms.set(room, r);
        if (this.state === "open") this._sendJoin(room, r);
      }
      r.joinWaiters.push({ resolve, reject });
    });
  }

  /** Leaves a room; it is not re-joined on reconnect. */
  leave(room) {
    const r = this._rooms.get(room);
    if (!r) return Promise.resolve();
    this._rooms.delete(room);
    for (const w of r.joinWaiters.splice(0)) w.reject(new HubError("left", "the room was left"));
    this._queue = this._queue.filter((p) => {
      if (p.room !== room) return true;
      p.reject(new HubError("not_joined", "the room was left"));
      return false;
    });
    this._emit("left", { room });
    if (this.state !== "open" || !r.joined) return Promise.resolve();
    return this._request("leave", { type: "leave", room }).then(
      () => undefined,
      () => undefined,
    );
  }

  /** Rooms this client is in (or will re-join). */
  get rooms() {
    return [...this._rooms.keys()];
  }

  /** Users in a joined room as last known: [{user, sessions}]. */
  presenceOf(room) {
    const r = this._rooms.get(room);
    return r ? [...r.presence].map(([user, sessions]) => ({ user, sessions })) : [];
  }

  /** Tells the room this user is (or stopped) typing. Fire and forget. */
  typing(room, active = true) {
    const r = this._rooms.get(room);
    if (!r || !r.joined) return false;
    return this._send({ type: "typing", room, active: !!active });
  }

  /** Asks the hub who is in the room: resolves with [{user, sessions}]. */
  presence(room) {
    return this._request("presence", { type: "presence", room });
  }

  /**
   * Older messages: the newest `limit` below offset `before` (or the newest
   * overall), oldest first. An empty list means there are none older.
   */
  history(room, { before, limit } = {}) {
    const frame = { type: "history", room };
    if (before != null) frame.before = before;
    if (limit != null) frame.limit = limit;
    return this._request("history", frame);
  }

  /** Sends `data` to every session of user `to`. */
  direct(to, data) {
    return this._request("direct", { type: "direct", to, data });
  }

  /** Round trip to the hub. */
  ping() {
    return this._request("ping", { type: "ping" });
  }
}

export default RoomHub;

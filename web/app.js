// The roomhub chat page. Every piece of user data is put into the page with
// textContent (never innerHTML), so a message is always shown as text.
import { RoomHub } from "./roomhub.js";

const USER_RE = /^[A-Za-z0-9._-]{1,64}$/;
const ROOM_RE = /^[A-Za-z0-9._:-]{1,128}$/;
const PAGE = 50; // messages per history page
const TYPING_SEND_EVERY_MS = 3000; // re-send "typing" while typing
const TYPING_IDLE_MS = 4000; // stop "typing" after this long without input
const TYPING_SHOW_MS = 6000; // forget someone's "typing" after this long
const GROUP_WINDOW_MS = 5 * 60 * 1000; // same author within this: one group

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
};

const ui = {
  login: $("login"),
  loginForm: $("login-form"),
  loginUser: $("login-user"),
  loginRoom: $("login-room"),
  loginProblem: $("login-problem"),
  app: $("app"),
  conn: $("conn-state"),
  me: $("me-name"),
  rooms: $("rooms"),
  joinForm: $("join-form"),
  joinRoom: $("join-room"),
  title: $("room-title"),
  retry: $("retry-now"),
  notice: $("notice"),
  scroller: $("scroller"),
  messages: $("messages"),
  loadOlder: $("load-older"),
  historyStart: $("history-start"),
  typing: $("typing"),
  composer: $("composer"),
  input: $("composer-input"),
  people: $("people"),
  peopleToggle: $("toggle-people"),
  peopleCount: $("people-count"),
  presence: $("presence"),
};

/** @type {RoomHub} */
let hub = null;
let me = null; // our user id (from welcome)
let active = null; // the room shown
/** room name -> per-room view state */
const rooms = new Map();

// ---- start -------------------------------------------------------------

const params = new URLSearchParams(location.search);
const urlUser = params.get("user");
const urlRoom = params.get("room");
const urlToken = params.get("token");

function start(user, room) {
  ui.login.hidden = true;
  ui.app.hidden = false;
  hub = new RoomHub(urlToken ? { token: urlToken } : { user, history: PAGE });
  me = user || null;
  ui.me.textContent = user || "…";
  hub.on("state", onState);
  hub.on("welcome", (w) => {
    me = w.user;
    ui.me.textContent = w.user;
    renderPresence();
  });
  hub.on("joined", onJoined);
  hub.on("message", onMessage);
  hub.on("presence", onPresence);
  hub.on("typing", onTyping);
  hub.on("direct", (d) => notice(`Direct message from ${d.from}: ${textOf(d.data)}`, 8000));
  hub.on("ratelimited", (r) =>
    notice(`Sending too fast: waiting ${Math.ceil(r.retryAfterMs / 1000)} s before sending the rest.`, r.retryAfterMs + 1000),
  );
  hub.on("left", (l) => {
    if (l.error) notice(`Could not join ${l.room}: ${l.error.code}`, 6000);
    removeRoom(l.room);
  });
  hub.on("error", (f) => notice(`Hub error: ${f.code}${f.message ? ` (${f.message})` : ""}`, 6000));
  hub.connect();
  openRoom(room);
}

if (urlToken || (urlUser && USER_RE.test(urlUser) && urlRoom && ROOM_RE.test(urlRoom))) {
  start(urlUser, urlRoom && ROOM_RE.test(urlRoom) ? urlRoom : "lobby");
} else {
  ui.login.hidden = false;
  ui.loginUser.value = urlUser || localStorage.getItem("roomhub.user") || "";
  if (urlRoom) ui.loginRoom.value = urlRoom;
  // A name from the link that the hub would refuse: say why instead of
  // silently asking again.
  showLoginProblem(urlUser, urlRoom);
  (ui.loginUser.value ? ui.loginRoom : ui.loginUser).focus();
  ui.loginForm.addEventListener("submit", (e) => {
    e.preventDefault();
    const user = ui.loginUser.value.trim();
    const room = ui.loginRoom.value.trim();
    if (showLoginProblem(user, room)) return;
    try {
      localStorage.setItem("roomhub.user", user);
    } catch (_) {
      /* private mode */
    }
    start(user, room);
  });
}

/**
 * Shows why `user` or `room` cannot be used (the hub's name rules), if so.
 * `null` means "not given" and is not a problem here.
 * @returns {boolean} whether there was a problem
 */
function showLoginProblem(user, room) {
  const problems = [];
  if (user != null && !USER_RE.test(user)) {
    problems.push(
      `"${user}" cannot be a name: use 1–64 letters, digits, dots, dashes or underscores (no spaces).`,
    );
  }
  if (room != null && !ROOM_RE.test(room)) {
    problems.push(
      `"${room}" cannot be a room: use 1–128 letters, digits, dots, dashes, underscores or colons.`,
    );
  }
  ui.loginProblem.textContent = problems.join(" ");
  ui.loginProblem.hidden = problems.length === 0;
  return problems.length > 0;
}

// ---- rooms -------------------------------------------------------------

function openRoom(name) {
  if (!ROOM_RE.test(name)) {
    notice(`"${name}" is not a valid room name (letters, digits, . _ : -).`, 5000);
    return;
  }
  if (!rooms.has(name)) {
    const list = el("ol", "message-list");
    list.dataset.room = name;
    list.hidden = true;
    ui.messages.append(list);
    const tab = el("li", "room-tab");
    tab.dataset.room = name;
    const pick = el("button", "room-pick");
    pick.type = "button";
    pick.append(el("span", "hash", "#"), el("span", "room-name", name), el("span", "badge"));
    pick.addEventListener("click", () => showRoom(name));
    const leave = el("button", "room-leave", "×");
    leave.type = "button";
    leave.title = `Leave ${name}`;
    leave.setAttribute("aria-label", `Leave ${name}`);
    leave.addEventListener("click", () => hub.leave(name));
    tab.append(pick, leave);
    ui.rooms.append(tab);
    rooms.set(name, {
      name,
      list,
      tab,
      unread: 0,
      oldest: null,
      exhausted: false,
      loadingOlder: false,
      joinedOnce: false,
      presence: [],
      typing: new Map(), // user -> timer
      typingSent: 0,
      typingIdle: null,
      draft: "",
    });
    // A refused join comes back as a `left` event (handled in start()).
    hub.join(name).catch(() => {});
  }
  showRoom(name);
}

function removeRoom(name) {
  const r = rooms.get(name);
  if (!r) return;
  for (const t of r.typing.values()) clearTimeout(t);
  r.list.remove();
  r.tab.remove();
  rooms.delete(name);
  if (active === name) {
    active = null;
    const next = rooms.keys().next();
    if (!next.done) showRoom(next.value);
    else showEmpty();
  }
}

function showEmpty() {
  ui.title.textContent = "No room";
  ui.presence.replaceChildren();
  ui.peopleCount.textContent = "0";
  ui.typing.textContent = "";
  ui.loadOlder.hidden = true;
  ui.historyStart.hidden = true;
  ui.input.disabled = true;
  ui.input.placeholder = "Join a room to start chatting";
  setUrl(null);
}

function showRoom(name) {
  const r = rooms.get(name);
  if (!r) return;
  if (active && rooms.has(active)) rooms.get(active).draft = ui.input.value;
  active = name;
  for (const [n, other] of rooms) {
    other.list.hidden = n !== name;
    other.tab.classList.toggle("active", n === name);
    other.tab.querySelector(".room-pick").setAttribute("aria-current", n === name ? "true" : "false");
  }
  r.unread = 0;
  renderBadge(r);
  ui.title.textContent = `# ${name}`;
  ui.input.disabled = false;
  ui.input.value = r.draft;
  autosize();
  updatePlaceholder();
  renderOlderControls(r);
  renderPresence();
  renderTyping();
  scrollToBottom();
  setUrl(name);
  if (matchMedia("(min-width: 721px)").matches) ui.input.focus();
}

function setUrl(room) {
  const p = new URLSearchParams(location.search);
  if (me && !urlToken) p.set("user", me);
  if (room) p.set("room", room);
  else p.delete("room");
  history.replaceState(null, "", `${location.pathname}?${p}`);
}

function renderBadge(r) {
  const badge = r.tab.querySelector(".badge");
  badge.textContent = r.unread ? String(r.unread > 99 ? "99+" : r.unread) : "";
  badge.hidden = !r.unread;
}

ui.joinForm.addEventListener("submit", (e) => {
  e.preventDefault();
  const name = ui.joinRoom.value.trim();
  if (!name) return;
  ui.joinRoom.value = "";
  openRoom(name);
});

// ---- hub events --------------------------------------------------------

let countdown = null;

function onState(s) {
  ui.conn.dataset.state = s.state;
  clearInterval(countdown);
  countdown = null;
  ui.retry.hidden = s.state !== "reconnecting";
  if (s.state === "connecting") ui.conn.textContent = s.attempt ? "Reconnecting…" : "Connecting…";
  else if (s.state === "open") ui.conn.textContent = "Connected";
  else if (s.state === "closed") ui.conn.textContent = "Disconnected";
  else if (s.state === "reconnecting") {
    const tick = () => {
      const secs = Math.max(0, Math.ceil((s.retryAt - Date.now()) / 1000));
      ui.conn.textContent = `Reconnecting in ${secs} s`;
    };
    tick();
    countdown = setInterval(tick, 250);
  }
  updatePlaceholder();
}

ui.retry.addEventListener("click", () => hub && hub.reconnectNow());

function onJoined(j) {
  const r = rooms.get(j.room);
  if (!r) return;
  if (j.epochChanged) {
    // The room's history was reset on the hub: old offsets mean nothing now.
    r.list.replaceChildren();
    r.oldest = null;
    r.exhausted = false;
    if (j.room === active) notice(`The history of #${j.room} was reset on the server.`, 8000);
  }
  if (j.resumed && !j.recovered && !j.epochChanged && j.room === active) {
    notice(`Some messages of #${j.room} from while you were away are no longer kept.`, 8000);
  }
  // A fresh join that got less than a page of history has it all.
  if (!j.resumed && !r.joinedOnce && j.historyCount < PAGE) r.exhausted = true;
  r.joinedOnce = true;
  if (j.room === active) renderOlderControls(r);
}

function onMessage(m) {
  const r = rooms.get(m.room);
  if (!r) return;
  const stick = m.room === active && nearBottom();
  const node = renderMessage(m);
  const firstPending = r.list.querySelector(":scope > .pending");
  r.list.insertBefore(node, firstPending);
  regroup(node);
  regroup(node.nextElementSibling);
  if (r.oldest == null || m.offset < r.oldest) r.oldest = m.offset;
  if (m.room === active) {
    renderOlderControls(r);
    if (stick || m.user === me) scrollToBottom();
  } else if (!m.replayed) {
    r.unread += 1;
    renderBadge(r);
  }
  // A message ends its author's "typing".
  clearTyping(r, m.user);
}

function onPresence(p) {
  const r = rooms.get(p.room);
  if (!r) return;
  r.presence = p.users;
  if (p.room === active) renderPresence();
}

function onTyping(t) {
  const r = rooms.get(t.room);
  if (!r || t.user === me) return;
  if (t.active) {
    clearTimeout(r.typing.get(t.user));
    r.typing.set(
      t.user,
      setTimeout(() => clearTyping(r, t.user), TYPING_SHOW_MS),
    );
    if (t.room === active) renderTyping();
  } else {
    clearTyping(r, t.user);
  }
}

function clearTyping(r, user) {
  if (!r.typing.has(user)) return;
  clearTimeout(r.typing.get(user));
  r.typing.delete(user);
  if (r.name === active) renderTyping();
}

// ---- rendering ---------------------------------------------------------

function textOf(data) {
  if (data && typeof data === "object" && typeof data.text === "string") return data.text;
  if (typeof data === "string") return data;
  return null;
}

function hue(name) {
  let h = 0;
  for (let i = 0; i < name.length; i++) h = (h * 31 + name.charCodeAt(i)) >>> 0;
  return h % 360;
}

function avatar(user) {
  const a = el("span", "avatar", (user || "?").charAt(0).toUpperCase());
  a.style.backgroundColor = `hsl(${hue(user || "?")} 55% 45%)`;
  a.setAttribute("aria-hidden", "true");
  return a;
}

function timeLabel(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function renderMessage(m) {
  const li = el("li", "msg");
  li.dataset.offset = String(m.offset);
  li.dataset.user = m.user;
  li.dataset.ts = String(m.ts || 0);
  if (m.user === me) li.classList.add("mine");
  const body = el("div", "msg-body");
  const meta = el("div", "msg-meta");
  const who = el("span", "msg-user", m.user);
  who.style.color = `hsl(${hue(m.user)} 55% 40%)`;
  const time = el("time", "msg-time", m.ts ? timeLabel(m.ts) : "");
  if (m.ts) {
    time.dateTime = new Date(m.ts).toISOString();
    time.title = new Date(m.ts).toLocaleString();
  }
  meta.append(who, time);
  const text = textOf(m.data);
  const content =
    text != null ? el("div", "msg-text", text) : el("pre", "msg-text msg-data", JSON.stringify(m.data, null, 2));
  body.append(meta, content);
  li.append(avatar(m.user), body);
  return li;
}

/** Hides avatar and name of a message that follows one by the same author. */
function regroup(node) {
  if (!node || !node.classList.contains("msg") || node.classList.contains("pending")) return;
  const prev = node.previousElementSibling;
  const cont =
    prev &&
    prev.classList.contains("msg") &&
    !prev.classList.contains("pending") &&
    prev.dataset.user === node.dataset.user &&
    Number(node.dataset.ts) - Number(prev.dataset.ts) < GROUP_WINDOW_MS;
  node.classList.toggle("cont", !!cont);
}

function renderPending(room, text) {
  const r = rooms.get(room);
  const li = el("li", "msg pending mine");
  li.dataset.user = me || "";
  const body = el("div", "msg-body");
  const meta = el("div", "msg-meta");
  meta.append(el("span", "msg-user", me || ""), el("span", "msg-status", hub.connected ? "sending…" : "waiting for connection…"));
  body.append(meta, el("div", "msg-text", text));
  li.append(avatar(me || "?"), body);
  r.list.append(li);
  if (room === active) scrollToBottom();
  return li;
}

function renderPresence() {
  const r = active && rooms.get(active);
  const users = r ? r.presence : [];
  ui.peopleCount.textContent = String(users.length);
  const items = users.map((u) => {
    const li = el("li", "person");
    li.dataset.user = u.user;
    const name = el("span", "person-name", u.user);
    li.append(el("span", "dot"), avatar(u.user), name);
    if (u.user === me) li.append(el("span", "muted you", "(you)"));
    if (u.sessions > 1) li.title = `${u.sessions} connections`;
    return li;
  });
  ui.presence.replaceChildren(...items);
}

function renderTyping() {
  const r = active && rooms.get(active);
  const who = r ? [...r.typing.keys()] : [];
  let line = "";
  if (who.length === 1) line = `${who[0]} is typing…`;
  else if (who.length === 2) line = `${who[0]} and ${who[1]} are typing…`;
  else if (who.length > 2) line = "Several people are typing…";
  ui.typing.textContent = line;
}

function renderOlderControls(r) {
  ui.loadOlder.hidden = r.exhausted;
  ui.loadOlder.disabled = r.loadingOlder;
  ui.loadOlder.textContent = r.loadingOlder ? "Loading…" : "Load older messages";
  ui.historyStart.hidden = !r.exhausted;
}

let noticeTimer = null;
function notice(text, ms = 4000) {
  ui.notice.textContent = text;
  ui.notice.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => {
    ui.notice.hidden = true;
  }, ms);
}

function nearBottom() {
  const s = ui.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

function scrollToBottom() {
  ui.scroller.scrollTop = ui.scroller.scrollHeight;
}

function updatePlaceholder() {
  if (!active) return;
  ui.input.placeholder =
    hub && hub.connected ? `Message #${active}` : `Message #${active} (sent when reconnected)`;
}

// ---- scroll-back -------------------------------------------------------

async function loadOlder() {
  const r = active && rooms.get(active);
  if (!r || r.loadingOlder || r.exhausted || !hub.connected) return;
  r.loadingOlder = true;
  renderOlderControls(r);
  try {
    const opts = { limit: PAGE };
    if (r.oldest != null) opts.before = r.oldest;
    const older = await hub.history(r.name, opts);
    const fresh = older.filter((m) => r.oldest == null || m.offset < r.oldest);
    if (fresh.length === 0) {
      r.exhausted = true;
    } else {
      const s = ui.scroller;
      const before = s.scrollHeight - s.scrollTop;
      const frag = document.createDocumentFragment();
      for (const m of fresh) frag.append(renderMessage({ ...m, room: r.name }));
      const oldFirst = r.list.firstElementChild;
      r.list.prepend(frag);
      for (let n = r.list.firstElementChild; n && n !== oldFirst; n = n.nextElementSibling) regroup(n);
      regroup(oldFirst);
      r.oldest = fresh[0].offset;
      if (r.name === active) s.scrollTop = s.scrollHeight - before; // keep the view still
    }
  } catch (e) {
    notice(`Could not load older messages: ${e.code || e.message}`);
  } finally {
    r.loadingOlder = false;
    if (r.name === active) renderOlderControls(r);
  }
}

ui.loadOlder.addEventListener("click", loadOlder);
ui.scroller.addEventListener("scroll", () => {
  if (ui.scroller.scrollTop < 40) loadOlder();
});

// ---- composer ----------------------------------------------------------

function autosize() {
  const input = ui.input;
  input.style.height = "auto";
  const borders = input.offsetHeight - input.clientHeight;
  const want = input.scrollHeight + borders;
  input.style.height = `${Math.min(want, 160)}px`;
  input.style.overflowY = want > 160 ? "auto" : "hidden";
}

function stopTyping(r) {
  clearTimeout(r.typingIdle);
  r.typingIdle = null;
  if (r.typingSent) hub.typing(r.name, false);
  r.typingSent = 0;
}

ui.input.addEventListener("input", () => {
  autosize();
  const r = active && rooms.get(active);
  if (!r) return;
  if (!ui.input.value.trim()) {
    stopTyping(r);
    return;
  }
  const now = Date.now();
  if (now - r.typingSent > TYPING_SEND_EVERY_MS && hub.typing(r.name, true)) r.typingSent = now;
  clearTimeout(r.typingIdle);
  r.typingIdle = setTimeout(() => stopTyping(r), TYPING_IDLE_MS);
});

ui.input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    send();
  }
});

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});

function send() {
  const r = active && rooms.get(active);
  const text = ui.input.value;
  if (!r || !text.trim()) return;
  ui.input.value = "";
  r.draft = "";
  autosize();
  stopTyping(r);
  const pending = renderPending(r.name, text);
  hub.publish(r.name, { text }).then(
    () => pending.remove(),
    (e) => {
      pending.classList.add("failed");
      pending.querySelector(".msg-status").textContent = `not sent (${e.code || e.message})`;
    },
  );
}

// Pending messages say whether they wait for the connection.
setInterval(() => {
  if (!hub) return;
  const label = hub.connected ? "sending…" : "waiting for connection…";
  for (const s of document.querySelectorAll(".pending:not(.failed) .msg-status")) s.textContent = label;
}, 500);

// ---- people panel (phones) ---------------------------------------------

ui.peopleToggle.addEventListener("click", () => {
  const open = !ui.people.classList.contains("open");
  ui.people.classList.toggle("open", open);
  ui.peopleToggle.setAttribute("aria-expanded", String(open));
});

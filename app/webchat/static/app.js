// The web chat page: the UI over wire.js's Session. Messages are kept by id, so a
// message replayed after a resume (delivery is at least once) shows once, and each
// conversation shows them in id order. Untrusted text only ever goes in textContent.

import { Session, ServerError } from "./wire.js";

const session = new Session();
const $ = (id) => document.getElementById(id);

const convs = new Map(); // "u:<user>" | "r:<room>" -> conversation
const contacts = new Map(); // user -> {status, state, text}
const rooms = new Map(); // room id -> name
const invites = new Map(); // room id -> {name, from}
const readBy = new Map(); // msg id -> Set of users who read it
let current = null;
let typingSentAt = 0;
const typingShown = new Map(); // conversation key -> {who, timer}

// ---- conversations ------------------------------------------------------------------
function keyOf(m) {
  if (m.room !== undefined && m.room !== null) return `r:${m.room}`;
  return `u:${m.from === session.user ? m.to : m.from}`;
}

function conv(key) {
  let c = convs.get(key);
  if (!c) {
    const isRoom = key.startsWith("r:");
    const target = isRoom ? Number(key.slice(2)) : key.slice(2);
    c = {
      key, isRoom, target, messages: new Map(), pending: new Map(), unread: 0,
      oldest: null, more: true, loaded: false, readSent: new Set(),
    };
    convs.set(key, c);
  }
  return c;
}

function titleOf(c) {
  return c.isRoom ? `# ${rooms.get(c.target) || invites.get(c.target)?.name || "room"} (${c.target})` : c.target;
}

function addMessage(m, live) {
  const c = conv(keyOf(m));
  if (m.cmid) c.pending.delete(m.cmid);
  if (c.messages.has(m.id)) return;
  c.messages.set(m.id, { id: m.id, from: m.from, body: m.body, ts: m.ts });
  if (c.oldest === null || m.id < c.oldest) c.oldest = m.id;
  if (live && m.from !== session.user && c !== current) c.unread += 1;
  renderChats();
  if (c === current) renderMessages();
}

function target(c) {
  return c.isRoom ? { room: c.target } : { to: c.target };
}

async function openConv(key) {
  // Focus goes to the message box at the end, unless the user has moved it meanwhile
  // (typing in the invite box while the history loads must stay in the invite box).
  const focusedAtStart = document.activeElement;
  current = conv(key);
  current.unread = 0;
  $("conv-title").textContent = titleOf(current);
  $("compose").hidden = false;
  $("invite-form").hidden = !current.isRoom;
  $("typing").textContent = "";
  renderChats();
  renderMessages();
  if (!current.loaded) {
    current.loaded = true;
    await loadOlder(current);
  }
  const focused = document.activeElement;
  if (focused === focusedAtStart || focused === document.body || focused === null) $("body").focus();
}

async function loadOlder(c) {
  const fields = c.isRoom ? { room: c.target } : { with: c.target };
  if (c.oldest !== null) fields.before = c.oldest;
  fields.limit = 50;
  try {
    const page = await session.request("history", fields);
    for (const m of page.messages) addMessage(m, false);
    c.more = page.more;
  } catch (err) {
    c.loaded = false;
    showSideError(err);
  }
  if (c === current) renderMessages();
}

// ---- rendering ----------------------------------------------------------------------
function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("data-") || name.startsWith("aria-")) node.setAttribute(name, value);
    else node[name] = value;
  }
  node.append(...children);
  return node;
}

function renderMessages() {
  const list = $("messages");
  if (!current) {
    list.replaceChildren();
    return;
  }
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  const items = [...current.messages.values()].sort((a, b) => a.id - b.id).map((m) => {
    const own = m.from === session.user;
    const readers = readBy.get(m.id);
    const meta = new Date(m.ts).toLocaleTimeString() + (own && readers ? ` · read by ${[...readers].join(", ")}` : "");
    return el(
      "li",
      { className: own ? "msg own" : "msg", "data-id": String(m.id), "data-from": m.from },
      el("span", { className: "from", text: own ? "you" : m.from }),
      el("span", { className: "body", text: m.body }),
      el("span", { className: "meta", text: meta }),
    );
  });
  for (const p of current.pending.values()) {
    items.push(el(
      "li", { className: "msg own pending", "data-cmid": p.cmid },
      el("span", { className: "from", text: "you" }),
      el("span", { className: "body", text: p.body }),
      el("span", { className: "meta", text: "sending…" }),
    ));
  }
  list.replaceChildren(...items);
  $("older").hidden = !current.more || current.messages.size === 0;
  if (atBottom) list.scrollTop = list.scrollHeight;
  markRead(current);
}

function markRead(c) {
  if (document.hidden || session.status !== "online") return;
  for (const m of c.messages.values()) {
    if (m.from !== session.user && !c.readSent.has(m.id)) {
      c.readSent.add(m.id);
      session.request("read", { msg_id: m.id }).catch(() => c.readSent.delete(m.id));
    }
  }
}

function openButton(key, label, unread) {
  const button = el("button", { type: "button", className: "open", text: label });
  button.dataset.key = key;
  if (current && current.key === key) button.setAttribute("aria-current", "true");
  if (unread) button.setAttribute("aria-label", `${label}, ${unread} unread`);
  button.addEventListener("click", () => openConv(key));
  return button;
}

function renderChats() {
  const items = [...convs.values()].map((c) => {
    const li = el("li", { "data-key": c.key }, openButton(c.key, titleOf(c), c.unread));
    if (c.unread) li.append(el("span", { className: "badge", text: String(c.unread), "aria-hidden": "true" }));
    return li;
  });
  $("chats").replaceChildren(...items);
}

function renderContacts() {
  const items = [...contacts.entries()].map(([user, c]) => {
    const dot = el("span", { className: "presence", "data-state": c.state || "offline", "aria-hidden": "true" });
    const state = c.status === "accepted" ? (c.state || "offline") + (c.text ? ` – ${c.text}` : "") : c.status.replace("_", " ");
    const li = el("li", { "data-user": user }, dot, openButton(`u:${user}`, `${user} (${state})`, 0));
    if (c.status === "pending_in") {
      const accept = el("button", { type: "button", text: "Accept", className: "link" });
      accept.setAttribute("aria-label", `Accept ${user}`);
      accept.addEventListener("click", () => act("contact_accept", { user }).then(refreshContacts));
      li.append(accept);
    }
    return li;
  });
  $("contacts").replaceChildren(...items);
}

function renderRooms() {
  const items = [...rooms.entries()].map(([room, name]) => el("li", {}, openButton(`r:${room}`, `# ${name} (${room})`, 0)));
  for (const [room, invite] of invites) {
    if (rooms.has(room)) continue;
    const join = el("button", { type: "button", className: "link", text: `Join # ${invite.name} (from ${invite.from})` });
    join.addEventListener("click", () => joinRoom(room));
    items.push(el("li", {}, join));
  }
  $("rooms").replaceChildren(...items);
}

function setStatus(status, worker) {
  const node = $("status");
  node.dataset.state = status;
  node.dataset.worker = worker || "";
  node.textContent = status === "reconnecting" ? "reconnecting…" : status;
}

function showSideError(err) {
  $("side-error").textContent = err instanceof ServerError ? err.message : String(err.message || err);
}

// ---- requests from the UI -----------------------------------------------------------
async function act(op, fields) {
  $("side-error").textContent = "";
  try {
    return await session.request(op, fields);
  } catch (err) {
    showSideError(err);
    throw err;
  }
}

async function refreshContacts() {
  const reply = await session.request("contacts", {});
  contacts.clear();
  for (const c of reply.contacts) contacts.set(c.user, c);
  renderContacts();
}

async function refreshRooms() {
  const reply = await session.request("rooms", {});
  rooms.clear();
  for (const r of reply.rooms) rooms.set(r.room, r.name);
  // Invitations are stored: one pushed while this page was away is listed here.
  for (const i of reply.invites || []) invites.set(i.room, { name: i.name, from: i.from });
  renderRooms();
  renderChats();
}

async function joinRoom(room) {
  const joined = await act("room_join", { room });
  rooms.set(joined.room, joined.name);
  invites.delete(joined.room);
  renderRooms();
  await openConv(`r:${joined.room}`);
}

function showChat() {
  $("auth").hidden = true;
  $("chat").hidden = false;
  $("logout").hidden = false;
  $("whoami").textContent = `${session.user} on ${session.state.device}`;
}

function showAuth(why) {
  $("auth").hidden = false;
  $("chat").hidden = true;
  $("logout").hidden = true;
  $("whoami").textContent = "";
  $("auth-error").textContent = why || "";
  $("auth-user").focus();
}

// ---- session events -----------------------------------------------------------------
session.addEventListener("status", (e) => setStatus(e.detail.status, e.detail.detail));
let links = 0; // connections that logged in: a resume after a drop adds one
session.addEventListener("online", () => {
  links += 1;
  $("status").dataset.links = String(links);
  showChat();
  Promise.all([refreshContacts(), refreshRooms()]).catch(showSideError);
  if (current) markRead(current);
});
session.addEventListener("stopped", (e) => showAuth(e.detail.why));
session.addEventListener("entry", (e) => {
  const frame = e.detail;
  if (frame.op === "msg") {
    addMessage(frame, true);
  } else if (frame.op === "receipt") {
    if (!readBy.has(frame.msg_id)) readBy.set(frame.msg_id, new Set());
    readBy.get(frame.msg_id).add(frame.by);
    if (current) renderMessages();
  }
});
session.addEventListener("frame", (e) => {
  const f = e.detail;
  if (f.op === "presence") {
    const c = contacts.get(f.user);
    if (c) Object.assign(c, { state: f.state, text: f.text });
    renderContacts();
  } else if (f.op === "contact_request") {
    refreshContacts().catch(showSideError);
  } else if (f.op === "room_invite") {
    invites.set(f.room, { name: f.name, from: f.from });
    renderRooms();
  } else if (f.op === "typing") {
    const key = f.room !== undefined && f.room !== null ? `r:${f.room}` : `u:${f.from}`;
    const shown = typingShown.get(key);
    if (shown) clearTimeout(shown.timer);
    if (f.active) {
      const timer = setTimeout(() => { typingShown.delete(key); renderTyping(); }, 6000);
      typingShown.set(key, { who: f.from, timer });
    } else {
      typingShown.delete(key);
    }
    renderTyping();
  }
});

function renderTyping() {
  const shown = current && typingShown.get(current.key);
  $("typing").textContent = shown ? `${shown.who} is typing…` : "";
}

document.addEventListener("visibilitychange", () => { if (current) markRead(current); });

// ---- forms --------------------------------------------------------------------------
async function authenticate(register) {
  const user = $("auth-user").value.trim();
  const password = $("auth-password").value;
  $("auth-error").textContent = "";
  try {
    if (register) await session.register(user, password);
    await session.login(user, password);
    $("auth-password").value = "";
  } catch (err) {
    $("auth-error").textContent = err instanceof ServerError ? err.message : "cannot reach the server";
  }
}

$("auth-form").addEventListener("submit", (e) => { e.preventDefault(); authenticate(false); });
$("register-button").addEventListener("click", () => {
  if ($("auth-form").reportValidity()) authenticate(true);
});
$("logout").addEventListener("click", () => session.logout());

$("contact-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const user = $("contact-user").value.trim();
  await act("contact_add", { user });
  $("contact-user").value = "";
  await refreshContacts();
});
$("open-chat").addEventListener("click", () => {
  const user = $("contact-user").value.trim();
  if (!user) return;
  $("contact-user").value = "";
  openConv(`u:${user}`);
});
$("room-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const created = await act("room_create", { name: $("room-name").value });
  $("room-name").value = "";
  rooms.set(created.room, created.name);
  renderRooms();
  await openConv(`r:${created.room}`);
});
$("join-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const room = Number($("room-id").value);
  $("room-id").value = "";
  await joinRoom(room);
});
$("invite-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  if (!current || !current.isRoom) return;
  await act("room_invite", { room: current.target, user: $("invite-user").value.trim() });
  $("invite-user").value = "";
});
$("older").addEventListener("click", () => current && loadOlder(current));

function sendCurrent() {
  const body = $("body").value;
  if (!current || !body.trim()) return;
  $("body").value = "";
  const c = current;
  const sending = session.send(target(c), body);
  const cmid = [...session.outbox.keys()].pop();
  c.pending.set(cmid, { cmid, body });
  renderMessages();
  typingSentAt = 0;
  sending.then(
    (sent) => {
      c.pending.delete(cmid);
      addMessage({ id: sent.id, from: session.user, body, ts: sent.ts, ...target(c) }, false);
    },
    (err) => {
      c.pending.delete(cmid);
      renderMessages();
      showSideError(err);
    },
  );
}

$("compose").addEventListener("submit", (e) => { e.preventDefault(); sendCurrent(); });
$("body").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    sendCurrent();
  }
});
$("body").addEventListener("input", () => {
  if (!current || session.status !== "online") return;
  const now = Date.now();
  if (now - typingSentAt > 3000) {
    typingSentAt = now;
    session.request("typing", { ...target(current), active: true }).catch(() => {});
  }
});

// ---- start --------------------------------------------------------------------------
setStatus("offline");
session.restore().then((restored) => {
  if (restored) showChat();
  else showAuth("");
});

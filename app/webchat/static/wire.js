// The protocol over a WebSocket (docs/protocol.md): one JSON frame per text message.
//
// A Session is one user's login that survives dropped connections, like the SDK's
// ResilientClient: on a drop it reconnects with a jittered backoff and `resume`s with
// the last resume token and the last inbox seq it handled (the server replays what
// came after); a refused resume falls back to `login_token` with the device token.
// Sends live in an outbox until `sent` arrives and are written again, with the same
// cmid, on every new connection: the server stores each cmid once. Inbox entries are
// handed out once each, in seq order (a seq at or below the last is dropped; a gap
// makes it resume, which replays the missing ones).

import * as store from "./store.js";

// Fatal codes after which resuming is pointless. `kicked` also ends the device's
// tokens; `session_replaced` means this device (this browser: another tab, say)
// logged in again, and the other tab now holds the stored tokens.
const FATAL_STOP = new Set(["session_replaced", "kicked"]);
const REPLY_OPS = new Set([
  "registered", "welcome", "sent", "ok", "pong", "contacts", "room", "rooms",
  "members", "history", "error",
]);
const PING_EVERY_MS = 30000;
const REQUEST_TIMEOUT_MS = 15000;

export class ServerError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.code = frame.code;
    this.retryAfter = frame.retry_after;
  }
}

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function newCmid() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export class Session extends EventTarget {
  constructor() {
    super();
    this.ws = null;
    this.rid = 0;
    this.pending = new Map(); // rid -> {resolve, reject, timer}
    this.outbox = new Map(); // cmid -> {fields, resolve, reject}
    this.ownSeqs = new Set(); // seqs of our own sends beyond lastSeq (sent.seq)
    this.state = store.load();
    this.lastSeq = this.state.lastSeq || 0;
    this.status = "offline";
    this.attempt = 0;
    this.stopped = true;
    this.pinger = null;
    this.ackTimer = null;
    this.worker = null;
  }

  get user() {
    return this.state.user;
  }

  // ---- connection ----------------------------------------------------------------
  open() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(wsUrl());
      this.ws = ws;
      ws.onopen = () => resolve(ws);
      ws.onerror = () => reject(new Error("cannot connect"));
      ws.onmessage = (event) => this.onFrame(ws, event.data);
      ws.onclose = () => this.onClose(ws);
    });
  }

  async ensureOpen() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) return;
    await this.open();
  }

  setStatus(status, detail = "") {
    this.status = status;
    this.dispatchEvent(new CustomEvent("status", { detail: { status, detail } }));
  }

  // Log in with the password (a new login of this device).
  async login(user, password) {
    await this.ensureOpen();
    const device = store.deviceName();
    const welcome = await this.request("hello", { user, password, device, v: 1 });
    this.lastSeq = 0;
    this.ownSeqs.clear();
    this.online(welcome, true);
    return welcome;
  }

  async register(user, password) {
    await this.ensureOpen();
    return this.request("register", { user, password });
  }

  // Continue what localStorage remembers: resume, else the device token.
  async restore() {
    if (!this.state.user || !(this.state.resumeToken || this.state.deviceToken)) return false;
    this.stopped = false;
    try {
      await this.ensureOpen();
      await this.relogin();
      return true;
    } catch (err) {
      if (err instanceof ServerError) {
        this.stopped = true;
        return false;
      }
      this.scheduleReconnect();
      return true;
    }
  }

  async relogin() {
    const { user, device, resumeToken, deviceToken } = this.state;
    if (resumeToken) {
      try {
        const welcome = await this.request("resume", {
          user, device, token: resumeToken, last_seq: this.lastSeq,
        });
        this.online(welcome, false);
        return;
      } catch (err) {
        if (!(err instanceof ServerError) || err.code !== "bad_token") throw err;
      }
    }
    if (!deviceToken) throw new ServerError({ code: "auth_failed", message: "log in again" });
    const welcome = await this.request("login_token", { user, device, device_token: deviceToken });
    this.online(welcome, false);
  }

  online(welcome, fresh) {
    this.stopped = false;
    if (welcome.device_token) {
      // hello or login_token: the server replays after this device's acked position.
      this.lastSeq = Math.max(this.lastSeq, welcome.acked);
    }
    this.attempt = 0;
    this.worker = welcome.worker;
    this.state = {
      ...this.state,
      user: welcome.user,
      device: welcome.device,
      resumeToken: welcome.resume_token,
      deviceToken: welcome.device_token || this.state.deviceToken,
      lastSeq: this.lastSeq,
    };
    store.save(this.state);
    clearInterval(this.pinger);
    this.pinger = setInterval(() => this.ping(), PING_EVERY_MS);
    this.setStatus("online", welcome.worker);
    this.dispatchEvent(new CustomEvent("online", { detail: { welcome, fresh } }));
    for (const [cmid, out] of this.outbox) this.writeSend(cmid, out);
  }

  ping() {
    this.request("ping", {}).catch(() => {});
  }

  onClose(ws) {
    if (ws !== this.ws) return;
    this.ws = null;
    clearInterval(this.pinger);
    for (const [, p] of this.pending) {
      clearTimeout(p.timer);
      p.reject(new Error("connection lost"));
    }
    this.pending.clear();
    if (this.stopped) {
      this.setStatus("offline");
      return;
    }
    this.setStatus("reconnecting");
    const after = this.reconnectAfterMs;
    this.reconnectAfterMs = undefined;
    this.scheduleReconnect(after);
  }

  scheduleReconnect(afterMs) {
    if (this.stopped || this.reconnectTimer) return;
    const cap = Math.min(2000, 100 * 2 ** this.attempt);
    const delay = afterMs !== undefined ? afterMs : Math.random() * cap;
    this.attempt += 1;
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      this.reconnect();
    }, delay);
  }

  async reconnect() {
    if (this.stopped) return;
    this.setStatus("reconnecting");
    try {
      await this.open();
      await this.relogin();
    } catch (err) {
      if (err instanceof ServerError && ["auth_failed", "account_disabled"].includes(err.code)) {
        this.stop("log in again");
        return;
      }
      if (this.ws) this.ws.close();
      else this.scheduleReconnect();
    }
  }

  drop() {
    // Close this connection and resume on a new one (a gap, a `reconnect` frame).
    if (this.ws) this.ws.close();
  }

  stop(why) {
    this.stopped = true;
    clearInterval(this.pinger);
    if (this.ws) this.ws.close();
    this.dispatchEvent(new CustomEvent("stopped", { detail: { why } }));
  }

  async logout() {
    try {
      await this.request("bye", { forget: true });
    } catch {
      // gone already: the token is forgotten here all the same
    }
    this.outbox.clear();
    store.forget();
    this.state = store.load();
    this.lastSeq = 0;
    this.stop("logged out");
  }

  // ---- requests ------------------------------------------------------------------
  request(op, fields) {
    return new Promise((resolve, reject) => {
      const ws = this.ws;
      if (!ws || ws.readyState !== WebSocket.OPEN) {
        reject(new Error("not connected"));
        return;
      }
      const rid = ++this.rid;
      const timer = setTimeout(() => {
        this.pending.delete(rid);
        reject(new Error(`no reply to ${op}`));
      }, REQUEST_TIMEOUT_MS);
      this.pending.set(rid, { resolve, reject, timer });
      ws.send(JSON.stringify({ op, ...fields, rid }));
    });
  }

  // A message: resolves with `sent` once it is durably stored, however many
  // connections that takes.
  send(target, body) {
    const cmid = newCmid();
    return new Promise((resolve, reject) => {
      const out = { fields: { ...target, body, cmid }, resolve, reject };
      this.outbox.set(cmid, out);
      this.writeSend(cmid, out);
    });
  }

  writeSend(cmid, out) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN || this.status !== "online") return;
    this.request("send", out.fields).then(
      (sent) => {
        this.outbox.delete(cmid);
        if (typeof sent.seq === "number" && sent.seq > this.lastSeq) this.ownSeqs.add(sent.seq);
        this.advance();
        out.resolve(sent);
      },
      (err) => {
        if (err instanceof ServerError && !["internal", "overloaded", "rate_limited"].includes(err.code)) {
          this.outbox.delete(cmid);
          out.reject(err);
        } else if (err instanceof ServerError) {
          setTimeout(() => this.writeSend(cmid, out), 1000 * (err.retryAfter || 1));
        }
        // Connection lost: written again after the resume (online()).
      },
    );
  }

  // ---- frames in -----------------------------------------------------------------
  onFrame(ws, text) {
    if (ws !== this.ws) return;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (REPLY_OPS.has(frame.op) && frame.rid !== undefined && this.pending.has(frame.rid)) {
      const p = this.pending.get(frame.rid);
      this.pending.delete(frame.rid);
      clearTimeout(p.timer);
      if (frame.op === "error") p.reject(new ServerError(frame));
      else p.resolve(frame);
      return;
    }
    switch (frame.op) {
      case "msg":
      case "receipt":
        this.inboxEntry(frame);
        return;
      case "reconnect":
        // A drain: come back after the server's (jittered) delay, to another worker.
        this.reconnectAfterMs = frame.after_ms;
        this.drop();
        return;
      case "error":
        if (FATAL_STOP.has(frame.code)) {
          if (frame.code === "kicked") {
            store.forget();
            this.state = store.load();
          }
          this.stop(frame.message);
        }
        // Other fatal codes (shutting_down, idle_timeout): the close follows; we resume.
        return;
      default:
        this.dispatchEvent(new CustomEvent("frame", { detail: frame }));
    }
  }

  inboxEntry(frame) {
    this.advance();
    if (frame.seq <= this.lastSeq) {
      // Seen already, or our own send's entry: hand it out only if it is our own
      // message (the page shows it by id, once).
      if (frame.op === "msg") this.dispatchEvent(new CustomEvent("entry", { detail: frame }));
      return;
    }
    if (frame.seq > this.lastSeq + 1) {
      this.drop(); // a gap: resume replays from lastSeq
      return;
    }
    this.lastSeq = frame.seq;
    this.ownSeqs.delete(frame.seq);
    this.advance();
    this.state.lastSeq = this.lastSeq;
    store.save(this.state);
    this.dispatchEvent(new CustomEvent("entry", { detail: frame }));
    this.scheduleAck();
  }

  advance() {
    while (this.ownSeqs.has(this.lastSeq + 1)) {
      this.lastSeq += 1;
      this.ownSeqs.delete(this.lastSeq);
    }
  }

  scheduleAck() {
    if (this.ackTimer) return;
    this.ackTimer = setTimeout(() => {
      this.ackTimer = null;
      this.request("ack", { seq: this.lastSeq }).catch(() => {});
    }, 500);
  }
}

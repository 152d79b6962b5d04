// The herald inbox page: sign in, list notifications, and receive new ones live.
//
// No build step and no dependencies. Two rules hold throughout:
// - Data from the server is put on the page with textContent only, never as
//   HTML, so markup in a notification shows as text and never runs.
// - The bearer token lives in sessionStorage and travels only in the
//   Authorization header, never in a URL. That is why the stream is read with
//   fetch() and a small SSE parser: EventSource cannot send headers.
"use strict";

(() => {
  const TOKEN_KEY = "herald.token";
  const USER_KEY = "herald.user";
  const PAGE_SIZE = 50;
  const PRESENCE_MS = 60_000;
  const MAX_BACKOFF_MS = 30_000;
  // Resolves API paths against the page's own location, so the app also works
  // when mounted below a path prefix.
  const BASE = new URL("./", document.baseURI);

  const $ = (id) => document.getElementById(id);
  const view = {
    status: $("status"),
    login: $("login-view"),
    loginForm: $("login-form"),
    email: $("email"),
    password: $("password"),
    signIn: $("sign-in"),
    loginError: $("login-error"),
    inbox: $("inbox-view"),
    who: $("who"),
    unread: $("unread-count"),
    readAll: $("read-all"),
    signOut: $("sign-out"),
    empty: $("empty"),
    list: $("list"),
  };

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    items: new Map(), // id -> {item, element}
    unread: 0,
    lastId: 0, // highest notification id seen: the stream's Last-Event-ID
    generation: 0, // bumped on sign-out/sign-in: stale stream loops stop
    controller: null,
    reconnectTimer: null,
    attempt: 0,
    retryMs: 1000,
    presenceTimer: null,
    presenceSupported: true,
  };

  class Unauthorized extends Error {}

  // --- HTTP -------------------------------------------------------------------

  function url(path) {
    return new URL(path, BASE).toString();
  }

  function authHeaders(extra = {}) {
    return { ...extra, Authorization: `Bearer ${state.token}` };
  }

  /** A JSON call with the token; signs out on 401. */
  async function call(method, path, body) {
    const headers = authHeaders({ Accept: "application/json" });
    const init = { method, headers, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const response = await fetch(url(path), init);
    if (response.status === 401) {
      signOut("Your session has ended. Please sign in again.");
      throw new Unauthorized();
    }
    if (!response.ok) {
      throw new Error(`${method} ${path}: HTTP ${response.status}`);
    }
    return response.json();
  }

  // --- rendering --------------------------------------------------------------

  function setStatus(text, kind = "") {
    view.status.textContent = text;
    view.status.dataset.state = kind;
  }

  function showUnread() {
    view.unread.textContent = String(Math.max(0, state.unread));
    view.empty.hidden = state.items.size > 0;
  }

  function formatTime(iso) {
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? "" : date.toLocaleString();
  }

  /** One list entry; every server string goes in through textContent. */
  function renderItem(item) {
    const li = document.createElement("li");
    li.className = "item";
    li.dataset.id = String(item.id);

    const title = document.createElement("h2");
    title.className = "title";
    title.textContent = item.title;

    const body = document.createElement("p");
    body.className = "body";
    body.textContent = item.body;

    const meta = document.createElement("p");
    meta.className = "meta";
    const time = document.createElement("time");
    time.dateTime = String(item.created_at);
    time.textContent = formatTime(item.created_at);
    meta.append(time);

    const button = document.createElement("button");
    button.type = "button";
    button.className = "mark-read";
    button.textContent = "Mark read";
    button.addEventListener("click", () => markRead(item.id, button));

    li.append(title, body, meta, button);
    li.classList.toggle("read", Boolean(item.read));
    return li;
  }

  /** Show ``item`` once (by id), newest first; count it when it is new and unread. */
  function upsert(item) {
    if (!Number.isInteger(item.id)) return;
    state.lastId = Math.max(state.lastId, item.id);
    const known = state.items.get(item.id);
    if (known) {
      if (item.read && !known.item.read) setRead(item.id);
      return;
    }
    const element = renderItem(item);
    state.items.set(item.id, { item: { ...item }, element });
    let before = null;
    for (const child of view.list.children) {
      if (Number(child.dataset.id) < item.id) {
        before = child;
        break;
      }
    }
    view.list.insertBefore(element, before);
    if (!item.read) state.unread += 1;
    showUnread();
  }

  function setRead(id) {
    const known = state.items.get(id);
    if (!known || known.item.read) return;
    known.item.read = true;
    known.element.classList.add("read");
    state.unread -= 1;
    showUnread();
  }

  function clearList() {
    state.items.clear();
    state.unread = 0;
    state.lastId = 0;
    view.list.replaceChildren();
    showUnread();
  }

  // --- actions ----------------------------------------------------------------

  async function signIn(event) {
    event.preventDefault();
    view.loginError.textContent = "";
    view.signIn.disabled = true;
    try {
      const response = await fetch(url("login"), {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ email: view.email.value, password: view.password.value }),
        cache: "no-store",
      });
      if (response.status === 401) {
        view.loginError.textContent = "Wrong email or password.";
        return;
      }
      if (response.status === 422) {
        view.loginError.textContent = "Enter your email address and password.";
        return;
      }
      if (!response.ok) {
        view.loginError.textContent = `Sign-in failed (HTTP ${response.status}).`;
        return;
      }
      const body = await response.json();
      state.token = body.access_token;
      sessionStorage.setItem(TOKEN_KEY, state.token);
      sessionStorage.setItem(USER_KEY, body.user.email);
      view.password.value = "";
      await openInbox();
    } catch (error) {
      view.loginError.textContent = "Cannot reach the server.";
      console.error(error);
    } finally {
      view.signIn.disabled = false;
    }
  }

  function signOut(message = "") {
    state.generation += 1;
    stopStream();
    stopPresence();
    state.token = null;
    sessionStorage.removeItem(TOKEN_KEY);
    sessionStorage.removeItem(USER_KEY);
    clearList();
    view.inbox.hidden = true;
    view.login.hidden = false;
    view.loginError.textContent = message;
    setStatus("");
  }

  async function openInbox() {
    state.generation += 1;
    const generation = state.generation;
    view.login.hidden = true;
    view.inbox.hidden = false;
    view.who.textContent = sessionStorage.getItem(USER_KEY) || "";
    clearList();
    setStatus("Loading…");
    try {
      const page = await call("GET", `me/notifications?limit=${PAGE_SIZE}`);
      if (generation !== state.generation) return;
      for (const item of page.items) upsert(item);
      // The server counts unread items beyond this page too.
      state.unread = page.unread_count;
      showUnread();
    } catch (error) {
      if (error instanceof Unauthorized) return;
      console.error(error);
    }
    startPresence();
    connect(generation);
  }

  async function markRead(id, button) {
    button.disabled = true;
    try {
      const item = await call("POST", `me/notifications/${encodeURIComponent(id)}/read`);
      if (item.read) setRead(id);
    } catch (error) {
      if (!(error instanceof Unauthorized)) console.error(error);
    } finally {
      button.disabled = false;
    }
  }

  async function markAllRead() {
    view.readAll.disabled = true;
    try {
      await call("POST", "me/notifications/read-all");
      for (const id of state.items.keys()) setRead(id);
      state.unread = 0;
      showUnread();
    } catch (error) {
      if (!(error instanceof Unauthorized)) console.error(error);
    } finally {
      view.readAll.disabled = false;
    }
  }

  // --- the live stream --------------------------------------------------------

  /**
   * A Server-Sent Events parser (the WHATWG "event stream" rules): lines end
   * in CRLF, LF or CR; "field: value" lines build an event; a blank line
   * dispatches it; lines starting with ":" are comments (pings).
   */
  class SseParser {
    constructor(onEvent) {
      this.onEvent = onEvent;
      this.buffer = "";
      this.reset();
      this.lastEventId = "";
    }

    reset() {
      this.type = "";
      this.data = [];
      this.retry = null;
    }

    feed(chunk) {
      this.buffer += chunk;
      let start = 0;
      for (let i = 0; i < this.buffer.length; i += 1) {
        const c = this.buffer[i];
        if (c !== "\n" && c !== "\r") continue;
        // A CR at the very end may be the first half of a CRLF: wait for more.
        if (c === "\r" && i === this.buffer.length - 1) break;
        this.line(this.buffer.slice(start, i));
        if (c === "\r" && this.buffer[i + 1] === "\n") i += 1;
        start = i + 1;
      }
      this.buffer = this.buffer.slice(start);
    }

    line(text) {
      if (text === "") {
        if (this.data.length > 0) {
          this.onEvent({
            type: this.type || "message",
            data: this.data.join("\n"),
            id: this.lastEventId,
            retry: this.retry,
          });
        } else if (this.retry !== null) {
          this.onEvent({ type: "", data: "", id: this.lastEventId, retry: this.retry });
        }
        this.reset();
        return;
      }
      if (text.startsWith(":")) return;
      const colon = text.indexOf(":");
      const field = colon === -1 ? text : text.slice(0, colon);
      let value = colon === -1 ? "" : text.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") this.type = value;
      else if (field === "data") this.data.push(value);
      else if (field === "id" && !value.includes("\0")) this.lastEventId = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    }
  }

  function onStreamEvent(event) {
    if (event.retry !== null) state.retryMs = event.retry;
    if (event.type === "ready") {
      state.attempt = 0;
      setStatus("Live", "live");
    } else if (event.type === "notification") {
      let item;
      try {
        item = JSON.parse(event.data);
      } catch {
        return;
      }
      upsert(item);
    }
  }

  function stopStream() {
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = null;
    if (state.controller) state.controller.abort();
    state.controller = null;
  }

  function scheduleReconnect(generation, why) {
    if (generation !== state.generation) return;
    const base = Math.min(MAX_BACKOFF_MS, state.retryMs * 2 ** Math.min(state.attempt, 5));
    const delay = Math.round(base * (0.75 + Math.random() / 2));
    state.attempt += 1;
    setStatus(`${why}; reconnecting in ${Math.ceil(delay / 1000)} s…`, "retry");
    clearTimeout(state.reconnectTimer);
    state.reconnectTimer = setTimeout(() => connect(generation), delay);
  }

  async function connect(generation) {
    if (generation !== state.generation || !state.token) return;
    stopStream();
    const controller = new AbortController();
    state.controller = controller;
    setStatus(state.attempt === 0 ? "Connecting…" : "Reconnecting…");
    // Always send Last-Event-ID (0 at first): whatever arrived between loading
    // the list and this request is replayed, later ones come live.
    const headers = authHeaders({
      Accept: "text/event-stream",
      "Last-Event-ID": String(state.lastId),
    });
    let response;
    try {
      response = await fetch(url("me/notifications/stream"), {
        headers,
        cache: "no-store",
        signal: controller.signal,
      });
    } catch (error) {
      if (!controller.signal.aborted) scheduleReconnect(generation, "Offline");
      return;
    }
    if (response.status === 401) {
      signOut("Your session has ended. Please sign in again.");
      return;
    }
    const type = response.headers.get("Content-Type") || "";
    if (!response.ok || !response.body || !type.startsWith("text/event-stream")) {
      const why = response.status === 503 ? "Live updates unavailable" : `HTTP ${response.status}`;
      scheduleReconnect(generation, why);
      return;
    }
    const parser = new SseParser(onStreamEvent);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.feed(value);
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (!controller.signal.aborted) scheduleReconnect(generation, "Disconnected");
  }

  // --- presence -----------------------------------------------------------------

  /** Tell the server the user is looking (the decision engine holds back pushes). */
  async function heartbeat() {
    if (!state.token || !state.presenceSupported || document.visibilityState !== "visible") {
      return;
    }
    try {
      const response = await fetch(url("me/presence"), {
        method: "POST",
        headers: authHeaders(),
        cache: "no-store",
      });
      if (response.status === 404 || response.status === 405) {
        state.presenceSupported = false; // this server has no presence route
        stopPresence();
      }
    } catch {
      // Best effort: the next beat tries again.
    }
  }

  function startPresence() {
    stopPresence();
    heartbeat();
    state.presenceTimer = setInterval(heartbeat, PRESENCE_MS);
  }

  function stopPresence() {
    clearInterval(state.presenceTimer);
    state.presenceTimer = null;
  }

  // --- start ------------------------------------------------------------------

  view.loginForm.addEventListener("submit", signIn);
  view.readAll.addEventListener("click", markAllRead);
  view.signOut.addEventListener("click", () => signOut());
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") heartbeat();
  });

  if (state.token) {
    openInbox();
  } else {
    signOut();
  }
})();

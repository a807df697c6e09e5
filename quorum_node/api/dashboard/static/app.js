// The Quorum dashboard: vanilla JS, no framework, no CDN (the node serves this file).
// Data: GET /quorum/admin/fleet, /recent, /usage/series, /keys; live: GET /quorum/admin/events (SSE read
// with fetch + ReadableStream, since EventSource cannot send the Authorization header).
"use strict";

const KEY_STORE = "quorum.dashboard.key";
const PALETTE = ["#2b6cb0", "#dd6b20", "#38a169", "#805ad5", "#d53f8c", "#319795", "#975a16", "#718096"];
const MAX_RECENT = 100;
const $ = (id) => document.getElementById(id);

const state = {
  fleet: null,
  features: {},
  live: new Map(), // request_id -> live entry
  recent: [],
  usageBy: "key",
  usageTimer: null,
  stream: null, // AbortController of the events stream
  needKey: false,
};

class Unauthorized extends Error {}
class Missing extends Error {}

// -- HTTP ----------------------------------------------------------------------------------

function authHeaders(extra) {
  const h = Object.assign({}, extra || {});
  const key = localStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function api(path, opts) {
  opts = opts || {};
  const resp = await fetch(path, {
    method: opts.method || "GET",
    headers: authHeaders(opts.body !== undefined ? { "Content-Type": "application/json" } : null),
    body: opts.body !== undefined ? JSON.stringify(opts.body) : undefined,
    cache: "no-store",
    credentials: "omit",
  });
  if (resp.status === 401 || resp.status === 403) {
    const err = await errorMessage(resp);
    if (resp.status === 401) { askForKey(err); throw new Unauthorized(err); }
    throw new Error(err);
  }
  if (resp.status === 404) throw new Missing(await errorMessage(resp));
  if (!resp.ok) throw new Error(await errorMessage(resp));
  if (resp.status === 204) return null;
  return resp.json();
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return "HTTP " + resp.status;
}

// -- the key (off loopback) --------------------------------------------------------------------

function askForKey(message) {
  state.needKey = true;
  $("key-panel").classList.remove("hidden");
  $("key-error").textContent = localStorage.getItem(KEY_STORE) ? "That key was refused: " + message : "";
  $("main").classList.add("hidden");
  setLive(false, "needs a key");
}

function setupKeyForm() {
  $("key-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    localStorage.setItem(KEY_STORE, key);
    $("key-input").value = "";
    state.needKey = false;
    $("key-panel").classList.add("hidden");
    $("main").classList.remove("hidden");
    start();
  });
  $("key-forget").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); $("key-error").textContent = ""; });
  $("key-button").addEventListener("click", () => $("key-panel").classList.toggle("hidden"));
}

// -- DOM helpers -----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "" : String(c)));
  return e;
}

function fillBody(table, rows) {
  const tbody = table.tBodies[0];
  tbody.replaceChildren(...rows);
}

function ago(epoch) {
  if (epoch === null || epoch === undefined) return "–";
  const s = Math.max(0, Math.floor(Date.now() / 1000 - epoch));
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + Math.floor((s % 86400) / 3600) + "h";
}

function clock(epoch) {
  return new Date(epoch * 1000).toLocaleTimeString();
}

function ms(v) {
  if (v === null || v === undefined) return "–";
  return v >= 1000 ? (v / 1000).toFixed(2) + " s" : v.toFixed(v < 10 ? 1 : 0) + " ms";
}

function num(v) { return v === null || v === undefined ? "–" : String(v); }

// -- fleet and models ----------------------------------------------------------------------------

function renderFleet(fleet) {
  state.fleet = fleet;
  state.features = fleet.features || {};
  const me = fleet.self;
  $("whoami").textContent = "node " + me.name + (fleet.cluster ? " · cluster " + fleet.cluster : " · no cluster");
  const online = fleet.nodes.filter((n) => n.online).length;
  $("fleet-summary").textContent = online + " of " + fleet.nodes.length + " online";
  fillBody($("fleet"), fleet.nodes.map((n) => {
    const engines = n.engines.map((e) => e.kind + (e.state && e.state !== "ready" ? " (" + e.state + ")" : "")).join(", ");
    const load = n.load ? n.load.in_flight + " req" + (n.load.engines ? " · engines " + n.load.engines : "") +
      (n.load.waiting ? " · " + n.load.waiting + " waiting" : "") : "–";
    return el("tr", { "data-node": n.name },
      el("td", {}, el("strong", { text: n.name }), n.self ? el("span", { class: "muted", text: " (this node)" }) : ""),
      el("td", { class: "state-" + n.state, text: n.online ? "online" : n.state }),
      el("td", { title: n.since ? new Date(n.since * 1000).toLocaleString() : "" , text: n.since ? ago(n.since) : "–" }),
      el("td", { text: n.routes.join(", ") || "–" }),
      el("td", { text: engines || "–" }),
      el("td", { class: "num", text: String(n.models.length) }),
      el("td", { text: load }),
      el("td", { class: "num", text: n.rtt_ms === null || n.rtt_ms === undefined ? "–" : n.rtt_ms + " ms" }));
  }));
  const relay = fleet.relay;
  $("relay").textContent = relay ? "Relay " + relay.url + ": " + relay.state + (relay.error ? " (" + relay.error + ")" : "") +
    "; online there: " + ((relay.online || []).join(", ") || "nobody else") : "";
  $("models-summary").textContent = fleet.models.length + " in the cluster";
  fillBody($("models"), fleet.models.map((m) => el("tr", { "data-model": m.id },
    el("td", {}, el("code", { text: m.id })),
    el("td", { text: m.holders.map((h) => (m.sharded || {})[h] ? h + " (sharded across " + m.sharded[h].join(" + ") + ")" : h)
      .join(", ") || "nobody online" }),
    el("td", { text: m.engines.join(", ") }))));
  renderFeatures();
}

// -- in flight ----------------------------------------------------------------------------------

function renderLive() {
  const rows = [...state.live.values()].sort((a, b) => b.age_ms - a.age_ms);
  $("inflight-count").textContent = String(rows.length);
  $("inflight-empty").classList.toggle("hidden", rows.length > 0);
  fillBody($("inflight"), rows.map((r) => el("tr", { "data-request": r.request_id },
    el("td", {}, el("code", { text: r.request_id })),
    el("td", { text: r.model || "–" }),
    el("td", { text: (r.surface || "") + " " + (r.operation || "") }),
    el("td", { text: r.serving_node || "…" }),
    el("td", { text: r.route || "…" }),
    el("td", { text: r.key_name || "–" }),
    el("td", { class: "num", text: ms(r.age_ms) }))));
}

// -- recent requests ------------------------------------------------------------------------------

function recentRow(r, fresh) {
  const tokens = (r.prompt_tokens === null || r.prompt_tokens === undefined ? "–" : r.prompt_tokens) + " / " +
    (r.completion_tokens === null || r.completion_tokens === undefined ? "–" : r.completion_tokens) + (r.tokens_estimated ? "~" : "");
  return el("tr", { class: fresh ? "fresh" : null, "data-request": r.request_id, title: r.error || "" },
    el("td", { text: clock(r.time) }),
    el("td", { text: r.serving_node || r.node }),
    el("td", { text: r.route || "–" }),
    el("td", { text: r.model || "–" }),
    el("td", { text: (r.surface || "") + " " + (r.operation || "") }),
    el("td", { text: r.key_name || "–" }),
    el("td", { class: "status-" + r.outcome, text: String(r.status) }),
    el("td", { class: "num", text: tokens }),
    el("td", { class: "num", title: r.queue_ms ? "waited " + ms(r.queue_ms) + " for a holder with room" : "",
      text: ms(r.ttft_ms) + (r.queue_ms ? " (waited " + ms(r.queue_ms) + ")" : "") }),
    el("td", { class: "num", text: ms(r.duration_ms) }));
}

function addRecord(r) {
  state.live.delete(r.request_id);
  renderLive();
  if (r.surface === null || r.surface === undefined) return; // a refused stray request, not an API call
  state.recent.unshift(r);
  state.recent.length = Math.min(state.recent.length, MAX_RECENT);
  const tbody = $("recent").tBodies[0];
  tbody.prepend(recentRow(r, true));
  while (tbody.rows.length > MAX_RECENT) tbody.deleteRow(-1);
  scheduleUsage();
}

async function loadRecent() {
  const note = $("recent-note");
  if (!state.features.recent) {
    note.textContent = "History is not available on this node (no usage ledger); requests made from now on appear live.";
    note.classList.remove("hidden");
    return;
  }
  try {
    const body = await api("/quorum/admin/recent?limit=" + MAX_RECENT);
    state.recent = (body.records || []).filter((r) => r.surface !== null && r.surface !== undefined);
    fillBody($("recent"), state.recent.map((r) => recentRow(r, false)));
    note.classList.add("hidden");
  } catch (e) {
    if (e instanceof Unauthorized) return;
    note.textContent = "Recent requests are not available: " + e.message;
    note.classList.remove("hidden");
  }
}

// -- usage charts (hand-drawn SVG: stacked bars per time bucket, one colour per group) -------------

const SVG = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function scheduleUsage() {
  if (state.usageTimer !== null) return;
  state.usageTimer = setTimeout(() => { state.usageTimer = null; loadUsage(); }, 2000);
}

async function loadUsage() {
  const note = $("usage-note");
  const chart = $("usage-chart");
  if (!state.features.usage) {
    chart.replaceChildren();
    note.textContent = "Usage charts are not available on this node (no usage ledger).";
    note.classList.remove("hidden");
    return;
  }
  const [span, bucket] = $("usage-range").value.split(":").map(Number);
  const now = Date.now() / 1000;
  const since = Math.floor((now - span) / bucket) * bucket;
  try {
    const body = await api("/quorum/admin/usage/series?by=" + encodeURIComponent(state.usageBy) + "&since=" + since +
      "&bucket=" + bucket);
    note.classList.add("hidden");
    drawUsage(body.points || [], since, now, bucket, $("usage-metric").value);
  } catch (e) {
    if (e instanceof Unauthorized) return;
    chart.replaceChildren();
    note.textContent = "Usage is not available: " + e.message;
    note.classList.remove("hidden");
  }
}

function niceCeil(v) {
  // the axis top: 2, 4, 10, 20, 50, 100 … (even, so the middle line is a whole number)
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 5, 10]) if (m * p >= v && (m * p) % 2 === 0) return m * p;
  return 20 * p;
}

function groupName(g) {
  return g === "" || g === null || g === undefined || g === "-" ? "(no " + state.usageBy + ")" : g;
}

function drawUsage(points, since, now, bucket, metric) {
  const chart = $("usage-chart");
  const value = (p) => metric === "requests" ? p.requests : p.prompt_tokens + p.completion_tokens;
  const groups = [];
  const totals = new Map();
  for (const p of points) {
    const g = groupName(p.group);
    totals.set(g, (totals.get(g) || 0) + value(p));
  }
  for (const [g] of [...totals.entries()].sort((a, b) => b[1] - a[1])) groups.push(g);
  const colour = (g) => PALETTE[Math.min(groups.indexOf(g), PALETTE.length - 1)];
  const nb = Math.max(1, Math.ceil((now - since) / bucket));
  const stacks = Array.from({ length: nb }, () => []);
  for (const p of points) {
    const i = Math.floor((p.t - since) / bucket);
    if (i >= 0 && i < nb) stacks[i].push(p);
  }
  const max = niceCeil(Math.max(1, ...stacks.map((s) => s.reduce((a, p) => a + value(p), 0))));
  const W = 800, H = 240, L = 48, B = 22, T = 8;
  const plotW = W - L - 8, plotH = H - B - T;
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "usage by " + state.usageBy,
    preserveAspectRatio: "none" });
  root.append(svg("line", { x1: L, y1: T + plotH, x2: W - 8, y2: T + plotH, class: "axis" }));
  for (const f of [0.5, 1]) {
    const y = T + plotH - f * plotH;
    root.append(svg("line", { x1: L, y1: y, x2: W - 8, y2: y, class: "axis" }));
    const t = svg("text", { x: L - 6, y: y + 4, "text-anchor": "end" });
    t.textContent = String(max * f);
    root.append(t);
  }
  const bw = plotW / nb;
  stacks.forEach((stack, i) => {
    let y = T + plotH;
    for (const p of stack) {
      const h = (value(p) / max) * plotH;
      y -= h;
      const g = groupName(p.group);
      const r = svg("rect", { x: L + i * bw + bw * 0.1, y: y, width: Math.max(1, bw * 0.8), height: Math.max(0, h),
        fill: colour(g), "data-group": g });
      const tip = svg("title", {});
      tip.textContent = `${g}: ${p.requests} requests, ${p.prompt_tokens} + ${p.completion_tokens} tokens`;
      r.append(tip);
      root.append(r);
    }
  });
  const labels = Math.min(nb, 6);
  for (let k = 0; k < labels; k++) {
    const i = Math.floor((k * (nb - 1)) / Math.max(1, labels - 1));
    const anchor = k === 0 ? "start" : k === labels - 1 ? "end" : "middle";
    const t = svg("text", { x: L + i * bw + (k === 0 ? 0 : k === labels - 1 ? bw : bw / 2), y: H - 6,
      "text-anchor": anchor });
    const d = new Date((since + i * bucket) * 1000);
    t.textContent = bucket >= 86400 ? d.toLocaleDateString() : d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
    root.append(t);
  }
  const legend = el("div", { class: "legend" }, ...groups.map((g) => el("span", { "data-group": g },
    el("i", { class: "sw" + Math.min(groups.indexOf(g), PALETTE.length - 1) }), g + " (" + totals.get(g) + ")")));
  if (!points.length) legend.append(el("span", { class: "muted", text: "No requests in this time range." }));
  chart.replaceChildren(root, legend);
}

function setupUsage() {
  for (const b of $("usage-by").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      state.usageBy = b.dataset.by;
      for (const o of $("usage-by").querySelectorAll("button")) o.classList.toggle("on", o === b);
      loadUsage();
    });
  }
  $("usage-range").addEventListener("change", loadUsage);
  $("usage-metric").addEventListener("change", loadUsage);
}

// -- keys ----------------------------------------------------------------------------------------

function keyList(body) {
  if (Array.isArray(body)) return body;
  return (body && (body.keys || body.data)) || [];
}

async function loadKeys() {
  const note = $("keys-note");
  if (!state.features.keys) {
    note.textContent = "Key management is not available on this node.";
    note.classList.remove("hidden");
    $("keys-body").classList.add("hidden");
    return;
  }
  note.classList.add("hidden");
  $("keys-body").classList.remove("hidden");
  try {
    const keys = keyList(await api("/quorum/admin/keys"));
    fillBody($("keys"), keys.map((k) => {
      let revoke;
      if (k.revoked) {
        revoke = el("span", { class: "status-failed", text: "revoked" });
      } else {
        revoke = el("button", { type: "button", class: "danger", text: "Revoke" });
        revoke.addEventListener("click", () => revokeKey(k));
      }
      const created = k.created_at || k.created;
      const used = k.last_used_at || k.last_used;
      return el("tr", { "data-key": k.name },
        el("td", { text: k.name }), el("td", {}, el("code", { text: k.id || "" })),
        el("td", { text: created ? new Date(created * 1000).toLocaleString() : "–" }),
        el("td", { text: used ? ago(used) + " ago" : "never" }),
        el("td", {}, revoke));
    }));
    $("keys-error").textContent = "";
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("keys-error").textContent = "Keys: " + e.message;
  }
}

async function createKey(ev) {
  ev.preventDefault();
  const name = $("key-name").value.trim();
  if (!name) return;
  try {
    const body = await api("/quorum/admin/keys", { method: "POST", body: { name } });
    const secret = body.key || body.secret || body.token || "";
    $("key-secret-name").textContent = body.name || name;
    $("key-secret-value").textContent = secret;
    $("key-secret").classList.remove("hidden");
    $("key-name").value = "";
    $("keys-error").textContent = "";
    await loadKeys();
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("keys-error").textContent = "Could not create the key: " + e.message;
  }
}

async function revokeKey(k) {
  if (!window.confirm("Revoke the key " + k.name + "? Apps using it stop working at once.")) return;
  try {
    await api("/quorum/admin/keys/" + encodeURIComponent(k.id || k.name), { method: "DELETE" });
    $("key-secret").classList.add("hidden");
    await loadKeys();
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("keys-error").textContent = "Could not revoke the key: " + e.message;
  }
}

let featuresShown = "";
function renderFeatures() {
  const f = JSON.stringify(state.features);
  if (f === featuresShown) return;
  featuresShown = f;
  loadRecent();
  loadUsage();
  loadKeys();
}

// -- live events (SSE over fetch) -------------------------------------------------------------------

function setLive(on, text) {
  const p = $("live-state");
  p.className = "pill " + (on ? "on" : "off");
  p.textContent = text;
}

function onEvent(name, data) {
  switch (name) {
    case "hello":
      renderFleet(data.fleet);
      onTick(data.live);
      break;
    case "start":
      state.live.set(data.request_id, data);
      renderLive();
      break;
    case "tick":
      onTick(data);
      break;
    case "record":
      addRecord(data);
      break;
    case "fleet":
      renderFleet(data);
      break;
    case "dropped":
      loadRecent();
      break;
  }
}

function onTick(live) {
  state.live = new Map(live.requests.map((r) => [r.request_id, r]));
  renderLive();
}

async function followEvents() {
  const ctl = new AbortController();
  state.stream = ctl;
  let delay = 1000;
  while (!ctl.signal.aborted && !state.needKey) {
    try {
      const resp = await fetch("/quorum/admin/events", { headers: authHeaders({ Accept: "text/event-stream" }),
        signal: ctl.signal, cache: "no-store", credentials: "omit" });
      if (resp.status === 401) { askForKey(await errorMessage(resp)); return; }
      if (!resp.ok || !resp.body) throw new Error("HTTP " + resp.status);
      setLive(true, "live");
      delay = 1000;
      const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          let name = "message", data = "";
          for (const line of block.split("\n")) {
            if (line.startsWith("event: ")) name = line.slice(7);
            else if (line.startsWith("data: ")) data += line.slice(6);
          }
          if (data) {
            try { onEvent(name, JSON.parse(data)); } catch (e) { console.warn("dashboard: bad event", name, e); }
          }
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    setLive(false, "reconnecting");
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 10000);
  }
}

// -- doctor: the node's checks of its own setup (quorum-node doctor) ---------------------------------

async function loadDoctor() {
  let report;
  try {
    report = await api("/quorum/admin/doctor");
  } catch (e) {
    if (!(e instanceof Unauthorized)) $("doctor-summary").textContent = "cannot run the checks: " + e.message;
    return;
  }
  const problems = report.findings.filter((f) => f.status !== "ok");
  $("doctor-summary").textContent = problems.length ? problems.length + " problem(s)" : "no problem found";
  fillBody($("doctor"), report.findings.map((f) => el("tr", { class: "doctor-" + f.status },
    el("td", { text: f.status === "ok" ? f.check : f.status.toUpperCase() + " " + f.check }),
    el("td", { text: f.message }),
    el("td", { text: f.status === "ok" ? "" : f.fix || "" }))));
}

// -- start ------------------------------------------------------------------------------------------

async function start() {
  if (state.stream) state.stream.abort();
  featuresShown = "";
  try {
    renderFleet(await api("/quorum/admin/fleet"));
  } catch (e) {
    if (e instanceof Unauthorized) return;
    $("fleet-summary").textContent = "cannot read the fleet: " + e.message;
  }
  loadDoctor();
  followEvents();
}

document.addEventListener("DOMContentLoaded", () => {
  setupKeyForm();
  setupUsage();
  $("key-create").addEventListener("submit", createKey);
  setInterval(() => { if (state.fleet && !state.needKey) renderLiveAges(); }, 1000);
  setInterval(() => { if (state.fleet && !state.needKey) loadDoctor(); }, 30000);
  start();
});

function renderLiveAges() {
  // ages between ticks, so a long request's "for" keeps counting
  for (const r of state.live.values()) r.age_ms += 1000;
  renderLive();
}

// tidemark live dashboard: the WebSocket feed (/ws) and a few REST queries, drawn on
// canvas. No library, nothing fetched from elsewhere.
"use strict";

const MAX_POINTS = 180;
const MAX_ALERTS = 200;
const MAX_CHARTS = 6;

const state = {
  key: localStorage.getItem("tidemark.key") || "",
  sensors: [],          // filter: sensor ids (empty: top sensors)
  eventType: "",        // filter: one event type (empty: all)
  shown: [],            // "sensor|type" keys on screen
  series: new Map(),    // key -> Map(windowStartMs -> prediction)
  alerts: new Map(),    // id -> alert
  lastAlertId: null,
  lastPredictionId: null,
  socket: null,
  retry: 1000,
  lastStatus: null,
  dirty: new Set(),
  subscribedCharts: "",
};

const $ = (id) => document.getElementById(id);
const fmt = (n, digits = 0) => (n === null || n === undefined || Number.isNaN(n)) ? "–"
  : Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits });
const keyOf = (p) => `${p.sensorId}|${p.eventType}`;
const ms = (iso) => Date.parse(iso);

function headers() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

// ---- WebSocket ---------------------------------------------------------------------

function connect() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const query = state.key ? `?access_token=${encodeURIComponent(state.key)}` : "";
  const socket = new WebSocket(`${scheme}//${location.host}/ws${query}`);
  state.socket = socket;
  setConnection("connecting", "connecting…");
  socket.onopen = () => {
    state.retry = 1000;
    setConnection("up", "live");
    send({ subscribe: { id: "status", kind: "status" } });
    // After a reconnect, continue from the oldest alert still firing (its resolution may
    // have been missed), else from the last alert seen: the map keeps one row per alert.
    const firing = [...state.alerts.values()].filter((a) => a.state === "firing").map((a) => ms(a.startedAt));
    const since = firing.length ? new Date(Math.min(...firing)).toISOString()
      : state.lastAlertId !== null ? state.lastAlertId : new Date(Date.now() - 3600e3).toISOString();
    send({ subscribe: { id: "alerts", kind: "alerts", since, ...typeFilter() } });
    state.subscribedCharts = "";
    subscribeCharts();
  };
  socket.onmessage = (event) => {
    let message;
    try { message = JSON.parse(event.data); } catch { return; }
    handle(message);
  };
  socket.onclose = (event) => {
    if (state.socket !== socket) return;
    const why = event.code === 1006 ? "" : ` (${event.code}${event.reason ? ": " + event.reason : ""})`;
    setConnection("down", `reconnecting in ${Math.round(state.retry / 1000)} s${why}`);
    setTimeout(connect, state.retry);
    state.retry = Math.min(state.retry * 2, 10000);
  };
}

function send(request) {
  if (state.socket && state.socket.readyState === WebSocket.OPEN) state.socket.send(JSON.stringify(request));
}

function typeFilter() {
  return state.eventType ? { eventType: [state.eventType] } : {};
}

function setConnection(kind, text) {
  const pill = $("connection");
  pill.className = `pill ${kind === "up" ? "up" : "down"}`;
  pill.dataset.state = kind;
  pill.textContent = text;
}

function handle(message) {
  switch (message.kind) {
    case "predictions": addPrediction(message.data); break;
    case "alerts": addAlert(message.data); break;
    case "status": showStatus(message.data); break;
    case "lagged": $("status-line").textContent = `this screen fell behind and missed ${message.data.missed} messages`; break;
    case "error":
      if (message.data.code === "forbidden") $("status-line").textContent = "the pipeline status needs an admin key (Key button)";
      else $("status-line").textContent = `${message.data.code}: ${message.data.message}`;
      break;
    default: break;
  }
}

// ---- Charts ------------------------------------------------------------------------

async function chooseCharts() {
  let keys = [];
  if (state.sensors.length > 0) {
    if (state.eventType) keys = state.sensors.map((s) => `${s}|${state.eventType}`);
    else keys = state.sensors.map((s) => `${s}|*`);
  } else {
    try {
      const type = state.eventType ? `&eventType=${encodeURIComponent(state.eventType)}` : "";
      const answer = await fetch(`api/sensors/top?by=predictionScore&n=${MAX_CHARTS}&minutes=10${type}`, { headers: headers() });
      if (answer.status === 401 || answer.status === 403) { askForKey(); return; }
      const body = await answer.json();
      showTop(body.items || []);
      keys = (body.items || []).map((item) => `${item.sensorId}|${item.eventType}`);
    } catch { return; }
  }
  const sameSet = keys.join(",") === state.shown.join(",");
  if (!sameSet && keys.length > 0) {
    state.shown = keys;
    renderChartFrames();
  }
  subscribeCharts();
}

function subscribeCharts() {
  const sensors = [...new Set(state.shown.map((k) => k.split("|")[0]))];
  const signature = sensors.join(",") + "/" + state.eventType;
  if (sensors.length === 0 || signature === state.subscribedCharts) return;
  state.subscribedCharts = signature;
  send({ unsubscribe: { id: "charts" } });
  // History from the store first (the replay), then live windows.
  const since = new Date(Date.now() - 10 * 60e3).toISOString();
  send({ subscribe: { id: "charts", kind: "predictions", sensorId: sensors, since, ...typeFilter() } });
}

function renderChartFrames() {
  const holder = $("charts");
  holder.replaceChildren();
  for (const key of state.shown) {
    const [sensor, type] = key.split("|");
    const box = document.createElement("div");
    box.className = "chart";
    box.dataset.key = key;
    box.dataset.points = "0";
    box.innerHTML = `<div class="title"><strong></strong><span class="last"></span></div>
      <canvas></canvas>
      <div class="legend"><span class="avg">average</span><span class="band">min–max</span><span class="score">score</span><span class="anomaly">anomaly</span></div>`;
    box.querySelector("strong").textContent = type === "*" ? sensor : `${sensor} · ${type}`;
    holder.appendChild(box);
    state.dirty.add(key);
  }
  if (state.shown.length === 0) holder.innerHTML = `<p class="empty">Waiting for windows…</p>`;
}

function chartKeyFor(p) {
  const exact = keyOf(p);
  if (state.shown.includes(exact)) return exact;
  const any = `${p.sensorId}|*`;
  return state.shown.includes(any) ? any : null;
}

function addPrediction(p) {
  if (state.lastPredictionId === null || p.id > state.lastPredictionId) state.lastPredictionId = p.id;
  const key = chartKeyFor(p);
  if (!key) return;
  let points = state.series.get(key);
  if (!points) { points = new Map(); state.series.set(key, points); }
  points.set(ms(p.windowStart), p);       // a revision replaces its window
  if (points.size > MAX_POINTS) {
    const oldest = [...points.keys()].sort((a, b) => a - b).slice(0, points.size - MAX_POINTS);
    for (const start of oldest) points.delete(start);
  }
  state.dirty.add(key);
}

function draw(key) {
  const box = document.querySelector(`.chart[data-key="${CSS.escape(key)}"]`);
  if (!box) return;
  const canvas = box.querySelector("canvas");
  const points = [...(state.series.get(key) || new Map()).values()].sort((a, b) => ms(a.windowStart) - ms(b.windowStart));
  box.dataset.points = String(points.length);
  box.dataset.anomalies = String(points.filter((p) => p.anomaly).length);
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth, height = canvas.clientHeight;
  canvas.width = width * ratio; canvas.height = height * ratio;
  const g = canvas.getContext("2d");
  g.scale(ratio, ratio);
  g.clearRect(0, 0, width, height);
  if (points.length === 0) return;
  const last = points[points.length - 1];
  box.dataset.last = String(ms(last.windowStart));
  box.querySelector(".last").textContent = `avg ${fmt(last.avgValue, 2)} · score ${fmt(last.predictionScore, 2)}`;
  const css = getComputedStyle(document.documentElement);
  const t0 = ms(points[0].windowStart), t1 = Math.max(ms(last.windowStart), t0 + 1);
  let lo = Math.min(...points.map((p) => p.minValue)), hi = Math.max(...points.map((p) => p.maxValue));
  if (hi - lo < 1e-9) { hi += 1; lo -= 1; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const left = 48, right = 8, top = 6, bottom = 18;
  const x = (t) => left + (t - t0) / (t1 - t0) * (width - left - right);
  const y = (v) => top + (hi - v) / (hi - lo) * (height - top - bottom);
  const ys = (s) => top + (1 - s) * (height - top - bottom);
  // grid and axis labels
  g.strokeStyle = css.getPropertyValue("--line"); g.fillStyle = css.getPropertyValue("--muted");
  g.font = "10px system-ui"; g.lineWidth = 1;
  for (let i = 0; i <= 3; i++) {
    const v = lo + (hi - lo) * i / 3, yy = y(v);
    g.beginPath(); g.moveTo(left, yy); g.lineTo(width - right, yy); g.stroke();
    g.fillText(fmt(v, Math.abs(hi - lo) < 10 ? 2 : 0), 2, yy + 3);
  }
  g.fillText(new Date(t0).toLocaleTimeString(), left, height - 4);
  const end = new Date(t1).toLocaleTimeString();
  g.fillText(end, width - right - g.measureText(end).width, height - 4);
  // min–max band
  g.fillStyle = css.getPropertyValue("--band");
  g.beginPath();
  points.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, x(ms(p.windowStart)), y(p.maxValue)));
  for (let i = points.length - 1; i >= 0; i--) g.lineTo(x(ms(points[i].windowStart)), y(points[i].minValue));
  g.closePath(); g.fill();
  // score (0..1 over the full height)
  g.strokeStyle = css.getPropertyValue("--score"); g.lineWidth = 1; g.globalAlpha = 0.7;
  g.beginPath();
  points.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, x(ms(p.windowStart)), ys(p.predictionScore)));
  g.stroke(); g.globalAlpha = 1;
  // average
  g.strokeStyle = css.getPropertyValue("--accent"); g.lineWidth = 2;
  g.beginPath();
  points.forEach((p, i) => (i ? g.lineTo : g.moveTo).call(g, x(ms(p.windowStart)), y(p.avgValue)));
  g.stroke();
  // anomalies
  g.fillStyle = css.getPropertyValue("--critical");
  for (const p of points.filter((p) => p.anomaly)) {
    g.beginPath(); g.arc(x(ms(p.windowStart)), y(p.avgValue), 4, 0, Math.PI * 2); g.fill();
  }
}

// ---- Alerts, top sensors, status ---------------------------------------------------

function addAlert(a) {
  if (state.lastAlertId === null || a.id > state.lastAlertId) state.lastAlertId = a.id;
  state.alerts.set(a.id, a);  // a resolution replaces the firing row of the same alert
  if (state.alerts.size > MAX_ALERTS) {
    const oldest = [...state.alerts.values()].sort((x, y) => ms(x.startedAt) - ms(y.startedAt))[0];
    state.alerts.delete(oldest.id);
  }
  state.alertsDirty = true;
}

function renderAlerts() {
  const list = $("alerts");
  const alerts = [...state.alerts.values()].sort((x, y) => ms(y.startedAt) - ms(x.startedAt) || y.id - x.id);
  list.replaceChildren(...alerts.slice(0, 60).map((a) => {
    const item = document.createElement("li");
    item.dataset.sensor = a.sensorId;
    item.dataset.severity = a.severity;
    item.dataset.state = a.state;
    item.title = a.message;
    item.innerHTML = `<span class="sev"></span><span class="what"></span><span class="when"></span>`;
    item.querySelector(".sev").classList.add(a.severity);
    item.querySelector(".sev").textContent = a.severity;
    item.querySelector(".what").textContent = `${a.rule} · ${a.sensorId} · ${a.eventType} · ${a.message}`;
    const started = new Date(ms(a.startedAt)).toLocaleTimeString();
    item.querySelector(".when").textContent = a.state === "resolved"
      ? `${started}–${new Date(ms(a.resolvedAt)).toLocaleTimeString()}` : `${started} firing`;
    return item;
  }));
  const firing = alerts.filter((a) => a.state === "firing").length;
  $("alert-count").textContent = firing ? `${firing} firing / ${state.alerts.size}` : String(state.alerts.size);
}

function showTop(items) {
  const body = $("top").querySelector("tbody");
  body.replaceChildren(...items.map((item) => {
    const row = document.createElement("tr");
    for (const text of [item.sensorId, item.eventType, fmt(item.value, 2), fmt(item.maxValue, 2)]) {
      const cell = document.createElement("td"); cell.textContent = text; row.appendChild(cell);
    }
    return row;
  }));
}

function showStatus(s) {
  const now = Date.now();
  const previous = state.lastStatus;
  state.lastStatus = { at: now, events: s.events };
  if (previous && s.events) {
    const seconds = Math.max((now - previous.at) / 1000, 0.001);
    $("t-rate").textContent = fmt(Math.max(s.events.accepted - previous.events.accepted, 0) / seconds);
    const rejects = Math.max(s.events.rejected - previous.events.rejected, 0) / seconds;
    $("t-rejects").textContent = fmt(rejects);
    $("t-rejects").className = `value ${rejects > 0 ? "bad" : ""}`;
  }
  const partitions = s.partitions || [];
  const live = partitions.filter((p) => p.live).length;
  $("t-partitions").textContent = `${live}/${partitions.length}`;
  $("t-partitions").className = `value ${live < partitions.length ? "bad" : "good"}`;
  $("t-restarts").textContent = fmt(partitions.reduce((sum, p) => sum + (p.restarts || 0), 0));
  const kafka = s.kafka;
  $("t-lag").textContent = kafka && Array.isArray(kafka.partitions)
    ? fmt(kafka.partitions.reduce((sum, p) => sum + Math.max(p.lag || 0, 0), 0)) : "n/a";
  const sinks = s.sinks || [];
  const failing = sinks.filter((k) => !k.healthy);
  $("t-sinks").textContent = failing.length ? `${failing.map((k) => k.name).join(", ")} failing` : `${sinks.length} ok`;
  $("t-sinks").className = `value ${failing.length ? "bad" : "good"}`;
  const p99 = s.latency && s.latency.windowFireToWebSocketSend && s.latency.windowFireToWebSocketSend.p99Ms;
  $("t-latency").textContent = p99 === null || p99 === undefined ? "–" : `${fmt(p99)} ms`;
  $("status-line").textContent = `tidemark ${s.version} · store ${s.store} · search ${s.search} · up ${fmt(s.uptimeSeconds)} s · ${s.websocketConnections} live connections`;
}

// ---- Filters, key, loop ------------------------------------------------------------

function askForKey() {
  const key = prompt("API key (read scope; admin for the pipeline status):", state.key);
  if (key === null) return;
  state.key = key.trim();
  localStorage.setItem("tidemark.key", state.key);
  if (state.socket) state.socket.close();
}

function applyFilters(event) {
  if (event) event.preventDefault();
  state.sensors = $("f-sensor").value.split(",").map((s) => s.trim()).filter(Boolean);
  state.eventType = $("f-type").value.trim();
  const params = new URLSearchParams();
  if (state.sensors.length) params.set("sensor", state.sensors.join(","));
  if (state.eventType) params.set("type", state.eventType);
  history.replaceState(null, "", params.toString() ? `?${params}` : location.pathname);
  state.shown = []; state.series.clear(); state.alerts.clear(); state.lastAlertId = null;
  renderChartFrames(); renderAlerts();
  if (state.socket) state.socket.close(); // reconnects with the new filters
  chooseCharts();
}

function frame() {
  for (const key of state.dirty) draw(key);
  state.dirty.clear();
  if (state.alertsDirty) { renderAlerts(); state.alertsDirty = false; }
}

window.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.search);
  $("f-sensor").value = params.get("sensor") || "";
  $("f-type").value = params.get("type") || "";
  state.sensors = $("f-sensor").value.split(",").map((s) => s.trim()).filter(Boolean);
  state.eventType = $("f-type").value.trim();
  $("filters").addEventListener("submit", applyFilters);
  $("key-button").addEventListener("click", askForKey);
  window.addEventListener("resize", () => state.shown.forEach((k) => state.dirty.add(k)));
  connect();
  chooseCharts();
  setInterval(chooseCharts, 5000);
  setInterval(frame, 500);
});

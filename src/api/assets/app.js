// fmsflow's dashboard: polls the query API (same origin) and draws the fleet overview,
// one device's hourly charts (mean line, min/max band) and quality by rule. No libraries:
// the machines it runs on are offline. A token, when the API asks for one, is given once
// in the address as #token=... and kept for the tab.
"use strict";

const METRICS = ["sensor1", "sensor2", "sensor3", "motor1", "motor2", "motor3"];
const POLL_MS = 2000;

const hashToken = new URLSearchParams(location.hash.slice(1)).get("token");
if (hashToken) sessionStorage.setItem("fmsflow-token", hashToken);
const token = sessionStorage.getItem("fmsflow-token");

const $ = (id) => document.getElementById(id);
let device = Number(new URLSearchParams(location.search).get("device")) || 1;
let lastCount = null;

async function api(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  const body = await r.json().catch(() => ({}));
  if (!r.ok) {
    const e = new Error((body.error && body.error.message) || r.statusText);
    e.status = r.status;
    throw e;
  }
  return body;
}

function fmt(n, digits = 1) {
  return Number.isFinite(n) ? n.toFixed(digits) : "–";
}

function setupDevices(n) {
  const sel = $("device");
  if (sel.options.length === n) return;
  sel.innerHTML = "";
  for (let d = 1; d <= n; d++) sel.add(new Option(String(d), String(d)));
  sel.value = String(Math.min(device, n));
  sel.onchange = () => {
    device = Number(sel.value);
    history.replaceState(null, "", "?device=" + device + location.hash);
    refresh();
  };
}

function setupCharts() {
  const box = $("charts");
  if (box.children.length) return;
  for (const m of METRICS) {
    const div = document.createElement("div");
    div.className = "chart";
    div.innerHTML = `<h3>${m}: mean, min–max band per hour</h3><canvas id="chart-${m}" data-points="0"></canvas>`;
    box.appendChild(div);
  }
}

// One metric's hours: the min–max band, the mean line, and the axes' labels.
function drawChart(canvas, hours, metric) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth, h = canvas.clientHeight;
  canvas.width = w * dpr;
  canvas.height = h * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  g.clearRect(0, 0, w, h);
  const pts = hours.map((r) => ({ t: Date.parse(r.hour), ...r.metrics[metric] }));
  canvas.dataset.points = String(pts.length);
  g.fillStyle = "#8a96a3";
  g.font = "11px system-ui, sans-serif";
  if (!pts.length) {
    g.fillText("no hours yet", 10, h / 2);
    return;
  }
  const pad = { l: 44, r: 8, t: 8, b: 18 };
  let lo = Math.min(...pts.map((p) => p.min)), hi = Math.max(...pts.map((p) => p.max));
  if (hi === lo) { hi += 1; lo -= 1; }
  const t0 = pts[0].t, t1 = pts[pts.length - 1].t;
  const x = (t) => pad.l + (t1 === t0 ? (w - pad.l - pad.r) / 2 : ((t - t0) / (t1 - t0)) * (w - pad.l - pad.r));
  const y = (v) => pad.t + (1 - (v - lo) / (hi - lo)) * (h - pad.t - pad.b);
  g.fillText(fmt(hi), 2, pad.t + 8);
  g.fillText(fmt(lo), 2, h - pad.b);
  g.fillText(new Date(t0).toISOString().slice(5, 13) + "h", pad.l, h - 4);
  if (t1 !== t0) {
    const label = new Date(t1).toISOString().slice(5, 13) + "h";
    g.fillText(label, w - pad.r - g.measureText(label).width, h - 4);
  }
  g.fillStyle = "rgba(79, 179, 255, 0.22)";
  g.beginPath();
  pts.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.max)) : g.moveTo(x(p.t), y(p.max))));
  for (let i = pts.length - 1; i >= 0; i--) g.lineTo(x(pts[i].t), y(pts[i].min));
  g.closePath();
  g.fill();
  // Each hour's own min–max bar (the band alone has no width with one hour).
  g.fillStyle = "rgba(79, 179, 255, 0.45)";
  for (const p of pts) g.fillRect(x(p.t) - 3, y(p.max), 6, Math.max(1, y(p.min) - y(p.max)));
  g.strokeStyle = "#4fb3ff";
  g.lineWidth = 1.5;
  g.beginPath();
  pts.forEach((p, i) => (i ? g.lineTo(x(p.t), y(p.mean)) : g.moveTo(x(p.t), y(p.mean))));
  g.stroke();
  for (const p of pts) {
    g.fillStyle = "#4fb3ff";
    g.fillRect(x(p.t) - 1.5, y(p.mean) - 1.5, 3, 3);
  }
}

function drawRules(q) {
  const box = $("rules");
  const rows = [["valid", q.valid, "valid"], ...Object.entries(q.rules).map(([r, n]) => [r, n, "bad"])];
  const max = Math.max(1, ...rows.map((r) => r[1]));
  box.innerHTML = "";
  for (const [name, n, kind] of rows) {
    const div = document.createElement("div");
    div.className = "rule";
    div.dataset.rule = name;
    div.innerHTML = `<span>${name}</span><div><div class="bar ${kind}" style="width:${(100 * n) / max}%"></div></div><span>${n}</span>`;
    box.appendChild(div);
  }
}

function drawFleet(f) {
  const body = $("fleet").querySelector("tbody");
  body.innerHTML = "";
  for (const r of f.devices.slice(0, 15)) {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td>${r.device}</td><td>${r.count}</td><td class="${r.fails ? "fail" : ""}">${r.fails}</td>` +
      `<td>${fmt(r.metrics.sensor1.mean)}</td><td>${fmt(r.metrics.motor1.max)}</td><td>${r.last}</td>`;
    body.appendChild(tr);
  }
}

async function refresh() {
  try {
    const st = await api("/api/v1/status");
    setupDevices(st.devices);
    setupCharts();
    const received = st.processes.reduce((a, p) => a + p.received, 0);
    const now = performance.now();
    if (lastCount) {
      const rate = ((received - lastCount.n) * 1000) / (now - lastCount.t);
      $("rate").textContent = fmt(Math.max(0, rate), 0) + "/s";
    }
    lastCount = { n: received, t: now };
    $("rate-sub").textContent = `${received} records in, ${st.workers} worker(s), ${st.processes.length} process(es)`;
    $("asof").textContent = `as of epoch ${st.as_of.epoch}${st.as_of.complete ? " (input complete)" : ""} · watermark ${st.watermark || "–"}`;

    const [fleet, quality, hourly] = await Promise.all([
      api("/api/v1/fleet/hourly?sort=fails").catch((e) => (e.status === 404 ? { devices: [], hour: null } : Promise.reject(e))),
      api("/api/v1/quality"),
      api(`/api/v1/devices/${device}/hourly`),
    ]);
    $("reporting").textContent = `${fleet.devices.length} / ${st.devices}`;
    $("reporting-sub").textContent = fleet.hour ? "hour " + fleet.hour : "no hour yet";
    const failing = fleet.devices.filter((r) => r.fails > 0);
    $("failing").textContent = String(failing.length);
    $("failing-list").textContent = failing.slice(0, 10).map((r) => `#${r.device} (${r.fails})`).join(" ");
    $("quality").textContent = fmt(100 * quality.valid_ratio, 2) + " %";
    $("quality-sub").textContent = `${quality.valid} valid of ${quality.total}`;
    drawRules(quality);
    drawFleet(fleet);
    $("device-sub").textContent = `${hourly.hours.length} hour(s) from ${hourly.from} to ${hourly.to}`;
    for (const m of METRICS) drawChart($("chart-" + m), hourly.hours, m);
    $("error").hidden = true;
    document.body.dataset.updates = String(Number(document.body.dataset.updates) + 1);
    document.body.dataset.epoch = String(st.as_of.epoch);
  } catch (e) {
    $("error").hidden = false;
    $("error").textContent = e.status === 401 ? "the API needs a token: open this page as /#token=…" : "API: " + e.message;
  }
}

refresh();
setInterval(refresh, POLL_MS);

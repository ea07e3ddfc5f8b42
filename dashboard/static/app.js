/* IoT CA Lab dashboard: live state over Socket.IO (snapshot, then batches), Chart.js, the CA forms.
 * Native ES modules (js/*.js), no build step and no framework: plain DOM, text only through textContent
 * (data never parsed as HTML). This is the entry point (<script type="module">): it wires the socket. */
import { state } from "./js/state.js";
import { $ } from "./js/dom.js";
import { socket } from "./js/socket.js";
import { chart, datasetFor, mergePoints, metrics, scheduleChart } from "./js/chart.js";
import { renderBroker, renderCardTimes, renderDevice, renderKpis, renderStats } from "./js/devices.js";
import { receiveLog, renderLogAll } from "./js/log.js";
import { receiveCerts } from "./js/certs.js";
import "./js/actions.js"; // the dialog, the CA forms and the tokens: event handlers only

// -- sidebar: highlight the section in view --------------------------------------------------
const navLinks = [...document.querySelectorAll(".sidebar nav a")];
if ("IntersectionObserver" in window) {
  const observer = new IntersectionObserver((items) => {
    const visible = items.filter((i) => i.isIntersecting).sort((a, b) => a.boundingClientRect.top - b.boundingClientRect.top)[0];
    if (!visible) return;
    navLinks.forEach((a) => a.classList.toggle("active", a.getAttribute("href") === `#${visible.target.id}`));
  }, { rootMargin: "0px 0px -60% 0px" });
  navLinks.forEach((a) => { const target = $(a.getAttribute("href")); if (target) observer.observe(target); });
}

// -- Socket.IO -------------------------------------------------------------------------------
const setLive = (stateName, text) => {
  $("#live-pill").dataset.state = stateName;
  $("#live-state").textContent = text;
};
const syncClock = (serverTime) => {
  if (!serverTime) return;
  state.clockOffset = serverTime * 1000 - Date.now();
  state.lastServerTime = serverTime;
};

const listen = () => {
  socket.on("connect", () => setLive("ok", "Live"));
  // The server refuses the handshake without a session (logged out, idle timeout): back to the login.
  socket.on("connect_error", () => {
    fetch("/api/session", { credentials: "same-origin" }).then((r) => { if (r.status === 401) window.location.assign("/login"); }).catch(() => {});
  });
  socket.on("disconnect", () => setLive("warn", "Reconnecting…"));
  socket.io.on("reconnect_attempt", () => setLive("warn", "Reconnecting…"));

  socket.on("snapshot", (snap) => {
    syncClock(snap.server_time);
    const config = snap.config || {};
    state.logLimit = config.log_limit || state.logLimit;
    state.historySeconds = config.history_seconds || state.historySeconds;
    state.publishInterval = config.publish_interval || state.publishInterval;
    $("#log-limit").textContent = state.logLimit;
    // A reconnect replaces everything: the snapshot is the truth.
    state.devices.clear();
    state.history.clear();
    if (chart) chart.data.datasets = [];
    $("#device-grid").replaceChildren();
    for (const device of snap.devices || []) state.devices.set(device.device_id, device);
    for (const [deviceId, points] of Object.entries(snap.history || {})) mergePoints(deviceId, points);
    receiveCerts(snap.certs);
    for (const device of snap.devices || []) renderDevice(device);
    for (const deviceId of state.devices.keys()) datasetFor(deviceId);
    state.log = (snap.log || []).slice(-state.logLimit);
    state.pausedQueue = [];
    renderLogAll();
    renderKpis();
    renderStats(snap.stats);
    renderBroker(snap.broker);
    scheduleChart();
  });

  socket.on("batch", (batch) => {
    const started = performance.now();
    syncClock(batch.server_time);
    for (const device of batch.devices || []) state.devices.set(device.device_id, device);
    for (const [deviceId, points] of Object.entries(batch.points || {})) mergePoints(deviceId, points);
    for (const device of batch.devices || []) renderDevice(device, true);
    receiveLog(batch.log || []);
    renderKpis();
    renderStats(batch.stats);
    if (batch.broker) renderBroker(batch.broker);
    scheduleChart();
    const spent = performance.now() - started;
    metrics.batches += 1;
    metrics.batchMsTotal += spent;
    metrics.batchMsMax = Math.max(metrics.batchMsMax, spent);
  });

  socket.on("certs", (data) => receiveCerts(data));

  // Relative times and the chart's moving window advance even when nothing arrives.
  setInterval(() => {
    for (const [deviceId, device] of state.devices) {
      const card = $(`#device-grid [data-device="${CSS.escape(deviceId)}"]`);
      if (card) renderCardTimes(card, device);
    }
    scheduleChart();
  }, 1000);
};
if (socket) listen();
else setLive("bad", "Socket.IO client missing");

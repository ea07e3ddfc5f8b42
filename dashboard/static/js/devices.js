/* Device cards (live reading, presence, sparkline, certificate lifecycle), KPIs, stats and the broker pill. */
import { RENEW_BEFORE_DAYS, state } from "./state.js";
import { $, el, svgEl } from "./dom.js";
import { colorOf, fmtAgo, fmtDate, fmtDay, fmtNumber, now, shortSerial } from "./format.js";

// -- device cards ----------------------------------------------------------------------------
export const THERMO_ICON = "M14 14.76V3.5a2.5 2.5 0 0 0-5 0v11.26a4.5 4.5 0 1 0 5 0Z";

export const buildCard = (deviceId) => {
  const icon = svgEl("svg", { viewBox: "0 0 24 24", "aria-hidden": "true" });
  icon.append(svgEl("path", { d: THERMO_ICON, fill: "none", stroke: "currentColor", "stroke-width": "2", "stroke-linecap": "round", "stroke-linejoin": "round" }));
  const spark = svgEl("svg", { class: "sparkline", viewBox: "0 0 100 30", preserveAspectRatio: "none", "aria-hidden": "true" });
  spark.append(svgEl("path", { class: "area" }), svgEl("path", { class: "line", "vector-effect": "non-scaling-stroke" }));
  const card = el("article", { class: "device-card", dataset: { device: deviceId, status: "unknown" }, "aria-label": `Device ${deviceId}` },
    el("div", { class: "device-head" },
      el("div", { class: "device-ico" }, icon),
      el("div", { class: "device-title" }, el("h3", { text: deviceId }), el("div", { class: "muted small", text: "Thermometer" })),
      el("span", { class: "badge badge-unknown status-badge", text: "Unknown" })),
    el("div", { class: "reading" },
      el("span", { class: "value", text: "—" }), el("span", { class: "unit", text: "°C" }),
      el("span", { class: "trend", title: "Change over the last minute", text: "→ 0.00" })),
    spark,
    el("dl", { class: "meta" },
      el("div", {}, el("dt", { text: "Last seen" }), el("dd", { class: "last-seen", text: "never" })),
      el("div", {}, el("dt", { text: "Last renewal" }),
        el("dd", { class: "last-renewal" }, el("span", { class: "when", text: "—" }), el("span", { class: "sub", text: "" }))),
      el("div", {}, el("dt", { text: "Readings" }), el("dd", { class: "count", text: "0" }))),
    el("div", { class: "cert-strip" },
      el("span", { class: "cert-badge cert-unknown", text: "Certificate …" }),
      el("span", { class: "renewal-mode muted small" }),
      el("div", { class: "card-actions" },
        el("button", { type: "button", class: "btn btn-ghost btn-small", dataset: { action: "renew", name: deviceId }, hidden: true, text: "Renew…" }),
        el("button", { type: "button", class: "btn btn-ghost btn-small btn-danger-ghost", dataset: { action: "revoke", name: deviceId }, hidden: true, text: "Revoke…" }))));
  return card;
};

export const cardOf = (deviceId) => {
  const grid = $("#device-grid");
  let card = grid.querySelector(`[data-device="${CSS.escape(deviceId)}"]`);
  if (!card) {
    grid.querySelector(".empty-state")?.remove();
    card = buildCard(deviceId);
    const after = [...grid.children].find((c) => c.dataset.device && c.dataset.device.localeCompare(deviceId) > 0);
    grid.insertBefore(card, after || null);
  }
  return card;
};

export const renderDevice = (device, flash = false) => {
  state.devices.set(device.device_id, device);
  const card = cardOf(device.device_id);
  card.dataset.status = device.status;
  const badge = $(".status-badge", card);
  badge.className = `badge status-badge badge-${device.status}`;
  badge.textContent = device.status === "online" ? "Online" : device.status === "offline" ? "Offline" : "Unknown";
  $(".value", card).textContent = device.temperature === null ? "—" : device.temperature.toFixed(2);
  const trend = $(".trend", card);
  const arrow = device.trend === "up" ? "↑" : device.trend === "down" ? "↓" : "→";
  trend.className = `trend trend-${device.trend}`;
  trend.textContent = `${arrow} ${device.delta >= 0 ? "+" : ""}${Number(device.delta || 0).toFixed(2)}`;
  trend.setAttribute("aria-label", `trend ${device.trend}, ${device.delta} degrees over the last minute`);
  $(".count", card).textContent = fmtNumber(device.readings);
  if (flash) {
    card.classList.add("flash");
    clearTimeout(card._flash);
    card._flash = setTimeout(() => card.classList.remove("flash"), 400);
  }
  renderCardTimes(card, device);
  renderCardCert(card, device.device_id);
  drawSparkline(device.device_id);
};

export const renderCardTimes = (card, device) => {
  const entity = entityOf(device.device_id);
  if (entity && entity.last_renewal && entity.last_renewal.renewed) renderCardRenewal(card, entity);
  const seen = $(".last-seen", card);
  const age = device.last_seen ? (now() - device.last_seen * 1000) / 1000 : null;
  seen.textContent = age === null ? "never" : fmtAgo(age);
  seen.title = device.last_seen ? new Date(device.last_seen * 1000).toLocaleString() : "";
  // Online but silent for three publish intervals (at least 30 s): say so before the broker's LWT does.
  const stale = device.status === "online" && age !== null && age > Math.max(30, 3 * state.publishInterval);
  seen.classList.toggle("warn", stale);
  if (stale) seen.title = `no reading for ${Math.round(age)} s · ${seen.title}`;
};

// -- certificate lifecycle on the cards ------------------------------------------------------
export const STATUS_TEXT = { valid: "Valid", expiring: "Expiring", expired: "Expired", revoked: "Revoked", invalid: "Invalid", missing: "No certificate" };
// How a certificate came to be (the inventory's issued_via).
export const VIA_TEXT = { renew: "over MQTT", cli: "by the generator", import: "by the generator", http: "via the CA API", mqtt: "via the CA API (MQTT)" };
export const daysText = (days) => {
  if (days === null || days === undefined) return "";
  if (days <= 0) return `${Math.ceil(-days)} d ago`;
  return days < 1 ? `${Math.max(1, Math.round(days * 24))} h left` : `${Math.floor(days)} d left`;
};
export const badgeText = (entity) => {
  const label = STATUS_TEXT[entity.status] || entity.status;
  if (entity.status === "revoked" || entity.status === "missing" || entity.status === "invalid") return label;
  const days = daysText(entity.days_left);
  return days ? `${label} · ${days}` : label;
};
export const entityOf = (name) => state.entities[name] || null;
// What the page says about who renews a certificate: the device itself, the CA (with the passphrase), or nobody.
export const renewalNote = (entity) => {
  const renewal = entity.renewal || {};
  if (entity.status === "revoked") return "Revoked: the broker refuses it; enrol again with a token to rejoin";
  if (entity.status === "missing") return "No certificate yet: run ./setup.sh certs or enrol with a token";
  if (entity.status === "expired") {
    return renewal.server ? "Expired: it cannot renew itself; the CA can re-sign its key" : "Expired: it cannot renew itself; enrol again with a token";
  }
  if (renewal.self) return `↻ Renews itself over MQTT inside the ${RENEW_BEFORE_DAYS}-day window: no action needed`;
  if (renewal.server) return "The CA holds its key: renew here";
  return "The key is with its owner: it renews with a new CSR";
};

export const renderCardCert = (card, deviceId) => {
  const entity = entityOf(deviceId);
  const badge = $(".cert-badge", card);
  const note = $(".renewal-mode", card);
  const renew = $('[data-action="renew"]', card);
  const revoke = $('[data-action="revoke"]', card);
  card.dataset.cert = entity ? entity.status : "unknown";
  if (!entity) {
    badge.className = "cert-badge cert-missing";
    badge.textContent = state.certsLoaded ? "No certificate" : "Certificate …";
    badge.title = "";
    note.textContent = state.certsLoaded ? "No certificate issued to this name" : "";
    renew.hidden = revoke.hidden = true;
    renderCardRenewal(card, null);
    return;
  }
  badge.className = `cert-badge cert-${entity.status}`;
  badge.textContent = badgeText(entity);
  badge.title = entity.not_after ? `Certificate ${entity.serial ? shortSerial(entity.serial) : ""} valid until ${fmtDate(entity.not_after)}${entity.detail ? ` · ${entity.detail}` : ""}` : entity.detail;
  note.textContent = renewalNote(entity);
  note.title = entity.renewal && entity.renewal.self ? `It publishes a CSR for a new key to ssl/renew/${deviceId}; its current certificate is the credential` : "";
  renew.hidden = !(entity.renewal && entity.renewal.server);
  revoke.hidden = !(entity.serial && (entity.status === "valid" || entity.status === "expiring"));
  renderCardRenewal(card, entity);
};

export const renderCardRenewal = (card, entity) => {
  const when = $(".last-renewal .when", card);
  const sub = $(".last-renewal .sub", card);
  const last = entity && entity.last_renewal;
  if (!last) { when.textContent = "—"; sub.textContent = ""; when.parentElement.title = ""; return; }
  const at = new Date(last.at).getTime();
  when.textContent = last.renewed ? fmtAgo((now() - at) / 1000) : fmtDay(last.at);
  const how = VIA_TEXT[last.via] || (last.via ? `via ${last.via}` : "");
  sub.textContent = last.renewed ? how : `issued ${how}`.trim();
  when.parentElement.title = `${last.renewed ? "Renewed" : "Issued"} ${how} on ${fmtDate(last.at, true)} · serial ${last.serial}`;
};

export const drawSparkline = (deviceId) => {
  const card = cardOf(deviceId);
  const series = state.history.get(deviceId) || [];
  const recent = series.slice(-90);
  const line = $(".sparkline path.line", card);
  const area = $(".sparkline path.area", card);
  const color = colorOf(deviceId);
  line.setAttribute("stroke", color);
  area.setAttribute("fill", color);
  if (recent.length < 2) { line.setAttribute("d", ""); area.setAttribute("d", ""); return; }
  const xs = recent.map((p) => p.x);
  const ys = recent.map((p) => p.y);
  const x0 = xs[0], x1 = xs[xs.length - 1] || x0 + 1;
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 0.5) { const mid = (y0 + y1) / 2; y0 = mid - 0.25; y1 = mid + 0.25; }
  const px = (x) => ((x - x0) / Math.max(1, x1 - x0)) * 100;
  const py = (y) => 28 - ((y - y0) / (y1 - y0)) * 26;
  const d = recent.map((p, i) => `${i ? "L" : "M"}${px(p.x).toFixed(2)},${py(p.y).toFixed(2)}`).join(" ");
  line.setAttribute("d", d);
  area.setAttribute("d", `${d} L100,30 L0,30 Z`);
};

export const renderKpis = () => {
  const devices = [...state.devices.values()];
  const grid = $("#device-grid");
  if (!devices.length && !grid.children.length) {
    grid.append(el("div", { class: "card empty-state" },
      el("div", { class: "empty-ico", "aria-hidden": "true", text: "◉" }),
      el("div", { text: "No device has reported yet. Start one with DEVICE_ID=device001 python thermometer.py" })));
  }
  const online = devices.filter((d) => d.status === "online").length;
  $("#kpi-online").textContent = online;
  $("#kpi-devices").textContent = devices.length;
  const offline = devices.filter((d) => d.status === "offline").length;
  $("#kpi-devices-foot").textContent = devices.length
    ? `${offline} offline · ${devices.length - online - offline} unknown`
    : "waiting for data";
};

export const renderStats = (stats) => {
  if (!stats) return;
  $("#kpi-rate").textContent = stats.rate >= 100 ? fmtNumber(Math.round(stats.rate)) : stats.rate.toFixed(1);
  $("#kpi-messages").textContent = fmtNumber(stats.messages);
  $("#kpi-readings").textContent = fmtNumber(stats.readings);
};

export const renderBroker = (broker) => {
  if (!broker) return;
  const pill = $("#broker-pill");
  pill.dataset.state = broker.connected ? "ok" : "bad";
  $("#broker-state").textContent = broker.connected ? "connected" : "disconnected";
  pill.title = broker.connected ? `Connected to ${broker.broker}` : (broker.last_error || `Not connected to ${broker.broker || "the broker"}`);
};

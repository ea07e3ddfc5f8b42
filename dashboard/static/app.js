/* IoT CA Lab dashboard: live state over Socket.IO (snapshot, then batches), Chart.js, the CA forms.
 * No build step and no framework: plain DOM, text only through textContent (never innerHTML with data). */
(() => {
  "use strict";

  const body = document.body;
  const PALETTE = ["#4f8cff", "#3ecf8e", "#f59e0b", "#f472b6", "#a78bfa", "#22d3ee", "#fb7185", "#a3e635"];
  const RENEW_BEFORE_DAYS = Number(body.dataset.renewBeforeDays || 30);
  const IS_OPERATOR = body.dataset.role === "operator";
  const CSRF_TOKEN = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
  // Every state-changing request of the page: JSON, with the session's CSRF token; a lost session
  // (logged out elsewhere, idle timeout) sends the tab back to the login page.
  const postJson = async (url, payload) => {
    const response = await fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": CSRF_TOKEN },
      body: JSON.stringify(payload),
      credentials: "same-origin",
    });
    if (response.status === 401) window.location.assign("/login");
    return response;
  };

  const state = {
    devices: new Map(),        // id -> device dict from the server
    history: new Map(),        // id -> [{x: ms, y}] (shared with the chart's datasets)
    log: [],                   // newest last, at most logLimit
    pausedQueue: [],
    paused: false,
    filter: "",
    logLimit: 500,
    historySeconds: 3600,
    publishInterval: 5,
    range: 3600,
    certs: [],
    crl: null,
    entities: {},              // name -> lifecycle state (status, days left, last renewal, who can renew it)
    attention: null,           // what the banner shows
    certsLoaded: false,        // whether the first certificate table has arrived
    bannerDismissed: null,     // the banner's content when the user closed it (shown again once it changes)
    certFilter: "",
    showSuperseded: false,
    knownSerials: null,
    clockOffset: 0,            // server time - local time, ms
    lastServerTime: 0,
  };

  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, attrs = {}, ...children) => {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs)) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  };
  const svgEl = (tag, attrs = {}) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  };

  // -- formatting ------------------------------------------------------------------------------
  const now = () => Date.now() + state.clockOffset;
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  const fmtClock = (ms, withMs = false) => {
    const d = new Date(ms);
    const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
    return withMs ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
  };
  const fmtDay = (iso) => {
    if (!iso) return "—";
    const d = new Date(iso);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
  };
  const fmtDate = (iso, seconds = false) => {
    if (!iso) return "—";
    const d = new Date(iso);
    return `${fmtDay(iso)} ${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ""}`;
  };
  const fmtAgo = (seconds) => {
    if (seconds === null || seconds === undefined) return "never";
    const s = Math.max(0, seconds);
    if (s < 2) return "just now";
    if (s < 60) return `${Math.floor(s)} s ago`;
    if (s < 3600) return `${Math.floor(s / 60)} min ago`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
    return `${Math.floor(s / 86400)} d ago`;
  };
  const fmtIn = (iso) => {
    if (!iso) return "—";
    const days = (new Date(iso).getTime() - now()) / 86400000;
    if (days < 0) return "overdue";
    if (days < 1) return `in ${Math.max(1, Math.round(days * 24))} h`;
    return `in ${Math.round(days)} days`;
  };
  const fmtNumber = (n) => new Intl.NumberFormat().format(n);
  const shortSerial = (serial) => (serial && serial.length > 16 ? `${serial.slice(0, 8)}…${serial.slice(-6)}` : serial || "—");
  const cnOf = (subject) => {
    const match = /(?:^|,)CN=((?:\\.|[^,])*)/.exec(subject || "");
    return match ? match[1].replace(/\\(.)/g, "$1") : "";
  };
  const colorOf = (deviceId) => {
    const ids = [...state.devices.keys()].sort();
    const index = Math.max(0, ids.indexOf(deviceId));
    return PALETTE[index % PALETTE.length];
  };

  // -- theme -----------------------------------------------------------------------------------
  const applyTheme = (theme) => {
    document.documentElement.dataset.theme = theme;
    try { localStorage.setItem("lab-theme", theme); } catch (_) { /* private mode */ }
    if (chart) { styleChart(); chart.update("none"); }
  };
  let initialTheme = "dark";
  try { initialTheme = localStorage.getItem("lab-theme") || "dark"; } catch (_) { /* ignore */ }
  document.documentElement.dataset.theme = initialTheme;
  $("#theme-toggle").addEventListener("click", () => {
    applyTheme(document.documentElement.dataset.theme === "light" ? "dark" : "light");
  });

  // -- chart -----------------------------------------------------------------------------------
  const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  let chart = null;
  const styleChart = () => {
    const grid = cssVar("--border");
    const text = cssVar("--muted");
    const x = chart.options.scales.x;
    const y = chart.options.scales.y;
    x.grid.color = grid; y.grid.color = grid;
    x.ticks.color = text; y.ticks.color = text; y.title.color = text;
    chart.options.plugins.legend.labels.color = cssVar("--text-2");
  };
  if (window.Chart) {
    window.Chart.defaults.font.family = getComputedStyle(body).fontFamily;
    chart = new window.Chart($("#temperature-chart"), {
      type: "line",
      data: { datasets: [] },
      options: {
        animation: false,
        parsing: false,
        normalized: true,
        responsive: true,
        maintainAspectRatio: false,
        spanGaps: 5000,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        elements: { point: { radius: 0, hoverRadius: 4, hitRadius: 6 }, line: { borderWidth: 2, cubicInterpolationMode: "monotone" } },
        scales: {
          x: {
            type: "linear",
            grid: { drawTicks: false },
            border: { display: false },
            ticks: { maxTicksLimit: 8, padding: 8, callback: (value) => fmtClock(value).slice(0, 5) },
          },
          y: {
            grace: "10%",
            border: { display: false },
            grid: { drawTicks: false },
            title: { display: true, text: "°C" },
            ticks: { padding: 8 },
          },
        },
        plugins: {
          legend: { position: "top", align: "end", labels: { usePointStyle: true, pointStyle: "circle", boxWidth: 8, boxHeight: 8 } },
          tooltip: {
            callbacks: {
              title: (items) => (items.length ? fmtClock(items[0].parsed.x) : ""),
              label: (item) => ` ${item.dataset.label}: ${item.parsed.y.toFixed(2)} °C`,
            },
          },
        },
      },
    });
    styleChart();
  }
  // For tests and the curious (devtools): the state, the chart, and how much work each push costs the page.
  const metrics = { batches: 0, batchMsTotal: 0, batchMsMax: 0 };
  window.labDashboard = { state, metrics, get chart() { return chart; } };

  const datasetFor = (deviceId) => {
    if (!chart) return null;
    let dataset = chart.data.datasets.find((d) => d.label === deviceId);
    if (!dataset) {
      if (!state.history.has(deviceId)) state.history.set(deviceId, []);
      const color = colorOf(deviceId);
      dataset = { label: deviceId, data: state.history.get(deviceId), borderColor: color, backgroundColor: color, fill: false };
      chart.data.datasets.push(dataset);
      chart.data.datasets.sort((a, b) => a.label.localeCompare(b.label));
    }
    return dataset;
  };

  const mergePoints = (deviceId, points) => {
    if (!state.history.has(deviceId)) state.history.set(deviceId, []);
    const series = state.history.get(deviceId);
    for (const [second, value] of points) {
      const x = second * 1000;
      const last = series[series.length - 1];
      if (last && last.x === x) last.y = value;
      else if (!last || last.x < x) series.push({ x, y: value });
    }
    datasetFor(deviceId);
  };

  let chartPending = false;
  const scheduleChart = () => {
    if (!chart || chartPending) return;
    chartPending = true;
    requestAnimationFrame(() => {
      chartPending = false;
      const end = now();
      const horizon = end - state.historySeconds * 1000;
      let points = 0;
      for (const series of state.history.values()) {
        let drop = 0;
        while (drop < series.length && series[drop].x < horizon) drop++;
        if (drop) series.splice(0, drop);
        points += series.length;
      }
      chart.options.scales.x.min = end - state.range * 1000;
      chart.options.scales.x.max = end;
      chart.update("none");
      $("#chart-empty").hidden = points > 0;
    });
  };

  document.querySelectorAll(".segmented button").forEach((button) => {
    button.addEventListener("click", () => {
      state.range = Number(button.dataset.range);
      document.querySelectorAll(".segmented button").forEach((b) => b.setAttribute("aria-pressed", String(b === button)));
      scheduleChart();
    });
  });

  // -- device cards ----------------------------------------------------------------------------
  const THERMO_ICON = "M14 14.76V3.5a2.5 2.5 0 0 0-5 0v11.26a4.5 4.5 0 1 0 5 0Z";

  const buildCard = (deviceId) => {
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

  const cardOf = (deviceId) => {
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

  const renderDevice = (device, flash = false) => {
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

  const renderCardTimes = (card, device) => {
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
  const STATUS_TEXT = { valid: "Valid", expiring: "Expiring", expired: "Expired", revoked: "Revoked", invalid: "Invalid", missing: "No certificate" };
  // How a certificate came to be (the inventory's issued_via).
  const VIA_TEXT = { renew: "over MQTT", cli: "by the generator", import: "by the generator", http: "via the CA API", mqtt: "via the CA API (MQTT)" };
  const daysText = (days) => {
    if (days === null || days === undefined) return "";
    if (days <= 0) return `${Math.ceil(-days)} d ago`;
    return days < 1 ? `${Math.max(1, Math.round(days * 24))} h left` : `${Math.floor(days)} d left`;
  };
  const badgeText = (entity) => {
    const label = STATUS_TEXT[entity.status] || entity.status;
    if (entity.status === "revoked" || entity.status === "missing" || entity.status === "invalid") return label;
    const days = daysText(entity.days_left);
    return days ? `${label} · ${days}` : label;
  };
  const entityOf = (name) => state.entities[name] || null;
  // What the page says about who renews a certificate: the device itself, the CA (with the passphrase), or nobody.
  const renewalNote = (entity) => {
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

  const renderCardCert = (card, deviceId) => {
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

  const renderCardRenewal = (card, entity) => {
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

  const drawSparkline = (deviceId) => {
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

  const renderKpis = () => {
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

  const renderStats = (stats) => {
    if (!stats) return;
    $("#kpi-rate").textContent = stats.rate >= 100 ? fmtNumber(Math.round(stats.rate)) : stats.rate.toFixed(1);
    $("#kpi-messages").textContent = fmtNumber(stats.messages);
    $("#kpi-readings").textContent = fmtNumber(stats.readings);
  };

  const renderBroker = (broker) => {
    if (!broker) return;
    const pill = $("#broker-pill");
    pill.dataset.state = broker.connected ? "ok" : "bad";
    $("#broker-state").textContent = broker.connected ? "connected" : "disconnected";
    pill.title = broker.connected ? `Connected to ${broker.broker}` : (broker.last_error || `Not connected to ${broker.broker || "the broker"}`);
  };

  // -- MQTT log --------------------------------------------------------------------------------
  const logList = $("#log-list");
  const matches = (entry) => {
    if (!state.filter) return true;
    const needle = state.filter;
    return entry.topic.toLowerCase().includes(needle) || entry.payload.toLowerCase().includes(needle);
  };
  const logRow = (entry) => {
    const row = el("div", { class: `log-row${entry.note ? " rejected" : ""}`, dataset: { id: entry.id } },
      el("span", { class: "t", text: fmtClock(entry.time * 1000, true) }),
      el("span", { class: `dir dir-${entry.direction}`, text: entry.direction.toUpperCase(), title: entry.direction === "in" ? "to the dashboard" : "published by the dashboard's CA" }),
      el("span", { class: "topic", text: entry.topic, title: entry.topic }),
      el("span", { class: "payload", title: entry.payload }, entry.payload, entry.note ? el("span", { class: "note", text: entry.note }) : null));
    if (entry.retained) row.querySelector(".topic").append(el("span", { class: "role", text: "retained" }));
    return row;
  };
  const renderLogCount = () => {
    const shown = logList.querySelectorAll(".log-row").length;
    $("#log-count").textContent = state.filter ? `${shown} of ${state.log.length} match “${state.filter}”` : `${shown} shown`;
    const empty = $(".log-empty", logList);
    if (!shown && !empty) logList.append(el("div", { class: "log-empty", text: state.filter ? "No message matches the filter" : "No messages yet" }));
    if (shown && empty) empty.remove();
  };
  const renderLogAll = () => {
    logList.replaceChildren(...state.log.filter(matches).reverse().map(logRow));
    renderLogCount();
  };
  const addLogEntries = (entries) => {
    if (!entries.length) return;
    state.log.push(...entries);
    if (state.log.length > state.logLimit) state.log.splice(0, state.log.length - state.logLimit);
    const fresh = entries.filter(matches);
    if (fresh.length) {
      const fragment = document.createDocumentFragment();
      for (let i = fresh.length - 1; i >= 0; i--) fragment.append(logRow(fresh[i]));
      logList.prepend(fragment);
    }
    // Drop rows whose entries fell out of the capped log.
    const oldest = state.log.length ? state.log[0].id : Infinity;
    let last = logList.lastElementChild;
    while (last && last.classList.contains("log-row") && Number(last.dataset.id) < oldest) {
      const prev = last.previousElementSibling;
      last.remove();
      last = prev;
    }
    renderLogCount();
  };
  const receiveLog = (entries) => {
    if (!entries || !entries.length) return;
    if (state.paused) {
      state.pausedQueue.push(...entries);
      if (state.pausedQueue.length > state.logLimit) state.pausedQueue.splice(0, state.pausedQueue.length - state.logLimit);
      const note = $("#log-paused-note");
      note.hidden = false;
      note.textContent = `Paused · ${state.pausedQueue.length} new message${state.pausedQueue.length === 1 ? "" : "s"} waiting`;
      $("#log-pause").textContent = `Resume (${state.pausedQueue.length})`;
      return;
    }
    addLogEntries(entries);
  };
  let filterTimer = null;
  $("#log-filter").addEventListener("input", (event) => {
    clearTimeout(filterTimer);
    filterTimer = setTimeout(() => { state.filter = event.target.value.trim().toLowerCase(); renderLogAll(); }, 120);
  });
  $("#log-pause").addEventListener("click", (event) => {
    state.paused = !state.paused;
    event.currentTarget.setAttribute("aria-pressed", String(state.paused));
    event.currentTarget.textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) {
      const queued = state.pausedQueue.splice(0);
      $("#log-paused-note").hidden = true;
      addLogEntries(queued);
    }
  });
  $("#log-clear").addEventListener("click", () => {
    state.log = [];
    state.pausedQueue = [];
    renderLogAll();
  });

  // -- certificates ----------------------------------------------------------------------------
  const certMatches = (row) => {
    if (!state.showSuperseded && row.status === "superseded") return false;
    if (!state.certFilter) return true;
    const hay = `${row.name} ${row.subject} ${row.issuer} ${row.serial} ${row.status} ${row.role}`.toLowerCase();
    return hay.includes(state.certFilter);
  };
  const PROTECTED = new Set(["root_ca", "mosquitto", "dashboard", "provisioner", "policy"]);  // pki/profiles.py
  const certRow = (row, isNew) => {
    const days = row.days_left;
    const lifetime = row.not_before && row.not_after ? (new Date(row.not_after) - new Date(row.not_before)) / 86400000 : Number(body.dataset.certDays || 365);
    const pct = days === null || days === undefined ? 0 : Math.max(0, Math.min(100, (days / lifetime) * 100));
    const barClass = row.status === "revoked" || row.status === "superseded" ? "off"
      : row.status === "expired" || days <= 0 ? "bad" : row.status === "expiring" ? "warn" : "";
    const cn = cnOf(row.subject);
    const entity = entityOf(row.name);
    const stands = entity && row.serial && entity.serial === row.serial;  // the certificate that counts for the name
    const actions = el("td", { class: "actions" });
    if (stands && entity.renewal && entity.renewal.server) {
      actions.append(el("button", { type: "button", class: "btn btn-ghost btn-small", dataset: { action: "renew", name: row.name, serial: row.serial }, "aria-label": `Renew ${row.name} (serial ${row.serial})`, text: "Renew…" }));
    }
    if (!PROTECTED.has(row.name) && (row.status === "valid" || row.status === "expiring") && row.serial) {
      actions.append(el("button", { type: "button", class: "btn btn-ghost btn-small btn-danger-ghost", dataset: { action: "revoke", name: row.name, serial: row.serial }, "aria-label": `Revoke ${row.name} (serial ${row.serial})`, text: "Revoke…" }));
    }
    const auto = stands && entity.renewal && entity.renewal.self && row.status !== "expired"
      ? el("span", { class: "auto-renew", title: `Renews itself over MQTT (ssl/renew/${row.name}) inside the ${RENEW_BEFORE_DAYS}-day window`, "aria-label": "renews itself", text: "↻" }) : null;
    return el("tr", { class: `${row.status === "superseded" ? "superseded" : ""}${isNew ? " row-new" : ""}`, dataset: { name: row.name, serial: row.serial || "", status: row.status } },
      el("td", { class: "name" }, row.name, row.role && row.role !== row.name ? el("span", { class: "role", text: row.role }) : null),
      el("td", { class: "subject", title: row.subject }, el("b", { text: cn || row.subject || "—" }), cn && row.subject !== `CN=${cn}` ? el("span", { class: "muted", text: ` · ${row.subject.replace(/(^|,)CN=[^,]*/, "").replace(/^,/, "")}` }) : null),
      el("td", { class: "issuer", title: row.issuer || "", text: cnOf(row.issuer) || row.issuer || "—" }),
      el("td", { class: "serial", title: row.serial || "", text: shortSerial(row.serial) }),
      el("td", { class: "date", title: fmtDate(row.not_before, true), text: fmtDay(row.not_before) }),
      el("td", { class: "date", title: fmtDate(row.not_after, true), text: fmtDay(row.not_after) }),
      el("td", {}, el("div", { class: "days" },
        el("span", { class: "days-left", text: days === null || days === undefined ? "—" : `${Math.max(0, Math.floor(days))} d` }),
        barOf(pct, barClass))),
      el("td", { class: "status-cell" }, el("span", { class: `status status-${row.status}`, title: row.detail || "", text: row.status }), auto),
      actions);
  };
  const barOf = (pct, barClass) => {
    const fill = el("span");
    fill.style.width = `${pct.toFixed(1)}%`;  // CSSOM, not a style attribute: the page's CSP has no 'unsafe-inline'
    return el("div", { class: `bar ${barClass}`, "aria-hidden": "true" }, fill);
  };
  const renderCerts = () => {
    const fresh = state.knownSerials;
    const rows = state.certs.filter(certMatches);
    $("#cert-rows").replaceChildren(...(rows.length ? rows.map((row) => certRow(row, fresh && row.serial && !fresh.has(row.serial))) :
      [el("tr", {}, el("td", { colspan: "9", class: "muted", text: state.certs.length ? "No certificate matches the filter" : "No certificates yet" }))]));
    state.knownSerials = new Set(state.certs.map((r) => r.serial));
    for (const [deviceId] of state.devices) renderCardCert(cardOf(deviceId), deviceId);
  };
  const renderCrl = () => {
    const crl = state.crl;
    const bar = $("#crl-bar");
    if (!crl || !crl.present) {
      bar.replaceChildren(el("span", { text: `CRL: ${crl ? crl.error : "unknown"}` }));
      $("#kpi-crl").textContent = "—";
      return;
    }
    bar.replaceChildren(
      el("span", {}, "CRL ", el("b", { text: `#${crl.number ?? "?"}` })),
      el("span", {}, "Last update ", el("b", { text: fmtDate(crl.last_update) })),
      el("span", {}, "Next update ", el("b", { text: `${fmtDate(crl.next_update)} (${fmtIn(crl.next_update)})` })),
      el("span", {}, "Revoked entries ", el("b", { text: String(crl.revoked) })));
    $("#kpi-crl").textContent = fmtIn(crl.next_update);
    $("#kpi-crl").dataset.status = crl.status || "valid";
    $("#kpi-crl-foot").textContent = `${fmtDate(crl.next_update)} · ${crl.revoked} revoked`;
  };

  // -- the banner: certificates (and the CRL) that need attention -------------------------------
  const ATTENTION_TEXT = { expired: "expired", revoked: "revoked", invalid: "invalid", missing: "missing", expiring: "expiring" };
  const itemText = (item) => {
    if (item.status === "expiring") return `${item.name} expires ${fmtIn(item.not_after)}`;
    if (item.status === "expired") return `${item.name} expired ${daysText(item.days_left)}`;
    if (item.status === "missing") return `${item.name} has no certificate`;
    return `${item.name} ${item.status}`;
  };
  // What the banner is about; a dismissed banner comes back once this changes.
  const bannerKey = (attention) => (attention && attention.count
    ? JSON.stringify([attention.counts, attention.items.map((i) => [i.name, i.status]), attention.crl && attention.crl.status]) : null);
  const renderBanner = () => {
    const banner = $("#cert-banner");
    const attention = state.attention;
    const key = bannerKey(attention);
    if (!key || key === state.bannerDismissed) { banner.hidden = true; return; }
    banner.hidden = false;
    banner.dataset.level = attention.level;
    const certCount = attention.count - (attention.crl ? 1 : 0);
    const parts = [];
    if (certCount) parts.push(`${certCount} certificate${certCount === 1 ? "" : "s"}`);
    if (attention.crl) parts.push("the CRL");
    $("#cert-banner-title").textContent = `${parts.join(" and ")} need${attention.count === 1 ? "s" : ""} attention`;
    const tags = Object.entries(attention.counts).filter(([, n]) => n > 0)
      .map(([status, n]) => el("span", { class: `tag tag-${status}`, dataset: { status } }, el("b", { text: String(n) }), ` ${ATTENTION_TEXT[status] || status}`));
    if (attention.crl) {
      const crl = attention.crl;
      tags.push(el("span", { class: `tag tag-${crl.status}`, dataset: { status: `crl-${crl.status}` }, title: crl.detail || "" },
        crl.status === "expiring" ? `CRL due for refresh (next update ${fmtIn(crl.next_update)})` : `CRL ${crl.status}`));
    }
    const shown = attention.items.slice(0, 4).map(itemText);
    const more = certCount - shown.length;
    $("#cert-banner-detail").replaceChildren(...tags,
      el("span", { class: "banner-items", text: `${shown.join(" · ")}${more > 0 ? ` · ${more} more` : ""}` }));
  };
  $("#cert-banner-close").addEventListener("click", () => {
    state.bannerDismissed = bannerKey(state.attention);
    $("#cert-banner").hidden = true;
  });
  const receiveCerts = (data) => {
    if (!data) return;
    state.certs = data.certs || [];
    state.crl = data.crl || null;
    state.entities = data.entities || {};
    state.attention = data.attention || null;
    state.certsLoaded = true;
    const summary = data.summary || {};
    $("#kpi-valid").textContent = summary.valid ?? 0;
    $("#kpi-expiring").textContent = summary.expiring ?? 0;
    $("#kpi-expired").textContent = summary.expired ?? 0;
    $("#kpi-revoked").textContent = summary.revoked ?? 0;
    renderCerts();
    renderCrl();
    renderBanner();
  };
  $("#cert-filter").addEventListener("input", (event) => { state.certFilter = event.target.value.trim().toLowerCase(); renderCerts(); });
  $("#cert-history").addEventListener("change", (event) => { state.showSuperseded = event.target.checked; renderCerts(); });
  const onActionClick = (event) => {
    const button = event.target.closest("button[data-action]");
    if (!button) return;
    openAction(button.dataset.action, button.dataset.name, button.dataset.serial || null, button);
  };
  $("#cert-rows").addEventListener("click", onActionClick);
  $("#device-grid").addEventListener("click", onActionClick);

  // -- renew / revoke dialog -------------------------------------------------------------------
  // The operator's session is the credential: the page never asks for the CA passphrase.
  const dialog = $("#action-dialog");
  const dialogForm = $("#action-form");
  let pending = null;  // {action, name, serial, opener}
  const lifetimeDays = (entity) => {
    if (!entity || !entity.not_before || !entity.not_after) return Number(body.dataset.certDays || 365);
    return Math.max(1, Math.round((new Date(entity.not_after) - new Date(entity.not_before)) / 86400000));
  };
  const openAction = (action, name, serial, opener) => {
    const entity = entityOf(name);
    pending = { action, name, serial, opener };
    dialog.dataset.action = action;
    $("#action-error").hidden = true;
    const explain = [];
    if (action === "renew") {
      $("#action-title").textContent = `Renew ${name}`;
      if (entity && entity.renewal && entity.renewal.self && entity.status !== "expired") {
        explain.push(el("p", { class: "note-self" }, el("b", { text: "No action needed: " }),
          `${name} renews itself over MQTT (a CSR for a new key to ssl/renew/${name}) once inside the ${RENEW_BEFORE_DAYS}-day window.`));
        explain.push(el("p", { class: "muted", text: "Renewing here re-signs the key the CA holds for it instead, for a device that is offline; a running device uses the new certificate from its next start." }));
      } else {
        explain.push(el("p", { text: `The CA re-signs the key it holds for ${name} (POST /v1/ssl/sign without a CSR): same key and subject, a new serial and validity.` }));
      }
      dialogForm.elements.days.value = lifetimeDays(entity);
      $("#action-submit").textContent = "Renew certificate";
      $("#action-submit").className = "btn btn-primary";
    } else {
      $("#action-title").textContent = serial ? `Revoke ${name}'s certificate` : `Revoke ${name}`;
      explain.push(el("p", { text: serial
        ? `Certificate ${shortSerial(serial)} goes on the CRL and the broker shuts its holder out at once.`
        : `Every unexpired certificate of ${name} goes on the CRL and the broker shuts it out at once; it cannot renew itself any more.` }));
      $("#action-submit").textContent = "Revoke";
      $("#action-submit").className = "btn btn-danger";
      dialogForm.elements.reason.value = "unspecified";
    }
    $("#action-explain").replaceChildren(...explain);
    $("#action-days").hidden = action !== "renew";
    $("#action-reason").hidden = action !== "revoke";
    dialog.showModal();
    $("#action-submit").focus();
  };
  dialog.addEventListener("close", () => {
    const opener = pending && pending.opener;
    pending = null;
    if (opener && opener.isConnected) opener.focus();
  });
  $("#action-cancel").addEventListener("click", () => dialog.close());
  const toast = (text) => {
    const box = $("#toast");
    box.textContent = text;
    box.hidden = false;
    clearTimeout(box._timer);
    box._timer = setTimeout(() => { box.hidden = true; }, 6000);
  };
  dialogForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!pending) return;
    const { action, name, serial } = pending;
    const error = $("#action-error");
    const payload = action === "renew"
      ? { name, days: Number(dialogForm.elements.days.value) }
      : { ...(serial ? { serial } : { name }), reason: dialogForm.elements.reason.value };
    const submit = $("#action-submit");
    submit.disabled = true;
    let status = 0;
    let data = {};
    try {
      const response = await postJson(action === "renew" ? "/v1/ssl/sign" : "/v1/ssl/revoke", payload);
      status = response.status;
      data = await response.json().catch(() => ({ error: response.statusText || "the reply was not JSON" }));
      if (status === 429) data.error = `${data.error || "too many attempts"} (retry in ${response.headers.get("Retry-After")} s)`;
    } catch (ex) {
      data = { error: `could not reach the dashboard: ${ex.message}` };
    } finally {
      submit.disabled = false;
    }
    if (status >= 200 && status < 300) {
      dialog.close();
      // A renewal without CSR returns the stored key too: it is not needed here and not kept.
      toast(action === "renew"
        ? `Renewed ${name}: serial ${shortSerial(data.serial)}, valid until ${fmtDay(data.not_after)}`
        : `Revoked ${name}: ${(data.revoked || []).length} certificate${(data.revoked || []).length === 1 ? "" : "s"} on the CRL`);
      if (socket) socket.emit("refresh_certs");
      return;
    }
    error.textContent = `${data.error || "the request failed"}${status ? ` (HTTP ${status})` : ""}`;
    error.hidden = false;
    $("#action-submit").focus();
  });

  // -- CA panel --------------------------------------------------------------------------------
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const selectTab = (name) => {
    for (const tab of tabs) {
      const selected = tab.id === `tab-${name}`;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      $(`#${tab.getAttribute("aria-controls")}`).hidden = !selected;
    }
  };
  tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => selectTab(tab.id.slice(4)));
    tab.addEventListener("keydown", (event) => {
      if (event.key !== "ArrowRight" && event.key !== "ArrowLeft") return;
      const next = tabs[(index + (event.key === "ArrowRight" ? 1 : tabs.length - 1)) % tabs.length];
      selectTab(next.id.slice(4));
      next.focus();
    });
  });

  $("#csr-file").addEventListener("change", async (event) => {
    const file = event.target.files[0];
    if (file) $("#panel-sign").elements.csr.value = (await file.text()).trim();
  });

  const download = (filename, text) => {
    const url = URL.createObjectURL(new Blob([text], { type: "application/x-pem-file" }));
    const link = el("a", { href: url, download: filename });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  };

  const showResult = (status, data, action) => {
    const box = $("#ca-result");
    if (status >= 200 && status < 300) {
      const name = data.name || "certificate";
      const title = action === "revoke" ? `Revoked ${name}` : `${status === 201 ? "Issued" : "Returned the existing"} certificate for ${name}`;
      const details = el("dl", { class: "kv" });
      const add = (label, value) => { if (value !== undefined && value !== null && value !== "") details.append(el("dt", { text: label }), el("dd", { text: String(value) })); };
      add("Name", data.name);
      add("Serial", data.serial);
      add("Not after", data.not_after ? `${fmtDate(data.not_after)} (${fmtIn(data.not_after)})` : undefined);
      add("Reason", data.reason);
      if (Array.isArray(data.revoked) && data.revoked.length) add(data.revoked.length > 1 ? "Serials" : "Serial", data.revoked.join(", "));
      if (Array.isArray(data.already_revoked) && data.already_revoked.length) add("Already revoked", data.already_revoked.join(", "));
      add("Revoked at", data.revoked_at);
      add("HTTP status", status);
      const downloads = el("div", { class: "downloads" });
      if (data.crt) downloads.append(el("button", { type: "button", class: "btn btn-primary", dataset: { file: "crt" }, text: `⤓ ${name}.crt` }));
      if (data.key) downloads.append(el("button", { type: "button", class: "btn", dataset: { file: "key" }, text: `⤓ ${name}.key` }));
      if (data.ca) downloads.append(el("button", { type: "button", class: "btn", dataset: { file: "ca" }, text: "⤓ root_ca.crt" }));
      downloads.addEventListener("click", (event) => {
        const button = event.target.closest("[data-file]");
        if (!button) return;
        const kind = button.dataset.file;
        download(kind === "ca" ? "root_ca.crt" : `${name}.${kind}`, data[kind]);
      });
      box.replaceChildren(
        el("div", { class: "alert alert-ok", role: "status" }, el("div", { class: "alert-title", text: title }), details),
        downloads.children.length ? downloads : null,
        data.key ? el("div", { class: "hint", text: "The private key is not stored by the dashboard for you to fetch again: download it now." }) : null);
    } else {
      const retry = data.retry_after ? ` Try again in ${data.retry_after} s.` : "";
      box.replaceChildren(el("div", { class: "alert alert-bad", role: "alert" },
        el("div", { class: "alert-title", text: `Request failed (HTTP ${status})` }),
        el("div", { text: `${data.error || "unknown error"}${data.field ? ` (field: ${data.field})` : ""}${retry}` })));
    }
  };

  document.querySelectorAll(".ca-form").forEach((form) => {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const action = form.id.replace("panel-", "");
      const payload = {};
      for (const field of form.elements) {
        if (!field.name) continue;
        field.removeAttribute("aria-invalid");
        const value = field.value.trim();
        if (value === "") continue;
        payload[field.name] = field.name === "days" ? Number(value) : value;
      }
      const missing = [...form.elements].find((f) => f.required && !f.value.trim());
      if (missing || (action === "revoke" && !payload.name && !payload.serial)) {
        const field = missing || form.elements.name;
        field.setAttribute("aria-invalid", "true");
        field.focus();
        showResult(400, { error: action === "revoke" && !missing ? "give a name or a serial" : `${field.name} is required`, field: field.name }, action);
        return;
      }
      const submit = form.querySelector('[type="submit"]');
      submit.disabled = true;
      let status = 0;
      let data = {};
      try {
        const response = await postJson(form.dataset.endpoint, payload);
        status = response.status;
        data = await response.json().catch(() => ({ error: response.statusText || "the reply was not JSON" }));
        if (status === 429) data.retry_after = response.headers.get("Retry-After");
      } catch (error) {
        data = { error: `could not reach the dashboard: ${error.message}` };
      } finally {
        submit.disabled = false;
      }
      showResult(status, data, action);
      if (data.field && form.elements[data.field]) form.elements[data.field].setAttribute("aria-invalid", "true");
      if (status >= 200 && status < 300) socket.emit("refresh_certs");
    });
  });

  // -- API tokens (operators) ------------------------------------------------------------------
  const renderTokens = (tokens) => {
    $("#token-rows").replaceChildren(...tokens.map((t) => el("tr", { dataset: { tokenId: String(t.id) } },
      el("td", { text: String(t.id) }), el("td", { text: t.label }), el("td", { text: t.role }),
      el("td", { text: t.owner || "—" }), el("td", { text: fmtDate(t.created_at) }),
      el("td", { class: "token-state", text: t.revoked_at ? `revoked ${fmtDate(t.revoked_at)}` : "active" }),
      el("td", {}, t.revoked_at ? null : el("button", { type: "button", class: "btn btn-danger", dataset: { revokeToken: String(t.id) }, text: "Revoke" })))));
  };
  const loadTokens = async () => {
    const response = await fetch("/api/tokens", { headers: { Accept: "application/json" }, credentials: "same-origin" });
    if (response.ok) renderTokens((await response.json()).tokens || []);
  };
  if (IS_OPERATOR) {
    loadTokens();
    $("#token-form").addEventListener("submit", async (event) => {
      event.preventDefault();
      const form = event.target;
      const response = await postJson("/api/tokens", { label: form.elements.label.value.trim(), role: form.elements.role.value });
      const data = await response.json().catch(() => ({}));
      const box = $("#token-result");
      if (response.status === 201) {
        form.elements.label.value = "";
        box.replaceChildren(el("div", { class: "alert alert-ok", role: "status" },
          el("div", { class: "alert-title", text: `Token ${data.id} (${data.role}): copy it now, it is not shown again` }),
          el("code", { class: "mono", id: "token-secret", text: data.token })));
      } else {
        box.replaceChildren(el("div", { class: "alert alert-bad", role: "alert", text: `${data.error || "failed"} (HTTP ${response.status})` }));
      }
      loadTokens();
    });
    $("#token-rows").addEventListener("click", async (event) => {
      const button = event.target.closest("button[data-revoke-token]");
      if (!button) return;
      await postJson(`/api/tokens/${button.dataset.revokeToken}/revoke`, {});
      loadTokens();
    });
  }

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

  const socket = window.io ? window.io({ transports: ["websocket", "polling"] }) : null;
  if (!socket) {
    setLive("bad", "Socket.IO client missing");
    return;
  }
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
})();

/* The certificate table, the CRL and the attention banner. Every status word comes from the server
 * (pki/status.py decides valid / expiring / expired); the page only shows it. */
import { body, RENEW_BEFORE_DAYS, state } from "./state.js";
import { $, el } from "./dom.js";
import { cnOf, fmtDate, fmtDay, fmtIn, shortSerial } from "./format.js";
import { cardOf, daysText, entityOf, renderCardCert } from "./devices.js";
import { openAction } from "./actions.js";

// -- certificates ----------------------------------------------------------------------------
export const certMatches = (row) => {
  if (!state.showSuperseded && row.status === "superseded") return false;
  if (!state.certFilter) return true;
  const hay = `${row.name} ${row.subject} ${row.issuer} ${row.serial} ${row.status} ${row.role}`.toLowerCase();
  return hay.includes(state.certFilter);
};
export const PROTECTED = new Set(["root_ca", "mosquitto", "dashboard", "provisioner", "policy"]);  // pki/profiles.py
export const certRow = (row, isNew) => {
  const days = row.days_left;
  const lifetime = row.not_before && row.not_after ? (new Date(row.not_after) - new Date(row.not_before)) / 86400000 : Number(body.dataset.certDays || 365);
  const pct = days === null || days === undefined ? 0 : Math.max(0, Math.min(100, (days / lifetime) * 100));
  const barClass = row.status === "revoked" || row.status === "superseded" ? "off"
    : row.status === "expired" ? "bad" : row.status === "expiring" ? "warn" : "";  // the server's state (pki/status.py)
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
export const barOf = (pct, barClass) => {
  const fill = el("span");
  fill.style.width = `${pct.toFixed(1)}%`;  // CSSOM, not a style attribute: the page's CSP has no 'unsafe-inline'
  return el("div", { class: `bar ${barClass}`, "aria-hidden": "true" }, fill);
};
export const renderCerts = () => {
  const fresh = state.knownSerials;
  const rows = state.certs.filter(certMatches);
  $("#cert-rows").replaceChildren(...(rows.length ? rows.map((row) => certRow(row, fresh && row.serial && !fresh.has(row.serial))) :
    [el("tr", {}, el("td", { colspan: "9", class: "muted", text: state.certs.length ? "No certificate matches the filter" : "No certificates yet" }))]));
  state.knownSerials = new Set(state.certs.map((r) => r.serial));
  for (const [deviceId] of state.devices) renderCardCert(cardOf(deviceId), deviceId);
};
export const renderCrl = () => {
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
export const ATTENTION_TEXT = { expired: "expired", revoked: "revoked", invalid: "invalid", missing: "missing", expiring: "expiring" };
export const itemText = (item) => {
  if (item.status === "expiring") return `${item.name} expires ${fmtIn(item.not_after)}`;
  if (item.status === "expired") return `${item.name} expired ${daysText(item.days_left)}`;
  if (item.status === "missing") return `${item.name} has no certificate`;
  return `${item.name} ${item.status}`;
};
// What the banner is about; a dismissed banner comes back once this changes.
export const bannerKey = (attention) => (attention && attention.count
  ? JSON.stringify([attention.counts, attention.items.map((i) => [i.name, i.status]), attention.crl && attention.crl.status]) : null);
export const renderBanner = () => {
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
export const receiveCerts = (data) => {
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
export const onActionClick = (event) => {
  const button = event.target.closest("button[data-action]");
  if (!button) return;
  openAction(button.dataset.action, button.dataset.name, button.dataset.serial || null, button);
};
$("#cert-rows").addEventListener("click", onActionClick);
$("#device-grid").addEventListener("click", onActionClick);

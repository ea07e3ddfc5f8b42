/* The renew / revoke dialog, the CA panel's forms and the API tokens of operators. */
import { body, IS_OPERATOR, postJson, RENEW_BEFORE_DAYS } from "./state.js";
import { $, el } from "./dom.js";
import { fmtDate, fmtDay, fmtIn, now, shortSerial } from "./format.js";
import { entityOf } from "./devices.js";
import { socket } from "./socket.js";

// -- renew / revoke dialog -------------------------------------------------------------------
// The operator's session is the credential: the page never asks for the CA passphrase.
export const dialog = $("#action-dialog");
export const dialogForm = $("#action-form");
export let pending = null;  // {action, name, serial, opener}
export const lifetimeDays = (entity) => {
  if (!entity || !entity.not_before || !entity.not_after) return Number(body.dataset.certDays || 365);
  return Math.max(1, Math.round((new Date(entity.not_after) - new Date(entity.not_before)) / 86400000));
};
export const openAction = (action, name, serial, opener) => {
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
export const toast = (text) => {
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
export const tabs = [...document.querySelectorAll('[role="tab"]')];
export const selectTab = (name) => {
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

export const download = (filename, text) => {
  const url = URL.createObjectURL(new Blob([text], { type: "application/x-pem-file" }));
  const link = el("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
};

export const showResult = (status, data, action) => {
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
export const renderTokens = (tokens) => {
  $("#token-rows").replaceChildren(...tokens.map((t) => el("tr", { dataset: { tokenId: String(t.id) } },
    el("td", { text: String(t.id) }), el("td", { text: t.label }), el("td", { text: t.role }),
    el("td", { text: t.owner || "—" }), el("td", { text: fmtDate(t.created_at) }),
    el("td", { class: "token-state", text: t.revoked_at ? `revoked ${fmtDate(t.revoked_at)}` : "active" }),
    el("td", {}, t.revoked_at ? null : el("button", { type: "button", class: "btn btn-danger", dataset: { revokeToken: String(t.id) }, text: "Revoke" })))));
};
export const loadTokens = async () => {
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

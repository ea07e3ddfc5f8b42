/* The MQTT log: filter, pause, limit. */
import { state } from "./state.js";
import { $, el } from "./dom.js";
import { fmtClock } from "./format.js";

// -- MQTT log --------------------------------------------------------------------------------
export const logList = $("#log-list");
export const matches = (entry) => {
  if (!state.filter) return true;
  const needle = state.filter;
  return entry.topic.toLowerCase().includes(needle) || entry.payload.toLowerCase().includes(needle);
};
export const logRow = (entry) => {
  const row = el("div", { class: `log-row${entry.note ? " rejected" : ""}`, dataset: { id: entry.id } },
    el("span", { class: "t", text: fmtClock(entry.time * 1000, true) }),
    el("span", { class: `dir dir-${entry.direction}`, text: entry.direction.toUpperCase(), title: entry.direction === "in" ? "to the dashboard" : "published by the dashboard's CA" }),
    el("span", { class: "topic", text: entry.topic, title: entry.topic }),
    el("span", { class: "payload", title: entry.payload }, entry.payload, entry.note ? el("span", { class: "note", text: entry.note }) : null));
  if (entry.retained) row.querySelector(".topic").append(el("span", { class: "role", text: "retained" }));
  return row;
};
export const renderLogCount = () => {
  const shown = logList.querySelectorAll(".log-row").length;
  $("#log-count").textContent = state.filter ? `${shown} of ${state.log.length} match “${state.filter}”` : `${shown} shown`;
  const empty = $(".log-empty", logList);
  if (!shown && !empty) logList.append(el("div", { class: "log-empty", text: state.filter ? "No message matches the filter" : "No messages yet" }));
  if (shown && empty) empty.remove();
};
export const renderLogAll = () => {
  logList.replaceChildren(...state.log.filter(matches).reverse().map(logRow));
  renderLogCount();
};
export const addLogEntries = (entries) => {
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
export const receiveLog = (entries) => {
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
export let filterTimer = null;
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

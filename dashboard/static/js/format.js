/* Formatting of times, dates, numbers, serials and subjects for display. */
import { PALETTE, state } from "./state.js";
import { $ } from "./dom.js";

// -- formatting ------------------------------------------------------------------------------
export const now = () => Date.now() + state.clockOffset;
export const pad = (n, w = 2) => String(n).padStart(w, "0");
export const fmtClock = (ms, withMs = false) => {
  const d = new Date(ms);
  const base = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMs ? `${base}.${pad(d.getMilliseconds(), 3)}` : base;
};
export const fmtDay = (iso) => {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
};
export const fmtDate = (iso, seconds = false) => {
  if (!iso) return "—";
  const d = new Date(iso);
  return `${fmtDay(iso)} ${pad(d.getHours())}:${pad(d.getMinutes())}${seconds ? `:${pad(d.getSeconds())}` : ""}`;
};
export const fmtAgo = (seconds) => {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, seconds);
  if (s < 2) return "just now";
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
};
export const fmtIn = (iso) => {
  if (!iso) return "—";
  const days = (new Date(iso).getTime() - now()) / 86400000;
  if (days < 0) return "overdue";
  if (days < 1) return `in ${Math.max(1, Math.round(days * 24))} h`;
  return `in ${Math.round(days)} days`;
};
export const fmtNumber = (n) => new Intl.NumberFormat().format(n);
export const shortSerial = (serial) => (serial && serial.length > 16 ? `${serial.slice(0, 8)}…${serial.slice(-6)}` : serial || "—");
export const cnOf = (subject) => {
  const match = /(?:^|,)CN=((?:\\.|[^,])*)/.exec(subject || "");
  return match ? match[1].replace(/\\(.)/g, "$1") : "";
};
export const colorOf = (deviceId) => {
  const ids = [...state.devices.keys()].sort();
  const index = Math.max(0, ids.indexOf(deviceId));
  return PALETTE[index % PALETTE.length];
};

/* The page's shared state and settings (from the server's data attributes), and the one JSON POST helper. */

export const body = document.body;
export const PALETTE = ["#4f8cff", "#3ecf8e", "#f59e0b", "#f472b6", "#a78bfa", "#22d3ee", "#fb7185", "#a3e635"];
export const RENEW_BEFORE_DAYS = Number(body.dataset.renewBeforeDays || 30);
export const IS_OPERATOR = body.dataset.role === "operator";
export const CSRF_TOKEN = (document.querySelector('meta[name="csrf-token"]') || {}).content || "";
// Every state-changing request of the page: JSON, with the session's CSRF token; a lost session
// (logged out elsewhere, idle timeout) sends the tab back to the login page.
export const postJson = async (url, payload) => {
  const response = await fetch(url, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json", "X-CSRF-Token": CSRF_TOKEN },
    body: JSON.stringify(payload),
    credentials: "same-origin",
  });
  if (response.status === 401) window.location.assign("/login");
  return response;
};

export const state = {
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

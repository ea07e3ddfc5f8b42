/* The page's one Socket.IO connection (the vendored client is a classic script: window.io). Its handlers are
 * attached in app.js while the module graph evaluates, before any event can arrive. */

export const socket = window.io ? window.io({ transports: ["websocket", "polling"] }) : null;

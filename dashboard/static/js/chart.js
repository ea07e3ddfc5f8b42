/* The theme and the temperature chart (Chart.js, vendored as a classic script: window.Chart). */
import { body, state } from "./state.js";
import { $ } from "./dom.js";
import { colorOf, fmtClock, now } from "./format.js";

// -- theme -----------------------------------------------------------------------------------
export const applyTheme = (theme) => {
  document.documentElement.dataset.theme = theme;
  try { localStorage.setItem("lab-theme", theme); } catch (_) { /* private mode */ }
  if (chart) { styleChart(); chart.update("none"); }
};
export let initialTheme = "dark";
try { initialTheme = localStorage.getItem("lab-theme") || "dark"; } catch (_) { /* ignore */ }
document.documentElement.dataset.theme = initialTheme;
$("#theme-toggle").addEventListener("click", () => {
  applyTheme(document.documentElement.dataset.theme === "light" ? "dark" : "light");
});

// -- chart -----------------------------------------------------------------------------------
export const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();
export let chart = null;
export const styleChart = () => {
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
export const metrics = { batches: 0, batchMsTotal: 0, batchMsMax: 0 };
window.labDashboard = { state, metrics, get chart() { return chart; } };

export const datasetFor = (deviceId) => {
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

export const mergePoints = (deviceId, points) => {
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

export let chartPending = false;
export const scheduleChart = () => {
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

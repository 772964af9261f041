// Live view: recent requests' uncertainty over time (polled), threshold, latest calibration.
import { api } from "./api.js";
import { COLORS, axis, chart, clearChart, fmt, legend, refLine } from "./charts.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 2000;

export function setupLive() {
  let model = null;
  let timer = null;
  let calibrationTime = null;
  let plotFor = null;
  let xRange = [0, 1];

  const threshold = () => Number($("live-threshold").value);
  $("live-threshold").addEventListener("input", () => $("live-chart")._plot?.redraw(false, false));

  async function poll() {
    const m = model;
    if (!m) return;
    const base = `/v1/models/${encodeURIComponent(m.name)}`;
    try {
      const recent = await api("GET", `${base}/recent?limit=500`, undefined, { background: true });
      if (m === model) drawRecent(m, recent);
    } catch { /* shown in #error */ }
    try {
      const cal = await api("GET", `${base}/calibration`, undefined, { background: true, quiet404: true });
      if (m !== model) return;
      // {"time": null, "report": null}: no evaluation yet (older servers answer 404 instead)
      if (!cal || cal.time === null || cal.time === undefined || !cal.report) {
        if (calibrationTime !== null) showNoCalibration();
      } else if (cal.time !== calibrationTime) {
        calibrationTime = cal.time;
        drawCalibration(cal);
      }
    } catch (exc) {
      if (m === model && exc.status === 404) showNoCalibration();
    }
  }

  function drawRecent(m, recent) {
    const cls = recent.task === "classification";
    const keys = cls ? ["mean_mutual_information", "max_mutual_information"] : ["mean_std", "max_std"];
    const entries = recent.entries;
    const data = [entries.map((e) => e.time), ...keys.map((k) => entries.map((e) => e[k] ?? null))];
    $("live-note").textContent = entries.length
      ? `${entries.length} of the last ${recent.capacity} requests; polled every 2 s`
      : "no requests yet; polled every 2 s";
    const el = $("live-chart");
    const times = data[0];
    const last = times.length ? times[times.length - 1] : Date.now() / 1000;
    xRange = [Math.min(times.length ? times[0] : last, last - 60), last + 2];
    if (el._plot && plotFor === m.name) {
      el._plot.setData(data);
      return;
    }
    plotFor = m.name;
    const what = cls ? "mutual information (nats)" : `predictive std (${(m.outputs || ["y"])[0]} units)`;
    const opts = {
      scales: { x: { time: true, auto: false, range: () => xRange }, y: { range: (_, lo, hi) => [0, Math.max(hi ?? 0, threshold() || 0, 0.05) * 1.1] } },
      axes: [axis("time (local)"), axis(what)],
      series: [
        { label: "time" },
        { label: cls ? "mean MI per request" : "mean std per request", stroke: COLORS.mean, width: 2, points: { show: true, size: 5 } },
        { label: cls ? "max MI per request" : "max std per request", stroke: COLORS.gauss, width: 1, dash: [4, 3], points: { show: false } },
      ],
      hooks: { draw: [refLine(threshold, COLORS.threshold)] },
    };
    chart(el, opts, data, 260);
    legend($("legend-live"), [
      { label: opts.series[1].label, color: COLORS.mean },
      { label: opts.series[2].label, color: COLORS.gauss, kind: "dash" },
      { label: "threshold", color: COLORS.threshold, kind: "dash" },
    ]);
  }

  function showNoCalibration() {
    calibrationTime = null;
    clearChart($("calibration-chart"));
    $("calibration-chart").hidden = true;
    $("calibration-empty").hidden = false;
    $("calibration-summary").textContent = "";
    $("calibration-legend").textContent = "";
  }

  return {
    show(m) {
      model = m;
      calibrationTime = undefined;
      plotFor = null;
      clearChart($("live-chart"));
      $("live-threshold").value = m.task === "classification" ? "0.2" : "0.5";
      clearInterval(timer);
      timer = setInterval(poll, POLL_MS);
      poll();
    },
    hide() { model = null; clearInterval(timer); },
    poll,
  };
}

function drawCalibration(cal) {
  const report = cal.report;
  const m = report.metrics || {};
  $("calibration-empty").hidden = true;
  const el = $("calibration-chart");
  el.hidden = false;
  const when = new Date(cal.time * 1000).toLocaleTimeString();
  if (m.calibration) {
    const { edges, count, accuracy, confidence } = m.calibration;
    const mids = edges.slice(0, -1).map((e, i) => (e + edges[i + 1]) / 2);
    const acc = accuracy.map((a, i) => (count[i] > 0 ? a : null));
    const conf = confidence.map((c, i) => (count[i] > 0 ? c : null));
    const width = edges[1] - edges[0];
    chart(el, {
      scales: { x: { time: false, range: [0, 1] }, y: { range: [0, 1] } },
      axes: [axis("confidence (predicted probability, 0–1)"), axis("accuracy (0–1)")],
      series: [
        { label: "confidence" },
        { label: "accuracy", fill: "rgba(31,78,150,0.5)", stroke: COLORS.mean, paths: uPlot.paths.bars({ size: [0.9, Infinity] }), points: { show: false } },
        { label: "mean confidence", stroke: COLORS.gauss, width: 0, points: { show: true, size: 7, fill: COLORS.gauss } },
        { label: "ideal", stroke: COLORS.ideal, dash: [5, 4], points: { show: false } },
      ],
    }, [mids, acc, conf, mids], 260);
    legend($("calibration-legend"), [
      { label: `accuracy per bin (width ${fmt(width, 2)})`, color: "rgba(31,78,150,0.5)", kind: "band" },
      { label: "mean confidence in bin", color: COLORS.gauss },
      { label: "perfect calibration", color: COLORS.ideal, kind: "dash" },
    ]);
    $("calibration-summary").textContent =
      `${report.rows} rows at ${when}: accuracy ${fmt(m.accuracy)}, ECE ${fmt(m.ece)}, NLL ${fmt(m.nll)}`;
  } else {
    const observed = [m.coverage_gaussian_95 ?? null, m.coverage_empirical_95 ?? null];
    chart(el, {
      scales: { x: { time: false, range: [-0.6, 1.6] }, y: { range: [0, 1] } },
      axes: [
        axis("95% interval", { splits: () => [0, 1], values: () => ["Gaussian", "empirical"] }),
        axis("observed coverage (0–1)"),
      ],
      series: [
        { label: "interval" },
        { label: "observed coverage", fill: "rgba(31,78,150,0.5)", stroke: COLORS.mean, paths: uPlot.paths.bars({ size: [0.5, 120] }), points: { show: false } },
      ],
      hooks: { draw: [refLine(() => 0.95, COLORS.threshold)] },
    }, [[0, 1], observed], 260);
    legend($("calibration-legend"), [
      { label: "observed coverage", color: "rgba(31,78,150,0.5)", kind: "band" },
      { label: "nominal 0.95", color: COLORS.threshold, kind: "dash" },
    ]);
    $("calibration-summary").textContent =
      `${report.rows} rows at ${when}: coverage Gaussian ${fmt(observed[0])}, empirical ${fmt(observed[1])}` +
      (m.rmse !== undefined ? `, RMSE ${fmt(m.rmse)}` : "");
  }
}


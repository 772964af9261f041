// Regression views: the 1-D curve with bands and function draws, and the many-input form.
import { api, debounce, latest } from "./api.js";
import { COLORS, axis, chart, clearChart, fmt, legend, normalQuantile, refLine, shadeX } from "./charts.js";
import { featureForm } from "./forms.js";

const GRID_POINTS = 181;
const DRAWS = 5;
const $ = (id) => document.getElementById(id);

function predictUrl(model) {
  return `/v1/models/${encodeURIComponent(model.name)}/predict`;
}

// --- 1-D ------------------------------------------------------------------------------------

export function setup1d(ctx) {
  const only = latest();
  let model = null;

  async function redraw() {
    if (!model) return;
    const lo = Number($("x-min").value);
    const hi = Number($("x-max").value);
    if (!Number.isFinite(lo) || !Number.isFinite(hi) || !(lo < hi)) {
      ctx.showError(`x range: "from" (${$("x-min").value}) must be a number below "to" (${$("x-max").value})`);
      return;
    }
    const level = Number($("level").value);
    const xs = Array.from({ length: GRID_POINTS }, (_, i) => lo + ((hi - lo) * i) / (GRID_POINTS - 1));
    const { samples, seed } = ctx.mc();
    const body = {
      rows: xs.map((x) => [x]), samples, seed, mask_mode: "shared",
      interval_levels: [level], return_samples: Math.min(DRAWS, samples),
    };
    const res = await only(() => api("POST", predictUrl(model), body)).catch(() => null);
    if (!res) return;
    ctx.setStatus(res);
    draw(model, xs, res, level);
  }

  const later = debounce(redraw, 150);
  for (const id of ["x-min", "x-max", "level"]) $(id).addEventListener("input", later);

  return {
    show(m) {
      model = m;
      const ranges = m.training_ranges || [];
      if (ranges.length) {
        const lo = Math.min(...ranges.map((r) => r[0]));
        const hi = Math.max(...ranges.map((r) => r[1]));
        const pad = Math.max(1, (hi - lo) * 0.4);
        $("x-min").value = +(lo - pad).toFixed(2);
        $("x-max").value = +(hi + pad).toFixed(2);
      }
      redraw();
    },
    hide() { model = null; clearChart($("chart-1d")); },
    redraw: later,
  };
}

function draw(model, xs, res, level) {
  const out = (model.outputs || ["y"])[0];
  const key = String(level);
  const z = normalQuantile(0.5 + level / 2);
  const rows = res.predictions.map((p) => p[out]);
  const mean = rows.map((r) => r.mean);
  const epiHi = rows.map((r) => r.mean + z * Math.sqrt(Math.max(0, r.epistemic_variance)));
  const epiLo = rows.map((r) => r.mean - z * Math.sqrt(Math.max(0, r.epistemic_variance)));
  const totHi = rows.map((r) => (r.intervals[key] ? r.intervals[key].gaussian[1] : r.mean + z * r.std));
  const totLo = rows.map((r) => (r.intervals[key] ? r.intervals[key].gaussian[0] : r.mean - z * r.std));
  const k = rows[0].samples ? rows[0].samples.length : 0;
  const draws = Array.from({ length: k }, (_, j) => rows.map((r) => r.samples[j]));
  const pct = `${Math.round(level * 100)}%`;
  const xName = (model.input_names || ["x"])[0];
  const ranges = model.training_ranges || [];
  const edge = { stroke: "transparent", points: { show: false } };
  const series = [
    { label: xName },
    { label: `total ${pct} upper`, ...edge },
    { label: `total ${pct} lower`, ...edge },
    { label: `epistemic ${pct} upper`, ...edge },
    { label: `epistemic ${pct} lower`, ...edge },
    ...draws.map((_, j) => ({ label: `draw ${j + 1}`, stroke: COLORS.draws[j % 5], width: 1, points: { show: false } })),
    { label: "MC mean", stroke: COLORS.mean, width: 2.5, points: { show: false } },
  ];
  const opts = {
    scales: { x: { time: false } },
    axes: [axis(`${xName} (input units)`), axis(`${out} (output units)`)],
    series,
    bands: [
      { series: [1, 2], fill: COLORS.total },
      { series: [3, 4], fill: COLORS.epistemic },
    ],
    hooks: { drawAxes: [shadeX(() => ranges, COLORS.training)] },
  };
  chart($("chart-1d"), opts, [xs, totHi, totLo, epiHi, epiLo, ...draws, mean], 360);
  legend($("legend-1d"), [
    { label: "MC mean", color: COLORS.mean },
    { label: `epistemic ${pct} band`, color: COLORS.epistemic, kind: "band" },
    { label: `total ${pct} band`, color: COLORS.total, kind: "band" },
    { label: `${k} function draws (shared masks)`, color: COLORS.draws[0] },
    { label: "training data range", color: COLORS.training, kind: "band" },
  ]);
}

// --- many inputs --------------------------------------------------------------------------

export function setupMany(ctx) {
  let model = null;
  let last = null;

  function reshape(flat, shape) {
    if (shape.length <= 1) return flat;
    const step = flat.length / shape[0];
    return Array.from({ length: shape[0] }, (_, i) => reshape(flat.slice(i * step, (i + 1) * step), shape.slice(1)));
  }

  async function predict() {
    if (!model) return;
    const inputs = [...$("feature-form").querySelectorAll("input")];
    const flat = inputs.map((i) => Number(i.value));
    const bad = inputs.find((i) => i.value.trim() === "" || !Number.isFinite(Number(i.value)));
    if (bad) {
      ctx.showError(`${bad.dataset.label}: "${bad.value}" is not a number`);
      return;
    }
    const { samples, seed } = ctx.mc();
    const body = {
      rows: [reshape(flat, model.input_shape)], samples, seed,
      interval_levels: [0.95], return_samples: samples,
    };
    const res = await api("POST", predictUrl(model), body).catch(() => null);
    if (!res || model === null) return;
    ctx.setStatus(res);
    last = res;
    drawHist(model, res);
  }

  $("predict-button").addEventListener("click", predict);
  $("feature-form").addEventListener("submit", (e) => { e.preventDefault(); predict(); });
  $("output-select").addEventListener("change", () => last && drawHist(model, last));

  return {
    show(m) {
      model = m;
      last = null;
      featureForm($("feature-form"), m, "feature ");
      const sel = $("output-select");
      sel.textContent = "";
      for (const o of m.outputs || []) sel.append(new Option(o, o));
      predict();
    },
    hide() { model = null; clearChart($("predictive-hist")); },
    redraw: debounce(predict, 150),
  };
}

function drawHist(model, res) {
  const out = $("output-select").value || model.outputs[0];
  const r = res.predictions[0][out];
  const samples = r.samples || [];
  const [lo, hi] = r.intervals["0.95"].gaussian;
  const sd = Math.sqrt(Math.max(r.variance, 1e-12));
  const left = Math.min(lo - sd, ...samples);
  const right = Math.max(hi + sd, ...samples);
  const bins = Math.max(10, Math.min(40, Math.round(Math.sqrt(samples.length) * 2)));
  const width = (right - left) / bins;
  const centres = Array.from({ length: bins }, (_, i) => left + (i + 0.5) * width);
  const counts = new Array(bins).fill(0);
  for (const s of samples) counts[Math.min(bins - 1, Math.max(0, Math.floor((s - left) / width)))] += 1;
  const density = counts.map((c) => c / (samples.length * width || 1));
  const gauss = centres.map((x) => Math.exp(-0.5 * ((x - r.mean) / sd) ** 2) / (sd * Math.sqrt(2 * Math.PI)));
  const opts = {
    scales: { x: { time: false } },
    axes: [axis(`${out} (output units)`), axis("density (1 / output unit)")],
    series: [
      { label: out },
      { label: "MC samples", fill: COLORS.hist, stroke: COLORS.mean, paths: uPlot.paths.bars({ size: [1, Infinity] }), points: { show: false } },
      { label: "Gaussian of total variance", stroke: COLORS.gauss, width: 2, points: { show: false } },
    ],
    hooks: { draw: [refLine(() => lo, COLORS.interval, "x"), refLine(() => hi, COLORS.interval, "x"), refLine(() => r.mean, COLORS.mean, "x", [])] },
  };
  chart($("predictive-hist"), opts, [centres, density, gauss], 320);
  legend($("legend-hist"), [
    { label: `histogram of ${samples.length} MC samples (dropout passes)`, color: COLORS.hist, kind: "band" },
    { label: "Gaussian of the total variance", color: COLORS.gauss },
    { label: "95% interval", color: COLORS.interval, kind: "dash" },
    { label: "MC mean", color: COLORS.mean },
  ]);
  $("predictive-summary").textContent =
    `${out}: mean ${fmt(r.mean)}, std ${fmt(r.std)} (epistemic ${fmt(Math.sqrt(r.epistemic_variance))}, ` +
    `aleatoric ${fmt(Math.sqrt(r.aleatoric_variance))}), 95% interval [${fmt(lo)}, ${fmt(hi)}]`;
}

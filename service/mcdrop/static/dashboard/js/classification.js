// Classification view: digit input, probability bars with whiskers, measures, rotation sweep.
import { api, debounce, latest } from "./api.js";
import { COLORS, axis, chart, clearChart, fmt, legend, refLine } from "./charts.js";
import { DigitPad, rotateImage } from "./digits.js";

const $ = (id) => document.getElementById(id);
const SWEEP = Array.from({ length: 13 }, (_, i) => -90 + 15 * i);

export function setupClassification(ctx) {
  let model = null;
  let pad = null;
  let digits = [];
  let shape = [8, 8];
  const onlyCurrent = latest();
  const onlySweep = latest();

  const url = () => `/v1/models/${encodeURIComponent(model.name)}/predict`;
  const asRow = (flat) => {
    const [h, w] = shape;
    const image = Array.from({ length: h }, (_, i) => Array.from(flat.slice(i * w, (i + 1) * w)));
    return model.input_shape.length === 3 ? [image] : image;
  };

  async function predictCurrent() {
    if (!model) return;
    const { samples, seed } = ctx.mc();
    const body = { rows: [asRow(pad.current())], samples, seed };
    const res = await onlyCurrent(() => api("POST", url(), body)).catch(() => null);
    if (!res || !model) return;
    ctx.setStatus(res);
    drawCurrent(model, res.predictions[0]);
  }

  async function predictSweep() {
    if (!model) return;
    const { samples, seed } = ctx.mc();
    const base = pad.base();
    const rows = SWEEP.map((deg) => asRow(rotateImage(base, shape[0], shape[1], deg)));
    const res = await onlySweep(() => api("POST", url(), { rows, samples, seed })).catch(() => null);
    if (!res || !model) return;
    drawSweep(res.predictions, () => pad.angle);
  }

  // The sweep first, so that window.mcdropLast ends on the current image's answer.
  async function refreshAll() {
    await predictSweep();
    await predictCurrent();
  }

  const rotated = debounce(predictCurrent, 150);
  $("rotation").addEventListener("input", () => {
    const deg = Number($("rotation").value);
    $("rotation-value").textContent = `${deg}°`;
    if (!pad) return;
    pad.setAngle(deg);
    const sweep = $("sweep-chart")._plot;
    if (sweep) sweep.redraw(false, false);
    rotated();
  });
  $("digit-pick").addEventListener("change", () => {
    const d = digits[Number($("digit-pick").value)];
    if (d && pad) {
      pad.setPicked(d.pixels);
      refreshAll();
    }
  });
  $("clear-canvas").addEventListener("click", () => {
    if (!pad) return;
    pad.clear();
    refreshAll();
  });

  async function loadDigits() {
    if (digits.length) return;
    const res = await fetch("/dashboard/static/digits-test.json");
    digits = await res.json();
    const sel = $("digit-pick");
    sel.textContent = "";
    digits.forEach((d, i) => sel.append(new Option(`a ${d.label} (test image #${d.index ?? i})`, String(i))));
  }

  return {
    async show(m) {
      model = m;
      const s = m.input_shape;
      shape = s.length === 3 ? [s[1], s[2]] : s.length === 2 ? s : null;
      if (!shape) {
        ctx.showError(`${m.name}: the classification view needs an image input ([1, H, W] or [H, W]), not [${s}]`);
        return;
      }
      pad = new DigitPad($("digit-canvas"), shape[0], shape[1], refreshAll);
      pad.setAngle(Number($("rotation").value));
      try {
        await loadDigits();
      } catch (exc) {
        ctx.showError(`digits-test.json: ${exc.message}`);
      }
      const d = digits[Number($("digit-pick").value) || 0];
      if (d && shape[0] === d.pixels.length && shape[1] === d.pixels[0].length) pad.setPicked(d.pixels);
      await refreshAll();
    },
    hide() {
      model = null;
      clearChart($("prob-bars"));
      clearChart($("sweep-chart"));
    },
    redraw: debounce(refreshAll, 150),
  };
}

function drawCurrent(model, p) {
  const labels = model.outputs;
  const xs = labels.map((_, i) => i);
  const mean = labels.map((l) => p.probabilities[l]);
  const std = labels.map((l) => p.probabilities_std[l]);
  const whiskers = (u) => {
    const c = u.ctx;
    c.save();
    c.strokeStyle = "#222";
    c.lineWidth = 1.5 * devicePixelRatio;
    const cap = 6 * devicePixelRatio;
    xs.forEach((x, i) => {
      const px = u.valToPos(x, "x", true);
      const lo = u.valToPos(Math.max(0, mean[i] - std[i]), "y", true);
      const hi = u.valToPos(Math.min(1, mean[i] + std[i]), "y", true);
      c.beginPath();
      c.moveTo(px, lo); c.lineTo(px, hi);
      c.moveTo(px - cap, lo); c.lineTo(px + cap, lo);
      c.moveTo(px - cap, hi); c.lineTo(px + cap, hi);
      c.stroke();
    });
    c.restore();
  };
  const opts = {
    scales: { x: { time: false, range: [-0.6, labels.length - 0.4] }, y: { range: [0, 1] } },
    axes: [
      axis("class", { splits: () => xs, values: (_, ticks) => ticks.map((t) => labels[Math.round(t)] ?? "") }),
      axis("mean probability (0–1)"),
    ],
    series: [
      { label: "class" },
      { label: "mean probability", fill: "rgba(31,78,150,0.55)", stroke: COLORS.mean,
        paths: uPlot.paths.bars({ size: [0.6, 60] }), points: { show: false } },
    ],
    hooks: { draw: [whiskers] },
  };
  chart($("prob-bars"), opts, [xs, mean], 260);
  $("measure-predicted").textContent = `${p.predicted} (p = ${fmt(p.probabilities[p.predicted])})`;
  $("measure-entropy").textContent = fmt(p.entropy);
  $("measure-mi").textContent = fmt(p.mutual_information);
  $("measure-vr").textContent = fmt(p.variation_ratio);
}

function drawSweep(predictions, angleNow) {
  const opts = {
    scales: { x: { time: false }, y: { range: (_, lo, hi) => [0, Math.max(hi, 0.5) * 1.05] }, vr: { range: [0, 1] } },
    axes: [
      axis("rotation (degrees)", { incrs: [15, 30, 45] }),
      axis("entropy, MI (nats)"),
      axis("variation ratio (0–1)", { scale: "vr", side: 1, grid: { show: false } }),
    ],
    series: [
      { label: "rotation" },
      { label: "entropy", stroke: COLORS.entropy, width: 2 },
      { label: "mutual information", stroke: COLORS.mi, width: 2 },
      { label: "variation ratio", stroke: COLORS.vr, width: 2, dash: [5, 4], scale: "vr" },
    ],
    hooks: { draw: [refLine(angleNow, "#555", "x", [2, 3])] },
  };
  const data = [
    SWEEP,
    predictions.map((p) => p.entropy),
    predictions.map((p) => p.mutual_information),
    predictions.map((p) => p.variation_ratio),
  ];
  chart($("sweep-chart"), opts, data, 260);
  legend($("legend-sweep"), [
    { label: "entropy (total)", color: COLORS.entropy },
    { label: "mutual information (model)", color: COLORS.mi },
    { label: "variation ratio (right axis)", color: COLORS.vr, kind: "dash" },
    { label: "current rotation", color: "#555", kind: "dash" },
  ]);
}

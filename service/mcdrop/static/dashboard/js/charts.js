// Shared chart plumbing on uPlot: sizing to the container, legends, shaded ranges and lines.

export const COLORS = {
  mean: "#1f4e96",
  epistemic: "rgba(214, 96, 26, 0.45)",
  total: "rgba(31, 78, 150, 0.16)",
  draws: ["#2a9d8f", "#8e44ad", "#c0392b", "#b8860b", "#2c7a3f"],
  training: "rgba(120, 120, 120, 0.14)",
  hist: "rgba(31, 78, 150, 0.45)",
  gauss: "#d6601a",
  interval: "#c0392b",
  entropy: "#1f4e96",
  mi: "#d6601a",
  vr: "#2a9d8f",
  threshold: "#c0392b",
  ideal: "#888",
};

const AXIS = { stroke: "#333", grid: { stroke: "#e6e6e6" }, ticks: { stroke: "#ccc" } };

export function axis(label, extra = {}) {
  return { ...AXIS, label, labelSize: 18, ...extra };
}

function widthOf(el) {
  return Math.max(260, Math.floor(el.clientWidth || el.parentElement.clientWidth || 600));
}

/** A uPlot in `el` (replacing any previous one), resized with its container. */
export function chart(el, opts, data, height = 320) {
  if (el._plot) el._plot.destroy();
  if (el._resize) el._resize.disconnect();
  el.textContent = "";
  const plot = new uPlot({ width: widthOf(el), height, legend: { show: false }, ...opts }, data, el);
  el._plot = plot;
  el._resize = new ResizeObserver(() => {
    const w = widthOf(el);
    if (w !== plot.width) plot.setSize({ width: w, height });
  });
  el._resize.observe(el);
  return plot;
}

export function clearChart(el) {
  if (el._plot) el._plot.destroy();
  if (el._resize) el._resize.disconnect();
  el._plot = null;
  el.textContent = "";
}

/** A legend of colour swatches: items [{label, color, kind: "line"|"band"|"dash"}]. */
export function legend(el, items) {
  el.textContent = "";
  for (const item of items) {
    const span = document.createElement("span");
    const sw = document.createElement("i");
    sw.className = `swatch ${item.kind || "line"}`;
    sw.style.setProperty("--c", item.color);
    span.append(sw, document.createTextNode(item.label));
    el.append(span);
  }
}

/** Hook drawing vertical shaded x-ranges [[lo, hi], ...] behind the series. */
export function shadeX(getRanges, color) {
  return (u) => {
    const { ctx } = u;
    const { top, height } = u.bbox;
    ctx.save();
    ctx.fillStyle = color;
    for (const [lo, hi] of getRanges()) {
      const x0 = u.valToPos(lo, "x", true);
      const x1 = u.valToPos(hi, "x", true);
      const left = Math.max(u.bbox.left, Math.min(x0, x1));
      const right = Math.min(u.bbox.left + u.bbox.width, Math.max(x0, x1));
      if (right > left) ctx.fillRect(left, top, right - left, height);
    }
    ctx.restore();
  };
}

/** Hook drawing a line at a value of `scale` ("x": vertical, else horizontal). */
export function refLine(getValue, color, scale = "y", dash = [6, 4]) {
  return (u) => {
    const v = getValue();
    if (v === null || v === undefined || !Number.isFinite(v)) return;
    const { ctx } = u;
    const { left, top, width, height } = u.bbox;
    const p = u.valToPos(v, scale, true);
    ctx.save();
    ctx.strokeStyle = color;
    ctx.lineWidth = 2 * devicePixelRatio;
    ctx.setLineDash(dash.map((d) => d * devicePixelRatio));
    ctx.beginPath();
    if (scale === "x") {
      if (p < left || p > left + width) { ctx.restore(); return; }
      ctx.moveTo(p, top);
      ctx.lineTo(p, top + height);
    } else {
      if (p < top || p > top + height) { ctx.restore(); return; }
      ctx.moveTo(left, p);
      ctx.lineTo(left + width, p);
    }
    ctx.stroke();
    ctx.restore();
  };
}

/** Inverse of the standard normal CDF (Acklam's rational approximation, |error| < 1.2e-9). */
export function normalQuantile(p) {
  const a = [-39.69683028665376, 220.9460984245205, -275.9285104469687, 138.357751867269,
    -30.66479806614716, 2.506628277459239];
  const b = [-54.47609879822406, 161.5858368580409, -155.6989798598866, 66.80131188771972,
    -13.28068155211597];
  const c = [-0.007784894002430293, -0.3223964580411365, -2.400758277161838, -2.549732539343734,
    4.374664141464968, 2.938163982698783];
  const d = [0.007784695709041462, 0.3224671290700398, 2.445134137142996, 3.754408661907416];
  const lo = 0.02425;
  if (p < lo) {
    const q = Math.sqrt(-2 * Math.log(p));
    return (((((c[0] * q + c[1]) * q + c[2]) * q + c[3]) * q + c[4]) * q + c[5]) /
      ((((d[0] * q + d[1]) * q + d[2]) * q + d[3]) * q + 1);
  }
  if (p > 1 - lo) return -normalQuantile(1 - p);
  const q = p - 0.5;
  const r = q * q;
  return (((((a[0] * r + a[1]) * r + a[2]) * r + a[3]) * r + a[4]) * r + a[5]) * q /
    (((((b[0] * r + b[1]) * r + b[2]) * r + b[3]) * r + b[4]) * r + 1);
}

export function fmt(v, digits = 3) {
  return Number.isFinite(v) ? v.toFixed(digits) : "–";
}

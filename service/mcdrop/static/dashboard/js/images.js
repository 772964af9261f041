// Image inputs for image models: a file, random noise or a generated example, as the model's
// [C, H, W] (or [H, W], [H, W, C]) rows; and the colour ramps and palettes of per-pixel maps.

/** How an input shape holds an image: {channels, h, w, order: "chw" | "hwc" | "hw"}, or null. */
export function imageLayout(shape) {
  if (!shape) return null;
  if (shape.length === 2) return { channels: 1, h: shape[0], w: shape[1], order: "hw" };
  if (shape.length !== 3) return null;
  if (shape[0] > 4 && shape[2] <= 4) return { channels: shape[2], h: shape[0], w: shape[1], order: "hwc" };
  return { channels: shape[0], h: shape[1], w: shape[2], order: "chw" };
}

const NUMBER = String.raw`(-?\d+(?:\.\d+)?)`;
const RANGE = new RegExp(
  String.raw`(?:pixel values?|input values?|values? (?:in|from)|value range|pixel range)\s*:?\s*\[?\s*` +
  `${NUMBER}\\s*(?:\\.\\.|–|-|to|,)\\s*${NUMBER}`, "i");

/** The pixel range the model expects: from its description ("pixel values 0..255"), else 0..1. */
export function pixelRange(model) {
  const match = RANGE.exec(model.description || "");
  if (match) {
    const lo = Number(match[1]);
    const hi = Number(match[2]);
    if (Number.isFinite(lo) && Number.isFinite(hi) && lo < hi) {
      return { lo, hi, why: `from the model's description ("${match[0].trim()}")` };
    }
  }
  return { lo: 0, hi: 1, why: "the dashboard's default: the model's description names no pixel range" };
}

function channelNames(c) {
  if (c === 1) return "grey (0.299 R + 0.587 G + 0.114 B)";
  if (c === 3) return "R, G, B";
  if (c === 4) return "R, G, B, alpha";
  return `the grey value in each of the ${c} channels`;
}

/** A seeded generator of uniform numbers in [0, 1) (mulberry32). */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function gaussian(next) {
  const u = Math.max(next(), 1e-12);
  return Math.sqrt(-2 * Math.log(u)) * Math.cos(2 * Math.PI * next());
}

/** The image behind one view's input panel: values in 0..1 ("unit"), channel-major, shown on a
 *  canvas of the model's own H x W; rows() scales them to the model's pixel range. Elements:
 *  `${prefix}-canvas`, -file, -noise, -example, -note and (optional) -noise-std, -hard. */
export class ImageInput {
  constructor(prefix, onChange, showError) {
    this.$ = (name) => document.getElementById(`${prefix}-${name}`);
    this.onChange = onChange;
    this.showError = showError;
    this.layout = null;
    this.range = { lo: 0, hi: 1 };
    this.values = new Float64Array(0);
    this.examples = 0;
    this.source = "";
    this.$("file").addEventListener("change", () => {
      const file = this.$("file").files[0];
      if (file) this.fromFile(file);
    });
    this.$("noise").addEventListener("click", () => this.noise());
    this.$("example").addEventListener("click", () => this.example());
    for (const name of ["noise-std", "hard"]) {
      this.$(name)?.addEventListener("change", () => this.layout && this.example(true));
    }
  }

  /** Set up for a model; false (with the reason shown) when its input is no image. */
  use(model) {
    this.layout = imageLayout(model.input_shape);
    if (!this.layout) {
      this.showError(`${model.name}: this view needs an image input ([C, H, W] or [H, W]), not [${model.input_shape}]`);
      return false;
    }
    const { channels, h, w } = this.layout;
    this.range = pixelRange(model);
    this.values = new Float64Array(channels * h * w);
    this.examples = 0;
    const canvas = this.$("canvas");
    canvas.width = w;
    canvas.height = h;
    canvas.style.aspectRatio = `${w} / ${h}`;
    this.$("file").value = "";
    this.$("note").textContent =
      `Input [${model.input_shape.join(", ")}]: ${channels} channel${channels === 1 ? "" : "s"} ` +
      `(${channelNames(channels)}), ${h} x ${w} pixels. Values sent: ${this.range.lo}..${this.range.hi}, ` +
      `${this.range.why}. A file is stretched to ${w} x ${h} on black; random noise is uniform ` +
      "over the range; the example's Gaussian pixel noise is not clipped to it.";
    return true;
  }

  /** One row in the model's input shape, scaled to its pixel range. */
  row() {
    const { channels, h, w, order } = this.layout;
    const { lo, hi } = this.range;
    const v = (c, i, j) => lo + this.values[(c * h + i) * w + j] * (hi - lo);
    const range = (n, f) => Array.from({ length: n }, (_, k) => f(k));
    if (order === "hw") return range(h, (i) => range(w, (j) => v(0, i, j)));
    if (order === "hwc") return range(h, (i) => range(w, (j) => range(channels, (c) => v(c, i, j))));
    return range(channels, (c) => range(h, (i) => range(w, (j) => v(c, i, j))));
  }

  changed(source) {
    this.source = source;
    this.render();
    this.onChange();
  }

  render() {
    const { channels, h, w } = this.layout;
    const canvas = this.$("canvas");
    const ctx = canvas.getContext("2d");
    const image = ctx.createImageData(w, h);
    const byte = (x) => Math.round(255 * Math.max(0, Math.min(1, x)));
    for (let p = 0; p < h * w; p++) {
      const at = (c) => this.values[c * h * w + p];
      let rgb;
      if (channels >= 3) rgb = [at(0), at(1), at(2)];
      else {
        let grey = 0;
        for (let c = 0; c < channels; c++) grey += at(c) / channels;
        rgb = [grey, grey, grey];
      }
      image.data.set([byte(rgb[0]), byte(rgb[1]), byte(rgb[2]), 255], 4 * p);
    }
    ctx.putImageData(image, 0, 0);
    canvas.dataset.source = this.source;
  }

  noise() {
    for (let k = 0; k < this.values.length; k++) this.values[k] = Math.random();
    this.changed("random noise");
  }

  /** 1-3 bright squares and discs on a dark background with Gaussian pixel noise (not clipped),
   *  as the demo segmentation model was trained on; seeded, a new one per click (`again`: the
   *  same shapes with the current noise settings). */
  example(again = false) {
    const { channels, h, w } = this.layout;
    if (!again || !this.examples) this.examples += 1;
    const next = rng(this.examples);
    const std = Number(this.$("noise-std")?.value ?? 0.1);
    const hard = this.$("hard")?.checked;
    const image = new Float64Array(channels * h * w);
    const side = Math.min(h, w);
    for (let n = 1 + Math.floor(next() * 3); n > 0; n--) {
      const disc = next() < 0.5;
      const r = ((8 + next() * 6) * side) / 64;
      const cx = r + next() * (w - 2 * r);
      const cy = r + next() * (h - 2 * r);
      const level = channels === 1 ? [0.6 + 0.4 * next()] : Array.from({ length: channels }, () => 0.2 + 0.8 * next());
      for (let i = 0; i < h; i++) {
        for (let j = 0; j < w; j++) {
          const dx = j + 0.5 - cx;
          const dy = i + 0.5 - cy;
          const inside = disc ? dx * dx + dy * dy <= r * r : Math.abs(dx) <= r && Math.abs(dy) <= r;
          if (inside) for (let c = 0; c < channels; c++) image[(c * h + i) * w + j] = level[c % level.length];
        }
      }
    }
    const from = Math.floor((3 * w) / 4);
    const s = Number.isFinite(std) && std >= 0 ? std : 0.1;
    for (let c = 0; c < channels; c++) {
      for (let i = 0; i < h; i++) {
        for (let j = 0; j < w; j++) {
          image[(c * h + i) * w + j] += s * gaussian(next) + (hard && j >= from ? 0.5 * gaussian(next) : 0);
        }
      }
    }
    this.values = image;
    this.changed(`example ${this.examples}${hard ? " with strong noise on the right quarter" : ""}`);
  }

  async fromFile(file) {
    const { channels, h, w } = this.layout;
    let bitmap;
    try {
      bitmap = await createImageBitmap(file);
    } catch (exc) {
      this.showError(`${file.name}: not an image the browser can read (${exc.message})`);
      return;
    }
    const canvas = document.createElement("canvas");
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d", { willReadFrequently: true });
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, 0, 0, w, h);
    bitmap.close?.();
    const data = ctx.getImageData(0, 0, w, h).data;
    for (let p = 0; p < h * w; p++) {
      const [r, g, b, a] = [data[4 * p], data[4 * p + 1], data[4 * p + 2], data[4 * p + 3]].map((x) => x / 255);
      const grey = 0.299 * r + 0.587 * g + 0.114 * b;
      const own = channels === 3 ? [r, g, b] : channels === 4 ? [r, g, b, a] : null;
      for (let c = 0; c < channels; c++) this.values[c * h * w + p] = own ? own[c] : grey;
    }
    this.showError("");
    this.changed(`file ${file.name}`);
  }
}

// --- maps ---------------------------------------------------------------------------------

const VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
  .map((hex) => [1, 3, 5].map((k) => parseInt(hex.slice(k, k + 2), 16)));

/** Viridis-like colour of t in [0, 1] as [r, g, b]. */
export function viridis(t) {
  const x = Math.max(0, Math.min(1, Number.isFinite(t) ? t : 0)) * (VIRIDIS.length - 1);
  const k = Math.min(VIRIDIS.length - 2, Math.floor(x));
  const f = x - k;
  return VIRIDIS[k].map((v, c) => Math.round(v + (VIRIDIS[k + 1][c] - v) * f));
}

const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
  "#bcbd22", "#17becf", "#7f7f7f"];

/** A colour per class: dark grey for a "background" class, then a categorical palette. */
export function classColors(labels) {
  let k = 0;
  return labels.map((label) => {
    if (/^(background|bg)$/i.test(label)) return "#2b2b2b";
    const i = k++;
    if (i < PALETTE.length) return PALETTE[i];
    return `hsl(${Math.round((i * 137.508) % 360)}, 65%, 50%)`;
  });
}

function rgbOf(color) {
  const probe = document.createElement("canvas").getContext("2d");
  probe.fillStyle = color;
  probe.fillRect(0, 0, 1, 1);
  return [...probe.getImageData(0, 0, 1, 1).data.slice(0, 3)];
}

/** Draw an [H][W] map of class indices on `canvas` (one canvas pixel per element). */
export function drawClassMap(canvas, map, colors) {
  const rgb = colors.map(rgbOf);
  paint(canvas, map, (v) => rgb[v] || [255, 0, 255]);
}

/** Draw an [H][W] map of numbers through the viridis ramp; {min, max} of its finite values. */
export function drawValueMap(canvas, map) {
  let min = Infinity;
  let max = -Infinity;
  for (const row of map) for (const v of row) if (Number.isFinite(v)) { min = Math.min(min, v); max = Math.max(max, v); }
  const span = max - min;
  paint(canvas, map, (v) => viridis(span > 0 ? (v - min) / span : 0.5));
  return { min, max };
}

function paint(canvas, map, colorOf) {
  const h = map.length;
  const w = h ? map[0].length : 0;
  canvas.width = w;
  canvas.height = h;
  if (!h || !w) return;
  if (!canvas.classList.contains("ramp")) canvas.style.aspectRatio = `${w} / ${h}`;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      const [r, g, b] = colorOf(map[i][j]);
      image.data.set([r, g, b, 255], 4 * (i * w + j));
    }
  }
  ctx.putImageData(image, 0, 0);
}

/** A horizontal strip of the viridis ramp on `canvas`. */
export function drawRamp(canvas) {
  const n = 128;
  canvas.width = n;
  canvas.height = 1;
  paint(canvas, [Array.from({ length: n }, (_, i) => i / (n - 1))], viridis);
}

// The digit image: a picked test digit plus what was drawn, rotated client-side (bilinear).

const INK = 128; // side of the offscreen drawing canvas, in pixels

/** Rotate an H x W image (flat, row-major) by `degrees` about its centre, exactly like the
 *  server's demo `rotate` (torch affine_grid + grid_sample, align_corners=False, zero padding). */
export function rotateImage(img, h, w, degrees) {
  const a = (degrees * Math.PI) / 180;
  const cos = Math.cos(a);
  const sin = Math.sin(a);
  const out = new Float64Array(h * w);
  const at = (r, c) => (r < 0 || r >= h || c < 0 || c >= w ? 0 : img[r * w + c]);
  for (let i = 0; i < h; i++) {
    for (let j = 0; j < w; j++) {
      const x = (2 * j + 1) / w - 1;
      const y = (2 * i + 1) / h - 1;
      const px = ((cos * x - sin * y + 1) * w - 1) / 2;
      const py = ((sin * x + cos * y + 1) * h - 1) / 2;
      const c0 = Math.floor(px);
      const r0 = Math.floor(py);
      const fx = px - c0;
      const fy = py - r0;
      out[i * w + j] =
        at(r0, c0) * (1 - fx) * (1 - fy) + at(r0, c0 + 1) * fx * (1 - fy) +
        at(r0 + 1, c0) * (1 - fx) * fy + at(r0 + 1, c0 + 1) * fx * fy;
    }
  }
  return out;
}

/** The editable image behind #digit-canvas: picked pixels + ink drawn with the pointer. */
export class DigitPad {
  constructor(canvas, h, w, onChange) {
    this.canvas = canvas;
    this.h = h;
    this.w = w;
    this.angle = 0;
    this.picked = new Float64Array(h * w);
    this.ink = document.createElement("canvas");
    this.ink.width = INK;
    this.ink.height = INK;
    this.inkCtx = this.ink.getContext("2d", { willReadFrequently: true });
    this.onChange = onChange;
    this.last = null;
    canvas.addEventListener("pointerdown", (e) => this.down(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    canvas.addEventListener("pointerup", (e) => this.up(e));
    canvas.addEventListener("pointercancel", (e) => this.up(e));
    this.render();
  }

  /** Base image (before rotation), raw 0..16, flat row-major. */
  base() {
    const { h, w } = this;
    const data = this.inkCtx.getImageData(0, 0, INK, INK).data;
    const out = new Float64Array(h * w);
    const bh = INK / h;
    const bw = INK / w;
    for (let i = 0; i < h; i++) {
      for (let j = 0; j < w; j++) {
        let sum = 0;
        for (let y = i * bh; y < (i + 1) * bh; y++) {
          for (let x = j * bw; x < (j + 1) * bw; x++) sum += data[(y * INK + x) * 4 + 3];
        }
        const drawn = (16 * sum) / (255 * bh * bw);
        out[i * w + j] = Math.min(16, this.picked[i * w + j] + drawn);
      }
    }
    return out;
  }

  /** The image the model sees: the base rotated by the current angle. */
  current() {
    return rotateImage(this.base(), this.h, this.w, this.angle);
  }

  setPicked(pixels) {
    this.inkCtx.clearRect(0, 0, INK, INK);
    this.picked = Float64Array.from(pixels.flat());
    this.render();
  }

  clear() {
    this.setPicked(new Array(this.h * this.w).fill(0));
  }

  setAngle(degrees) {
    this.angle = degrees;
    this.render();
  }

  render() {
    const img = this.current();
    const ctx = this.canvas.getContext("2d");
    const cw = this.canvas.width / this.w;
    const ch = this.canvas.height / this.h;
    for (let i = 0; i < this.h; i++) {
      for (let j = 0; j < this.w; j++) {
        const v = Math.round(255 - (Math.max(0, Math.min(16, img[i * this.w + j])) / 16) * 235);
        ctx.fillStyle = `rgb(${v},${v},${v})`;
        ctx.fillRect(j * cw, i * ch, cw + 0.5, ch + 0.5);
      }
    }
  }

  // Pointer position -> point of the unrotated ink canvas (the inverse of the display rotation).
  toInk(e) {
    const rect = this.canvas.getBoundingClientRect();
    const qx = (2 * (e.clientX - rect.left)) / rect.width - 1;
    const qy = (2 * (e.clientY - rect.top)) / rect.height - 1;
    const a = (this.angle * Math.PI) / 180;
    const bx = Math.cos(a) * qx - Math.sin(a) * qy;
    const by = Math.sin(a) * qx + Math.cos(a) * qy;
    return [((bx + 1) / 2) * INK, ((by + 1) / 2) * INK];
  }

  stroke(from, to) {
    const ctx = this.inkCtx;
    ctx.strokeStyle = "rgba(0,0,0,1)";
    ctx.lineWidth = INK / 10;
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(...from);
    ctx.lineTo(...to);
    ctx.stroke();
  }

  down(e) {
    e.preventDefault();
    this.canvas.setPointerCapture?.(e.pointerId);
    this.last = this.toInk(e);
    this.stroke(this.last, this.last);
    this.render();
  }

  move(e) {
    if (!this.last) return;
    const p = this.toInk(e);
    this.stroke(this.last, p);
    this.last = p;
    this.render();
  }

  up() {
    if (!this.last) return;
    this.last = null;
    this.onChange();
  }
}

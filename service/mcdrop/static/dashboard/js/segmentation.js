// Segmentation view: an input image, the predicted mask, per-pixel entropy and mutual
// information maps, their means over the image and per predicted class.
import { api, debounce, latest } from "./api.js";
import { fmt } from "./charts.js";
import { MEASURES, drawMeasures } from "./classifiers.js";
import { ImageInput, classColors, drawClassMap, drawRamp, drawValueMap } from "./images.js";

const $ = (id) => document.getElementById(id);

export function setupSegmentation(ctx) {
  let model = null;
  const only = latest();

  async function predict() {
    if (!model) return;
    const { samples, seed } = ctx.mc();
    const body = { rows: [image.row()], samples, seed };
    const m = model;
    const res = await only(() => api("POST", `/v1/models/${encodeURIComponent(m.name)}/predict`, body)).catch(() => null);
    if (!res || model !== m) return;
    ctx.setStatus(res);
    draw(res.predictions[0]);
    $("seg-source").textContent = image.source;
  }

  const image = new ImageInput("seg", predict, ctx.showError);
  for (const ramp of document.querySelectorAll("#view-segmentation canvas.ramp")) drawRamp(ramp);

  return {
    show(m) {
      model = m;
      clear();
      if (!image.use(m)) { model = null; return; }
      image.example();
    },
    hide() { model = null; },
    redraw: debounce(predict, 150),
  };
}

function clear() {
  for (const id of ["seg-mask", "seg-entropy", "seg-mi"]) {
    const canvas = $(id);
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
  for (const id of ["seg-legend", "seg-entropy-range", "seg-mi-range", "seg-means", "seg-source"]) $(id).textContent = "";
  $("seg-classes").querySelector("tbody").textContent = "";
}

function draw(p) {
  const classes = p.classes;
  const colors = classColors(classes);
  drawClassMap($("seg-mask"), p.predicted_class, colors);
  const legend = $("seg-legend");
  legend.textContent = "";
  classes.forEach((label, c) => {
    const span = document.createElement("span");
    span.dataset.class = label;
    span.dataset.color = colors[c];
    const sw = document.createElement("i");
    sw.className = "swatch band";
    sw.style.setProperty("--c", colors[c]);
    span.append(sw, document.createTextNode(label));
    legend.append(span);
  });
  for (const [key, id] of [["entropy", "seg-entropy"], ["mutual_information", "seg-mi"]]) {
    const { min, max } = drawValueMap($(id), p[key]);
    const range = $(`${id}-range`);
    range.textContent = `min ${fmt(min)} · max ${fmt(max)} nats`;
    range.dataset.min = String(min);
    range.dataset.max = String(max);
  }
  drawMeasures($("seg-means"), p.map_mean, classes.length);
  const body = $("seg-classes").querySelector("tbody");
  body.textContent = "";
  const total = classes.reduce((n, label) => n + p.by_predicted_class[label].elements, 0);
  classes.forEach((label, c) => {
    const r = p.by_predicted_class[label];
    const tr = document.createElement("tr");
    tr.dataset.class = label;
    const name = document.createElement("td");
    const sw = document.createElement("i");
    sw.className = "swatch band";
    sw.style.setProperty("--c", colors[c]);
    name.append(sw, document.createTextNode(` ${label}`));
    tr.append(name);
    const cells = [String(r.elements), total ? `${fmt((100 * r.elements) / total, 1)}%` : "–",
      ...MEASURES.map(([key]) => (r[key] === null || r[key] === undefined ? "–" : fmt(r[key])))];
    const keys = ["elements", "share", ...MEASURES.map(([key]) => key)];
    cells.forEach((text, k) => {
      const td = document.createElement("td");
      td.dataset.key = keys[k];
      td.textContent = text;
      tr.append(td);
    });
    body.append(tr);
  });
}

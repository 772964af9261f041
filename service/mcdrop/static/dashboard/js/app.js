// The page: model picker, MC controls, and switching between the views by task and input shape.
import { api, showError } from "./api.js";
import { setupClassification } from "./classification.js";
import { setupFeatureClassifier, setupImageClassifier } from "./classifiers.js";
import { imageLayout } from "./images.js";
import { setupLive } from "./live.js";
import { setup1d, setupMany } from "./regression.js";
import { setupSegmentation } from "./segmentation.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["view-regression-1d", "view-regression", "view-classification",
  "view-classifier-features", "view-classifier-image", "view-segmentation"];

const ctx = {
  mc: () => ({ samples: Number($("samples").value), seed: Number($("seed").value) }),
  setStatus: (res) => {
    $("status").textContent = `${res.samples_used} samples, seed ${res.seed}`;
  },
  showError,
};

const views = {
  "view-regression-1d": setup1d(ctx),
  "view-regression": setupMany(ctx),
  "view-classification": setupClassification(ctx),
  "view-classifier-features": setupFeatureClassifier(ctx),
  "view-classifier-image": setupImageClassifier(ctx),
  "view-segmentation": setupSegmentation(ctx),
};
const live = setupLive();
let models = [];
let current = null;

/** The view for a model, from its metadata only: {view} or {why} there is none. */
function viewFor(m) {
  if (!m.task) return { why: null };
  const input = m.input_shape || [];
  const output = m.output_shape || [(m.outputs || []).length];
  const map = output.length > 1;
  const image = imageLayout(input);
  const shape = (s) => `[${s.join(", ")}]`;
  if (m.task === "classification") {
    if (map) {
      if (output.length === 3 && m.class_axis !== null && m.class_axis !== undefined && image) {
        return { view: "view-segmentation" };
      }
      return { why: `the dashboard shows class maps of images only ([C, H, W] output with a class axis); ` +
        `this model maps ${shape(input)} to ${shape(output)}: use the API` };
    }
    const digits = input.join("x");
    if (digits === "1x8x8" || digits === "8x8") return { view: "view-classification" };
    if (input.length === 1) return { view: "view-classifier-features" };
    if (image) return { view: "view-classifier-image" };
    return { why: `the dashboard has no view for a classifier of input ${shape(input)}: use the API` };
  }
  if (m.task === "regression") {
    if (map) return { why: `the dashboard has no view for regression maps (output ${shape(output)}): use the API` };
    return { view: input.length === 1 && input[0] === 1 ? "view-regression-1d" : "view-regression" };
  }
  return { why: `the dashboard has no view for task "${m.task}"` };
}

function infoText(m) {
  const parts = [`state: ${m.state}`];
  if (m.task) parts.unshift(`task: ${m.task}`);
  if (m.version) parts.splice(1, 0, `version ${m.version}`);
  if (m.input_shape) parts.push(`input [${m.input_shape.join(", ")}]`);
  if (m.output_shape) parts.push(`output [${m.output_shape.join(", ")}]`);
  if (m.default_samples) parts.push(`samples: default ${m.default_samples}, max ${m.max_samples ?? "–"}`);
  if (m.max_rows) parts.push(`max rows ${m.max_rows}`);
  if (m.mask_mode) parts.push(`mask mode ${m.mask_mode}`);
  if (m.error) parts.push(`error: ${m.error}`);
  return parts.join(" · ");
}

function select(name) {
  const m = models.find((x) => x.name === name);
  for (const v of Object.values(views)) v.hide();
  live.hide();
  current = m || null;
  if (!m) return;
  const info = $("model-info");
  info.textContent = infoText(m);
  info.title = m.description || "";
  const max = m.max_samples || 1000;
  const slider = $("samples");
  slider.max = String(Math.min(max, 2000));
  slider.value = String(Math.min(m.default_samples || 100, max));
  $("samples-value").textContent = slider.value;
  const { view, why } = viewFor(m);
  for (const id of VIEWS) $(id).hidden = id !== view;
  if (view) views[view].show(m);
  else if (m.error) showError(`${m.name}: ${m.error}`);
  else if (why) showError(`${m.name}: ${why}`);
  live.show(m);
}

async function start() {
  try {
    models = await api("GET", "/v1/models");
  } catch {
    return;
  }
  const sel = $("model-select");
  sel.textContent = "";
  for (const m of models) sel.append(new Option(`${m.name}${m.task ? ` (${m.task})` : ""}`, m.name));
  sel.addEventListener("change", () => select(sel.value));
  const wanted = new URLSearchParams(location.search).get("model");
  if (wanted && models.some((m) => m.name === wanted)) sel.value = wanted;
  if (models.length) select(sel.value);
  else showError("the model repository has no models");
}

function mcChanged() {
  $("samples-value").textContent = $("samples").value;
  const view = current && viewFor(current).view;
  if (view) views[view].redraw();
}
$("samples").addEventListener("input", mcChanged);
$("seed").addEventListener("input", mcChanged);

start();

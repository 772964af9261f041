// Classifiers other than the digits pad: one feature vector (a form), or an image of any size
// and channels (file, noise, example); both show probability bars and the uncertainty measures.
import { api, debounce, latest } from "./api.js";
import { fmt } from "./charts.js";
import { featureForm } from "./forms.js";
import { ImageInput } from "./images.js";

const $ = (id) => document.getElementById(id);

export const MEASURES = [
  ["entropy", "Entropy (nats)", (c) => `total uncertainty of the mean prediction: 0 when one class has all the probability, ln ${c} = ${fmt(Math.log(c))} when all ${c} classes are equally likely`],
  ["mutual_information", "Mutual information (nats)", () => "entropy minus expected entropy: how much the dropout samples disagree (epistemic, the model's uncertainty)"],
  ["variation_ratio", "Variation ratio (0–1)", () => "share of the dropout samples whose top class is not the predicted class"],
  ["expected_entropy", "Expected entropy (nats)", () => "mean entropy of the single dropout samples: uncertainty left however the model is sampled (aleatoric)"],
];

function predictUrl(model) {
  return `/v1/models/${encodeURIComponent(model.name)}/predict`;
}

/** Bars of the mean probability per class with a ± 1 std whisker, in class order. */
export function drawProbabilities(el, labels, p) {
  el.textContent = "";
  for (const label of labels) {
    const mean = p.probabilities[label];
    const std = p.probabilities_std[label];
    const row = document.createElement("div");
    row.className = "prob-row";
    row.dataset.class = label;
    if (label === p.predicted) row.dataset.predicted = "1";
    const name = document.createElement("span");
    name.className = "prob-label";
    name.textContent = label;
    name.title = label;
    const track = document.createElement("span");
    track.className = "prob-track";
    const fill = document.createElement("span");
    fill.className = "prob-fill";
    fill.style.width = `${100 * Math.max(0, Math.min(1, mean))}%`;
    const whisker = document.createElement("span");
    whisker.className = "prob-std";
    const lo = Math.max(0, mean - std);
    const hi = Math.min(1, mean + std);
    whisker.style.left = `${100 * lo}%`;
    whisker.style.width = `${100 * (hi - lo)}%`;
    track.append(fill, whisker);
    const value = document.createElement("span");
    value.className = "prob-value";
    value.textContent = `${fmt(mean)} ± ${fmt(std)}`;
    row.append(name, track, value);
    el.append(row);
  }
}

/** The four measures of one prediction (or of map means), each with a line saying what it is. */
export function drawMeasures(el, values, classes) {
  el.textContent = "";
  for (const [key, name, why] of MEASURES) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.dataset.measure = key;
    dd.textContent = fmt(values[key]);
    const note = document.createElement("dd");
    note.className = "why";
    note.textContent = why(classes);
    el.append(dt, dd, note);
  }
}

function drawPrediction(prefix, model, p) {
  $(`${prefix}-predicted`).textContent = `${p.predicted} (p = ${fmt(p.probabilities[p.predicted])})`;
  drawProbabilities($(`${prefix}-bars`), model.outputs, p);
  drawMeasures($(`${prefix}-measures`), p, model.outputs.length);
}

function clearPrediction(prefix) {
  $(`${prefix}-predicted`).textContent = "–";
  $(`${prefix}-bars`).textContent = "";
  $(`${prefix}-measures`).textContent = "";
}

// --- one feature vector -------------------------------------------------------------------

export function setupFeatureClassifier(ctx) {
  let model = null;
  const only = latest();

  async function predict() {
    if (!model) return;
    const inputs = [...$("cf-form").querySelectorAll("input")];
    const bad = inputs.find((i) => i.value.trim() === "" || !Number.isFinite(Number(i.value)));
    if (bad) {
      ctx.showError(`${bad.dataset.label}: "${bad.value}" is not a number`);
      return;
    }
    const { samples, seed } = ctx.mc();
    const body = { rows: [inputs.map((i) => Number(i.value))], samples, seed };
    const m = model;
    const res = await only(() => api("POST", predictUrl(m), body)).catch(() => null);
    if (!res || model !== m) return;
    ctx.setStatus(res);
    drawPrediction("cf", m, res.predictions[0]);
  }

  $("cf-predict").addEventListener("click", predict);
  $("cf-form").addEventListener("submit", (e) => { e.preventDefault(); predict(); });

  return {
    show(m) {
      model = m;
      clearPrediction("cf");
      const form = $("cf-form");
      featureForm(form, m, "x");
      const submit = document.createElement("button");
      submit.type = "submit";
      submit.hidden = true; // Enter in a field predicts
      form.append(submit);
      predict();
    },
    hide() { model = null; },
    redraw: debounce(predict, 150),
  };
}

// --- an image -------------------------------------------------------------------------------

export function setupImageClassifier(ctx) {
  let model = null;
  const only = latest();

  async function predict() {
    if (!model) return;
    const { samples, seed } = ctx.mc();
    const body = { rows: [image.row()], samples, seed };
    const m = model;
    const res = await only(() => api("POST", predictUrl(m), body)).catch(() => null);
    if (!res || model !== m) return;
    ctx.setStatus(res);
    drawPrediction("ic", m, res.predictions[0]);
  }

  const image = new ImageInput("ic", predict, ctx.showError);

  return {
    show(m) {
      model = m;
      clearPrediction("ic");
      if (!image.use(m)) { model = null; return; }
      image.example();
    },
    hide() { model = null; },
    redraw: debounce(predict, 150),
  };
}

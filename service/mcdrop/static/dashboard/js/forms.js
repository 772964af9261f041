// One number field per input feature, labelled from the model's input_names (else `${prefix}${i}`).

export function featureForm(form, model, prefix) {
  const n = model.input_shape.reduce((a, b) => a * b, 1);
  const names = model.input_names && model.input_names.length === n ? model.input_names : null;
  form.textContent = "";
  for (let i = 0; i < n; i++) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "number";
    input.step = "any";
    input.name = `feature-${i}`;
    input.value = "0";
    input.dataset.label = names ? names[i] : `${prefix}${i}`;
    label.append(document.createTextNode(input.dataset.label), input);
    form.append(label);
  }
}

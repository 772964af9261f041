// Calls to the public JSON API: the busy flag, window.mcdropLast, errors shown in #error.

let inFlight = 0;

function setBusy(delta) {
  inFlight += delta;
  document.body.dataset.busy = inFlight > 0 ? "1" : "0";
}

export function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message || "";
  box.hidden = !message;
}

export class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

/** Fetch JSON from the API. Foreground calls set busy, window.mcdropLast and #error;
 *  background polls (live view) do neither, so tests see the user's last request. */
export async function api(method, url, body = undefined, { background = false, quiet404 = false } = {}) {
  if (!background) setBusy(1);
  let status = 0;
  let response = null;
  try {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const res = await fetch(url, init);
    status = res.status;
    const text = await res.text();
    try {
      response = text ? JSON.parse(text) : null;
    } catch {
      response = { error: `HTTP ${status}: ${text.slice(0, 200)}` };
    }
    const record = { url, request: body ?? null, response, status };
    if (background) window.mcdropLive = record;
    else window.mcdropLast = record;
    if (!res.ok) {
      const message = (response && response.error) || `HTTP ${status}`;
      throw new ApiError(message, status);
    }
    if (!background) showError("");
    return response;
  } catch (exc) {
    const err = exc instanceof ApiError ? exc : new ApiError(`${method} ${url}: ${exc.message}`, status);
    if (!(quiet404 && err.status === 404)) showError(err.message);
    throw err;
  } finally {
    if (!background) setBusy(-1);
  }
}

/** Run fn at most once per `ms` of quiet: sliders redraw after a short pause. */
export function debounce(fn, ms = 150) {
  let timer = null;
  return (...args) => {
    clearTimeout(timer);
    timer = setTimeout(() => fn(...args), ms);
  };
}

/** Requests may overlap (slider moves); only the newest one's answer is drawn. */
export function latest() {
  let ticket = 0;
  return async (promiseFn) => {
    const mine = ++ticket;
    const result = await promiseFn();
    return mine === ticket ? result : null;
  };
}

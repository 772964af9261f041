"""The built-in dashboard (GET /dashboard) in a real browser against a real server on 127.0.0.1.

Debian's chromium driven by playwright; the module is skipped, with the reason, where chromium is
missing or cannot start. Numbers on the page are checked against the API: seeds make answers
reproducible, so the page's request sent again must give the page's answer.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import NARROW, WIDE, ApiCall, Dashboard, browser_problem, launch, png

PROBLEM = browser_problem()
if PROBLEM is not None:
    pytest.skip(f"browser tests skipped: {PROBLEM}", allow_module_level=True)

import torch  # noqa: E402
from conftest import toml_table, write_mlp_model  # noqa: E402
from http_helpers import ServerProcess, copy_shipped, start_server  # noqa: E402
from playwright.sync_api import Browser, FilePayload, sync_playwright  # noqa: E402

from mcdrop.repository.loading import save_weights  # noqa: E402

pytestmark = pytest.mark.slow

VIEWS = ("#view-regression-1d", "#view-regression", "#view-classification",
         "#view-classifier-features", "#view-classifier-image", "#view-segmentation")  # fmt: skip
MEASURE_KEYS = ("entropy", "mutual_information", "variation_ratio", "expected_entropy")
SWEEP_ANGLES = list(range(-90, 91, 15))
FEATURES = [0.5, -1.25, 2.0]  # typed into the "tabular" model's #feature-form
SUMMARY = re.compile(
    r"mean (?P<mean>\S+), std (?P<std>\S+) .*95% interval \[(?P<lo>\S+), (?P<hi>\S+)\]"
)


# Small entrypoint models whose views are picked from their metadata (not their names).
VIEW_MODELS = '''
import torch
from torch import nn


class Segmenter(nn.Module):
    """Grey images [B, 1, 32, 32] -> per-pixel logits [B, 3, 32, 32] (classes first)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.drop = nn.Dropout2d(0.3)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x))))


class Pictures(nn.Module):
    """RGB images [B, 3, 32, 32] -> 4 class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.conv(x)).mean(dim=(2, 3))))


class Tabular(nn.Module):
    """4 features -> 3 class logits."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.drop(torch.relu(self.fc(x))))


class Tagger(nn.Module):
    """Tokens [B, 5, 4] -> tag logits [B, 5, 3]: a map the dashboard has no view for."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.drop(x))


def segmenter() -> nn.Module:
    return Segmenter()


def pictures() -> nn.Module:
    return Pictures()


def tabular() -> nn.Module:
    return Tabular()


def tagger() -> nn.Module:
    return Tagger()
'''

IRIS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
VIEW_SPECS: dict[str, dict[str, Any]] = {
    "shapes-seg": {"factory": "segmenter", "input": {"shape": [1, 32, 32]},
                   "output": {"names": ["background", "square", "disc"], "shape": [3, 32, 32],
                              "class_axis": 0}},
    "pictures": {"factory": "pictures", "input": {"shape": [3, 32, 32]},
                 "output": {"names": ["cat", "dog", "ship", "truck"]},
                 "description": "RGB photos, pixel values 0..255, shape [3, 32, 32]."},
    "iris": {"factory": "tabular", "input": {"shape": [4], "names": IRIS},
             "output": {"names": ["setosa", "versicolor", "virginica"]}},
    "tagger": {"factory": "tagger", "input": {"shape": [5, 4]},
               "output": {"names": ["O", "PER", "LOC"], "shape": [5, 3], "class_axis": 1}},
}  # fmt: skip


def write_view_models(repository: Path) -> None:
    """Entrypoint classifiers (seeded weights, safetensors, model.toml) into `repository`."""
    factories: dict[str, Any] = {}
    exec(VIEW_MODELS, factories)  # the same classes the server imports from the folder
    for name, spec in VIEW_SPECS.items():
        folder = repository / name
        folder.mkdir(parents=True)
        (folder / "view_models.py").write_text(VIEW_MODELS, encoding="utf-8")
        torch.manual_seed(len(name))
        save_weights(factories[spec["factory"]](), folder / "weights.safetensors")
        head = f'name = "{name}"\ntask = "classification"\n'
        if "description" in spec:
            head += f"description = {json.dumps(spec['description'])}\n"
        manifest = head + "\n" + "\n".join([
            toml_table("input", spec["input"]), toml_table("output", spec["output"]),
            toml_table("model", {"format": "entrypoint",
                                 "entrypoint": f"view_models:{spec['factory']}"}),
            toml_table("mc", {"default_samples": 16, "max_samples": 256}),
        ])  # fmt: skip
        (folder / "model.toml").write_text(manifest, encoding="utf-8")


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """uvicorn over copies of the shipped digits and toy-regression, "tabular" (3 inputs,
    regression) and the VIEW_SPECS classifiers, on CPU."""
    root = tmp_path_factory.mktemp("dashboard")
    repository = copy_shipped(root / "models", "digits", "toy-regression")
    write_mlp_model(repository / "tabular", in_features=len(FEATURES), outputs=("price",),
                    tau=4.0, hidden=(16,), dropout=0.2)  # fmt: skip
    write_view_models(repository)
    process = start_server(repository, root / "server.log")
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30.0) as client:
        yield client


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = launch(playwright)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Path:
    """The folder the screenshots go to; its path is printed past pytest's capture."""
    folder = tmp_path_factory.mktemp("screenshots")
    capture: Any = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print(f"\ndashboard screenshots: {folder}")
    return folder


@pytest.fixture
def dash(browser: Browser, server: ServerProcess) -> Iterator[Dashboard]:
    """The dashboard loaded at 1280x800, its first model shown and settled."""
    context = browser.new_context(viewport=WIDE)  # type: ignore[arg-type]
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        board = Dashboard(page, server.url)
        page.goto(f"{server.url}/dashboard")
        page.wait_for_function("document.querySelectorAll('#model-select option').length > 0")
        board.settle()
        yield board
    finally:
        context.close()


@pytest.fixture(scope="module")
def test_digits(api: httpx.Client) -> list[dict[str, Any]]:
    """The held-out digits the page offers in #digit-pick, as the page loads them."""
    response = api.get("/dashboard/static/digits-test.json")
    assert response.status_code == 200, response.text
    digits: list[dict[str, Any]] = response.json()
    return digits


# -- helpers -------------------------------------------------------------------------------


def replay(api: httpx.Client, call: ApiCall) -> Any:
    """Send the page's request again (with the seed the server answered with, if none was sent)."""
    body = dict(call.request)
    body.setdefault("seed", call.response["seed"])
    response = api.post(call.path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def assert_replays(api: httpx.Client, calls: list[ApiCall]) -> None:
    """Every (successful) call of the page gives the same answer when sent again."""
    assert calls
    for call in calls:
        assert call.status == 200, (call.path, call.response)
        assert replay(api, call) == call.response, f"{call.path} {call.request}"


def one_row(calls: list[ApiCall]) -> ApiCall:
    """The latest single-row predict call (the classification view's current image)."""
    single = [c for c in calls if len(c.request["rows"]) == 1]
    assert single, [len(c.request["rows"]) for c in calls]
    return single[-1]


def assert_measures(dash: Dashboard, call: ApiCall) -> None:
    """#measure-* show the call's entropy / mutual information / variation ratio to 3 decimals."""
    row = call.response["predictions"][0]
    for selector, key in [("#measure-entropy", "entropy"), ("#measure-mi", "mutual_information"),
                          ("#measure-vr", "variation_ratio")]:  # fmt: skip
        assert dash.text(selector) == f"{row[key]:.3f}", (selector, key, row[key])


def only_view(dash: Dashboard, view: str) -> None:
    """`view` is shown and the other task views are hidden."""
    assert dash.visible(view), f"{view} hidden"
    for other in VIEWS:
        if other != view:
            assert not dash.visible(other), f"{other} visible next to {view}"


def flat(rows: Any) -> list[float]:
    out: list[float] = []
    for value in rows:
        out.extend(flat(value) if isinstance(value, list) else [float(value)])
    return out


def fixed(value: float, digits: int = 3) -> str:
    """value.toFixed(digits) as the page's JS writes it: exact value, ties away from zero."""
    return str(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def shape_of(value: Any) -> list[int]:
    """The shape of a nested list (of a rectangular array)."""
    return [len(value), *shape_of(value[0])] if isinstance(value, list) else []


def assert_classes_shown(dash: Dashboard, prefix: str, call: ApiCall) -> None:
    """#{prefix}-bars, -measures and -predicted show the call's single row (3 decimals)."""
    row = call.response["predictions"][0]
    labels = dash.page.eval_on_selector_all(
        f"#{prefix}-bars .prob-row", "rs => rs.map(r => r.dataset.class)"
    )
    assert labels == list(row["probabilities"]), labels
    for label, p in row["probabilities"].items():
        shown = dash.text(f'#{prefix}-bars .prob-row[data-class="{label}"] .prob-value')
        assert shown == f"{fixed(p)} ± {fixed(row['probabilities_std'][label])}", (label, shown)
    for key in MEASURE_KEYS:
        shown = dash.text(f'#{prefix}-measures [data-measure="{key}"]')
        assert shown == fixed(row[key]), (key, shown, row[key])
    notes = dash.page.eval_on_selector_all(
        f"#{prefix}-measures .why", "ds => ds.map(d => d.textContent)"
    )
    assert len(notes) == len(MEASURE_KEYS), notes
    assert all(notes), notes
    predicted = row["predicted"]
    assert (
        dash.text(f"#{prefix}-predicted")
        == f"{predicted} (p = {fixed(row['probabilities'][predicted])})"
    )


def pixel(dash: Dashboard, selector: str, i: int, j: int) -> list[int]:
    """[r, g, b] of the pixel at (row i, column j) of a canvas."""
    rgb: list[int] = dash.page.evaluate(
        """([sel, i, j]) => [...document.querySelector(sel).getContext('2d')
                .getImageData(j, i, 1, 1).data.slice(0, 3)]""",
        [selector, i, j],
    )
    return rgb


def shown_classes(dash: Dashboard) -> list[list[int]]:
    """#seg-mask read back through #seg-legend's colours: the class index per pixel (-1: none)."""
    classes: list[list[int]] = dash.page.evaluate(
        """() => {
            const probe = document.createElement('canvas').getContext('2d');
            const colors = [...document.querySelectorAll('#seg-legend [data-class]')].map((s) => {
                probe.fillStyle = s.dataset.color;
                probe.fillRect(0, 0, 1, 1);
                return [...probe.getImageData(0, 0, 1, 1).data.slice(0, 3)].join();
            });
            const c = document.getElementById('seg-mask');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            const at = (i, j) => [...d.slice(4 * (i * c.width + j), 4 * (i * c.width + j) + 3)];
            return Array.from({ length: c.height }, (_, i) =>
                Array.from({ length: c.width }, (_, j) => colors.indexOf(at(i, j).join())));
        }"""
    )
    return classes


def upload(dash: Dashboard, selector: str, name: str, content: bytes) -> list[ApiCall]:
    """Choose an image file in a file input; the predict calls that follow."""
    since = dash.count()
    payload: FilePayload = {"name": name, "mimeType": "image/png", "buffer": content}
    dash.page.set_input_files(selector, files=[payload])
    return dash.wait_predictions(since)


def draw(dash: Dashboard, strokes: list[list[tuple[float, float]]]) -> None:
    """Draw polylines on #digit-canvas; points are fractions (0..1) of its width and height."""
    box = dash.page.locator("#digit-canvas").bounding_box()
    assert box is not None
    assert box["width"] > 0, box
    assert box["height"] > 0, box
    mouse = dash.page.mouse
    for stroke in strokes:
        x, y = stroke[0]
        mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"])
        mouse.down()
        for x, y in stroke[1:]:
            mouse.move(box["x"] + x * box["width"], box["y"] + y * box["height"], steps=8)
        mouse.up()


# -- tests ---------------------------------------------------------------------------------


def test_page_loads_without_errors(dash: Dashboard, api: httpx.Client) -> None:
    models = api.get("/v1/models").json()
    options = dash.page.eval_on_selector_all("#model-select option", "os => os.map(o => o.value)")
    assert sorted(options) == sorted(m["name"] for m in models)
    chosen = dash.page.input_value("#model-select")
    info = next(m for m in models if m["name"] == chosen)
    text = dash.text("#model-info")
    for value in (info["task"], info["version"], info["state"]):
        assert str(value).lower() in text.lower(), (value, text)
    assert sum(dash.visible(v) for v in VIEWS) == 1
    assert dash.visible("#view-live")
    assert not dash.visible("#error")
    assert dash.page.get_attribute("#error", "role") == "alert"
    last = dash.last()
    assert {"url", "request", "response", "status"} <= set(last), last
    assert not dash.errors, "\n".join(dash.errors)


def test_regression_1d_view_matches_api(dash: Dashboard, api: httpx.Client, shots: Path) -> None:
    calls = dash.pick_model("toy-regression")
    only_view(dash, "#view-regression-1d")
    assert_replays(api, calls)
    x_min, x_max = float(dash.page.input_value("#x-min")), float(dash.page.input_value("#x-max"))
    assert x_min < x_max
    for call in calls:
        xs = flat(call.request["rows"])
        assert math.isclose(min(xs), x_min), (xs, x_min)
        assert math.isclose(max(xs), x_max), (xs, x_max)
    draws = [c for c in calls if c.request.get("mask_mode") == "shared"]
    assert draws, "no function draws: expected a request with mask_mode 'shared'"
    assert draws[0].request.get("return_samples") == 5
    assert len(draws[0].response["predictions"][0]["y"]["samples"]) == 5
    assert dash.ink("#chart-1d") > 0
    dash.screenshot(shots, "regression-1d")

    # new samples / seed: a new request with exactly those, answered as the API answers
    samples = dash.page.locator("#samples")
    low = int(samples.get_attribute("min") or 1)
    step = int(samples.get_attribute("step") or 1)
    wanted = low + step * max(1, (60 - low) // step)
    before = dash.signature("#chart-1d")
    since = dash.count()
    dash.set_value("#samples", str(wanted))
    dash.set_value("#seed", "11")
    calls = dash.wait_predictions(since)
    assert calls[-1].request["seed"] == 11, calls[-1].request
    latest = [c for c in calls if c.request["seed"] == 11]
    for call in latest:
        assert call.request["samples"] == wanted, call.request
        assert call.request["seed"] == 11, call.request
        assert call.response["samples_used"] == wanted
        assert call.response["seed"] == 11
    assert_replays(api, latest)
    status = dash.text("#status")
    assert f"{wanted} samples" in status, status
    assert "seed 11" in status, status
    assert dash.signature("#chart-1d") != before
    assert not dash.errors, "\n".join(dash.errors)


def test_classification_view_matches_api(
    dash: Dashboard, api: httpx.Client, test_digits: list[dict[str, Any]], shots: Path
) -> None:
    dash.pick_model("digits")
    only_view(dash, "#view-classification")
    k = 3
    since = dash.count()
    dash.page.select_option("#digit-pick", str(k))
    calls = dash.wait_predictions(since)
    assert_replays(api, calls)
    current = one_row(calls)
    row = current.request["rows"][0]
    assert [len(row), len(row[0]), len(row[0][0])] == [1, 8, 8]
    assert all(0 <= v <= 16 for v in flat(row))
    assert_measures(dash, current)
    # the picked digit itself, as the API sees it, is what the page predicts at rotation 0
    body = {"rows": [[test_digits[k]["pixels"]]], "samples": 100, "seed": 0}
    direct = api.post("/v1/models/digits/predict", json=body).json()["predictions"][0]
    assert direct["predicted"] == current.response["predictions"][0]["predicted"]

    # the sweep: one request, one row per angle, drawn
    sweeps = [c for c in dash.predictions() if len(c.request["rows"]) == len(SWEEP_ANGLES)]
    assert sweeps, "no sweep request with one row per angle -90..90 step 15"
    assert dash.ink("#sweep-chart") > 0
    assert dash.ink("#prob-bars") > 0

    # rotating: a new single-row request with another image; bars and measures follow it
    bars = dash.signature("#prob-bars")
    since = dash.count()
    dash.set_value("#rotation", "60")
    rotated = one_row(dash.wait_predictions(since))
    assert rotated.request["rows"] != current.request["rows"]
    assert_replays(api, [rotated])
    assert_measures(dash, rotated)
    assert dash.signature("#prob-bars") != bars
    dash.screenshot(shots, "classification")
    assert not dash.errors, "\n".join(dash.errors)


def test_regression_many_view_matches_api(dash: Dashboard, api: httpx.Client, shots: Path) -> None:
    dash.pick_model("tabular")
    only_view(dash, "#view-regression")
    inputs = dash.page.locator("#feature-form input")
    names = [inputs.nth(i).get_attribute("name") for i in range(inputs.count())]
    assert names == [f"feature-{i}" for i in range(len(FEATURES))], names
    hist = dash.signature("#predictive-hist")
    for i, value in enumerate(FEATURES):
        dash.set_value(f'#feature-form input[name="feature-{i}"]', str(value))
    since = dash.count()
    dash.page.click("#predict-button")
    calls = dash.wait_predictions(since)
    assert len(calls) == 1, [c.request for c in calls]
    call = calls[0]
    assert call.path == "/v1/models/tabular/predict", call.path
    assert call.request["rows"] == [FEATURES], call.request
    assert call.status == 200, call.response
    replayed = replay(api, call)
    assert replayed == call.response
    answer = replayed["predictions"][0]["price"]
    shown = SUMMARY.search(dash.text("#predictive-summary"))
    assert shown is not None, dash.text("#predictive-summary")
    lo, hi = answer["intervals"]["0.95"]["gaussian"]
    expected = {"mean": answer["mean"], "std": answer["std"], "lo": lo, "hi": hi}
    for key, value in expected.items():
        assert shown[key] == f"{value:.3f}", (key, shown[key], value)
    assert dash.ink("#predictive-hist") > 0
    assert dash.signature("#predictive-hist") != hist  # redrawn for the new feature vector
    dash.screenshot(shots, "regression-many")
    assert not dash.errors, "\n".join(dash.errors)


def test_drawing_changes_prediction(dash: Dashboard, api: httpx.Client) -> None:
    dash.pick_model("digits")
    since = dash.count()
    dash.page.select_option("#digit-pick", "0")
    picked = one_row(dash.wait_predictions(since))
    dash.page.click("#clear-canvas")
    dash.settle()
    since = dash.count()
    # a "7": a bar across the top and a stroke down to the bottom left
    draw(dash, [[(0.2, 0.2), (0.8, 0.2), (0.35, 0.9)]])
    drawn = one_row(dash.wait_predictions(since))
    pixels = flat(drawn.request["rows"])
    assert len(pixels) == 64
    assert all(0 <= v <= 16 for v in pixels)
    assert max(pixels) > 8, pixels  # the stroke shows up in the scaled image
    assert drawn.request["rows"] != picked.request["rows"]
    assert drawn.response["predictions"] != picked.response["predictions"]
    assert_replays(api, [drawn])
    assert_measures(dash, drawn)
    assert not dash.errors, "\n".join(dash.errors)


def test_api_error_is_shown(dash: Dashboard, api: httpx.Client) -> None:
    dash.pick_model("toy-regression")
    assert api.post("/v2/repository/models/toy-regression/unload").status_code == 200
    try:
        since = dash.count()
        dash.set_value("#seed", "5")
        failed = [c for c in dash.wait_predictions(since) if c.status >= 400]
        assert failed, "the page's request after the unload did not fail"
        message = failed[-1].response["error"]
        direct = api.post("/v1/models/toy-regression/predict", json={"rows": [[0.0]]})
        assert direct.status_code == failed[-1].status
        assert direct.json()["error"] == message
        assert dash.visible("#error")
        assert message in dash.text("#error")
    finally:
        assert api.post("/v2/repository/models/toy-regression/load").status_code == 200
    since = dash.count()
    dash.set_value("#seed", "6")
    assert all(c.status == 200 for c in dash.wait_predictions(since))
    assert not dash.visible("#error"), dash.text("#error")


def test_bad_range_is_shown(dash: Dashboard) -> None:
    dash.pick_model("toy-regression")
    since = dash.count()
    dash.set_value("#x-min", "5")
    dash.set_value("#x-max", "-5")
    dash.settle()
    assert dash.visible("#error")
    assert dash.text("#error")
    for call in dash.predictions(since):  # nothing is asked over a backwards range
        xs = flat(call.request["rows"])
        assert xs == sorted(xs), xs
    dash.set_value("#x-max", "6")
    dash.wait_predictions(since)
    assert not dash.visible("#error"), dash.text("#error")
    assert not dash.errors, "\n".join(dash.errors)


def test_live_view_and_calibration(
    dash: Dashboard, api: httpx.Client, test_digits: list[dict[str, Any]], shots: Path
) -> None:
    dash.pick_model("digits")
    rows = [[d["pixels"]] for d in test_digits[:8]]
    for seed in range(3):
        reply = api.post(
            "/v1/models/digits/predict", json={"rows": rows, "samples": 20, "seed": seed}
        )
        assert reply.status_code == 200, reply.text
    since = dash.count()

    def polled_entries() -> bool:  # ours: 8 rows, 20 samples
        return any(
            e["rows"] == len(rows) and e["samples"] == 20
            for c in dash.calls(since, polls=True)
            if c.path.startswith("/v1/models/digits/recent")
            for e in c.response["entries"]
        )

    give_up = 8_000
    while not polled_entries() and give_up > 0:
        dash.page.wait_for_timeout(100)
        give_up -= 100
    assert polled_entries(), "the page did not poll /v1/models/digits/recent within 8 s"
    dash.settle()
    assert dash.ink("#live-chart") > 0

    before = api.get("/v1/models/digits/calibration")  # 404, or 200 with a null report
    if before.status_code == 404 or before.json()["report"] is None:
        assert dash.visible("#calibration-empty")
        assert dash.ink("#calibration-chart") == 0
    labels = [d["label"] for d in test_digits[:8]]
    report = api.post("/v1/models/digits/evaluate",
                      json={"rows": rows, "targets": labels, "samples": 20, "seed": 0})  # fmt: skip
    assert report.status_code == 200, report.text
    dash.page.locator("#calibration-chart").wait_for(state="visible", timeout=8_000)
    assert not dash.visible("#calibration-empty")
    dash.settle()
    assert dash.ink("#calibration-chart") > 0
    dash.screenshot(shots, "live", "#view-live")
    assert not dash.errors, "\n".join(dash.errors)


@pytest.mark.parametrize("viewport", [WIDE, NARROW], ids=["1280x800", "400x800"])
def test_layout_fits_the_screen(dash: Dashboard, viewport: dict[str, int], shots: Path) -> None:
    dash.page.set_viewport_size(viewport)  # type: ignore[arg-type]
    for model in ("toy-regression", "tabular", "digits", "iris", "pictures", "shapes-seg"):
        dash.pick_model(model)
        scroll, inner = dash.overflow()
        assert scroll <= inner, f"{model} at {viewport}: page {scroll} px wide in {inner} px"
    if viewport == NARROW:
        dash.screenshot(shots, "narrow")
    assert not dash.errors, "\n".join(dash.errors)


def test_feature_classifier_view_matches_api(
    dash: Dashboard, api: httpx.Client, shots: Path
) -> None:
    calls = dash.pick_model("iris")
    only_view(dash, "#view-classifier-features")
    assert calls[-1].status == 200, calls[-1].response
    labels = dash.page.eval_on_selector_all("#cf-form label", "ls => ls.map(l => l.textContent)")
    assert labels == IRIS, labels
    values = [5.1, 3.5, -1.4, 0.25]
    for i, value in enumerate(values):
        dash.set_value(f'#cf-form input[name="feature-{i}"]', str(value))
    since = dash.count()
    dash.page.click("#cf-predict")
    (call,) = dash.wait_predictions(since)
    assert call.path == "/v1/models/iris/predict", call.path
    assert call.request["rows"] == [values], call.request
    assert call.request["seed"] == 0
    assert_replays(api, [call])
    assert_classes_shown(dash, "cf", call)
    assert not dash.visible("#error")
    dash.screenshot(shots, "classifier-features")

    # a new seed: a new request, and the page shows its answer
    since = dash.count()
    dash.set_value("#seed", "4")
    reseeded = dash.wait_predictions(since)[-1]
    assert reseeded.request["seed"] == 4
    assert reseeded.request["rows"] == [values]
    assert_classes_shown(dash, "cf", reseeded)

    # an empty field: an error in the page, nothing sent
    dash.set_value('#cf-form input[name="feature-2"]', "")
    since = dash.count()
    dash.page.click("#cf-predict")
    dash.settle()
    assert dash.predictions(since) == []
    assert dash.visible("#error")
    assert "petal_length" in dash.text("#error")
    assert not dash.errors, "\n".join(dash.errors)


def test_rgb_classifier_gets_its_shape_and_range(
    dash: Dashboard, api: httpx.Client, shots: Path
) -> None:
    calls = dash.pick_model("pictures")
    only_view(dash, "#view-classifier-image")
    first = calls[-1]
    assert first.status == 200, first.response  # not the 400 of a one-channel image
    assert shape_of(first.request["rows"]) == [1, 3, 32, 32]
    assert_replays(api, [first])
    assert_classes_shown(dash, "ic", first)
    note = dash.text("#ic-note")
    assert "0..255" in note, note  # the range the model's description names
    assert "description" in note, note
    assert dash.ink("#view-classifier-image .image-input") > 0  # the input drawn

    since = dash.count()
    dash.page.click("#ic-noise")
    (noise,) = dash.wait_predictions(since)
    values = flat(noise.request["rows"])
    assert shape_of(noise.request["rows"]) == [1, 3, 32, 32]
    assert all(0 <= v <= 255 for v in values)
    assert max(values) - min(values) > 100, (min(values), max(values))
    assert_replays(api, [noise])
    assert_classes_shown(dash, "ic", noise)

    # a red 40 x 20 file: stretched to 32 x 32, channel 0 full, 1 and 2 empty, in 0..255
    (red,) = upload(dash, "#ic-file", "red.png", png(40, 20, lambda i, j: (255, 0, 0)))
    channels = red.request["rows"][0]
    assert shape_of(channels) == [3, 32, 32]
    assert set(flat(channels[0])) == {255.0}
    assert set(flat(channels[1]) + flat(channels[2])) == {0.0}
    assert_replays(api, [red])
    assert_classes_shown(dash, "ic", red)
    assert pixel(dash, "#ic-canvas", 5, 7) == [255, 0, 0]
    assert not dash.visible("#error")
    dash.screenshot(shots, "classifier-image")
    assert not dash.errors, "\n".join(dash.errors)


def test_segmentation_view_matches_api(dash: Dashboard, api: httpx.Client, shots: Path) -> None:
    calls = dash.pick_model("shapes-seg")
    only_view(dash, "#view-segmentation")
    call = calls[-1]
    assert call.status == 200, call.response
    assert shape_of(call.request["rows"]) == [1, 1, 32, 32]
    assert "0..1" in dash.text("#seg-note")
    assert_replays(api, [call])
    row = call.response["predictions"][0]

    # the mask: one colour per class, as the legend says, pixel for pixel
    legend = dash.page.eval_on_selector_all(
        "#seg-legend [data-class]", "s => s.map(x => x.textContent)"
    )
    assert legend == row["classes"] == ["background", "square", "disc"]
    assert shown_classes(dash) == row["predicted_class"]

    # the maps: their min / max stated, darkest at the minimum and brightest at the maximum
    for key, canvas in (("entropy", "#seg-entropy"), ("mutual_information", "#seg-mi")):
        values = [(v, i, j) for i, line in enumerate(row[key]) for j, v in enumerate(line)]
        low, high = min(values), max(values)
        assert dash.text(f"{canvas}-range") == f"min {fixed(low[0])} · max {fixed(high[0])} nats"
        if high[0] > low[0]:
            assert pixel(dash, canvas, low[1], low[2]) == [68, 1, 84]  # viridis' dark end
            assert pixel(dash, canvas, high[1], high[2]) == [253, 231, 37]  # its bright end

    # map means and the per-class table
    for key in MEASURE_KEYS:
        assert dash.text(f'#seg-means [data-measure="{key}"]') == fixed(row["map_mean"][key])
    regions = row["by_predicted_class"]
    assert sum(r["elements"] for r in regions.values()) == 32 * 32
    for label, region in regions.items():
        cell = f'#seg-classes tr[data-class="{label}"] td'
        assert dash.text(f'{cell}[data-key="elements"]') == str(region["elements"])
        for key in MEASURE_KEYS:
            want = "–" if region[key] is None else fixed(region[key])
            assert dash.text(f'{cell}[data-key="{key}"]') == want, (label, key)
    dash.screenshot(shots, "segmentation")

    # strong noise on the right quarter: the same shapes, the right quarter changed the most
    since = dash.count()
    dash.page.check("#seg-hard")
    (hard,) = dash.wait_predictions(since)
    before, after = call.request["rows"][0][0], hard.request["rows"][0][0]

    def spread(columns: range) -> float:
        diff = [after[i][j] - before[i][j] for i in range(32) for j in columns]
        return math.sqrt(sum(d * d for d in diff) / len(diff))

    assert spread(range(24, 32)) > 2 * spread(range(24)), (spread(range(24, 32)), spread(range(24)))
    assert_replays(api, [hard])
    means = hard.response["predictions"][0]["map_mean"]
    assert dash.text('#seg-means [data-measure="mutual_information"]') == fixed(
        means["mutual_information"]
    )

    # a green file, one channel: grey = 0.587 G, in 0..1
    (green,) = upload(dash, "#seg-file", "green.png", png(64, 64, lambda i, j: (0, 255, 0)))
    grey = flat(green.request["rows"])
    assert len(grey) == 32 * 32
    assert all(abs(v - 0.587) < 1e-6 for v in grey), sorted(set(grey))[:5]
    assert_replays(api, [green])
    assert shown_classes(dash) == green.response["predictions"][0]["predicted_class"]
    assert "green.png" in dash.text("#seg-source")
    assert not dash.visible("#error")
    assert not dash.errors, "\n".join(dash.errors)


def test_a_map_without_a_view_says_so(dash: Dashboard) -> None:
    since = dash.count()
    dash.page.select_option("#model-select", "tagger")
    dash.settle()
    assert dash.predictions(since) == []
    for view in VIEWS:
        assert not dash.visible(view), view
    assert dash.visible("#error")
    message = dash.text("#error")
    for part in ("tagger", "[5, 3]", "use the API"):
        assert part in message, message
    assert not dash.errors, "\n".join(dash.errors)


def test_live_view_treats_a_null_calibration_as_none_yet(
    dash: Dashboard, api: httpx.Client
) -> None:
    dash.pick_model("iris")
    report = api.post("/v1/models/iris/evaluate", json={
        "rows": [[5.0, 3.0, 1.5, 0.2], [6.0, 2.8, 4.5, 1.3], [6.5, 3.0, 5.5, 2.0]],
        "targets": [0, 1, 2], "samples": 16, "seed": 0})  # fmt: skip
    assert report.status_code == 200, report.text
    dash.page.locator("#calibration-chart").wait_for(state="visible", timeout=8_000)
    assert not dash.visible("#calibration-empty")

    # the new contract for "no evaluation yet": 200 with a null time and report
    served: list[str] = []

    def none_yet(route: Any) -> None:
        served.append(route.request.url)
        route.fulfill(status=200, content_type="application/json",
                      body=json.dumps({"model": "iris", "time": None, "report": None}))  # fmt: skip

    dash.page.route("**/v1/models/iris/calibration", none_yet)
    dash.page.locator("#calibration-empty").wait_for(state="visible", timeout=8_000)
    assert served
    assert not dash.visible("#calibration-chart")
    assert dash.text("#calibration-summary") == ""
    dash.page.unroute("**/v1/models/iris/calibration")
    dash.page.locator("#calibration-chart").wait_for(state="visible", timeout=8_000)
    assert not dash.visible("#calibration-empty")
    assert not dash.visible("#error")
    assert not dash.errors, "\n".join(dash.errors)

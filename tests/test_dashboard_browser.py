"""The built-in dashboard (GET /dashboard) in a real browser against a real server on 127.0.0.1.

Debian's chromium driven by playwright; the module is skipped, with the reason, where chromium is
missing or cannot start. Numbers on the page are checked against the API: seeds make answers
reproducible, so the page's request sent again must give the page's answer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_helpers import NARROW, WIDE, ApiCall, Dashboard, browser_problem, launch

PROBLEM = browser_problem()
if PROBLEM is not None:
    pytest.skip(f"browser tests skipped: {PROBLEM}", allow_module_level=True)

from conftest import write_mlp_model  # noqa: E402
from http_helpers import ServerProcess, copy_shipped, start_server  # noqa: E402
from playwright.sync_api import Browser, sync_playwright  # noqa: E402

pytestmark = pytest.mark.slow

VIEWS = ("#view-regression-1d", "#view-regression", "#view-classification")
SWEEP_ANGLES = list(range(-90, 91, 15))
FEATURES = [0.5, -1.25, 2.0]  # typed into the "tabular" model's #feature-form
SUMMARY = re.compile(
    r"mean (?P<mean>\S+), std (?P<std>\S+) .*95% interval \[(?P<lo>\S+), (?P<hi>\S+)\]"
)


# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """uvicorn over copies of the shipped models plus "tabular" (3 inputs, regression), on CPU."""
    root = tmp_path_factory.mktemp("dashboard")
    repository = copy_shipped(root / "models", "digits", "toy-regression")
    write_mlp_model(repository / "tabular", in_features=len(FEATURES), outputs=("price",),
                    tau=4.0, hidden=(16,), dropout=0.2)  # fmt: skip
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

    if api.get("/v1/models/digits/calibration").status_code == 404:
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
    for model in ("toy-regression", "tabular", "digits"):
        dash.pick_model(model)
        scroll, inner = dash.overflow()
        assert scroll <= inner, f"{model} at {viewport}: page {scroll} px wide in {inner} px"
    if viewport == NARROW:
        dash.screenshot(shots, "narrow")
    assert not dash.errors, "\n".join(dash.errors)

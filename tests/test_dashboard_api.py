"""The built-in page over HTTP, without a browser: page, local assets, test digits, licence."""

from __future__ import annotations

import importlib.resources
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from http_helpers import serve, settings_for

from mcdrop.api.dashboard import STATIC
from mcdrop.training.demo_models import write_test_digits

pytestmark = pytest.mark.anyio
TYPES = {".js": "javascript", ".css": "text/css", ".json": "application/json", ".html": "text/html"}


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """A client to an app over an empty repository: the page needs no model to be served."""
    (tmp_path / "repo").mkdir()
    async with serve(settings_for(tmp_path / "repo"), lifespan=False) as (_, c):
        yield c


def references(text: str) -> list[str]:
    """Every src/href of an HTML page and every relative import of a JS module."""
    found = re.findall(r'(?:src|href)="([^"]+)"', text)
    return found + re.findall(r'from\s+"(\.[^"]+)"', text)


async def test_page_is_html_and_references_only_local_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    refs = references(page.text)
    assert "/dashboard/static/vendor/uPlot.iife.min.js" in refs
    for ref in refs:
        assert not re.match(r"(https?:)?//", ref), f"external reference {ref}"
    for element_id in ("model-select", "error", "samples", "seed", "view-live", "digit-canvas"):
        assert f'id="{element_id}"' in page.text


async def test_every_referenced_asset_is_served_with_its_type(client: httpx.AsyncClient) -> None:
    page = await client.get("/dashboard")
    pending = [r for r in references(page.text) if r.startswith("/dashboard/static/")]
    seen: set[str] = set()
    while pending:  # follow the JS modules' imports too
        url = pending.pop()
        if url in seen:
            continue
        seen.add(url)
        answer = await client.get(url)
        assert answer.status_code == 200, url
        suffix = Path(url).suffix
        if suffix in TYPES:
            assert TYPES[suffix] in answer.headers["content-type"], url
        if suffix == ".js" and "vendor" not in url:
            assert "http://" not in answer.text, url
            assert "https://" not in answer.text, url
            base = url.rsplit("/", 1)[0]
            pending += [f"{base}/{m.removeprefix('./')}" for m in references(answer.text)]
    assert {"/dashboard/static/js/app.js", "/dashboard/static/js/charts.js"} <= seen
    assert any(s.endswith("digits.js") for s in seen)


async def test_a_missing_asset_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.get("/dashboard/static/no-such-file.js")).status_code == 404
    assert (await client.get("/dashboard/static/../api/dashboard.py")).status_code == 404


async def test_test_digits_are_held_out_sklearn_digits(client: httpx.AsyncClient) -> None:
    from sklearn.datasets import load_digits

    answer = await client.get("/dashboard/static/digits-test.json")
    assert answer.status_code == 200
    digits = answer.json()
    assert 20 <= len(digits) <= 60
    assert {d["label"] for d in digits} == set(range(10))
    data = load_digits()
    for d in digits:
        assert d["index"] % 4 == 0  # held out from training
        pixels = np.asarray(d["pixels"], dtype=np.float64)
        assert pixels.shape == (8, 8)
        assert pixels.min() >= 0
        assert pixels.max() <= 16
        np.testing.assert_array_equal(pixels, data.images[d["index"]])
        assert d["label"] == int(data.target[d["index"]])


def test_committed_test_digits_are_what_write_test_digits_writes(tmp_path: Path) -> None:
    fresh = write_test_digits(tmp_path / "digits.json")
    assert json.loads(fresh.read_text()) == json.loads((STATIC / "digits-test.json").read_text())


async def test_vendored_uplot_has_its_licence_and_version(client: httpx.AsyncClient) -> None:
    licence = await client.get("/dashboard/static/vendor/LICENSE")
    assert licence.status_code == 200
    assert "MIT License" in licence.text
    assert "Leon Sorokin" in licence.text
    version = (STATIC / "vendor" / "VERSION").read_text()
    match = re.search(r"uPlot (\d+\.\d+\.\d+)", version)
    assert match is not None
    script = (STATIC / "vendor" / "uPlot.iife.min.js").read_text()
    assert f"(v{match.group(1)})" in script[:200]


def test_the_assets_are_package_data() -> None:
    folder = importlib.resources.files("mcdrop").joinpath("static/dashboard")
    names = {p.name for p in folder.iterdir()}
    assert {"index.html", "style.css", "digits-test.json", "js", "vendor"} <= names
    assert folder.joinpath("vendor/uPlot.min.css").is_file()

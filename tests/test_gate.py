"""The request gate: token, model and body size are settled before any body byte is read."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from http_helpers import asgi_call, copy_shipped, oip_body, serve, settings_for

from mcdrop.api.gate import ENVELOPE_BYTES, JSON_BYTES_PER_VALUE, body_budget
from mcdrop.config import Settings

pytestmark = pytest.mark.anyio
TOKEN = "gate-token"
CHUNK = 64 << 10
INFERENCE_URLS = [
    "/v2/models/toy-regression/infer",
    "/v2/models/toy-regression/versions/1/infer",
    "/v1/models/toy-regression/predict",
    "/v1/models/toy-regression/evaluate",
]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    return copy_shipped(tmp_path / "repo", "toy-regression", "digits")


class CountingBody:
    """An ASGI receive that streams `size` bytes in chunks and counts what the app pulled."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.read = 0

    async def __call__(self) -> dict[str, Any]:
        if self.read >= self.size:
            return {"type": "http.disconnect"}
        chunk = min(CHUNK, self.size - self.read)
        self.read += chunk
        more = self.read < self.size
        return {"type": "http.request", "body": b" " * chunk, "more_body": more}


async def asgi_post(
    app: FastAPI, path: str, body: CountingBody, headers: dict[str, str], declare: bool
) -> tuple[int, dict[str, Any]]:
    """POST a counted body through the ASGI interface; (status, JSON body) of the answer."""
    raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    if declare:
        raw.append((b"content-length", str(body.size).encode()))
    return await asgi_call(app, "POST", path, body, raw)


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", INFERENCE_URLS)
async def test_an_unauthenticated_body_is_refused_unread(
    repo: Path, path: str, declare: bool
) -> None:
    """16 MB that cost hundreds of MB to parse before the token check now cost nothing."""
    async with serve(settings_for(repo, inference_token=TOKEN)) as (app, _):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            body = CountingBody(16 << 20)
            status, answer = await asgi_post(app, path, body, headers, declare)
            assert status == 401, answer
            assert "Bearer" in answer["error"]
            assert body.read == 0


@pytest.mark.parametrize("path", ["/v2/models/nope/infer", "/v1/models/nope/predict"])
async def test_a_body_for_an_unknown_model_is_refused_unread(repo: Path, path: str) -> None:
    async with serve(settings_for(repo)) as (app, _):
        body = CountingBody(8 << 20)
        status, answer = await asgi_post(app, path, body, {}, declare=False)
    assert status == 404, answer
    assert "'nope' is not loaded" in answer["error"]
    assert body.read == 0


async def test_the_token_is_checked_before_the_model_is_looked_up(repo: Path) -> None:
    """Without the token a caller cannot learn which models exist."""
    async with serve(settings_for(repo, inference_token=TOKEN)) as (app, _):
        status, _answer = await asgi_post(app, "/v2/models/nope/infer", CountingBody(10), {}, True)
    assert status == 401


@pytest.mark.parametrize("declare", [True, False], ids=["content-length", "chunked"])
@pytest.mark.parametrize("path", INFERENCE_URLS)
async def test_a_body_beyond_the_models_budget_gets_413_before_parsing(
    repo: Path, path: str, declare: bool
) -> None:
    """toy-regression takes 1 value a row: its cap is far below the server's 16 MB."""
    async with serve(settings_for(repo)) as (app, _):
        spec = app.state.registry.get("toy-regression").model.spec
        budget = body_budget(spec)
        body = CountingBody(4 << 20)
        status, answer = await asgi_post(app, path, body, {}, declare)
    assert status == 413, answer
    assert f"limit of {budget} bytes of model 'toy-regression'" in answer["error"]
    assert body.read <= (0 if declare else budget + CHUNK)


def test_the_budget_follows_max_rows_and_the_row_size(repo: Path) -> None:
    from mcdrop.repository.manifest import load_manifest

    digits = load_manifest(repo / "digits" / "model.toml")
    toy = load_manifest(repo / "toy-regression" / "model.toml")
    assert body_budget(digits) == ENVELOPE_BYTES + 1024 * (64 + 10) * JSON_BYTES_PER_VALUE
    assert body_budget(toy) == ENVELOPE_BYTES + 1024 * (1 + 1) * JSON_BYTES_PER_VALUE
    assert body_budget(digits) < Settings().max_body_bytes


async def test_a_pretty_printed_request_at_max_rows_fits_the_budget(repo: Path) -> None:
    """The cap never refuses a request the model accepts: the widest floats, indented JSON."""
    widest = -1.2345678901234567e-05
    async with serve(settings_for(repo)) as (app, client):
        spec = app.state.registry.get("digits").model.spec
        rows = [[[[widest] * 8] * 8]] * spec.mc.max_rows
        native = json.dumps({"rows": rows, "samples": 1}, indent=4)
        oip = json.dumps(oip_body(rows, {"mc_samples": 1}, flat=False), indent=4)
        assert len(native) > Settings().max_body_bytes // 16  # a big body, not a toy one
        answers = [
            await client.post(url, content=text, headers={"content-type": "application/json"})
            for url, text in (("/v1/models/digits/predict", native),
                              ("/v2/models/digits/infer", oip))
        ]  # fmt: skip
    for answer in answers:
        assert answer.status_code == 200, answer.text[:300]
    assert len(answers[0].json()["predictions"]) == spec.mc.max_rows


@pytest.mark.parametrize("declared", ["12abc", "\u00b2", "-1", ""])
async def test_a_content_length_that_is_not_a_number_gets_400(repo: Path, declared: str) -> None:
    """'²' passes str.isdigit but not int(): it must be a 400, not a 500."""
    async with serve(settings_for(repo)) as (app, _):
        body = CountingBody(12)
        headers = [(b"content-length", declared.encode("latin-1"))]
        status, answer = await asgi_call(app, "POST", "/v1/models/digits/predict", body, headers)
    assert status == 400
    assert f"content-length: {declared!r} is not a byte count" in answer["error"]
    assert body.read == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/models/toy-regression/predict", {"rows": [[0.5]], "samples": 8}),
        ("/v1/models/toy-regression/evaluate", {"rows": [[0.5]], "targets": [0.1], "samples": 8}),
        ("/v2/models/toy-regression/infer", oip_body([[0.5]], {"mc_samples": 8})),
        ("/v2/models/toy-regression/versions/1/infer", oip_body([[0.5]], {"mc_samples": 8})),
    ],
)
async def test_a_request_looks_its_model_up_once(
    repo: Path, path: str, body: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gate's lookup is the one the route uses: no second lookup can see another version."""
    async with serve(settings_for(repo)) as (app, client):
        registry = app.state.registry
        lookups: list[str] = []
        real = registry.get

        def counted(name: str, version: str | None = None) -> Any:
            lookups.append(name)
            return real(name, version)

        monkeypatch.setattr(registry, "get", counted)
        response = await client.post(path, json=body)
    assert response.status_code == 200, response.text
    assert lookups == ["toy-regression"]

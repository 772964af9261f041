"""A Hugging Face text classifier served end to end (transformers, an optional test extra):
named integer inputs over OIP (tritonclient's body) and /v1, padding, range checks."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import tritonclient.http as triton
from http_helpers import error_of, serve, settings_for
from test_oip_codec import triton_body, triton_input

from mcdrop.model import ServedModel
from mcdrop.repository.loading import save_weights

pytest.importorskip("transformers", reason="transformers is not installed (the test extra)")
pytestmark = pytest.mark.anyio
LENGTH = 12
VOCAB = 50

ENTRYPOINT = f'''
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification


class TextClassifier(nn.Module):
    """A 2-layer BERT from a config (no download): token ids [B, {LENGTH}] -> logits [B, 2]."""

    def __init__(self) -> None:
        super().__init__()
        config = BertConfig(vocab_size={VOCAB}, hidden_size=16, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=32,
                            max_position_embeddings={LENGTH}, num_labels=2,
                            attention_probs_dropout_prob=0.2, hidden_dropout_prob=0.1,
                            attn_implementation="sdpa")
        self.bert = BertForSequenceClassification(config)

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).logits


def build() -> nn.Module:
    return TextClassifier()
'''

MANIFEST = f"""name = "bert"
task = "classification"

[[inputs]]
name = "input_ids"
dtype = "int64"
shape = [{LENGTH}]
range = [0, {VOCAB - 1}]
pad = 0

[[inputs]]
name = "attention_mask"
dtype = "int64"
shape = [{LENGTH}]
range = [0, 1]
pad = 0
mask_for = "input_ids"

[[inputs]]
name = "token_type_ids"
dtype = "int64"
shape = [{LENGTH}]
range = [0, 1]
default = 0
pad = 0

[output]
names = ["negative", "positive"]

[model]
format = "entrypoint"
entrypoint = "text:build"

[mc]
default_samples = 32
max_samples = 512
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("repo") / "bert"
    folder.mkdir()
    (folder / "text.py").write_text(ENTRYPOINT, encoding="utf-8")
    namespace: dict[str, Any] = {}
    exec(compile(ENTRYPOINT, "text.py", "exec"), namespace)  # the entrypoint, to save weights
    torch.manual_seed(0)
    save_weights(namespace["build"](), folder / "weights.safetensors")
    (folder / "model.toml").write_text(MANIFEST, encoding="utf-8")
    return folder.parent


SENTENCES = [[5, 17, 3, 42, 8], [9, 1, 33, 2, 7, 7, 21, 4, 11]]


def _padded(tokens: list[int]) -> tuple[list[int], list[int]]:
    return tokens + [0] * (LENGTH - len(tokens)), [1] * len(tokens) + [0] * (LENGTH - len(tokens))


async def test_a_padded_batch_answers_each_row_as_it_is_answered_alone(repo: Path) -> None:
    """Sentences of different lengths sent together (the batcher pads them into one engine
    call) answer as each sent alone; padded by the client or by the server, the same."""
    params = {"samples": 64, "seed": 3}

    def one(tokens: list[int]) -> dict[str, Any]:
        return {"rows": [{"input_ids": tokens}], **params}

    async with serve(settings_for(repo)) as (_, client):
        info = {m["name"]: m for m in (await client.get("/v1/models")).json()}
        assert info["bert"]["state"] == "READY", info["bert"]
        together = await asyncio.gather(
            *(client.post("/v1/models/bert/predict", json=one(s)) for s in SENTENCES)
        )
        alone = [await client.post("/v1/models/bert/predict", json=one(s)) for s in SENTENCES]
        explicit = await client.post("/v1/models/bert/predict", json={"rows": [
            dict(zip(("input_ids", "attention_mask"), _padded(s), strict=True))
            for s in SENTENCES], **params})  # fmt: skip
        rows = await client.post("/v1/models/bert/predict", json={
            "rows": [{"input_ids": s} for s in SENTENCES], **params})  # fmt: skip
    for r, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert a.status_code == t.status_code == 200, (a.text, t.text)
        assert t.json()["predictions"] == a.json()["predictions"], f"sentence {r}"
    predictions = rows.json()["predictions"]
    assert explicit.json()["predictions"] == predictions  # server padding = the client's own
    assert predictions[0] == alone[0].json()["predictions"][0]  # row 0 keys as a lone row 0
    assert sum(predictions[1]["probabilities"].values()) == pytest.approx(1.0)


def test_padding_is_honest_the_padded_row_computes_what_the_short_row_does(repo: Path) -> None:
    """In eval (dropout off), BERT on the padded row with its mask gives the short row's logits."""
    coverage = ServedModel.load(repo / "bert", settings_for(repo)).engine.coverage()
    assert coverage["program"] == "partitioned", coverage["whole_because"]
    sampled = [s["name"] for s in coverage["sampled"]]
    assert "bert.bert.encoder.layer.0.attention.self.sdpa" in sampled, sampled
    namespace: dict[str, Any] = {}
    exec(compile(ENTRYPOINT, "text.py", "exec"), namespace)
    net = namespace["build"]().eval()
    net.load_state_dict(_weights(repo), strict=True)
    short = torch.tensor([SENTENCES[1]])
    ids, mask = (torch.tensor([v]) for v in _padded(SENTENCES[1]))
    with torch.inference_mode():
        a = net(short, torch.ones_like(short), torch.zeros_like(short))
        b = net(ids, mask, torch.zeros_like(ids))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _weights(repo: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(repo / "bert" / "weights.safetensors"))


async def test_oip_named_int64_inputs_as_tritonclient_sends_them(repo: Path) -> None:
    ids = np.array([_padded(s)[0] for s in SENTENCES], dtype=np.int64)
    mask = np.array([_padded(s)[1] for s in SENTENCES], dtype=np.int64)
    body, json_size = triton_body(
        [triton_input("input_ids", ids, binary=True), triton_input("attention_mask", mask, False)],
        parameters={"seed": 3, "mc_samples": 64},
    )
    headers = {"Inference-Header-Content-Length": str(json_size)} if json_size else {}
    async with serve(settings_for(repo)) as (_, client):
        meta = (await client.get("/v2/models/bert")).json()
        response = await client.post("/v2/models/bert/infer", content=body, headers=headers)
        native = await client.post("/v1/models/bert/predict", json={
            "rows": [{"input_ids": s} for s in SENTENCES], "samples": 64, "seed": 3})  # fmt: skip
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("input_ids", "INT64", [-1, LENGTH]), ("attention_mask", "INT64", [-1, LENGTH]),
        ("token_type_ids", "INT64", [-1, LENGTH])]  # fmt: skip
    assert meta["inputs"][2]["parameters"]["optional"] is True
    assert response.status_code == 200, response.text
    length = response.headers.get("inference-header-content-length")
    result = triton.InferResult.from_response_body(
        response.content, header_length=None if length is None else int(length)
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    assert probabilities.shape == (2, 2)
    want = [[row["probabilities"][c] for c in ("negative", "positive")]
            for row in native.json()["predictions"]]  # fmt: skip
    assert np.array_equal(probabilities, np.asarray(want))


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"input_ids": [5, VOCAB]}, f"inputs 'input_ids': value {VOCAB} at row 0, position [1]"),
        ({"input_ids": [5, -1]}, "value -1 at row 0, position [1] is not an integer in [0, 49]"),
        ({"input_ids": [5, 2.5]}, "value 2.5"),
        ({"input_ids": [1] * (LENGTH + 1)}, f"row 0 has shape [{LENGTH + 1}]"),
        ({"input_ids": [5], "attention_mask": [2]}, "inputs 'attention_mask': value 2"),
        ({"token_type_ids": [0]}, "'input_ids' is required"),
        ({"input_ids": [5], "labels": [1]}, "unknown input(s) ['labels']"),
    ],
)
async def test_bad_named_inputs_get_a_400_naming_the_input_and_value(
    repo: Path, row: dict[str, Any], expected: str
) -> None:
    async with serve(settings_for(repo)) as (_, client):
        response = await client.post("/v1/models/bert/predict", json={"rows": [row]})
    assert expected in error_of(response, 400), json.dumps(row)

"""The zoo's acceptance on a real Hugging Face BERT (transformers, an optional test dependency):
built from a config, no download; eager and SDPA attention."""

from __future__ import annotations

import pytest
import torch
from model_zoo import excess_kurtosis, training_mode_samples, variance_ratio_tolerance
from torch import Tensor, nn

from mcdrop.engine.core import MCEngine, MCOptions
from mcdrop.uncertainty import RegressionSummary

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install -e '.[test]' adds it)"
)

SAMPLES = 2000


class HFBert(nn.Module):
    """A 2-layer BertForSequenceClassification on token embeddings [B, T, 16] -> logits [B, 3]."""

    def __init__(self, attn_implementation: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=8, num_labels=3,
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.3,
            attn_implementation=attn_implementation,
        )  # fmt: skip
        self.model = transformers.BertForSequenceClassification(config).eval()

    def forward(self, x: Tensor) -> Tensor:
        logits: Tensor = self.model(inputs_embeds=x).logits
        return logits


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_hf_bert_samples_every_dropout_by_module_path_and_matches_its_training_passes(
    attention: str,
) -> None:
    model = HFBert(attention)
    x = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(4))
    reference = training_mode_samples(model, x, SAMPLES, seed=1)
    engine = MCEngine(model, task="regression", input_shape=(6, 16))
    coverage = engine.coverage()
    assert coverage["program"] == "partitioned", coverage["whole_because"]
    assert coverage["not_sampled"] == []
    attention_site = "dropout" if attention == "eager" else "sdpa"
    per_layer = (f"attention.self.{attention_site}", "attention.output.dropout", "output.dropout")
    layer_sites = [f"model.bert.encoder.layer.{i}.{site}" for i in range(2) for site in per_layer]
    expected = ["model.bert.embeddings.dropout", *layer_sites, "model.dropout"]
    assert [s["name"] for s in coverage["sampled"]] == expected
    assert coverage["audit"]["verdict"] == "ok"
    out = engine.run(x, MCOptions(samples=SAMPLES, seed=2))
    assert isinstance(out, RegressionSummary)
    ratio = float(out.epistemic_variance.double().sum() / reference.var(dim=0).sum())
    tol = variance_ratio_tolerance(SAMPLES, excess_kurtosis(reference))
    assert abs(ratio - 1) <= tol, f"engine / training-mode variance {ratio:.3f}, 1 ± {tol:.3f}"
    again = engine.run(x, MCOptions(samples=SAMPLES, seed=2))
    assert isinstance(again, RegressionSummary)
    assert torch.equal(out.mean, again.mean)

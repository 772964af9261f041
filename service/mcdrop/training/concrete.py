"""Concrete dropout (Gal, Hron & Kendall, 2017): a dropout rate learned by gradient descent.

The Bernoulli keep-mask is relaxed to a Concrete (Gumbel-sigmoid) variable so the rate p,
the sigmoid of a learned logit, gets gradients; the KL adds the Bernoulli entropy term
K (p log p + (1 - p) log (1 - p)), K being the layer's input width. At serving time the
learned p is an ordinary dropout rate.
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-7


def concrete_keep(p: Tensor, uniform: Tensor, temperature: float = 0.1) -> Tensor:
    """Relaxed keep-mask in (0, 1) for drop rate p (broadcast over uniform noise's shape).

    drop = sigmoid((log p - log(1-p) + log u - log(1-u)) / t); as t -> 0 it is Bernoulli(p).
    """
    logit = (
        torch.log(p + EPS)
        - torch.log(1 - p + EPS)
        + torch.log(uniform + EPS)
        - torch.log(1 - uniform + EPS)
    )
    return 1 - torch.sigmoid(logit / temperature)


def entropy_penalty(p: Tensor) -> Tensor:
    """Negative Bernoulli entropy p log p + (1 - p) log(1 - p), elementwise (<= 0)."""
    return p * torch.log(p) + (1 - p) * torch.log1p(-p)

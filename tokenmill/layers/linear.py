"""Linear layers. A seam for weight formats: the model only calls `layer(x)`, so a quantized layer
with the same call can replace the dense one without touching the model code."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseLinear:
    """y = x @ W^T (+ b), weights stored [out_features, in_features] in the engine dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight = weight
        self.bias = bias

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

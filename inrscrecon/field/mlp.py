"""MLP trunk of the field: encoded coordinates → hidden features (DESIGN §2)."""

from __future__ import annotations

import torch
from torch import nn


class Trunk(nn.Module):
    """``n_layers`` Linear+ReLU layers: [N, in_dim] → [N, width]. ``layers[i].weight`` is [out, in]."""

    def __init__(self, in_dim: int, width: int = 256, n_layers: int = 4):
        super().__init__()
        dims = [in_dim] + [width] * n_layers
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, in_dim]
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

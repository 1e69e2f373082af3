"""The network: a small MLP from the measurements to the target."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class DiabetesMLP(nn.Module):
    """Linear -> SiLU blocks of `hidden_units` each (`hidden_layers` of them), then a linear head.

    trainrun passes `input_shape` (per sample: (10,)) and `num_outputs` (the target's values per sample: 1)
    because the signature names them. The output is [N, num_outputs].
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, hidden_units: int = 64, hidden_layers: int = 2):
        super().__init__()
        if hidden_units < 1 or hidden_layers < 0 or num_outputs < 1:
            raise ValueError(f"hidden_units={hidden_units} and num_outputs={num_outputs} must be at least 1, "
                             f"hidden_layers={hidden_layers} at least 0")
        layers, width = [nn.Flatten()], math.prod(input_shape)
        for _ in range(hidden_layers):
            layers += [nn.Linear(width, hidden_units), nn.SiLU()]
            width = hidden_units
        layers.append(nn.Linear(width, num_outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

"""User models: factories that take trainrun's offered input_shape / num_outputs."""
import math

import torch.nn as nn


class TinyNet(nn.Module):
    def __init__(self, input_shape, num_outputs, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU(),
                                  nn.Linear(width, num_outputs))

    def forward(self, x):
        return self.body(x)


def regressor(input_shape, width: int = 32):
    """Returns one value per sample, shape [N] (for task=regression with scalar targets)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(), nn.Linear(width, 1),
                         nn.Flatten(0))


def wrong_head(input_shape):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), 7))

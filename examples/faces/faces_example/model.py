"""The network: three conv-BN-ReLU stages on a 25x25 grey image, global average pooling, one linear head."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def conv_stage(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


class FaceNet(nn.Module):
    """`width` channels in the first stage, doubled in each of the next two; 25x25 -> 12x12 -> 6x6 -> pooled.

    trainrun passes `input_shape` (per sample, e.g. (1, 25, 25)) and `num_outputs` (1 for task=binary: one
    logit per sample) because the signature names them. The output is [N, num_outputs].
    """

    def __init__(self, input_shape: Sequence[int], num_outputs: int, width: int = 16):
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"FaceNet takes images [channels, height, width]; got samples of shape "
                             f"{tuple(input_shape)}")
        if width < 1 or num_outputs < 1:
            raise ValueError(f"width={width} and num_outputs={num_outputs} must both be at least 1")
        channels = input_shape[0]
        self.features = nn.Sequential(conv_stage(channels, width), nn.MaxPool2d(2),
                                      conv_stage(width, 2 * width), nn.MaxPool2d(2),
                                      conv_stage(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

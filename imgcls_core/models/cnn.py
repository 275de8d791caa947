"""cnn3: a classic three-block CNN, the baseline any ResNet has to beat.

Each block is conv3x3-BN-ReLU-maxpool (32/64/128 channels at width 1), then a
global average pool, dropout and a linear ``fc``. The pooling head makes it
work at any input size of 8 px or more.
"""

from __future__ import annotations

import torch
from torch import nn

from imgcls_core.models.catalog import register_model
from imgcls_core.models.resnet import scale_channels

BLOCK_CHANNELS = (32, 64, 128)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    """conv3x3-BN-ReLU then a 2x2 max-pool that halves the resolution."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),  # BN adds it
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class CNN3(nn.Module):
    head_name = "fc"
    # freeze_stages: 1 = block1 (the "stem"), 2 = +block2, 3 = all but fc.
    stage_names = (("block1",), ("block2",), ("block3",))

    def __init__(self, num_classes: int, width: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        c1, c2, c3 = (scale_channels(c, width) for c in BLOCK_CHANNELS)
        self.block1 = conv_block(3, c1)
        self.block2 = conv_block(c1, c2)
        self.block3 = conv_block(c2, c3)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(c3, num_classes)
        self.num_features = c3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, shape (N, num_features)."""
        return torch.flatten(self.avgpool(self.block3(self.block2(self.block1(x)))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


@register_model
def cnn3(num_classes: int, *, width: float = 1.0, dropout: float = 0.0) -> CNN3:
    """Three conv blocks, 32/64/128 channels x width; ~0.1 M parameters at width 1."""
    return CNN3(num_classes, width=width, dropout=dropout)

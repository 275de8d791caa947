"""ResNet-18/34/50/101/152 with torchvision's exact parameter names and shapes.

The residual blocks are torchvision's own (``BasicBlock``, ``Bottleneck``); only
the skeleton is ours, to add what torchvision's lacks for small images and
small budgets: a 3x3 stride-1 stem without max-pool (``small_input``), a channel
multiplier (``width``) and dropout before the classifier. With the default
options ``state_dict()`` matches torchvision's key for key and shape for shape,
so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from imgcls_core.models.catalog import register_model

Block = type[BasicBlock] | type[Bottleneck]

STAGE_PLANES = (64, 128, 256, 512)  # torchvision's per-stage planes at width 1.0


def scale_channels(channels: int, width: float, divisor: int = 8) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``).

    Multiples of 8 keep tensor-core and channels_last kernels on their fast paths.
    """
    return max(divisor, int(round(channels * width / divisor)) * divisor)


class ResNet(nn.Module):
    """torchvision's ResNet layout (conv1, bn1, layer1..layer4, fc) with extra options.

    ``width`` scales the stem and every stage's ``planes``. Scaling ``planes``
    (not torchvision's ``width_per_group``) keeps ``groups=1, base_width=64``,
    which BasicBlock requires, and gives Bottleneck an inner width of ``planes``.
    """

    head_name = "fc"  # the classifier: replaced on transfer, given its own LR
    # What freeze_stages(model, n) freezes: the first n entries.
    stage_names = (("conv1", "bn1"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))

    def __init__(
        self,
        block: Block,
        layers: list[int],
        num_classes: int = 1000,
        *,
        small_input: bool = False,
        width: float = 1.0,
        zero_init_residual: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        planes = [scale_channels(p, width) for p in STAGE_PLANES]
        self.inplanes = scale_channels(64, width)
        if small_input:  # 32 px in -> 32/16/8/4 px stages instead of 8/4/2/1
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, planes[0], layers[0])
        self.layer2 = self._make_layer(block, planes[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, planes[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, planes[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(planes[3] * block.expansion, num_classes)
        self.num_features = self.fc.in_features
        self._init_weights(zero_init_residual)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, zero_init_residual: bool) -> None:
        """torchvision's init; zero_init_residual makes every block start as the identity
        (last BN gamma = 0), which helps large-batch training (Goyal et al., 2017)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features before the classifier, shape (N, num_features)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.forward_features(x)))


@register_model
def resnet18(
    num_classes: int,
    *,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> ResNet:
    """ResNet-18: BasicBlock x (2, 2, 2, 2), 11.7 M parameters at width 1 (1000 classes)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, small_input=small_input, width=width,
                  zero_init_residual=zero_init_residual, dropout=dropout)


@register_model
def resnet34(
    num_classes: int,
    *,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> ResNet:
    """ResNet-34: BasicBlock x (3, 4, 6, 3), 21.8 M parameters at width 1 (1000 classes)."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, small_input=small_input, width=width,
                  zero_init_residual=zero_init_residual, dropout=dropout)


@register_model
def resnet50(
    num_classes: int,
    *,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> ResNet:
    """ResNet-50: Bottleneck x (3, 4, 6, 3), 25.6 M parameters at width 1 (1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, small_input=small_input, width=width,
                  zero_init_residual=zero_init_residual, dropout=dropout)


@register_model
def resnet101(
    num_classes: int,
    *,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> ResNet:
    """ResNet-101: Bottleneck x (3, 4, 23, 3), 44.5 M parameters at width 1 (1000 classes)."""
    return ResNet(Bottleneck, [3, 4, 23, 3], num_classes, small_input=small_input, width=width,
                  zero_init_residual=zero_init_residual, dropout=dropout)


@register_model
def resnet152(
    num_classes: int,
    *,
    small_input: bool = False,
    width: float = 1.0,
    zero_init_residual: bool = False,
    dropout: float = 0.0,
) -> ResNet:
    """ResNet-152: Bottleneck x (3, 8, 36, 3), 60.2 M parameters at width 1 (1000 classes)."""
    return ResNet(Bottleneck, [3, 8, 36, 3], num_classes, small_input=small_input, width=width,
                  zero_init_residual=zero_init_residual, dropout=dropout)

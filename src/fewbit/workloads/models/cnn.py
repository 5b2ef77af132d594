"""Two small image classifiers for 28x28 (or 8x8) grey-scale input: a ResNet and a MobileNet-v2.

**ResNet** (He et al. 2016) with basic blocks, in the CIFAR layout: a 3x3 stem at full resolution, then three stages
of ``blocks_per_stage`` blocks with ``w, 2w, 4w`` channels, the last two halving the resolution (28 -> 14 -> 7), a
global average pool and one linear layer. A block is conv3x3-BN-ReLU-conv3x3-BN plus a shortcut (identity, or a
strided 1x1 conv + BN where the shape changes), then ReLU.

**MobileNet-v2** (Sandler et al. 2018): inverted residual blocks. Each expands its ``c`` input channels ``t``-fold
with a 1x1 conv, filters each channel alone with a 3x3 depthwise conv (``groups = channels``: 9 weights per channel,
which is why 8-bit formats with one scale per tensor hurt MobileNets: channel ranges differ widely), and projects
back with a 1x1 conv *without* an activation (the "linear bottleneck": ReLU on a narrow layer would destroy
information). ReLU6 elsewhere; a residual where input and output shapes match. The stage table is the ImageNet one
trimmed for 28x28 input: two stride-2 stages instead of five.

Both are built from ``nn.Conv2d``, ``nn.BatchNorm2d`` and ``nn.Linear``, so ``fewbit.quantize_`` reaches every GEMM;
their residual adds are :class:`~fewbit.nn.QAdd` modules, which under ``int8`` quantize both inputs with calibrated
ranges, as an INT8 runtime adds them (under fp32: exactly ``a + b``).
Shapes: N batch, C channels, H x W spatial.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fewbit.nn.modules import QAdd


def _round_channels(channels: float, divisor: int = 8) -> int:
    """``channels`` rounded to a multiple of ``divisor`` (at least ``divisor``), never more than 10% below it: the
    MobileNet rule, which keeps GEMM sizes friendly to hardware (and to 32-element MX blocks when wide enough)."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(c_out)]


# --- ResNet -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResNetConfig:
    num_classes: int = 10
    in_channels: int = 1
    width: int = 16  # channels of the first stage; the others have 2x and 4x
    blocks_per_stage: tuple[int, ...] = (2, 2, 2)

    def __post_init__(self) -> None:
        if self.width < 1 or not self.blocks_per_stage or min(self.blocks_per_stage) < 1:
            raise ValueError(f"width={self.width} and blocks_per_stage={self.blocks_per_stage} must be positive")


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(c_in, c_out, 3, stride), nn.ReLU(inplace=True), *_conv_bn(c_out, c_out, 3))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else nn.Sequential(*_conv_bn(c_in, c_out, 1, stride)))
        self.add = QAdd()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.add(self.body(x), self.shortcut(x)))


class ResNet(nn.Module):
    def __init__(self, config: ResNetConfig) -> None:
        super().__init__()
        self.config = config
        self.stem = nn.Sequential(*_conv_bn(config.in_channels, config.width, 3), nn.ReLU(inplace=True))
        blocks, c_in = [], config.width
        for stage, count in enumerate(config.blocks_per_stage):
            c_out = config.width * 2**stage
            for i in range(count):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if stage > 0 and i == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, config.num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H, W) -> logits (N, num_classes)."""
        x = self.blocks(self.stem(x))  # (N, 4w, H/4, W/4)
        return self.head(x.mean(dim=(2, 3)))


# --- MobileNet-v2 -----------------------------------------------------------------------------------------------

# (expansion t, output channels c, repeats n, stride s of the first repeat), before the width multiplier: the
# ImageNet table's first five rows with strides cut to two stride-2 stages for 28x28 input.
MOBILENET_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 2, 1), (6, 96, 1, 1))


@dataclass(frozen=True)
class MobileNetV2Config:
    num_classes: int = 10
    in_channels: int = 1
    width_mult: float = 1.0
    stem_channels: int = 32
    stem_stride: int = 1  # 2 quarters the cost of every later layer (28x28 -> 14x14 from the start)
    head_channels: int = 512  # the 1x1 conv before pooling (1280 on ImageNet); not reduced below width_mult 1
    stages: tuple[tuple[int, int, int, int], ...] = MOBILENET_V2_STAGES
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.width_mult <= 0 or self.stem_stride < 1:
            raise ValueError(f"width_mult={self.width_mult} and stem_stride={self.stem_stride} must be positive")
        for row in self.stages:
            if len(row) != 4 or min(row) < 1:
                raise ValueError(f"stage {row}: expected positive (expansion, channels, repeats, stride)")


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [*_conv_bn(c_in, hidden, 1), nn.ReLU6(inplace=True)]  # expand
        layers += [*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6(inplace=True)]  # depthwise
        layers += _conv_bn(hidden, c_out, 1)  # linear bottleneck: no activation
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out
        if self.residual:
            self.add = QAdd()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add(x, self.body(x)) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    def __init__(self, config: MobileNetV2Config) -> None:
        super().__init__()
        self.config = config
        c_in = _round_channels(config.stem_channels * config.width_mult)
        self.stem = nn.Sequential(*_conv_bn(config.in_channels, c_in, 3, config.stem_stride), nn.ReLU6(inplace=True))
        blocks = []
        for expansion, channels, repeats, stride in config.stages:
            c_out = _round_channels(channels * config.width_mult)
            for i in range(repeats):
                blocks.append(InvertedResidual(c_in, c_out, stride if i == 0 else 1, expansion))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        head = _round_channels(config.head_channels * max(1.0, config.width_mult))
        self.head_conv = nn.Sequential(*_conv_bn(c_in, head, 1), nn.ReLU6(inplace=True))
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(head, config.num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels, H, W) -> logits (N, num_classes)."""
        x = self.head_conv(self.blocks(self.stem(x)))  # (N, head, H/4/stem_stride, W/4/stem_stride)
        return self.head(self.dropout(x.mean(dim=(2, 3))))


def _init_weights(model: nn.Module) -> None:
    """He-normal convs (fan-out, as torchvision), unit BN, small linear head; the last BN of each residual branch
    starts at zero so every block begins as the identity (Goyal et al. 2017), which helps short schedules."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if isinstance(m, BasicBlock) or (isinstance(m, InvertedResidual) and m.residual):
            nn.init.zeros_(m.body[-1].weight)


MODELS = ("resnet", "mobilenet_v2")


def build(name: str, num_classes: int = 10, in_channels: int = 1, width: float = 1.0, **options) -> nn.Module:
    """A classifier by name. ``width`` multiplies the channel counts (ResNet: 16 * width in the first stage;
    MobileNet-v2: its ``width_mult``). Other ``options`` go to :class:`ResNetConfig` (``blocks_per_stage``) or
    :class:`MobileNetV2Config` (``stages``, ``head_channels``, ``dropout``...)."""
    if name == "resnet":
        return ResNet(ResNetConfig(num_classes, in_channels, max(1, round(16 * width)), **options))
    if name == "mobilenet_v2":
        return MobileNetV2(MobileNetV2Config(num_classes, in_channels, width, **options))
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")

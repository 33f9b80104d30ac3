"""IResNet face-recognition backbones (Deng et al., ArcFace), 112x112 RGB in [-1, 1] -> embedding.

Structure and parameter names follow insightface ``recognition/arcface_torch/backbones/iresnet.py``
so its public ``.pth`` checkpoints load with ``strict=True``:

    conv1, bn1, prelu                       stem, stride 1
    layer1..layer4                          IBasicBlock stages, each starting with stride 2
        bn1, conv1, bn2, prelu, conv2, bn3  pre-activation block (conv2 carries the stride)
        downsample.0 / downsample.1         1x1 conv + BN on the first block of a stage
    bn2, dropout, fc, features              7x7 map -> flatten -> linear -> BatchNorm1d

``width`` scales the channels of the stem and the four stages (width, 2w, 4w, 8w); width 64 is
exactly insightface, smaller widths give tiny models for tests and demos.

The ``*_se`` archs are the SE-IResNets of the DataCV ICCV 2025 organisers' trainer
(``HaiyuWu/iccv2025-fr-competition``, ``model/iresnet.py`` with ``mode="se"``, the network its fixed
config trains), with their parameter names, so their checkpoints load with ``strict=True``:

    layerN.0.attn.fc1 / layerN.0.attn.fc2   squeeze-excitation (1x1 convs, no bias, reduction 16)
                                            on the first block of each stage only

As in their code, the excitation scales the block's *shortcut* (the downsampled input), not the
residual branch, before the two are added; every other name and shape is insightface's.
"""

from __future__ import annotations

import torch
from torch import nn

_DEPTHS: dict[str, list[int]] = {
    "iresnet18": [2, 2, 2, 2],
    "iresnet34": [3, 4, 6, 3],
    "iresnet50": [3, 4, 14, 3],
    "iresnet100": [3, 13, 30, 3],
}
#: Every buildable arch and its blocks per stage; ``<arch>_se`` is the organisers' SE variant.
ARCH_DEPTHS: dict[str, list[int]] = {**_DEPTHS, **{f"{name}_se": depths for name, depths in _DEPTHS.items()}}
#: The squeeze-excitation reduction of the ``*_se`` archs (channels / 16 in the bottleneck).
SE_REDUCTION = 16


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class SEModule(nn.Module):
    """Squeeze-excitation: ``x * sigmoid(fc2(relu(fc1(mean over H, W of x))))``, 1x1 convs without bias."""

    def __init__(self, channels: int, reduction: int = SE_REDUCTION):
        super().__init__()
        hidden = max(1, channels // reduction)  # >= 1 so the narrow test widths build too
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (downsampled) input; with
    ``se`` the input's path goes through a :class:`SEModule` (``attn``) first, as the organisers' code."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 se: bool = False):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-05)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-05)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-05)
        self.downsample = downsample
        self.stride = stride
        self.attn = SEModule(planes) if se else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        if self.attn is not None:
            identity = self.attn(identity)
        return out + identity


class IResNet(nn.Module):
    """The IResNet family; build one with :func:`iresnet50` & co. or :func:`build_backbone`
    (``se``: the organisers' SE variant, an excitation on the first block of each stage)."""

    fc_scale = 7 * 7  # 112 / 2**4 = 7: the spatial size after the four stride-2 stages

    def __init__(
        self,
        layers: list[int],
        width: int = 64,
        num_features: int = 512,
        dropout: float = 0.0,
        fp16: bool = False,
        amp_dtype: torch.dtype = torch.float16,
        se: bool = False,
    ):
        super().__init__()
        self.se = se
        self.fp16 = fp16
        self.amp_dtype = amp_dtype  # the autocast dtype when fp16 is on (bfloat16 on GPUs that have it)
        self.num_features = num_features
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width, eps=1e-05)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, layers[0], stride=2)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)
        self.bn2 = nn.BatchNorm2d(8 * width, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout, inplace=True)
        self.fc = nn.Linear(8 * width * self.fc_scale, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=1e-05)
        # insightface freezes the scale of the last BN: the embedding's norm is then set by fc alone.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False

        for m in self.modules():  # the SE convs too (this overrides their Xavier init in the organisers' code)
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=1e-05))
        layers = [IBasicBlock(self.inplanes, planes, stride, downsample, se=self.se)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.amp_dtype, enabled=self.fp16):
            x = self.conv1(x)
            x = self.bn1(x)
            x = self.prelu(x)
            x = self.layer1(x)
            x = self.layer2(x)
            x = self.layer3(x)
            x = self.layer4(x)
            x = self.bn2(x)
            x = torch.flatten(x, 1)
            x = self.dropout(x)
        # The embedding head stays in float32 (as insightface does) for a stable feature norm.
        x = self.fc(x.float() if self.fp16 else x)
        x = self.features(x)
        return x


def _iresnet(arch: str, width: int, num_features: int, dropout: float, fp16: bool) -> IResNet:
    return IResNet(ARCH_DEPTHS[arch], width=width, num_features=num_features, dropout=dropout, fp16=fp16,
                   se=arch.endswith("_se"))


def iresnet18(width: int = 64, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """IResNet-18: [2, 2, 2, 2] blocks."""
    return _iresnet("iresnet18", width, num_features, dropout, fp16)


def iresnet34(width: int = 64, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """IResNet-34: [3, 4, 6, 3] blocks."""
    return _iresnet("iresnet34", width, num_features, dropout, fp16)


def iresnet50(width: int = 64, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """IResNet-50: [3, 4, 14, 3] blocks (about 43.6M parameters at width 64)."""
    return _iresnet("iresnet50", width, num_features, dropout, fp16)


def iresnet100(width: int = 64, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """IResNet-100: [3, 13, 30, 3] blocks."""
    return _iresnet("iresnet100", width, num_features, dropout, fp16)


def iresnet50_se(width: int = 64, num_features: int = 512, dropout: float = 0.0, fp16: bool = False) -> IResNet:
    """SE-IResNet-50, the DataCV organisers' network (their trainer builds it with dropout 0.4)."""
    return _iresnet("iresnet50_se", width, num_features, dropout, fp16)


def build_backbone(arch: str, width: int = 64, embedding_size: int = 512, fp16: bool = False,
                   dropout: float = 0.0) -> IResNet:
    """Build an IResNet by name (``iresnet18|34|50|100``, each also ``_se``); an unknown name is a
    ``ValueError``. ``dropout`` is applied to the flattened map before ``fc`` (training only)."""
    if arch not in ARCH_DEPTHS:
        raise ValueError(f"unknown backbone arch {arch!r}; expected one of {sorted(ARCH_DEPTHS)}")
    if width < 1 or embedding_size < 1:
        raise ValueError(f"backbone {arch}: width and embedding_size must be positive (got {width}, {embedding_size})")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"backbone {arch}: dropout must be in [0, 1) (got {dropout})")
    return _iresnet(arch, width, embedding_size, dropout, fp16)

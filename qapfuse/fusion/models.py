"""A small model zoo for fusion tests, applications and benchmarks.

Every architecture takes its widths and input size as parameters, so tests build tiny versions
and benchmarks the ImageNet ones. All of them trace with :func:`qapfuse.fusion.trace`.

=====================  ===========================================================
``MLP``                Linear layers with biases and ReLU
``LeNet``              two 5x5 convs with max pooling, flatten, three Linear layers
``VGG`` / ``vgg11``,   conv stacks (optionally with BatchNorm), adaptive pooling,
``vgg16``              a Linear classifier
``ResNet`` /           BasicBlock (``resnet18``, ``resnet20``) or Bottleneck
``resnet18``, ...      (``resnet50``) residual nets with 1x1 downsample shortcuts
``ConvLayerNormNet``   convs with LayerNorm over (C, H, W) and a channels-last block
                       (LayerNorm over C, a pointwise Linear, a residual add)
``SmallCNN``           two 3x3 conv + max-pool stages and one Linear (the fusion benchmark)
=====================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

__all__ = [
    "MLP",
    "VGG",
    "BasicBlock",
    "Bottleneck",
    "ConvLayerNormNet",
    "LeNet",
    "ResNet",
    "SmallCNN",
    "resnet18",
    "resnet20",
    "resnet50",
    "vgg11",
    "vgg16",
]


def _widths(values: Sequence[int], name: str, caller: str) -> tuple[int, ...]:
    values = tuple(values)
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(
            f"The {name!r} parameter of {caller} must be a non-empty sequence of ints >= 1. "
            f"Got {values!r} instead."
        )
    return values


class MLP(nn.Module):
    """Multi-layer perceptron ``in_features -> hidden... -> out_features`` with ReLU.

    Parameters
    ----------
    in_features : int
        Input size; inputs have shape (N, in_features).
    hidden : sequence of int
        Hidden layer widths.
    out_features : int
        Number of outputs; outputs have shape (N, out_features).
    bias : bool
        Whether the Linear layers have biases.
    """

    def __init__(
        self,
        in_features: int = 784,
        hidden: Sequence[int] = (512, 512),
        out_features: int = 10,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        sizes = (in_features, *_widths(hidden, "hidden", "MLP"), out_features)
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1], bias=bias))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNet(nn.Module):
    """LeNet-5 style CNN: two 5x5 conv + ReLU + 2x2 max-pool stages, then three Linear layers.

    Parameters
    ----------
    in_channels : int
        Input channels; inputs have shape (N, in_channels, input_size, input_size).
    num_classes : int
        Outputs have shape (N, num_classes).
    channels : (int, int)
        Output channels of the two convs.
    hidden : (int, int)
        Widths of the two hidden Linear layers.
    input_size : int
        Height and width of the input (at least 16).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (6, 16),
        hidden: Sequence[int] = (120, 84),
        input_size: int = 28,
    ) -> None:
        super().__init__()
        c1, c2 = _widths(channels, "channels", "LeNet")
        h1, h2 = _widths(hidden, "hidden", "LeNet")
        if input_size < 16:
            raise ValueError(
                f"The 'input_size' parameter of LeNet must be >= 16; got {input_size}."
            )
        self.conv1 = nn.Conv2d(in_channels, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        side = ((input_size - 4) // 2 - 4) // 2
        self.fc1 = nn.Linear(c2 * side * side, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


_VGG_CFGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
    ),
}  # fmt: skip


class VGG(nn.Module):
    """VGG: 3x3 conv stacks with max-pooling, optional BatchNorm, a Linear classifier.

    Parameters
    ----------
    cfg : str or sequence
        ``"vgg11"``, ``"vgg13"``, ``"vgg16"``, or a list of conv widths and ``"M"`` (max-pool).
    batch_norm : bool
        Add BatchNorm2d after every conv.
    in_channels, num_classes : int
        Inputs have shape (N, in_channels, H, W); outputs (N, num_classes).
    width : float
        Multiplier of the conv widths (``1/16`` gives a tiny test net).
    classifier : sequence of int
        Hidden widths of the classifier (ImageNet: ``(4096, 4096)``; ``()`` for one Linear).
    pool_size : int or None
        Side of the adaptive average pool before the classifier (ImageNet: 7); ``None`` for
        none, in which case `input_size` fixes the classifier's input size.
    input_size : int
        Input height and width, used only when ``pool_size is None``.
    dropout : float
        Dropout probability in the classifier.
    """

    def __init__(
        self,
        cfg: str | Sequence[int | str] = "vgg16",
        *,
        batch_norm: bool = False,
        in_channels: int = 3,
        num_classes: int = 1000,
        width: float = 1.0,
        classifier: Sequence[int] = (4096, 4096),
        pool_size: int | None = 7,
        input_size: int = 224,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in _VGG_CFGS:
                raise ValueError(
                    f"The 'cfg' parameter of VGG must be one of {sorted(_VGG_CFGS)} or a list. "
                    f"Got {cfg!r} instead."
                )
            cfg = _VGG_CFGS[cfg]
        layers: list[nn.Module] = []
        c, side = in_channels, input_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                side //= 2
                continue
            out = max(1, round(int(v) * width))
            layers.append(nn.Conv2d(c, out, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            c = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(pool_size) if pool_size is not None else nn.Identity()
        flat = c * (pool_size * pool_size if pool_size is not None else side * side)
        head: list[nn.Module] = []
        for h in tuple(classifier):
            head += [nn.Linear(flat, h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            flat = h
        head.append(nn.Linear(flat, num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg11(**kwargs) -> VGG:
    """VGG-11 (see :class:`VGG` for the keyword arguments)."""
    return VGG("vgg11", **kwargs)


def vgg16(**kwargs) -> VGG:
    """VGG-16 (see :class:`VGG` for the keyword arguments)."""
    return VGG("vgg16", **kwargs)


class BasicBlock(nn.Module):
    """Two 3x3 convs with BatchNorm and a residual add; a 1x1 conv + BN shortcut when needed."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand (x4), BatchNorm, residual add."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Residual network of BasicBlocks or Bottlenecks (torchvision's layout and names).

    Parameters
    ----------
    block : {"basic", "bottleneck"}
        Residual block type.
    layers : sequence of int
        Blocks per stage (ResNet-18: (2, 2, 2, 2); ResNet-20: (3, 3, 3); ResNet-50: (3, 4, 6, 3)).
    widths : sequence of int
        Planes per stage (ImageNet: (64, 128, 256, 512); CIFAR ResNet-20: (16, 32, 64)).
    in_channels, num_classes : int
        Inputs have shape (N, in_channels, H, W); outputs (N, num_classes).
    stem : {"imagenet", "cifar"}
        ``"imagenet"``: 7x7 stride-2 conv and 3x3 max-pool; ``"cifar"``: one 3x3 conv.
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        widths: Sequence[int] = (64, 128, 256, 512),
        *,
        in_channels: int = 3,
        num_classes: int = 1000,
        stem: str = "imagenet",
    ) -> None:
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(
                f"The 'block' parameter of ResNet must be 'basic' or 'bottleneck'. Got {block!r}."
            )
        if stem not in ("imagenet", "cifar"):
            raise ValueError(
                f"The 'stem' parameter of ResNet must be 'imagenet' or 'cifar'. Got {stem!r}."
            )
        layers = _widths(layers, "layers", "ResNet")
        widths = _widths(widths, "widths", "ResNet")
        if len(layers) != len(widths):
            raise ValueError(
                f"'layers' and 'widths' of ResNet must have the same length; got {len(layers)} "
                f"and {len(widths)}."
            )
        cls = blocks[block]
        self.stem_kind = stem
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        else:
            self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (n, w) in enumerate(zip(layers, widths)):
            stage = []
            for j in range(n):
                stage.append(cls(in_planes, w, stride=2 if (j == 0 and i > 0) else 1))
                in_planes = w * cls.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
        self.n_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def resnet18(*, width: int = 64, num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-18: BasicBlocks (2, 2, 2, 2), stage widths ``width * (1, 2, 4, 8)``."""
    return ResNet("basic", (2, 2, 2, 2), tuple(width * m for m in (1, 2, 4, 8)),
                  num_classes=num_classes, **kwargs)  # fmt: skip


def resnet20(*, width: int = 16, num_classes: int = 10, **kwargs) -> ResNet:
    """CIFAR ResNet-20: BasicBlocks (3, 3, 3), widths ``width * (1, 2, 4)``, 3x3 stem."""
    kwargs.setdefault("stem", "cifar")
    return ResNet("basic", (3, 3, 3), tuple(width * m for m in (1, 2, 4)),
                  num_classes=num_classes, **kwargs)  # fmt: skip


def resnet50(*, width: int = 64, num_classes: int = 1000, **kwargs) -> ResNet:
    """ResNet-50: Bottlenecks (3, 4, 6, 3), planes ``width * (1, 2, 4, 8)`` (outputs x4)."""
    return ResNet("bottleneck", (3, 4, 6, 3), tuple(width * m for m in (1, 2, 4, 8)),
                  num_classes=num_classes, **kwargs)  # fmt: skip


class ConvLayerNormNet(nn.Module):
    """Convs with LayerNorm: LN over (C, H, W), then a ConvNeXt-like channels-last block.

    ``conv1 -> LayerNorm([C1, H, W]) -> GELU -> conv2 (stride 2)``, then a residual branch
    ``permute to NHWC -> LayerNorm(C2) -> Linear(C2, C2) -> GELU -> permute back`` added to the
    conv2 output, global mean pooling, and a Linear head.

    Parameters
    ----------
    in_channels, num_classes : int
        Inputs have shape (N, in_channels, input_size, input_size); outputs (N, num_classes).
    channels : (int, int)
        Widths of the two convs.
    input_size : int
        Input height and width (the first LayerNorm's shape depends on it).
    """

    def __init__(
        self,
        in_channels: int = 3,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (16, 32),
        input_size: int = 16,
    ) -> None:
        super().__init__()
        c1, c2 = _widths(channels, "channels", "ConvLayerNormNet")
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.norm1 = nn.LayerNorm([c1, input_size, input_size])
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(c2)
        self.pw = nn.Linear(c2, c2)
        self.act = nn.GELU()
        self.head = nn.Linear(c2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv2(self.act(self.norm1(self.conv1(x))))
        y = self.norm2(x.permute(0, 2, 3, 1))
        y = self.act(self.pw(y)).permute(0, 3, 1, 2)
        x = x + y
        return self.head(x.mean(dim=(2, 3)))


class SmallCNN(nn.Module):
    """The small CNN of the fusion benchmark: two 3x3 conv + ReLU + 2x2 max-pool stages, a Linear.

    ``conv(in -> c1, 3x3, pad 1) -> ReLU -> maxpool 2 -> conv(c1 -> c2, 3x3, pad 1) -> ReLU ->
    maxpool 2 -> flatten -> Linear(c2 * (input_size // 4)**2 -> num_classes)``.

    Parameters
    ----------
    in_channels : int
        Input channels; inputs have shape (N, in_channels, input_size, input_size).
    num_classes : int
        Outputs have shape (N, num_classes).
    channels : (int, int)
        Output channels of the two convs (default 16 and 32).
    input_size : int
        Height and width of the input (at least 4): 8 for the embedded digits, 28 for MNIST.

    Examples
    --------
    >>> SmallCNN(input_size=8)(torch.zeros(2, 1, 8, 8)).shape
    torch.Size([2, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        *,
        channels: Sequence[int] = (16, 32),
        input_size: int = 28,
    ) -> None:
        super().__init__()
        c1, c2 = _widths(channels, "channels", "SmallCNN")
        if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 4:
            raise ValueError(
                f"The 'input_size' parameter of SmallCNN must be an int >= 4. Got {input_size!r}."
            )
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        side = input_size // 2 // 2
        self.fc = nn.Linear(c2 * side * side, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))

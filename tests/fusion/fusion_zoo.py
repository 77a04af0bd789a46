"""Tiny versions of the zoo's architectures, their hand-written specs, and test helpers."""

from __future__ import annotations

import copy
from functools import cache

import torch
from torch import nn

from qapfuse.fusion import PermutationSpec, Segment, trace
from qapfuse.fusion import models as M  # noqa: N812

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give BatchNorm/LayerNorm non-trivial statistics and affine parameters (so they matter)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


def kaiming(model: nn.Module) -> nn.Module:
    """He initialisation: keeps a deep plain net's activations at unit scale (not degenerate)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return model


# -- hand-written specs ----------------------------------------------------------------------


def mlp_spec() -> dict:
    return {
        "layers.0.weight": ("layers.0", "input"),
        "layers.0.bias": ("layers.0",),
        "layers.2.weight": ("layers.2", "layers.0"),
        "layers.2.bias": ("layers.2",),
        "layers.4.weight": ("output", "layers.2"),
        "layers.4.bias": ("output",),
    }


def lenet_spec() -> dict:
    return {
        "conv1.weight": ("conv1", "input", None, None),
        "conv1.bias": ("conv1",),
        "conv2.weight": ("conv2", "conv1", None, None),
        "conv2.bias": ("conv2",),
        "fc1.weight": ("fc1", Segment("conv2", 16)),  # 4x4 maps flattened
        "fc1.bias": ("fc1",),
        "fc2.weight": ("fc2", "fc1"),
        "fc2.bias": ("fc2",),
        "fc3.weight": ("output", "fc2"),
        "fc3.bias": ("output",),
    }


def _bn(axes: dict, name: str, group: str) -> None:
    for k in BN_KEYS:
        axes[f"{name}.{k}"] = (group,)
    axes[f"{name}.num_batches_tracked"] = ()


VGG_CFGS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512,
              "M"),
}  # fmt: skip


def vgg_spec(cfg: str, batch_norm: bool, pool_block: int, n_hidden: int = 1) -> dict:
    axes: dict = {}
    prev, i = "input", 0
    for v in VGG_CFGS[cfg]:
        if v == "M":
            i += 1
            continue
        name = f"features.{i}"
        axes[f"{name}.weight"] = (name, prev, None, None)
        axes[f"{name}.bias"] = (name,)
        if batch_norm:
            _bn(axes, f"features.{i + 1}", name)
        prev, i = name, i + (3 if batch_norm else 2)
    inp = Segment(prev, pool_block)  # channel c feeds the c-th block of pooled positions
    for j in range(n_hidden + 1):
        name = f"classifier.{3 * j}"
        out = "output" if j == n_hidden else name
        axes[f"{name}.weight"] = (out, inp)
        axes[f"{name}.bias"] = (out,)
        inp = Segment(name)
    return axes


def resnet_spec(block: str, layers: tuple[int, ...], has_stage0_downsample: bool) -> dict:
    axes: dict = {}

    def conv(name: str, out: str, inp: str) -> None:
        axes[f"{name}.weight"] = (out, inp, None, None)

    stream = "conv1"
    conv("conv1", "conv1", "input")
    _bn(axes, "bn1", "conv1")
    convs = ("conv1", "conv2") if block == "basic" else ("conv1", "conv2", "conv3")
    for i, n in enumerate(layers):
        for j in range(n):
            p = f"layer{i + 1}.{j}"
            downsample = j == 0 and (i > 0 or has_stage0_downsample)
            prev = stream
            for c in convs[:-1]:
                conv(f"{p}.{c}", f"{p}.{c}", prev)
                _bn(axes, f"{p}.bn{c[-1]}", f"{p}.{c}")
                prev = f"{p}.{c}"
            last = convs[-1]
            out = f"{p}.{last}" if downsample else stream
            conv(f"{p}.{last}", out, prev)
            _bn(axes, f"{p}.bn{last[-1]}", out)
            if downsample:
                conv(f"{p}.downsample.0", out, stream)
                _bn(axes, f"{p}.downsample.1", out)
            stream = out
    axes["fc.weight"] = ("output", stream)
    axes["fc.bias"] = ("output",)
    return axes


def convln_spec() -> dict:
    return {
        "conv1.weight": ("conv1", "input", None, None),
        "conv1.bias": ("conv1",),
        "norm1.weight": ("conv1", None, None),  # LayerNorm over (C, H, W)
        "norm1.bias": ("conv1", None, None),
        "conv2.weight": ("conv2", "conv1", None, None),
        "conv2.bias": ("conv2",),
        "norm2.weight": ("conv2",),  # channels-last LayerNorm over C
        "norm2.bias": ("conv2",),
        "pw.weight": ("conv2", "conv2"),  # residual add merges pw's output with conv2's
        "pw.bias": ("conv2",),
        "head.weight": ("output", "conv2"),
        "head.bias": ("output",),
    }


# -- the cases -------------------------------------------------------------------------------


def _cases() -> dict:
    return {
        "mlp": (lambda: M.MLP(20, (8, 6), 3), (20,), mlp_spec),
        "lenet": (
            lambda: M.LeNet(1, 10, channels=(4, 6), hidden=(10, 8), input_size=28),
            (1, 28, 28),
            lenet_spec,
        ),
        "vgg11": (
            lambda: M.vgg11(width=1 / 16, classifier=(16,), pool_size=2, num_classes=5),
            (3, 32, 32),
            lambda: vgg_spec("vgg11", False, 4),
        ),
        "vgg11_bn": (
            lambda: M.vgg11(
                batch_norm=True, width=1 / 16, classifier=(16,), pool_size=2, num_classes=5
            ),
            (3, 32, 32),
            lambda: vgg_spec("vgg11", True, 4),
        ),
        "vgg16_bn": (
            lambda: M.vgg16(
                batch_norm=True, width=1 / 16, classifier=(16, 12), pool_size=1, num_classes=5
            ),
            (3, 32, 32),
            lambda: vgg_spec("vgg16", True, 1, n_hidden=2),
        ),
        "resnet18": (
            lambda: M.resnet18(width=4, num_classes=5),
            (3, 32, 32),
            lambda: resnet_spec("basic", (2, 2, 2, 2), False),
        ),
        "resnet20": (
            lambda: M.resnet20(width=4),
            (3, 16, 16),
            lambda: resnet_spec("basic", (3, 3, 3), False),
        ),
        "resnet50": (
            lambda: M.resnet50(width=2, num_classes=5),
            (3, 32, 32),
            lambda: resnet_spec("bottleneck", (3, 4, 6, 3), True),
        ),
        "convln": (
            lambda: M.ConvLayerNormNet(3, 4, channels=(4, 6), input_size=8),
            (3, 8, 8),
            convln_spec,
        ),
    }


CASES = _cases()
NAMES = tuple(CASES)


def make(name: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """A freshly initialised tiny model (eval mode) and a random batch of 4 inputs for it."""
    build, shape, _ = CASES[name]
    torch.manual_seed(seed)
    model = build()
    if not name.startswith("resnet"):  # plain nets: keep the signal alive through depth
        kaiming(model)
    model = randomise_norms(model, seed)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(seed + 1))
    return model, x


def hand_spec(name: str) -> PermutationSpec:
    return PermutationSpec(CASES[name][2](), fixed={"input", "output"})


@cache
def traced(name: str) -> PermutationSpec:
    model, x = make(name)
    return trace(model, x)


def outputs_with(model: nn.Module, state_dict: dict, x: torch.Tensor) -> torch.Tensor:
    other = copy.deepcopy(model)
    other.load_state_dict(state_dict)
    other.eval()
    with torch.no_grad():
        return other(x)

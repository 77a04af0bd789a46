"""reset_bn re-estimates BatchNorm statistics exactly; REPAIR hits its interpolated targets."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fusion_zoo import CASES, make, traced
from torch import nn

from qapfuse.fusion import permute, random_permutations, trace
from qapfuse.fusion.fuse import fuse_aligned
from qapfuse.fusion.repair import repair_points, repair_statistics, reset_bn


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 3, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(3)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.drop(torch.relu(self.bn2(self.conv2(x))))
        return self.fc(x.mean((2, 3)))


def test_reset_bn_equals_a_manual_pass():
    torch.manual_seed(0)
    model = ConvBN().eval()
    model.bn1.momentum = 0.3
    x = torch.randn(40, 2, 5, 5)
    reset_bn(model, x, batch_size=40)
    with torch.no_grad():
        h = model.conv1(x)
        mean1, var1 = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=True)
        # in training mode bn1 normalises with the biased batch variance
        std1 = torch.sqrt(h.var((0, 2, 3), unbiased=False) + model.bn1.eps)
        hn = (h - mean1[:, None, None]) / std1[:, None, None]
        hn = hn * model.bn1.weight[:, None, None] + model.bn1.bias[:, None, None]
        h2 = model.conv2(torch.relu(hn))
    torch.testing.assert_close(model.bn1.running_mean, mean1)
    torch.testing.assert_close(model.bn1.running_var, var1)
    torch.testing.assert_close(model.bn2.running_mean, h2.mean((0, 2, 3)))
    torch.testing.assert_close(model.bn2.running_var, h2.var((0, 2, 3), unbiased=True))
    assert model.bn1.momentum == 0.3 and not model.training and not model.bn1.training


def test_reset_bn_over_batches_averages_them_and_restores_training_flags():
    torch.manual_seed(1)
    model = ConvBN().train()
    x = torch.randn(30, 2, 4, 4)
    reset_bn(model, (x, torch.zeros(30)), batch_size=10)
    with torch.no_grad():
        h = model.conv1(x).reshape(3, 10, 4, 4, 4)
    torch.testing.assert_close(model.bn1.running_mean, h.mean((1, 3, 4)).mean(0))
    torch.testing.assert_close(model.bn1.running_var, h.var((1, 3, 4)).mean(0))
    assert model.training and model.drop.training
    assert model.bn1.num_batches_tracked.item() == 3


def test_reset_bn_needs_batchnorm_and_data():
    model, _ = make("mlp")
    with pytest.raises(ValueError, match="needs BatchNorm layers; MLP has none"):
        reset_bn(model, torch.zeros(4, 20))
    with pytest.raises(TypeError, match="'data' parameter of reset_bn"):
        reset_bn(ConvBN(), "x")


def channel_stats(model, name, x):
    """Mean and std of every output channel of module `name` (independent of repair.py)."""
    module = dict(model.named_modules())[name]
    out = {}

    def hook(m, args, o):  # returns None: a returned value would replace the output
        out["o"] = o.detach().clone()

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    o = out["o"].double()
    dim = o.ndim - 1 if isinstance(module, nn.Linear) else 1
    flat = o.movedim(dim, 0).reshape(o.shape[dim], -1)
    return flat.mean(1), flat.std(1, unbiased=False)


@pytest.mark.parametrize("name", ["mlp", "vgg11_bn", "lenet"])
def test_repair_gives_every_channel_the_interpolated_statistics(name):
    a, _ = make(name, seed=0)
    b, _ = make(name, seed=1)
    spec = traced(name)
    perms = [{}, random_permutations(spec, rng=3)]  # any alignment: targets follow it
    x = torch.randn(200, *CASES[name][1], generator=torch.Generator().manual_seed(5))
    w = [0.3, 0.7]
    fused = fuse_aligned([a, b], SimpleNamespace(spec=spec, perms=perms), alpha=0.7)
    repair_statistics(fused, [a, b], spec, perms, w, x, batch_size=64)
    points = repair_points(fused, spec)
    kinds = {type(dict(fused.named_modules())[n]) for n, _ in points}
    expected = {
        "mlp": {nn.Linear},
        "lenet": {nn.Linear, nn.Conv2d},
        "vgg11_bn": {nn.BatchNorm2d, nn.Linear},
    }
    assert kinds == expected[name]
    for point, group in points:
        mu_a, sd_a = channel_stats(a, point, x)
        mu_b, sd_b = channel_stats(b, point, x)
        p = torch.as_tensor(perms[1][group])
        mu_f, sd_f = channel_stats(fused, point, x)
        torch.testing.assert_close(mu_f, 0.3 * mu_a + 0.7 * mu_b[p], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sd_f, 0.3 * sd_a + 0.7 * sd_b[p], atol=1e-4, rtol=1e-4)


def test_repair_of_a_perfectly_aligned_copy_changes_nothing():
    model, _ = make("resnet20")
    spec = traced("resnet20")
    truth = random_permutations(spec, rng=1)
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, truth))
    inverse = {g: np.argsort(p) for g, p in truth.items()}
    xs = torch.randn(64, *CASES["resnet20"][1], generator=torch.Generator().manual_seed(2))
    fused = fuse_aligned([model, other], SimpleNamespace(spec=spec, perms=[{}, inverse]),
                         repair="repair", data=xs)  # fmt: skip
    for key, t in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], t, atol=1e-4, rtol=1e-4, msg=key)


def test_repair_points_choose_norms_over_producers():
    model, _ = make("resnet20")
    names = [n for n, _ in repair_points(model, traced("resnet20"))]
    assert "bn1" in names and "layer1.0.bn2" in names and "layer2.0.downsample.1" in names
    assert not any("conv" in n for n in names)
    cnn = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 2))
    spec = trace(cnn, torch.zeros(1, 1, 4, 4))
    assert repair_points(cnn, spec) == [("0", "0")]


def test_fuse_aligned_repairs_with_reset_bn():
    a, _ = make("vgg11_bn", seed=0)
    b, _ = make("vgg11_bn", seed=1)
    spec = traced("vgg11_bn")
    x = torch.randn(48, *CASES["vgg11_bn"][1], generator=torch.Generator().manual_seed(0))
    fused = fuse_aligned([a, b], SimpleNamespace(spec=spec, perms=[{}, {}]), repair="reset_bn",
                         data=x, repair_samples=32)  # fmt: skip
    manual = fuse_aligned([a, b], SimpleNamespace(spec=spec, perms=[{}, {}]))
    reset_bn(manual, x[:32], batch_size=128)
    for key, t in manual.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], t, msg=key)
    assert not torch.equal(fused.features[1].running_var, a.features[1].running_var)

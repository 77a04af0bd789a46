"""Weights computed from stored tensors: parametrizations, the old weight-norm hooks, pruning.

Every wrapper either keeps the function under a random spec-consistent permutation (in eval
mode, and in training mode, where spectral norm runs its power iteration again) or raises
UnsupportedOpError naming the parameter and the parametrization; nothing is left silently
unpermuted.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from qapfuse.fusion import (
    Segment,
    UnplacedTensorError,
    UnsupportedOpError,
    from_graph,
    permute,
    random_permutations,
    to_graph,
    trace,
)

XV = torch.randn(5, 6)
XI = torch.randn(4, 3, 8, 8)


def old_weight_norm(m: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():  # deprecated in favour of the parametrization
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(m, **kw)


WRAPPERS = {
    "weight_norm": (parametrizations.weight_norm, "keeps"),
    "weight_norm_dim1": (lambda m: parametrizations.weight_norm(m, dim=1), "keeps"),
    "weight_norm_dim_none": (lambda m: parametrizations.weight_norm(m, dim=None), "keeps"),
    "spectral_norm": (parametrizations.spectral_norm, "keeps"),
    "spectral_norm_dim1": (lambda m: parametrizations.spectral_norm(m, dim=1), "keeps"),
    "weight_then_spectral_norm": (
        lambda m: parametrizations.spectral_norm(parametrizations.weight_norm(m)),
        "keeps",
    ),
    "orthogonal": (parametrizations.orthogonal, "raises"),
    "old_weight_norm": (old_weight_norm, "keeps"),
    "old_weight_norm_dim_none": (lambda m: old_weight_norm(m, dim=None), "keeps"),
    "old_spectral_norm": (torch.nn.utils.spectral_norm, "keeps"),
    "pruning": (lambda m: prune.l1_unstructured(m, "weight", amount=0.4), "keeps"),
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(6, 8), nn.Linear(8, 7), nn.Linear(7, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.tanh(self.a(x)))))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(3, 5, 3, padding=1), nn.BatchNorm2d(5)
        self.conv2 = nn.Conv2d(5, 4, 3)
        self.fc = nn.Linear(4 * 2 * 2, 2)
        with torch.no_grad():  # statistics that a permutation visibly moves
            for t in (self.bn.weight, self.bn.bias, self.bn.running_mean, self.bn.running_var):
                t.uniform_(0.5, 1.5)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        return self.fc(torch.flatten(torch.relu(self.conv2(x)), 1))


def wrapped(build, wrapper) -> nn.Module:
    torch.manual_seed(0)
    model = build()
    for m in list(model.modules()):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            wrapper(m)
    return model


def outputs(model: nn.Module, x: torch.Tensor, *, train: bool, steps: int = 2) -> torch.Tensor:
    model.train(train)
    with torch.no_grad():
        for _ in range(steps):  # in training mode, spectral norm updates u and v every step
            y = model(x)
    return y


CASES = [(w, b) for w in WRAPPERS for b in ("mlp", "conv")]


@pytest.mark.parametrize(("wrapper", "build"), CASES, ids=[f"{w}-{b}" for w, b in CASES])
def test_wrapped_layers_keep_the_function_or_raise(wrapper, build):
    wrap, expected = WRAPPERS[wrapper]
    model = wrapped({"mlp": MLP, "conv": ConvNet}[build], wrap).eval()
    x = XV if build == "mlp" else XI
    if expected == "raises":
        with pytest.raises(UnsupportedOpError, match=r"computed from '.*by the parametrization"):
            trace(model, x)
        return
    spec = trace(model, x)
    sd = model.state_dict()
    perms = random_permutations(spec, torch.Generator().manual_seed(3))
    permuted = permute(model, spec, perms)
    # Every stored tensor with a hidden channel axis was moved (none silently left behind).
    for key, entries in spec.axes.items():
        if any(e is not None and not set(s.group for s in e) <= spec.fixed for e in entries):
            assert not torch.equal(permuted[key], sd[key]), key
    other = wrapped({"mlp": MLP, "conv": ConvNet}[build], wrap)  # old hooks defeat deepcopy
    other.load_state_dict(permuted)
    # Training mode first: the old spectral_norm starts from random u, v (sigma near 0 and
    # outputs near 1e4); one power iteration brings them to scale.
    for train in (True, False):
        torch.testing.assert_close(
            outputs(other, x, train=train), outputs(model, x, train=train), atol=1e-5, rtol=0
        )
    # The round trip through a graph is exact for every stored tensor.
    back = from_graph(to_graph(sd, spec))
    assert list(back) == list(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_stored_tensors_follow_the_weights_axes():
    model = wrapped(ConvNet, parametrizations.spectral_norm).eval()
    spec = trace(model, XI)
    base = "conv2.parametrizations.weight."
    assert spec.axes[base + "original"] == ((Segment("conv2"),), (Segment("conv1"),), None, None)
    assert spec.axes[base + "0._u"] == ((Segment("conv2"),),)
    assert spec.axes[base + "0._v"] == ((Segment("conv1", 9),),)  # (in, kh, kw) flattened
    model = wrapped(ConvNet, lambda m: parametrizations.weight_norm(m, dim=1)).eval()
    spec = trace(model, XI)
    g = "conv2.parametrizations.weight.original0"
    assert spec.axes[g] == (None, (Segment("conv1"),), None, None)
    model = wrapped(ConvNet, lambda m: parametrizations.spectral_norm(m, dim=1)).eval()
    spec = trace(model, XI)
    assert spec.axes["conv2.parametrizations.weight.0._u"] == ((Segment("conv1"),),)
    assert spec.axes["conv2.parametrizations.weight.0._v"] == ((Segment("conv2", 9),),)


def test_refusals_name_the_parameter_and_the_parametrization():
    model = wrapped(MLP, parametrizations.orthogonal).eval()
    with pytest.raises(UnsupportedOpError) as info:
        trace(model, XV)
    msg = str(info.value)
    assert "'a.weight' is computed from 'a.parametrizations.weight.original'" in msg
    assert "_Orthogonal (torch.nn.utils.parametrizations.orthogonal)" in msg
    assert info.value.node == "a"

    class Symmetric(nn.Module):  # a parametrization of one's own
        def forward(self, w):
            return w.triu() + w.triu(1).transpose(0, 1)

    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    parametrize.register_parametrization(model[2], "weight", Symmetric())
    with pytest.raises(UnsupportedOpError, match=r"'2.weight'.*parametrization .*Symmetric"):
        trace(model, XV)

    # Spectral norm over a kernel axis flattens the in and out channels into one vector.
    model = ConvNet().eval()
    parametrizations.spectral_norm(model.conv2, dim=2)
    with pytest.raises(UnsupportedOpError, match=r"'conv2.parametrizations.weight.0._v'.*flattens"):
        trace(model, XI)


def test_refused_parametrization_on_fixed_channels_only_is_fine():
    model = parametrizations.orthogonal(nn.Linear(6, 6)).eval()  # input -> output: nothing free
    spec = trace(model, XV)
    assert spec.free_groups == ()
    assert spec.axes["parametrizations.weight.original"] == (None, None)


def test_functional_and_shared_parametrized_weights():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(8, 6))
            self.hidden, self.out = nn.Linear(8, 8), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.relu(F.linear(x, self.w))  # the parametrized weight read in forward
            h = self.hidden(torch.relu(self.hidden(h)))  # one wrapped module used twice
            return self.out(h)

    model = Functional().eval()
    parametrizations.weight_norm(model, "w")
    parametrizations.spectral_norm(model.hidden)
    spec = trace(model, XV)
    assert spec.axes["parametrizations.w.original1"] == ((Segment("w"),), (Segment("input"),))
    assert spec.axes["hidden.parametrizations.weight.original"] == ((Segment("w"),),) * 2
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, random_permutations(spec, 0)))
    for train in (False, True):
        torch.testing.assert_close(
            outputs(other, XV, train=train), outputs(model, XV, train=train), atol=1e-5, rtol=0
        )


def test_weights_computed_by_unknown_hooks_raise():
    layer = nn.Linear(6, 8)
    del layer.weight
    layer.raw = nn.Parameter(torch.randn(8, 6))
    layer.register_forward_pre_hook(lambda m, args: setattr(m, "weight", 2 * m.raw))
    model = nn.Sequential(layer, nn.ReLU(), nn.Linear(8, 3)).eval()
    with pytest.raises(UnsupportedOpError, match=r"'0.weight' is not in the state dict"):
        trace(model, XV)


def test_unused_parametrized_layer_is_unplaced():
    class Spare(MLP):
        def forward(self, x):
            return self.c(torch.relu(self.a(x)[:, :7]))

    model = wrapped(Spare, parametrizations.weight_norm).eval()
    with pytest.raises(UnsupportedOpError):  # slicing channels comes first
        trace(model, XV)

    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.spare = nn.Linear(6, 3), parametrizations.weight_norm(nn.Linear(3, 3))

        def forward(self, x):
            return self.a(x)

    with pytest.raises(UnplacedTensorError, match=r"'spare.parametrizations.weight.original0'"):
        trace(Unused(), XV)
    spec = trace(Unused(), XV, allow_unplaced=True)
    assert spec.axes["spare.parametrizations.weight.original1"] == (None, None)


def test_trace_leaves_spectral_norm_vectors_alone_in_training_mode():
    model = wrapped(ConvNet, parametrizations.spectral_norm).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, XI)  # runs in eval mode: no power iteration
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm])
def test_parametrized_norm_layers(wrap):
    class Normed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)
            self.bn, self.ln = nn.BatchNorm1d(8), nn.LayerNorm(8)
            with torch.no_grad():
                for t in (self.bn.weight, self.bn.bias, self.ln.weight, self.ln.bias):
                    t.uniform_(0.5, 1.5)
            wrap(self.bn)
            wrap(self.ln)

        def forward(self, x):
            return self.b(self.ln(torch.relu(self.bn(self.a(x)))))

    torch.manual_seed(0)
    model = Normed().eval()
    spec = trace(model, XV)
    stored = [k for k in spec.axes if ".parametrizations.weight.original" in k]
    assert stored and all(spec.axes[k] == ((Segment("a"),),) for k in stored)
    torch.manual_seed(0)
    other = Normed()
    other.load_state_dict(permute(model, spec, random_permutations(spec, 2)))
    for train in (True, False):
        torch.testing.assert_close(
            outputs(other, XV, train=train), outputs(model, XV, train=train), atol=1e-5, rtol=0
        )

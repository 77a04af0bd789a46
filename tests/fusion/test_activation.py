"""Activation matching recovers the permutation between a model and its permuted copy."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from fusion_zoo import CASES, make, traced

from qapfuse.fusion import permute, random_permutations, trace
from qapfuse.fusion._activation import _record, activation_perms, channel_points
from qapfuse.fusion.models import SmallCNN

ZOO = ("mlp", "lenet", "vgg11_bn", "resnet20", "convln")


def permuted_copy(model, spec, seed):
    truth = random_permutations(spec, rng=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, truth))
    return other, truth


def inputs_for(name: str, n: int = 256) -> torch.Tensor:
    shape = CASES[name][1]
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(11))


def live_channels(model, spec, x):
    """Per group, the channels whose activations vary on `x` (dead ReLUs are not identifiable)."""
    seen = _record(model, channel_points(model, spec), x, spec)
    return {g: (torch.cat(f).std(0) > 1e-9).numpy() for g, f in seen.items()}


def assert_recovers(perms, truth, spec, live=None):
    # copy's channel i is the model's channel truth[i], so model channel j sits at
    # argsort(truth)[j] in the copy: that is what aligning the copy to the model must give.
    for g in spec.free_groups:
        np.testing.assert_array_equal(perms[0][g], np.arange(spec.sizes[g]))
        keep = slice(None) if live is None else live[g]
        assert live is None or keep.sum() >= len(keep) // 2
        np.testing.assert_array_equal(perms[1][g][keep], np.argsort(truth[g])[keep], err_msg=g)
        assert sorted(perms[1][g].tolist()) == list(range(spec.sizes[g]))


@pytest.mark.parametrize("name", ZOO)
def test_recovers_a_random_permutation_of_the_zoo(name):
    model, _ = make(name)
    spec = traced(name)
    other, truth = permuted_copy(model, spec, seed=3)
    x = inputs_for(name)
    perms = activation_perms([model, other], spec, x, batch_size=100)
    # A channel that is dead on every input (tiny ResNet-20's last stage has some) correlates
    # with nothing; every other channel must be matched exactly.
    assert_recovers(perms, truth, spec, live_channels(model, spec, x))


def test_recovers_the_small_cnn_and_counts_flattened_positions_as_samples():
    torch.manual_seed(0)
    model = SmallCNN(input_size=8).eval()
    spec = trace(model, torch.zeros(1, 1, 8, 8))
    points = channel_points(model, spec)
    assert [(name, where) for name, where, *_ in points] == [("conv2", "input"), ("fc", "input")]
    other, truth = permuted_copy(model, spec, seed=5)
    x = torch.rand(64, 1, 8, 8)
    perms = activation_perms([model, other], spec, (x, torch.zeros(64)))
    assert_recovers(perms, truth, spec)


def test_three_models_are_each_matched_to_model_zero():
    model, _ = make("mlp")
    spec = traced("mlp")
    b, tb = permuted_copy(model, spec, seed=1)
    c, tc = permuted_copy(model, spec, seed=2)
    perms = activation_perms([model, b, c], spec, inputs_for("mlp"))
    assert_recovers(perms[:2], tb, spec)
    assert_recovers([perms[0], perms[2]], tc, spec)


def test_progress_reports_every_batch_and_models_are_untouched():
    model, _ = make("mlp")
    spec = traced("mlp")
    other, _ = permuted_copy(model, spec, seed=1)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    calls = []
    activation_perms([model, other], spec, inputs_for("mlp", 50), batch_size=20,
                     progress=lambda done, total: calls.append((done, total)))  # fmt: skip
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_bad_arguments_are_named():
    model, _ = make("mlp")
    spec = traced("mlp")
    with pytest.raises(TypeError, match="'data' parameter of activation_perms"):
        activation_perms([model, model], spec, "x")
    with pytest.raises(ValueError, match="'batch_size' parameter of activation_perms"):
        activation_perms([model, model], spec, inputs_for("mlp"), batch_size=0)
    with pytest.raises(TypeError, match="'spec' parameter of activation_perms"):
        activation_perms([model, model], None, inputs_for("mlp"))
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'batchsize' \(did you mean"):
        activation_perms([model, model], spec, inputs_for("mlp"), batchsize=3)
    with pytest.raises(ValueError, match="needs `data`"):
        activation_perms([model, model], spec, None)
    with pytest.raises(TypeError, match="state dicts are not enough"):
        activation_perms([model, model.state_dict()], spec, inputs_for("mlp"))

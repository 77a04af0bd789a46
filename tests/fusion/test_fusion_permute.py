"""Spec-consistent permutations preserve the function; inconsistent ones do not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fusion_zoo import NAMES, make, outputs_with, traced

from qapfuse.fusion import (
    PermutationSpec,
    Segment,
    SpecError,
    identity_permutations,
    permute,
    random_permutations,
    trace,
)
from qapfuse.fusion.models import MLP


@pytest.mark.parametrize("name", NAMES)
def test_random_permutations_preserve_outputs(name):
    model, x = make(name)
    spec = traced(name)
    perms = random_permutations(spec, 0)
    assert set(perms) == set(spec.free_groups)
    sd = permute(model, spec, perms)
    before = model(x).detach()
    after = outputs_with(model, sd, x)
    assert before.dtype == after.dtype == torch.float32
    assert (before - after).abs().max().item() < 1e-5
    # ... and the weights did move: at least one tensor changed.
    assert any(not torch.equal(sd[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_permuting_one_side_only_changes_outputs(name):
    model, x = make(name)
    spec = traced(name)
    sd = model.state_dict()
    group = next(g for g in spec.free_groups if spec.sizes[g] > 1)
    n = spec.sizes[group]
    perms = {group: np.roll(np.arange(n), 1)}
    broken = permute(sd, spec, perms)
    consumers = {key for key, axis, _ in spec.perm_to_axes[group] if axis >= 1}
    assert consumers
    for key in consumers:  # undo the consumer side: the group is permuted on one side only
        broken[key] = sd[key].clone()
    diff = (model(x).detach() - outputs_with(model, broken, x)).abs().max().item()
    assert diff > 1e-4
    whole = permute(sd, spec, perms)
    assert (model(x).detach() - outputs_with(model, whole, x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_identity_permutations_are_the_identity(name):
    model, _ = make(name)
    spec = traced(name)
    sd = model.state_dict()
    for perms in (identity_permutations(spec), {}):
        out = permute(sd, spec, perms)
        assert list(out) == list(sd)
        assert all(torch.equal(out[k], sd[k]) and out[k].dtype == sd[k].dtype for k in sd)
        assert all(out[k].data_ptr() != sd[k].data_ptr() for k in sd if sd[k].numel())


def test_permute_semantics_and_block_expansion():
    w = torch.arange(6.0).reshape(3, 2)
    v = torch.arange(12.0).reshape(2, 6)
    spec = PermutationSpec(
        {"w": ("h", "input"), "v": ("output", Segment("h", 2))}, fixed={"input", "output"}
    )
    out = permute({"w": w, "v": v}, spec, {"h": torch.tensor([2, 0, 1])})
    assert torch.equal(out["w"], w[[2, 0, 1]])
    assert torch.equal(out["v"], v[:, [4, 5, 0, 1, 2, 3]])


def test_random_permutations_are_seeded():
    spec = traced("resnet20")
    a, b = random_permutations(spec, 3), random_permutations(spec, 3)
    assert all(np.array_equal(a[g], b[g]) for g in a)
    c = random_permutations(spec, np.random.default_rng(4))
    assert any(not np.array_equal(a[g], c[g]) for g in a)
    with pytest.raises(TypeError, match=r"'rng' parameter of random_permutations.*torch"):
        random_permutations(spec, 1.5)
    with pytest.raises(ValueError, match=r"'rng' parameter of random_permutations.*Got -1"):
        random_permutations(spec, -1)


def test_random_permutations_take_a_torch_generator():
    spec = traced("resnet20")
    t1 = random_permutations(spec, torch.Generator().manual_seed(5))
    t2 = random_permutations(spec, torch.Generator().manual_seed(5))
    t3 = random_permutations(spec, torch.Generator().manual_seed(6))
    assert set(t1) == set(spec.free_groups)
    for g, p in t1.items():
        assert p.dtype == np.int64 and np.array_equal(np.sort(p), np.arange(spec.sizes[g]))
        assert np.array_equal(p, t2[g])
    assert any(not np.array_equal(t1[g], t3[g]) for g in t1)
    gen = torch.Generator().manual_seed(5)  # a generator advances: two draws differ
    first, second = random_permutations(spec, gen), random_permutations(spec, gen)
    assert all(np.array_equal(first[g], t1[g]) for g in t1)
    assert any(not np.array_equal(first[g], second[g]) for g in t1)


def test_identity_permutations_name_the_argument():
    spec = traced("resnet20")
    ident = identity_permutations(spec)
    assert all(np.array_equal(p, np.arange(spec.sizes[g])) for g, p in ident.items())
    with pytest.raises(TypeError, match="'spec' parameter of identity_permutations"):
        identity_permutations({"a": ("a",)})
    with pytest.raises(SpecError, match=r"identity_permutations needs the group sizes"):
        identity_permutations(PermutationSpec({"w": ("a", None)}))


def test_bad_permutations_are_refused():
    model = MLP(4, (3,), 2)
    spec = trace(model, torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"names the group 'nope'"):
        permute(model, spec, {"nope": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"permutation of range\(3\).*not a permutation"):
        permute(model, spec, {"layers.0": [0, 0, 1]})
    with pytest.raises(ValueError, match=r"permutation of range\(3\).*shape \(2,\)"):
        permute(model, spec, {"layers.0": [0, 1]})
    with pytest.raises(TypeError, match=r"must hold integers"):
        permute(model, spec, {"layers.0": np.array([0.0, 1.0, 2.0])})
    with pytest.raises(ValueError, match=r"fixed group 'output'"):
        permute(model, spec, {"output": [1, 0]})
    with pytest.raises(TypeError, match=r"'spec' parameter of permute"):
        permute(model, {"a": 1}, {})
    with pytest.raises(TypeError, match=r"'model_or_state_dict' parameter of permute"):
        permute([1], spec, {})
    with pytest.raises(SpecError, match=r"'layers.0.weight'\] has shape \(5, 4\)"):
        permute(MLP(4, (5,), 2), spec, {})
    # identity on a fixed group is fine; torch permutations are accepted
    out = permute(model, spec, {"output": [0, 1], "layers.0": torch.tensor([1, 2, 0])})
    assert torch.equal(out["layers.0.bias"], model.layers[0].bias.detach()[[1, 2, 0]])

"""Fusing under an alignment: the permuted copy fuses back to the original; weights; bad input."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fusion_zoo import CASES, make, traced

from qapfuse.fusion import SpecError, identity_permutations, permute, random_permutations
from qapfuse.fusion.fuse import average_state_dicts, fuse, fuse_aligned, fusion_weights
from qapfuse.fusion.models import MLP

ZOO = ("mlp", "lenet", "vgg11_bn", "resnet20", "convln")


def permuted_copy(model, spec, seed):
    truth = random_permutations(spec, rng=seed)
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, truth))
    # the alignment that undoes it: copy channel argsort(truth)[j] is model channel j
    inverse = {g: np.argsort(p) for g, p in truth.items()}
    return other, inverse


def alignment(spec, *perms):
    return SimpleNamespace(spec=spec, perms=list(perms))


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", ZOO)
def test_fusing_a_model_with_its_permuted_copy_gives_the_model_back(name):
    model, x = make(name)
    spec = traced(name)
    other, inverse = permuted_copy(model, spec, seed=4)
    assert (outputs(other, x) - outputs(model, x)).abs().max() < 1e-4
    fused = fuse_aligned([model, other], alignment(spec, identity_permutations(spec), inverse))
    for key, t in model.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], t, msg=key)
    torch.testing.assert_close(outputs(fused, x), outputs(model, x), atol=1e-5, rtol=1e-5)
    # without the alignment the average is a different network
    plain = fuse_aligned([model, other], alignment(spec, {}, {}))
    assert (outputs(plain, x) - outputs(model, x)).abs().max() > 1e-3


def test_result_has_the_input_class_and_keys_and_inputs_are_untouched():
    model, _ = make("vgg11_bn")
    spec = traced("vgg11_bn")
    other, inverse = permuted_copy(make("vgg11_bn", seed=1)[0], spec, seed=2)
    before = [copy.deepcopy(m.state_dict()) for m in (model, other)]
    model.train()
    fused = fuse_aligned([model, other], alignment(spec, {}, inverse))
    assert type(fused) is type(model) and fused is not model
    assert list(fused.state_dict()) == list(model.state_dict())
    assert not fused.training and model.training
    for m, sd in zip((model, other), before):
        assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())


def test_weights_alpha_and_integer_buffers():
    a, _ = make("vgg11_bn", seed=0)
    b, _ = make("vgg11_bn", seed=1)
    spec = traced("vgg11_bn")
    b.features[1].num_batches_tracked.fill_(7)
    ident = alignment(spec, {}, {})
    for fused, wa in [
        (fuse_aligned([a, b], ident, alpha=0.25), 0.75),
        (fuse_aligned([a, b], ident, weights=[300, 100]), 0.75),
        (fuse_aligned([a, b], ident), 0.5),
        (fuse_aligned([a, b], ident, alpha=0.0), 1.0),
    ]:
        sd = fused.state_dict()
        for key, ta in a.state_dict().items():
            tb = b.state_dict()[key]
            if ta.is_floating_point():
                torch.testing.assert_close(sd[key], wa * ta + (1 - wa) * tb, msg=key)
        assert sd["features.1.num_batches_tracked"].item() == 7
        assert sd["features.1.num_batches_tracked"].dtype == torch.int64


def test_n_models_with_sample_count_weights():
    spec = traced("mlp")
    base, x = make("mlp")
    models, perms = [base], [identity_permutations(spec)]
    for seed in (1, 2, 3):
        other, inverse = permuted_copy(base, spec, seed)
        models.append(other)
        perms.append(inverse)
    fused = fuse_aligned(models, alignment(spec, *perms), weights=[10, 0, 5, 1])
    torch.testing.assert_close(outputs(fused, x), outputs(base, x), atol=1e-5, rtol=1e-5)


def test_fusion_weights_and_average():
    assert fusion_weights(4).tolist() == [0.25] * 4
    sds = [{"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)},
           {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}]  # fmt: skip
    out = average_state_dicts(sds, np.array([0.5, 0.5]))
    assert out["w"].tolist() == [2.0, 4.0] and out["n"].item() == 5


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"weights": [1.0]}, ValueError, r"one number per model \(2\)"),
        ({"weights": [1.0, -1.0]}, ValueError, "non-negative"),
        ({"weights": [0.0, 0.0]}, ValueError, "all zero"),
        ({"weights": [1.0, float("nan")]}, ValueError, "finite"),
        ({"alpha": 1.5}, ValueError, r"`alpha` must be a float in \[0, 1\]"),
        ({"alpha": float("nan")}, ValueError, r"`alpha` must be a float in \[0, 1\]"),
        ({"alpha": 0.5, "weights": [1, 1]}, ValueError, "not both"),
        ({"repair": "repair"}, ValueError, "needs `data`"),
        ({"repair": "reset-bn", "data": torch.zeros(2, 20)}, ValueError, "Did you mean 'reset_bn'"),
    ],
)
def test_bad_arguments_are_named_before_any_work(kwargs, error, match):
    a, _ = make("mlp")
    b, _ = make("mlp", seed=1)
    spec = traced("mlp")
    with pytest.raises(error, match=match):
        fuse_aligned([a, b], alignment(spec, {}, {}), **kwargs)
    with pytest.raises(error, match=match):
        fuse([a, b], method="none", **kwargs)


def test_alpha_needs_two_models_and_the_alignment_must_fit():
    models = [make("mlp", seed=s)[0] for s in range(3)]
    spec = traced("mlp")
    with pytest.raises(ValueError, match="two models; got 3"):
        fuse_aligned(models, alignment(spec, {}, {}, {}), alpha=0.5)
    with pytest.raises(ValueError, match="permutations for 2 models, but 3"):
        fuse_aligned(models, alignment(spec, {}, {}))
    with pytest.raises(TypeError, match="'alignment' parameter of fuse_aligned"):
        fuse_aligned(models, {"spec": spec})


def test_models_of_other_widths_classes_or_with_nan_are_refused():
    spec = traced("mlp")
    a = MLP(20, (8, 6), 3)
    with pytest.raises(SpecError, match=r"models\[1\]\['layers.0.weight'\] has shape \(9, 20\)"):
        fuse([a, MLP(20, (9, 6), 3)])
    with pytest.raises(ValueError, match="share one architecture"):
        fuse_aligned([a, CASES["lenet"][0]()], alignment(spec, {}, {}))
    bad = copy.deepcopy(a)
    with torch.no_grad():
        bad.layers[2].bias[1] = float("inf")
    with pytest.raises(ValueError, match=r"models\[1\].*NaN or Inf in 'layers.2.bias'"):
        fuse([a, bad])
    with pytest.raises(TypeError, match="'models' parameter of fuse"):
        fuse(a)


@pytest.mark.parametrize("method", ["weight", "gamf", "activation", "merge_many", "c2m3"])
def test_fuse_through_align_returns_the_original_function(method):
    model, _ = make("lenet")
    spec = traced("lenet")
    other, _ = permuted_copy(model, spec, seed=6)
    x = torch.randn(64, *CASES["lenet"][1], generator=torch.Generator().manual_seed(0))
    fused = fuse([model, other], method=method, data=x, rng=0)
    assert type(fused) is type(model)
    torch.testing.assert_close(outputs(fused, x), outputs(model, x), atol=1e-5, rtol=1e-5)


def test_align_once_then_sweep_alpha():
    from qapfuse.fusion import align

    a, x = make("mlp", seed=0)
    b, _ = make("mlp", seed=1)
    res = align([a, b], method="weight", spec=traced("mlp"), rng=0)
    ends = [fuse_aligned([a, b], res, alpha=t) for t in (0.0, 1.0)]
    torch.testing.assert_close(outputs(ends[0], x), outputs(a, x))
    torch.testing.assert_close(outputs(ends[1], x), outputs(b, x), atol=1e-5, rtol=1e-5)
    mid = fuse_aligned([a, b], res, alpha=0.5)
    assert (outputs(mid, x) - outputs(a, x)).abs().max() > 1e-4

"""align(): permuted copies recovered, N-model consistency, objective vs weight matching, errors."""

import copy

import numpy as np
import pytest
import torch
from fusion_zoo import make, traced

from qapfuse.fusion import Alignment, SpecError, align, permute, random_permutations, trace
from qapfuse.fusion.models import MLP

FAST = {"tau0": 0.5, "tau_min": 0.05, "decay": 0.5, "max_inner": 5}  # a short schedule
METHODS = ("gamf", "weight", "merge_many", "c2m3")


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _common(models, spec, res):
    return [permute(m, spec, p) for m, p in zip(models, res.perms)]


def _options(method):
    return FAST if method == "gamf" else {}


@pytest.mark.parametrize("name", ["mlp", "lenet", "vgg11_bn", "resnet20", "convln"])
@pytest.mark.parametrize("method", METHODS)
def test_permuted_copy_is_aligned_exactly(name, method):
    model, _ = make(name)
    spec = traced(name)
    copy_ = permute(model, spec, random_permutations(spec, rng=3))
    res = align([model, copy_], method=method, spec=spec, rng=0, **_options(method))
    a, b = _common([model.state_dict(), copy_], spec, res)
    assert _same(a, b)
    assert isinstance(res, Alignment) and res.method == method
    if method == "gamf":  # the annealing itself found it, not only the identity start's polish
        assert res.info["candidates"]["annealed"] == pytest.approx(res.objective)


@pytest.mark.parametrize("kernel", ["gaussian", "node"])
@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_second_order_kernels_align_a_permuted_copy(name, kernel):
    model, _ = make(name)
    spec = traced(name)
    copy_ = permute(model, spec, random_permutations(spec, rng=4))
    res = align([model, copy_], kernel=kernel, spec=spec, rng=0, **FAST)
    assert _same(*_common([model.state_dict(), copy_], spec, res))
    assert res.kernel == kernel
    assert res.info["candidates"]["annealed"] == pytest.approx(res.objective)


def test_none_is_the_identity_and_scores_lower_on_a_shuffled_copy():
    model, _ = make("mlp")
    spec = traced("mlp")
    copy_ = permute(model, spec, random_permutations(spec, rng=5))
    none = align([model, copy_], method="none", spec=spec)
    assert all(np.array_equal(p, np.arange(p.size)) for d in none.perms for p in d.values())
    assert align([model, copy_], spec=spec, rng=0, **FAST).objective > none.objective


@pytest.mark.parametrize("method", METHODS)
def test_three_shuffled_copies_are_aligned_together(method):
    model, _ = make("mlp")
    spec = traced("mlp")
    models = [model.state_dict()] + [
        permute(model, spec, random_permutations(spec, rng=s)) for s in (6, 7)
    ]
    res = align(models, method=method, spec=spec, rng=0, **_options(method))
    common = _common(models, spec, res)
    assert _same(common[0], common[1]) and _same(common[0], common[2])


@pytest.mark.parametrize("method", METHODS)
def test_n_model_alignment_is_cycle_consistent(method):
    torch.manual_seed(0)
    models = [MLP(6, (5, 4), 3) for _ in range(3)]
    spec = trace(models[0], torch.zeros(1, 6))
    res = align(models, method=method, spec=spec, rng=0, **_options(method))

    def pair(p, q, g):  # channel of q matched to each channel of p
        match = np.empty(spec.sizes[g], dtype=np.int64)
        match[res.perms[p][g]] = res.perms[q][g]
        return match

    for g in spec.free_groups:
        for p in range(3):
            assert np.array_equal(np.sort(res.perms[p][g]), np.arange(spec.sizes[g]))
        assert np.array_equal(pair(1, 2, g)[pair(0, 1, g)], pair(0, 2, g))


@pytest.mark.parametrize("seed", range(12))
def test_gamf_inner_objective_is_at_least_weight_matchings_with_the_same_seed(seed):
    # a short schedule, so that on some seeds (8 here) the annealed candidate is the worse one
    torch.manual_seed(seed)
    a, b = MLP(12, (10, 8), 4), MLP(12, (10, 8), 4)
    spec = trace(a, torch.zeros(1, 12))
    g = align([a, b], spec=spec, rng=seed, tau_min=0.05)
    w = align([a, b], method="weight", spec=spec, rng=seed)
    # gamf's identity candidate is weight matching itself: same seed, same block orders
    assert g.info["candidates"]["identity"] == pytest.approx(w.objective, rel=1e-12)
    assert g.objective >= w.objective


@pytest.mark.parametrize("name", ["mlp", "resnet20"])
def test_identity_start_keeps_nearby_models_in_order_in_one_stage(name):
    # models that trained a little from one start (federated clients after a round)
    model, _ = make(name)
    spec = traced(name)
    gen = torch.Generator().manual_seed(0)
    models = [
        {k: v + 1e-3 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
         for k, v in model.state_dict().items()}
        for _ in range(3)
    ]  # fmt: skip
    warm = align(models, spec=spec, rng=0, start="identity")
    cold = align(models, spec=spec, rng=0, **FAST)
    assert all(np.array_equal(p, np.arange(p.size)) for d in warm.perms for p in d.values())
    assert warm.objective == pytest.approx(cold.objective, rel=1e-12)
    assert warm.n_iter <= 10  # one temperature (tau_min) of at most max_inner steps
    assert "identity" not in warm.info["candidates"]  # the same start is polished once


def test_inputs_are_not_modified():
    model, _ = make("mlp")
    spec = traced("mlp")
    copy_ = permute(model, spec, random_permutations(spec, rng=1))
    before = [copy.deepcopy(model.state_dict()), {k: v.clone() for k, v in copy_.items()}]
    align([model, copy_], spec=spec, rng=0, **FAST)
    assert _same(model.state_dict(), before[0]) and _same(copy_, before[1])


def test_traces_with_example_input():
    model, x = make("mlp")
    res = align([model, copy.deepcopy(model)], example_input=x, method="weight")
    assert res.spec == traced("mlp")


def test_errors_name_the_argument():
    model, _ = make("mlp")
    spec = traced("mlp")
    two = [model, copy.deepcopy(model)]
    with pytest.raises(ValueError, match=r"'method' parameter of align.*Did you mean 'gamf'"):
        align(two, spec=spec, method="gamf2")
    with pytest.raises(ValueError, match="'kernel' parameter of align"):
        align(two, spec=spec, kernel="gauss")
    with pytest.raises(TypeError, match=r"unknown option.*'tau00' \(did you mean 'tau0'\?\)"):
        align(two, spec=spec, tau00=1.0)
    with pytest.raises(TypeError, match=r"unknown option.*'tau0'"):
        align(two, spec=spec, method="weight", tau0=1.0)
    with pytest.raises(ValueError, match="'tau0' parameter of align must be a float > 0"):
        align(two, spec=spec, tau0=-1.0)
    with pytest.raises(ValueError, match="'start' parameter of align"):
        align(two, spec=spec, start="random")
    with pytest.raises(ValueError, match="at least 2 models"):
        align([model], spec=spec)
    with pytest.raises(ValueError, match="'spec' or an 'example_input'"):
        align(two)
    for bad in ([1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]):
        with pytest.raises(ValueError, match="'weights' parameter of align"):
            align(two, spec=spec, weights=bad)
    wide = MLP(20, (9, 6), 3)
    with pytest.raises(SpecError, match=r"'layers.0.weight'.*\(9, 20\).*\(8, 20\)"):
        align([model, wide], spec=spec)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["layers.2.bias"][1] = float("nan")
    with pytest.raises(ValueError, match=r"models\[1\]\['layers.2.bias'\] .* NaN or Inf"):
        align([model, sd], spec=spec)
    with pytest.raises(TypeError, match="'models' parameter of align"):
        align(model, spec=spec)


def test_gaussian_on_large_conv_edges_refuses_with_the_budget():
    model, _ = make("lenet")
    with pytest.raises(
        ValueError,
        match=r"'conv1.weight'.*needs 16 kernel values.*max_kernel_evals=10.*"
        r"To fix: use kernel='inner' or 'node'.*raise max_kernel_evals",
    ):
        align([model, model], spec=traced("lenet"), kernel="gaussian", max_kernel_evals=10)


def test_progress_bar_goes_to_stderr_and_can_be_switched_off(capsys):
    model, _ = make("mlp")
    two = [model, copy.deepcopy(model)]
    align(two, spec=traced("mlp"), progress=True, **FAST)
    assert "align gamf" in capsys.readouterr().err
    align(two, spec=traced("mlp"), progress=False, **FAST)
    assert capsys.readouterr().err == ""


def test_activation_method_dispatches_to_activation_matching():
    model, _ = make("mlp")
    spec = traced("mlp")
    shuffled = copy.deepcopy(model)
    shuffled.load_state_dict(permute(model, spec, random_permutations(spec, rng=2)))
    res = align([model, shuffled], method="activation", spec=spec, data=torch.randn(64, 20))
    assert res.method == "activation"
    assert _same(*_common([model.state_dict(), shuffled], spec, res))


def test_kernel_options_score_every_method_and_method_options_reach_the_method():
    model, _ = make("mlp")
    spec = traced("mlp")
    other = copy.deepcopy(model)
    other.load_state_dict(permute(model, spec, random_permutations(spec, rng=2)))
    kw = {"method": "activation", "spec": spec, "data": torch.randn(64, 20), "kernel": "gaussian"}
    res = align([model, other], sigma=0.5, max_samples=32, **kw)
    assert set(res.info["sigma"].values()) == {0.5}
    # the objective is the Gaussian one at sigma 0.5: "none" on the aligned pair agrees
    back = permute(other, spec, res.perms[1])
    same = align([model, back], method="none", spec=spec, kernel="gaussian", sigma=0.5)
    assert res.objective == pytest.approx(same.objective, rel=1e-12)
    with pytest.raises(ValueError, match="max_terms=1"):
        align([model, other], max_terms=1, **kw)
    with pytest.raises(TypeError, match="restarts"):
        align([model, other], restarts=2, **kw)  # weight matching's option, not activation's


def test_float32_products_give_the_same_alignment():
    model, _ = make("lenet")
    spec = traced("lenet")
    shuffled = permute(model, spec, random_permutations(spec, rng=8))
    r64 = align([model, shuffled], spec=spec, rng=0, **FAST)
    r32 = align([model, shuffled], spec=spec, rng=0, precision="float32", **FAST)
    assert all(np.array_equal(r64.perms[1][g], r32.perms[1][g]) for g in r64.perms[1])
    assert r32.objective == pytest.approx(r64.objective, rel=1e-5)


def test_default_precision_is_float32_only_above_a_million_parameters():
    torch.manual_seed(0)
    big = [MLP(1000, (1000,), 10) for _ in range(2)]  # 1,011,010 parameters
    small = [MLP(6, (5,), 3) for _ in range(2)]
    assert sum(p.numel() for p in big[0].parameters()) > 1_000_000
    spec_big = trace(big[0], torch.zeros(1, 1000))
    spec_small = trace(small[0], torch.zeros(1, 6))
    r32 = align(big, method="none", spec=spec_big)
    r64 = align(big, method="none", spec=spec_big, precision="float64")
    assert (r32.info["precision"], r64.info["precision"]) == ("float32", "float64")
    assert r32.objective == pytest.approx(r64.objective, rel=1e-5)
    assert align(small, method="none", spec=spec_small).info["precision"] == "float64"
    # the Gaussian expansion's error bound needs float64 at any size
    gauss = align(big, method="none", kernel="gaussian", spec=spec_big, sigma=1e3)
    assert gauss.info["precision"] == "float64"


def test_weights_scale_each_pair_of_the_objective():
    torch.manual_seed(1)
    models = [MLP(6, (5,), 3) for _ in range(3)]
    spec = trace(models[0], torch.zeros(1, 6))
    one = {
        (p, q): align([models[p], models[q]], method="none", spec=spec).objective
        for p, q in ((0, 1), (0, 2), (1, 2))
    }
    w = np.array([1.0, 2.0, 3.0])
    res = align(models, method="none", spec=spec, weights=w)
    w = w / w.mean()
    assert res.objective == pytest.approx(sum(w[p] * w[q] * v for (p, q), v in one.items()))
    assert align(models, method="none", spec=spec).objective == pytest.approx(sum(one.values()))

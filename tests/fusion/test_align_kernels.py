"""Edge kernels of the network QAP: the Gaussian expansion's bound, the exact sums, sigma."""

import numpy as np
import pytest
import torch

from qapfuse.fusion import align, permute, random_permutations, trace
from qapfuse.fusion._kernels import (
    ExactGaussianPair,
    gaussian_features,
    median_sigma,
)
from qapfuse.fusion.models import MLP


def _edges(seed, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3


def _factorised(Fp, Fq, Y):
    """``sum_{j,b,t} Fp[i, j, t] Y[j, b] Fq[a, b, t]``: the kernel product through features."""
    return torch.einsum("ijt,jb,abt->ia", Fp, Y, Fq)


def _brute(Wp, Wq, sigma, Y):
    d2 = ((Wp[:, :, None, None, :] - Wq[None, None, :, :, :]) ** 2).sum(-1)
    K = torch.exp(-d2 / sigma)
    return torch.einsum("ijab,jb->ia", K, Y), K


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_scalar_gaussian_expansion_is_within_its_stated_bound(tol):
    Wp, Wq = _edges(0, (7, 5, 1)), _edges(1, (7, 5, 1)) + 0.2
    sigma = median_sigma([Wp.reshape(-1, 1), Wq.reshape(-1, 1)])
    (Fp, Fq), T, bound = gaussian_features([Wp, Wq], sigma, tol, 500)
    assert bound <= tol and Fp.shape == (7, 5, T + 1)
    Y = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact, K = _brute(Wp, Wq, sigma, Y)
    approx = _factorised(Fp, Fq, Y)
    err = float((approx - exact).abs().max())
    assert err <= bound * float(Y.sum()) + 1e-12
    # and the expansion is not trivially exact: one order fewer breaks the bound
    if T > 1:
        lower = torch.einsum("ijt,abt->ijab", Fp[..., :-1], Fq[..., :-1])
        assert float((lower - K).abs().max()) > 0.0


def test_exact_gaussian_pair_matches_brute_force_in_both_directions():
    Wp, Wq = _edges(3, (6, 4, 9)), _edges(4, (6, 4, 9))
    pair = ExactGaussianPair(Wp, Wq, sigma=2.0)
    pair.rows = 2  # force several chunks
    Y = torch.rand(4, 4, dtype=torch.float64)
    Z = torch.rand(6, 6, dtype=torch.float64)
    exact, K = _brute(Wp, Wq, 2.0, Y)
    torch.testing.assert_close(pair.apply(Y), exact)
    torch.testing.assert_close(pair.apply_t(Z), torch.einsum("ijab,ia->jb", K, Z))


def test_median_sigma_is_the_median_of_cross_model_squared_distances():
    F = [_edges(s, (30, 3)) for s in range(3)]
    d2 = [
        ((F[p][:, None] - F[q][None]) ** 2).sum(-1).reshape(-1)
        for p in range(3)
        for q in range(p + 1, 3)
    ]
    assert median_sigma(F) == pytest.approx(float(torch.cat(d2).median()), rel=0.02)
    exact = float(np.median(torch.cat(d2).numpy()))
    assert median_sigma(F) == pytest.approx(exact, rel=1e-12)
    # sampled above max_pairs: deterministic and close
    s1, s2 = median_sigma(F, max_pairs=600), median_sigma(F, max_pairs=600)
    assert s1 == s2 and s1 == pytest.approx(exact, rel=0.15)
    assert median_sigma([torch.zeros(4, 1), torch.zeros(4, 1)]) == 1.0


def test_expansion_refuses_past_max_terms():
    W = [_edges(0, (4, 4, 1)), _edges(1, (4, 4, 1))]
    with pytest.raises(ValueError, match="max_terms=3"):
        gaussian_features(W, 1e-3, 1e-8, 3)


def _heavy_tailed(seed, shape, outlier):
    """Edges like a trained layer's: small weights and one far outlier (z of about 200)."""
    W = _edges(seed, shape) * 0.1
    W[0, 0, 0] = outlier
    return W


def test_expansion_terms_follow_the_bound_for_any_weight_scale():
    # a trained MNIST MLP's layer had z = 180 (249 terms): the default must not give up
    Wp, Wq = _heavy_tailed(0, (6, 5, 1), 0.45), _heavy_tailed(1, (6, 5, 1), -0.4)
    sigma = median_sigma([Wp.reshape(-1, 1), Wq.reshape(-1, 1)])
    (Fp, Fq), T, bound = gaussian_features([Wp, Wq], sigma, 1e-6)
    assert T + 1 > 200 and bound <= 1e-6
    Y = torch.rand(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact, _ = _brute(Wp, Wq, sigma, Y)
    err = float((_factorised(Fp, Fq, Y) - exact).abs().max())
    assert err <= bound * float(Y.sum()) + 1e-12


def test_align_gaussian_default_handles_a_heavy_tailed_mlp():
    torch.manual_seed(0)
    a, b = MLP(5, (4,), 3), MLP(5, (4,), 3)
    with torch.no_grad():
        a.layers[0].weight[0, 0] = 40 * a.layers[0].weight.std()
    spec = trace(a, torch.zeros(1, 5))
    res = align([a, b], method="none", kernel="gaussian", spec=spec)
    assert res.info["terms"]["layers.0.weight"] > 200 and res.info["bound"] <= 1e-6


def test_expansion_refuses_past_its_memory_budget_and_says_what_to_change():
    W = [_edges(0, (4, 4, 1)), _edges(1, (4, 4, 1))]
    with pytest.raises(ValueError, match=r"max_expansion_bytes=100.*precision='float32'"):
        gaussian_features(W, 1e-2, 1e-8, max_bytes=100, name="'fc'")


@pytest.mark.parametrize("f", [1, 9])
def test_median_sigma_does_not_depend_on_the_channel_order(f):
    # sampled regime (more pairs than max_pairs): sigma must see the edges as a multiset
    W = [_edges(s, (12, 10, f)) for s in range(3)]
    g = torch.Generator().manual_seed(4)
    out, inp = torch.randperm(12, generator=g), torch.randperm(10, generator=g)
    shuffled = [W[0], W[1][out][:, inp], W[2][:, inp]]
    a = median_sigma([w.reshape(-1, f) for w in W], max_pairs=500)
    b = median_sigma([w.reshape(-1, f) for w in shuffled], max_pairs=500)
    assert a == b


def test_gaussian_sigmas_of_a_permuted_network_are_unchanged():
    torch.manual_seed(2)
    models = [MLP(40, (30,), 20) for _ in range(2)]  # 1200 edges per layer: sigma is sampled
    spec = trace(models[0], torch.zeros(1, 40))
    shuffled = permute(models[1], spec, random_permutations(spec, rng=5))
    opts = {"method": "none", "kernel": "gaussian", "spec": spec}
    ref = align(models, **opts).info["sigma"]
    assert align([models[0], shuffled], **opts).info["sigma"] == ref

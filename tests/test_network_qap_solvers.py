"""The block solvers on a generic block QAP (no networks): a dense K over two blocks."""

import itertools

import numpy as np
import pytest

from qapfuse.solvers._blocks import (
    BlockQAP,
    coordinate_ascent,
    coordinate_lap,
    frank_wolfe,
    solve_blocks,
)


class DenseBlocks(BlockQAP):
    """``score = z^T K z + <c, z>`` over ``z = [vec(X_0), vec(X_1)]``; K has zero diagonal blocks
    (so the score is affine in each block given the other)."""

    def __init__(self, sizes, seed, linear):
        rng = np.random.default_rng(seed)
        self.sizes = sizes
        self.offsets = np.cumsum([0] + [r * c for r, c in sizes])
        n = self.offsets[-1]
        K = rng.normal(size=(n, n))
        K = (K + K.T) / 2
        for a, b in zip(self.offsets[:-1], self.offsets[1:]):
            K[a:b, a:b] = 0.0
        self.K, self.c, self.linear = K, rng.normal(size=n), linear
        self.scores = 0

    def _z(self, X):
        return np.concatenate([np.asarray(x).ravel() for x in X])

    def score(self, X):
        self.scores += 1
        z = self._z(X)
        return float(z @ self.K @ z + self.c @ z)

    def gradient(self, X, blocks=None):
        g = 2 * self.K @ self._z(X) + self.c
        want = range(len(self.sizes)) if blocks is None else blocks
        out = [None] * len(self.sizes)
        for b in want:
            out[b] = g[self.offsets[b] : self.offsets[b + 1]].reshape(self.sizes[b])
        return out

    def is_linear(self, b):
        return self.linear


def _brute(op):
    perms = [list(itertools.permutations(range(r))) for r, _ in op.sizes]
    return max(
        op.score([np.eye(r)[list(p)] for p, (r, _) in zip(combo, op.sizes)])
        for combo in itertools.product(*perms)
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_solve_blocks_reaches_the_brute_force_optimum(seed):
    op = DenseBlocks([(3, 3), (4, 4)], seed, True)
    best = _brute(op)
    res = solve_blocks(op, rng=0)
    assert res.score == pytest.approx(best)
    assert res.score == pytest.approx(op.score(res.X))
    for r in (coordinate_lap(op, rng=0, restarts=4), frank_wolfe(op, max_sweeps=5)):
        assert r.score <= best + 1e-9 and r.score == pytest.approx(op.score(r.X))


def test_affine_blocks_skip_rescoring_with_the_same_result():
    lin, full = DenseBlocks([(3, 3), (4, 4)], 3, True), DenseBlocks([(3, 3), (4, 4)], 3, False)
    start = [np.eye(3), np.eye(4)]
    a = coordinate_ascent(lin, start, rng=np.random.default_rng(0))
    b = coordinate_ascent(full, start, rng=np.random.default_rng(0))
    assert lin.scores == 1 and full.scores > 1  # only the starting score, vs one per trial
    assert all(np.array_equal(x, y) for x, y in zip(a[0], b[0]))
    assert a[1] == pytest.approx(b[1]) and a[1] == pytest.approx(lin.score(a[0]))


def test_bad_start_is_refused():
    op = DenseBlocks([(3, 3), (4, 4)], 0, True)
    with pytest.raises(ValueError, match=r"Block 1 of the 'x0' parameter of solve_blocks"):
        solve_blocks(op, x0=[np.eye(3), np.eye(3)])
    with pytest.raises(ValueError, match=r"'tau_min' parameter of solve_blocks must be <= tau0"):
        solve_blocks(op, tau0=0.1, tau_min=0.2)
    with pytest.raises(ValueError, match=r"'restarts' parameter of coordinate_lap must be an int"):
        coordinate_lap(op, restarts=0)


def test_block_projection_in_threads_equals_one_thread(monkeypatch):
    # blocks large enough for the threaded projection; the same warm sequence of
    # temperatures through both paths gives identical plans
    from qapfuse.solvers import _blocks

    sizes = [(300, 300), (250, 250), (3, 5)]
    assert sum(r * c for r, c in sizes) >= _blocks._PARALLEL_ENTRIES
    rng = np.random.default_rng(0)
    G = [rng.normal(size=s) for s in sizes]
    monkeypatch.setattr(_blocks.os, "cpu_count", lambda: 2)  # threads even on one core
    threaded = _blocks._BlockSinkhorn(sizes, sk_iter=50)
    serial = _blocks._BlockSinkhorn(sizes, sk_iter=50)
    serial.close()
    serial.pool = None
    assert threaded.pool is not None
    try:
        for tau in (0.5, 0.1, 0.02):
            for a, b in zip(threaded(G, tau), serial(G, tau)):
                np.testing.assert_array_equal(a, b)
    finally:
        threaded.close()

"""Option tables against signatures, the one unknown-option message, rng types, warnings."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest

import qapfuse
from qapfuse import ConvergenceWarning, Problem, solve
from qapfuse._validation import Option, options_of, validate_options, warn_not_converged
from qapfuse.backend import namespace_of, rng_from
from qapfuse.solvers import METHODS, multi

# Every public solver beyond solve's registry; each is decorated with validate_options and
# carries its own table.
_TABLES = {
    "two_opt": (qapfuse.two_opt, None),
    "tabu": (qapfuse.tabu, None),
    "auto": (qapfuse.auto, None),
    "sinkhorn": (qapfuse.sinkhorn, None),
    "match_with_outliers": (qapfuse.match_with_outliers, None),
    "gamgm_affinity": (multi.gamgm_affinity, None),
    "gamgm": (multi.gamgm, None),
}


def _public_solvers():
    solvers = {name: (m.func, m.options) for name, m in METHODS.items()}
    solvers.update(_TABLES)
    return solvers


def _keyword_only(func) -> list[str]:
    params = inspect.signature(func).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


@pytest.mark.parametrize("name", sorted(_public_solvers()))
def test_every_public_solver_declares_exactly_its_keyword_options(name):
    func, table = _public_solvers()[name]
    try:
        table = options_of(func)  # a decorated function: its own table wins
    except TypeError:
        assert table is not None, f"{name} declares no option table"
    assert sorted(table) == sorted(_keyword_only(func))
    for option in _keyword_only(func):
        default = inspect.signature(func).parameters[option].default
        if default is None:
            assert table[option].allow_none, option


def test_the_solve_registry_uses_each_methods_own_table():
    for name, method in METHODS.items():
        try:
            assert method.options is options_of(method.func), name
        except TypeError:  # not decorated yet (see _TABLES)
            assert sorted(method.options) == sorted(_keyword_only(method.func)), name


def test_a_table_that_disagrees_with_the_signature_fails_at_definition():
    with pytest.raises(TypeError, match=r"without a constraint: \['tol'\]"):

        @validate_options({})
        def f(x, *, tol=1e-3):
            return x

    with pytest.raises(TypeError, match=r"not in the signature: \['tau'\]"):

        @validate_options({"tol": Option("float"), "tau": Option("float")})
        def g(x, *, tol=1e-3):
            return x

    with pytest.raises(TypeError, match=r"'x0' of h defaults to None.*allow_none=True"):

        @validate_options({"x0": Option("array")})
        def h(p, *, x0=None):
            return p


def test_decorated_functions_check_values_and_keep_their_signature():
    @validate_options({"n": Option("int", low=1), "tau": Option("float", low=0)})
    def f(x, *, n=3, tau=0.5):
        """Docstring."""
        return n, tau

    assert f(0, n=np.int64(4)) == (4, 0.5)
    assert type(f(0, n=np.int64(4))[0]) is int
    assert list(inspect.signature(f).parameters) == ["x", "n", "tau"]
    assert f.__doc__ == "Docstring."
    with pytest.raises(ValueError, match=r"The 'n' parameter of f must be an int >= 1"):
        f(0, n=0)


@pytest.mark.parametrize(
    ("call", "typo", "meant"),
    [
        (lambda p: qapfuse.rrwm(p, max_itre=3), "max_itre", "max_iter"),
        (lambda p: qapfuse.ipfp(p, max_itre=3), "max_itre", "max_iter"),
        (lambda p: qapfuse.sm(p, max_itre=3), "max_itre", "max_iter"),
        (lambda p: solve(p, "rrwm", max_itre=3), "max_itre", "max_iter"),
        (lambda p: qapfuse.ga(p, max_iner=3), "max_iner", "max_inner"),
        (lambda p: qapfuse.match_with_outliers(p, max_iner=3), "max_iner", "max_inner"),
    ],
)
def test_misspelt_options_get_one_message_with_a_suggestion(call, typo, meant):
    p = Problem.koopmans_beckmann(np.eye(3), np.eye(3))
    with pytest.raises(
        TypeError, match=rf"unknown option\(s\) '{typo}' \(did you mean '{meant}'\?\)"
    ):
        call(p)


@pytest.mark.parametrize("method", ["rrwm", "ipfp", "sm"])
def test_deterministic_methods_take_no_rng_but_solve_passes_one_only_where_used(method):
    p = Problem.koopmans_beckmann(np.eye(4), np.eye(4)[[1, 2, 3, 0]][:, [1, 2, 3, 0]])
    with pytest.raises(TypeError, match=r"unknown option\(s\) 'rng'"):
        getattr(qapfuse, method)(p, rng=0)
    assert not METHODS[method].random
    a = solve(p, method, rng=0, restarts=3)  # rng draws the restarts' starts
    b = solve(p, method, rng=0, restarts=3)
    np.testing.assert_array_equal(a.X, b.X)


def test_a_torch_generator_is_one_more_seed():
    torch = pytest.importorskip("torch")
    a = rng_from(torch.Generator().manual_seed(3)).random(4)
    b = rng_from(torch.Generator().manual_seed(3)).random(4)
    c = rng_from(torch.Generator().manual_seed(4)).random(4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    rng = np.random.default_rng(0)
    p = Problem.koopmans_beckmann(rng.random((7, 7)), rng.random((7, 7)), sense="min")
    runs = [solve(p, "tabu", rng=torch.Generator().manual_seed(1)) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].X, runs[1].X)


def test_convergence_warnings_point_past_every_qapfuse_frame():
    def inner():
        warn_not_converged("slow")

    with pytest.warns(ConvergenceWarning, match="slow") as rec:
        inner()
    assert rec[0].filename == __file__
    rng = np.random.default_rng(5)
    p = Problem.koopmans_beckmann(rng.random((6, 6)), rng.random((6, 6)))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        qapfuse.sm(p, max_iter=1)  # through the validate_options wrapper
    assert [w.filename for w in rec] == [__file__]


def test_arguments_left_at_none_are_left_out_of_library_errors():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError) as info:
        namespace_of(np.eye(2), None, torch.eye(2), name="A, W, L")
    assert str(info.value).startswith("`A, L` must be arrays of one library")
    assert "NoneType" not in str(info.value)


@pytest.mark.parametrize(
    ("call", "caller"),
    [
        (lambda: Problem.from_dense(np.eye(4), 2, 2, sence="min"), "Problem.from_dense"),
        (lambda: Problem.from_sparse(np.eye(4), sence="min"), "Problem.from_sparse"),
        (lambda: Problem.koopmans_beckmann(np.eye(2), np.eye(2), sence="min"), "Problem"),
    ],
)
def test_problem_constructors_give_the_same_unknown_option_message(call, caller):
    with pytest.raises(TypeError, match=rf"^{caller}.* 'sence' \(did you mean 'sense'\?\)"):
        call()

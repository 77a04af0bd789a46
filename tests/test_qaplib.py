"""QAPLIB I/O: every shipped optimum re-scores exactly, and malformed files fail clearly."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from qapfuse import Problem
from qapfuse.io import qaplib

SHARED = Path(__file__).resolve().parents[2] / "shared" / "qaplib"
NO_SHARED = f"shared QAPLIB set not found at {SHARED} (a sibling folder of the repository)"


def _index() -> list[dict[str, str]]:
    if not (SHARED / "index.csv").is_file():
        return []
    with open(SHARED / "index.csv", newline="") as fh:
        return list(csv.DictReader(fh))


INDEX = _index()
needs_shared = pytest.mark.skipif(not INDEX, reason=NO_SHARED)


def _write(tmp_path: Path, name: str, text: str, *, newline: str = "\n") -> Path:
    path = tmp_path / name
    path.write_bytes(text.replace("\n", newline).encode())
    return path


# A hand-made 3x3 instance. Identity: sum_ij A[i,j] * B[i,j]
#   = 0*0 + 1*5 + 2*6 + 3*7 + 0*0 + 4*8 + 5*9 + 6*1 + 0*0 = 5 + 12 + 21 + 32 + 45 + 6 = 121.
A3 = np.array([[0, 1, 2], [3, 0, 4], [5, 6, 0]])
B3 = np.array([[0, 5, 6], [7, 0, 8], [9, 1, 0]])
DAT3 = "3\n\n0 1 2\n3 0 4\n5 6 0\n\n0 5 6\n7 0 8\n9 1 0\n"


# ----------------------------------------------------------------------------------------------
# The 58-instance development set
# ----------------------------------------------------------------------------------------------


@needs_shared
def test_index_lists_58_instances_with_files():
    assert len(INDEX) == 58
    for row in INDEX:
        assert (SHARED / f"{row['name']}.dat").is_file()
        assert (SHARED / f"{row['name']}.sln").is_file()


@pytest.mark.parametrize("row", INDEX or [None], ids=[r["name"] for r in INDEX] or ["absent"])
def test_every_sln_rescores_to_header_and_index(row):
    if row is None:
        pytest.skip(NO_SHARED)
    name = row["name"]
    A, B = qaplib.read_dat(SHARED / f"{name}.dat")
    n, value, perm = qaplib.read_sln(SHARED / f"{name}.sln")
    assert A.shape == B.shape == (int(row["n"]),) * 2 == (n, n)
    assert A.dtype == B.dtype == np.int64
    assert perm.min() == 0 and perm.max() == n - 1  # 0-indexed
    got = qaplib.objective(A, B, perm)
    assert isinstance(got, int)
    assert got == value == int(row["best_known"])
    # same value the slow, obvious way (no fancy indexing)
    if n <= 30:
        assert (
            sum(int(A[i, j]) * int(B[perm[i], perm[j]]) for i in range(n) for j in range(n)) == got
        )
    # load_instance finds the .sln beside the .dat and agrees
    inst = qaplib.load_instance(SHARED / f"{name}.dat")
    assert inst.name == name and inst.n == n
    assert inst.best_known == int(row["best_known"]) and isinstance(inst.best_known, int)
    np.testing.assert_array_equal(inst.best_perm, perm)


@needs_shared
@pytest.mark.parametrize("name", qaplib.list_examples())
def test_packaged_examples_match_shared_copies(name):
    for ext in (".dat", ".sln"):
        packaged = qaplib.example_path(name).with_suffix(ext).read_bytes()
        assert packaged == (SHARED / f"{name}{ext}").read_bytes(), f"{name}{ext} differs"


def test_examples_are_listed_and_loadable():
    names = qaplib.list_examples()
    assert {"nug12", "nug20"} <= set(names)
    for name in names:
        inst = qaplib.load_instance(qaplib.example_path(name))
        assert inst.best_known is not None
        assert inst.objective(inst.best_perm) == inst.best_known


def test_example_path_accepts_suffix_and_suggests_for_typos():
    assert qaplib.example_path("nug12.dat") == qaplib.example_path("nug12")
    with pytest.raises(ValueError, match=r"Unknown example 'nug13'.*Did you mean 'nug12'"):
        qaplib.example_path("nug13")
    with pytest.raises(ValueError, match="Unknown example"):
        qaplib.example_path("../qaplib/nug12")


def test_problem_from_qaplib_scores_like_objective():
    path = qaplib.example_path("tai12a")
    inst = qaplib.load_instance(path)
    problem = Problem.from_qaplib(path)
    assert problem.sense == "min" and problem.best_known == inst.best_known == 224416
    X = np.eye(inst.n)[inst.best_perm][None]  # X[i, p(i)] = 1
    score = float(np.asarray(problem.score(X))[0])
    assert problem.objective_from_score(score) == pytest.approx(inst.best_known)


# ----------------------------------------------------------------------------------------------
# Objective and gap
# ----------------------------------------------------------------------------------------------


def test_objective_of_identity_on_hand_made_instance():
    assert qaplib.objective(A3, B3, [0, 1, 2]) == 121


def test_objective_matches_brute_force_definition():
    # p = [2, 0, 1]: sum_ij A[i,j] B[p(i), p(j)]
    p = [2, 0, 1]
    Bp = np.array(
        [[B3[p[i], p[j]] for j in range(3)] for i in range(3)]
    )  # [[0,9,1],[6,0,5],[8,7,0]]
    np.testing.assert_array_equal(Bp, [[0, 9, 1], [6, 0, 5], [8, 7, 0]])
    assert qaplib.objective(A3, B3, p) == 0 + 9 + 2 + 18 + 0 + 20 + 40 + 42 + 0 == 131
    values = {tuple(q): qaplib.objective(A3, B3, q) for q in itertools.permutations(range(3))}
    assert min(values.values()) <= 121 <= max(values.values())


def test_objective_float_matrices_give_float():
    assert qaplib.objective(A3 * 0.5, B3, [0, 1, 2]) == pytest.approx(60.5)


@pytest.mark.parametrize(
    ("perm", "match"),
    [
        ([0, 1], r"length n = 3; got shape \(2,\)"),
        ([0, 1, 1], r"permutation of 0\.\.2"),
        ([1, 2, 3], r"looks 1-indexed"),
        ([0.0, 1.0, 2.0], "integers"),
    ],
)
def test_objective_rejects_non_permutations(perm, match):
    with pytest.raises(ValueError, match=match):
        qaplib.objective(A3, B3, perm)


def test_objective_rejects_bad_matrices():
    with pytest.raises(ValueError, match=r"`A` must be a square matrix.*\(2, 3\)"):
        qaplib.objective(np.zeros((2, 3)), B3, [0, 1, 2])
    with pytest.raises(ValueError, match="one size"):
        qaplib.objective(A3, np.zeros((2, 2)), [0, 1, 2])


def test_relative_gap_arithmetic():
    assert qaplib.relative_gap(2570, 2570) == 0.0
    assert qaplib.relative_gap(2596, 2570) == pytest.approx(26 / 2570)
    assert qaplib.relative_gap(2544, 2570) == pytest.approx(-26 / 2570)
    assert qaplib.relative_gap(-90, -100) == pytest.approx(0.1)  # divides by |best|
    assert qaplib.relative_gap(0, 0) == 0.0
    assert qaplib.relative_gap(3, 0) == math.inf
    assert qaplib.relative_gap(-3, 0) == -math.inf
    with pytest.raises(TypeError, match="'value' parameter of relative_gap"):
        qaplib.relative_gap("1", 2)
    with pytest.raises(ValueError, match=r"'best_known'.*finite"):
        qaplib.relative_gap(1, math.nan)


# ----------------------------------------------------------------------------------------------
# Layout variations
# ----------------------------------------------------------------------------------------------

LAYOUTS = {
    "one_line": lambda s: " ".join(s.split()) + "\n",
    "crlf": lambda s: s.replace("\n", "\r\n"),
    "tabs": lambda s: "\n".join("\t".join(line.split()) for line in s.split("\n")),
    "blank_lines_and_indent": lambda s: "\n\n   " + s.replace("\n", "\n\n  \t\n   ") + "\n\n",
    "one_number_per_line": lambda s: "\n".join(s.split()),
    "no_final_newline": lambda s: s.rstrip("\n"),
    "old_mac_cr": lambda s: s.replace("\n", "\r"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_dat_layouts_parse_identically(tmp_path, layout):
    A, B = qaplib.read_dat(_write(tmp_path, "x.dat", LAYOUTS[layout](DAT3)))
    np.testing.assert_array_equal(A, A3)
    np.testing.assert_array_equal(B, B3)
    assert A.dtype == np.int64


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sln_layouts_parse_identically(tmp_path, layout):
    text = LAYOUTS[layout]("3 121\n1\n2 3\n")
    n, value, perm = qaplib.read_sln(_write(tmp_path, "x.sln", text))
    assert (n, value) == (3, 121)
    np.testing.assert_array_equal(perm, [0, 1, 2])


@needs_shared
def test_real_instance_survives_relayout(tmp_path):
    text = (SHARED / "had12.dat").read_text()
    A0, B0 = qaplib.read_dat(SHARED / "had12.dat")
    for layout, f in LAYOUTS.items():
        A, B = qaplib.read_dat(_write(tmp_path, f"{layout}.dat", f(text)))
        np.testing.assert_array_equal(A, A0, err_msg=layout)
        np.testing.assert_array_equal(B, B0, err_msg=layout)


def test_decimals_give_float_arrays(tmp_path):
    A, B = qaplib.read_dat(_write(tmp_path, "f.dat", DAT3.replace("4", "4.5")))
    assert A.dtype == B.dtype == np.float64
    assert A[1, 2] == 4.5


def test_load_instance_finds_sln_beside_and_respects_sln_argument(tmp_path):
    dat = _write(tmp_path, "tiny.dat", DAT3)
    inst = qaplib.load_instance(dat)
    assert inst.best_known is None and inst.best_perm is None and inst.sln_path is None
    _write(tmp_path, "tiny.sln", "3 121\n1 2 3\n")
    inst = qaplib.load_instance(dat)
    assert inst.name == "tiny" and inst.n == 3 and inst.best_known == 121
    assert isinstance(inst.best_known, int)  # QAPLIB values are integers: kept as such
    np.testing.assert_array_equal(inst.best_perm, [0, 1, 2])
    assert inst.path == dat and inst.sln_path == tmp_path / "tiny.sln"
    other = _write(tmp_path, "other.sln", "3 131\n3 1 2\n")
    assert qaplib.load_instance(dat, sln=other).best_known == 131.0
    assert qaplib.load_instance(dat, sln=False).best_known is None
    with pytest.raises(FileNotFoundError, match=r"missing\.sln"):
        qaplib.load_instance(dat, sln=tmp_path / "missing.sln")


# ----------------------------------------------------------------------------------------------
# Malformed files: ValueError naming the file and the line
# ----------------------------------------------------------------------------------------------


def test_truncated_dat(tmp_path):
    path = _write(tmp_path, "trunc.dat", DAT3.rsplit("9", 1)[0])  # drop "9 1 0"
    with pytest.raises(
        ValueError,
        match=r"trunc\.dat: file is truncated: expected 2\*n\*n = 18 numbers after n, "
        r"found 15; file ends at line 8",
    ):
        qaplib.read_dat(path)


def test_non_integer_token_reports_its_line(tmp_path):
    path = _write(tmp_path, "bad.dat", DAT3.replace("3 0 4", "3 x 4"))
    with pytest.raises(ValueError, match=r"bad\.dat: line 4: expected a number .* found 'x'"):
        qaplib.read_dat(path)
    path = _write(tmp_path, "bad2.dat", DAT3.replace("7 0 8", "7 0 8,"), newline="\r\n")
    with pytest.raises(ValueError, match=r"line 8: .*found '8,'"):
        qaplib.read_dat(path)


def test_extra_tokens_report_their_line(tmp_path):
    path = _write(tmp_path, "extra.dat", DAT3 + "\n\n42 43\n")
    with pytest.raises(
        ValueError, match=r"extra\.dat: line 12: unexpected extra token '42'.*2 extra tokens"
    ):
        qaplib.read_dat(path)


def test_n_best_known_header_variant_gets_a_hint(tmp_path):
    path = _write(tmp_path, "plma.dat", DAT3.replace("3\n", "3 121\n", 1))
    with pytest.raises(ValueError, match=r"line 9: unexpected extra token '0'.*'n best_known'"):
        qaplib.read_dat(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", r"file is empty"),
        ("\n  \n", r"file is empty"),
        ("0\n", r"line 1: n \(the first number\) must be a positive integer; found '0'"),
        ("\n-3\n", r"line 2: n .* must be a positive integer; found '-3'"),
        ("2.5\n1 2", r"line 1: n .* positive integer; found '2.5'"),
        ("abc", r"line 1: n .* positive integer; found 'abc'"),
    ],
)
def test_bad_n(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        qaplib.read_dat(_write(tmp_path, "n.dat", text))


def test_binary_file_is_refused(tmp_path):
    path = tmp_path / "bin.dat"
    path.write_bytes(b"\xff\xfe\x00\x01")
    with pytest.raises(ValueError, match=r"bin\.dat: not a text file"):
        qaplib.read_dat(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (
            "3 121\n1 2\n",
            r"truncated: expected n = 3 permutation entries .* found 2; "
            r"file ends at line 2",
        ),
        ("3 121\n1 2 3\n4\n", r"line 3: unexpected extra token '4'"),
        ("3 121\n1 2\n2\n", r"line 3: not a permutation of 1\.\.3: 2 appears twice .*missing: 3"),
        ("3 121\n1 2 4\n", r"line 2: permutation entry 3 is 4, outside 1\.\.3"),
        ("3 121\n0 1 2\n", r"line 2: .*outside 1\.\.3.*looks 0-indexed"),
        ("3 121\n1\n2.0 3\n", r"line 3: permutation entries must be integers .* found '2.0'"),
        ("121\n", r"line 1: the header must be 'n value'; found only '121'"),
        ("6124\n1 2 3\n", r"expected n = 6124 .*found 2.*header must hold both n and the value"),
        ("3 x\n1 2 3\n", r"line 1: expected a number in the header"),
        ("0 0\n", r"line 1: n .* positive integer; found '0'"),
        ("", r"file is empty"),
    ],
)
def test_bad_sln(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        qaplib.read_sln(_write(tmp_path, "bad.sln", text))


def test_sln_disagreeing_with_dat(tmp_path):
    dat = _write(tmp_path, "tiny.dat", DAT3)
    wrong_n = _write(tmp_path, "n.sln", "4 121\n1 2 3 4\n")
    with pytest.raises(ValueError, match=r"n\.sln: line 1: n = 4 .* disagrees with n = 3"):
        qaplib.load_instance(dat, sln=wrong_n)
    wrong_value = _write(tmp_path, "v.sln", "3 120\n1 2 3\n")
    with pytest.raises(ValueError, match=r"v\.sln: line 1: stated value 120 .* objective 121"):
        qaplib.load_instance(dat, sln=wrong_value)
    # p = [2, 3, 1] has value 131 and its inverse [3, 1, 2] has another: flag the inversion.
    inverse = qaplib.objective(A3, B3, np.argsort([1, 2, 0]))
    assert inverse != qaplib.objective(A3, B3, [1, 2, 0])
    stored_inverted = _write(tmp_path, "i.sln", f"3 {inverse}\n2 3 1\n")
    with pytest.raises(ValueError, match="inverse permutation gives the stated value"):
        qaplib.load_instance(dat, sln=stored_inverted)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        qaplib.read_dat(tmp_path / "nope.dat")

"""Shared fixtures: array namespaces, tiny brute-force helpers, data locations."""

from __future__ import annotations

from pathlib import Path

import pytest
from array_api_compat import array_namespace

SHARED = Path(__file__).resolve().parents[2] / "shared"
QAPLIB_DIR = SHARED / "qaplib"


@pytest.fixture(params=["numpy", "torch", "array_api_strict"])
def xp(request):
    """Every array library the core must serve (torch missing means a skip, not a failure)."""
    lib = pytest.importorskip(request.param)
    return array_namespace(lib.empty(0))


@pytest.fixture(params=["numpy", "torch"])
def xp_np_torch(request):
    lib = pytest.importorskip(request.param)
    return array_namespace(lib.empty(0))

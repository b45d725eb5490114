"""Test set-up: one ``device`` for the whole run, and tolerances that fit it.

With CUDA, tests build CUDA tensors and Triton compiles its kernels; without it they build CPU
tensors and Triton runs under the interpreter. TRITON_INTERPRET must be set before anything
imports triton: without a GPU, importing triton without it fails with "0 active drivers".
Tests marked ``gpu`` are skipped without CUDA (they run on a CUDA machine, e.g. by
``scripts/gpu_check.sh``).
"""
import os
from dataclasses import dataclass

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
if not ON_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# every core unless OMP_NUM_THREADS says otherwise (parallel slow runs use one thread each: two
# 2-thread processes on 2 cores make OpenMP spin-wait, several times slower)
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)))


@dataclass(frozen=True)
class Tol:
    """Tolerances of the Triton kernels against a float64 reference on one device.

    ``loss``: relative, for values that go through exp/log. Under the interpreter tl.exp/tl.log
    are numpy's (correctly rounded float32); compiled, they are ex2/lg2.approx (relative error
    ~2^-22 each, times the range reduction), so 1e-4 leaves a wide margin over float32 noise
    while still catching a wrong term (off by >= 1e-2 relative).
    ``grad``: fp32 gradient, relative to the largest reference entry (the same reason).
    ``tie_gap``: rows whose hardest positive/negative is within this fraction of the largest
    distance from the runner-up are near-ties; there the pick may differ but must be a tie within
    the gap. Compiled code fuses |a|^2+|b|^2-2ab into FMAs and reorders the D-reduction, which
    moves distances by ~1e-6 relative: the gap is ten times that.
    """

    loss: float
    grad: float
    tie_gap: float


CPU_TOL = Tol(loss=2e-5, grad=1e-4, tie_gap=1e-5)
CUDA_TOL = Tol(loss=1e-4, grad=2e-4, tie_gap=1e-5 * 10)


def _dali_missing() -> str | None:
    """Why NVIDIA DALI cannot be used here (None when it imports)."""
    from fastmmt.data.factory import _dali_import_error

    err = _dali_import_error()
    return None if err is None else f"{type(err).__name__}: {err}"


def pytest_collection_modifyitems(config, items):
    """Skip ``gpu`` tests without CUDA and ``dali`` tests without DALI (a GPU machine with no
    package registry may lack it), saying so: they are never counted as passed there."""
    skip_gpu = pytest.mark.skip(reason="gpu: needs a CUDA device (run scripts/gpu_check.sh on one)")
    dali_tests = [item for item in items if "dali" in item.keywords]
    missing = _dali_missing() if dali_tests else None
    skip_dali = pytest.mark.skip(reason=f"dali: NVIDIA DALI is not installed here ({missing})")
    for item in items:
        if "gpu" in item.keywords and not ON_CUDA:
            item.add_marker(skip_gpu)
        if missing is not None and "dali" in item.keywords:
            item.add_marker(skip_dali)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """CUDA (compiled kernels) when present, else CPU (Triton interpreter)."""
    return torch.device("cuda" if ON_CUDA else "cpu")


@pytest.fixture(scope="session")
def tol(device: torch.device) -> Tol:
    """Kernel tolerances for ``device``."""
    return CUDA_TOL if device.type == "cuda" else CPU_TOL


@pytest.fixture
def gen() -> torch.Generator:
    """A fresh random generator per test; the seed is printed, FASTMMT_TEST_SEED pins it."""
    seed = int(os.environ.get("FASTMMT_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"seed={seed} (rerun with FASTMMT_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    """A finished tiny run (two pre-trained models, one k-means epoch) for the reliability tests
    (tests/reliability_env.py); tests copy what they change."""
    from reliability_env import build_env

    return build_env(tmp_path_factory.mktemp("tiny_run"))


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """The tiny synthetic source and target folders, made once per test session (read-only)."""
    from synthetic_fixtures import tiny_domain_folders

    return tiny_domain_folders(tmp_path_factory.mktemp("tiny_domains"))


@pytest.fixture
def restore_torch_globals():
    """Put back torch's thread count and deterministic mode after a test whose run sets them."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(det)

"""fastmmt.ops.compat (MMT's loss-module signatures) vs plain-torch implementations, fwd + bwd.

Run (quiet machine): .venv/bin/python -m pytest bench/bench_compat.py -q --benchmark-columns=min,median,mean,rounds
Smoke run (tiny rounds): FASTMMT_BENCH_QUICK=1 .venv/bin/python -m pytest bench/bench_compat.py -q -k "64"

Batch N = 64/128/256 as P x 4, D = 2048 features, K = 500 classes for the classification terms.
Each case times one module call (or MMT's pair of calls), forward + backward, for:
(a) ``plain``: the published formula written below in plain torch (a full distance matrix with
    gradient, mining by sorting, the smoothed target built as a dense matrix), timed inside every
    test so each row's ``extra_info`` carries ``speedup_vs_plain`` from the same run;
(b) ``torch``: the compat module with ``backend="torch"``;
(c) ``triton``: ``backend="triton"``, on a CUDA device only (the CPU interpreter is a correctness
    tool, not a speed one).
``soft_triplet_pair`` is MMT's use: ``SoftTripletLoss(margin=0)(f, f, y)`` and
``SoftTripletLoss(margin=None)(f, f_t, y)`` on the same student features, summed and
back-propagated once. Every timed call gets a fresh view of the features (a new tensor object,
as a new batch is), so the torch backend's mining is shared only between the two calls of one
step, never across steps. Ratios come from alternating calls of (a) and the variant (medians;
``..._min`` from minima), so a fluctuating load hits both alike; one intra-op thread.
"""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.nn.functional as F

from fastmmt.ops import compat

D, K = 2048, 500
NS = (64, 128, 256)
QUICK = os.environ.get("FASTMMT_BENCH_QUICK", "0") not in ("", "0")  # smoke run: few rounds
ROUNDS, REPS = (2, 3) if QUICK else (15, 11)


# ---- (a) plain torch, the published formulas ----------------------------------------------------
def plain_dist(x: torch.Tensor) -> torch.Tensor:
    sq = x.pow(2).sum(1, keepdim=True)
    return (sq + sq.t()).addmm(x, x.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()


def plain_mine(dist: torch.Tensor, labels: torch.Tensor):
    same = (labels.view(-1, 1) == labels.view(1, -1)).float()
    pos, ap = torch.sort(dist - 1e7 * (1 - same), dim=1, descending=True)
    neg, an = torch.sort(dist + 1e7 * same, dim=1)
    return pos[:, 0], neg[:, 0], ap[:, 0], an[:, 0]


def plain_ce(p: torch.Tensor, labels: torch.Tensor, num_classes: int = K, eps: float = 0.1) -> torch.Tensor:
    logp = F.log_softmax(p, dim=1)
    target = torch.zeros_like(logp).scatter_(1, labels.view(-1, 1), 1) * (1 - eps) + eps / num_classes
    return (-target * logp).mean(0).sum()


def plain_se(p: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    return (-F.softmax(p_t, dim=1).detach() * F.log_softmax(p, dim=1)).mean(0).sum()


def plain_triplet(f: torch.Tensor, labels: torch.Tensor, margin: float = 0.3):
    d_ap, d_an, _, _ = plain_mine(plain_dist(f), labels)
    loss = F.margin_ranking_loss(d_an, d_ap, torch.ones_like(d_ap), margin=margin)
    return loss, (d_an.detach() > d_ap.detach()).float().mean()


def plain_soft_triplet(f: torch.Tensor, f_t: torch.Tensor, labels: torch.Tensor, margin: float | None):
    d_ap, d_an, ap, an = plain_mine(plain_dist(f), labels)
    logp = F.log_softmax(torch.stack((d_ap, d_an), 1), dim=1)
    if margin is not None:
        return (-margin * logp[:, 0] - (1 - margin) * logp[:, 1]).mean()
    dist_t = plain_dist(f_t)
    t = torch.stack((dist_t.gather(1, ap.view(-1, 1))[:, 0], dist_t.gather(1, an.view(-1, 1))[:, 0]), 1)
    return (-F.softmax(t, dim=1).detach() * logp).mean(0).sum()


# ---- the timed steps ------------------------------------------------------------------------------
def _modules(backend: str) -> dict:
    return {"ce": compat.CrossEntropyLabelSmooth(K, backend=backend), "se": compat.SoftEntropy(backend=backend),
            "tri": compat.TripletLoss(0.3, backend=backend), "hard": compat.SoftTripletLoss(0.0, backend=backend),
            "soft": compat.SoftTripletLoss(None, backend=backend)}


def _plain_modules() -> dict:
    return {"ce": plain_ce, "se": plain_se, "tri": plain_triplet,
            "hard": lambda f, f2, y: plain_soft_triplet(f, f2, y, 0.0),
            "soft": lambda f, f_t, y: plain_soft_triplet(f, f_t, y, None)}


def _objective(case: str, m: dict, x: dict) -> torch.Tensor:
    f = x["f"].view_as(x["f"])  # a new tensor object per step, like a new batch's features
    y = x["labels"]
    if case == "cross_entropy_label_smooth":
        return m["ce"](x["p"], y)
    if case == "soft_entropy":
        return m["se"](x["p"], x["p_t"])
    if case == "triplet":
        return m["tri"](f, y)[0]
    if case == "soft_triplet_hard":
        return m["hard"](f, f, y)
    if case == "soft_triplet_soft":
        return m["soft"](f, x["f_t"], y)
    if case == "soft_triplet_pair":  # MMT: the hard and the soft term of one student
        return m["hard"](f, f, y) + m["soft"](f, x["f_t"], y)
    raise ValueError(case)


CASES = ["cross_entropy_label_smooth", "soft_entropy", "triplet", "soft_triplet_hard", "soft_triplet_soft",
         "soft_triplet_pair"]


def _inputs(n: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    x = {"f": torch.randn(n, D, generator=g).abs() * 2, "f_t": torch.randn(n, D, generator=g).abs() * 2,
         "p": torch.randn(n, K, generator=g) * 3, "p_t": torch.randn(n, K, generator=g) * 3,
         "labels": torch.arange(n // 4).repeat_interleave(4)[torch.randperm(n, generator=g)]}
    x = {k: v.to(device) for k, v in x.items()}
    x["f"].requires_grad_()
    x["p"].requires_grad_()
    return x


def _step(case: str, m: dict, x: dict):
    def run() -> None:
        x["f"].grad = x["p"].grad = None
        _objective(case, m, x).backward()
        if x["f"].is_cuda:
            torch.cuda.synchronize()
    return run


pytestmark = pytest.mark.usefixtures("one_thread")  # see bench/conftest.py


def _interleaved(run_ref, run_var, reps: int = REPS) -> tuple[float, float, float, float]:
    """(median ref, median variant, min ref, min variant) in seconds from alternating calls."""
    run_ref()
    run_var()
    t_ref, t_var = [], []
    for _ in range(reps):
        for run, times in ((run_ref, t_ref), (run_var, t_var)):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    t_ref.sort()
    t_var.sort()
    return t_ref[reps // 2], t_var[reps // 2], t_ref[0], t_var[0]


def _record(benchmark, case: str, x: dict, run) -> None:
    benchmark.group = f"compat {case} N={x['f'].shape[0]}"
    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    med_ref, med_var, min_ref, min_var = _interleaved(_step(case, _plain_modules(), x), run)
    benchmark.extra_info.update(plain_median_s=med_ref, variant_median_s=med_var,
                                speedup_vs_plain=med_ref / med_var, speedup_vs_plain_min=min_ref / min_var)


@pytest.mark.parametrize("case", CASES)
def test_variants_agree(case):
    """Plain and compat(torch) compute the same values and gradients (timings compare like with like)."""
    x = _inputs(64)
    got = _objective(case, _modules("torch"), x)
    g_got = torch.autograd.grad(got, [x["f"], x["p"]], allow_unused=True)
    want = _objective(case, _plain_modules(), x)
    g_want = torch.autograd.grad(want, [x["f"], x["p"]], allow_unused=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_got, g_want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_plain(benchmark, case, n):
    x = _inputs(n)
    _record(benchmark, case, x, _step(case, _plain_modules(), x))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_compat_torch(benchmark, case, n):
    x = _inputs(n)
    _record(benchmark, case, x, _step(case, _modules("torch"), x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels are benchmarked on CUDA only")
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", CASES)
def test_compat_triton_cuda(benchmark, case, n):
    x = _inputs(n, "cuda")
    _record(benchmark, case, x, _step(case, _modules("triton"), x))

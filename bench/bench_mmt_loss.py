"""The MMT objective, forward + backward: fused ``mmt_loss`` vs separate loss modules.

Run: .venv/bin/python -m pytest bench/bench_mmt_loss.py -q --benchmark-columns=min,median,mean,rounds

Variants, each timed on the same inputs (batch N = 64/128/256 as P x 4, D = 2048, K = 500/1500):
(a) ``separate``: the original MMT's composition of separate modules, written below in plain
    torch. Tri(f1), Tri(f2), STri(f1, f2_t), STri(f2, f1_t) each compute their own FULL student
    distance matrix, mine by sorting, and the soft ones also a FULL teacher matrix; CE and SE each
    run their own log-softmax. It is timed inside every test, so each row's ``extra_info`` carries
    the ratio to it measured in the same run.
(b) ``torch``: ``mmt_loss(backend="torch")`` (one distance matrix and one mining per student,
    2 teacher distances per row).
(c) ``compiled``: ``torch.compile`` of (b).
(d) ``triton``: ``mmt_loss(backend="triton")``, only on a CUDA device (skipped otherwise: the CPU
    interpreter is a correctness tool, not a speed one).
``extra_info`` also holds ``launches`` for the torch variants: the top-level aten ops one call runs
(torch.profiler; views, allocations and no-op casts excluded). ``python bench/bench_mmt_loss.py``
prints the launch counts, the Triton variant's included (its kernels counted by stubs). The ratios come from alternating
calls of (a) and the variant (``speedup_vs_separate`` from medians, ``..._min`` from minima), so
a shared machine's fluctuating load hits both sides alike; all run on one intra-op thread.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from fastmmt.ops import mmt_loss

D = 2048
CASES = [(n, k) for n in (64, 128, 256) for k in (500, 1500)]
NO_KERNEL = {"aten::view", "aten::t", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::squeeze",
             "aten::select", "aten::slice", "aten::transpose", "aten::detach", "aten::alias", "aten::empty",
             "aten::empty_like", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg",
             "aten::lift_fresh", "aten::_unsafe_view", "aten::reshape", "aten::permute", "aten::result_type",
             "aten::_reshape_alias", "aten::expand_as", "aten::numpy_T", "aten::squeeze_", "aten::unsqueeze_"}


# ---- (a) the original MMT's separate loss modules, plain torch -------------------------------
def _euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1, keepdim=True).t()
    return d.addmm(x, y.t(), beta=1, alpha=-2).clamp(min=1e-12).sqrt()


def _batch_hard(dist: torch.Tensor, same: torch.Tensor):
    sp, ip = torch.sort(dist + -9999999.0 * (1 - same), dim=1, descending=True)
    sn, i_n = torch.sort(dist + 9999999.0 * same, dim=1, descending=False)
    return sp[:, 0], sn[:, 0], ip[:, 0], i_n[:, 0]


def separate_tri(f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    dist = _euclidean(f, f)
    same = (labels.view(-1, 1) == labels.view(1, -1)).float()
    d_ap, d_an, _, _ = _batch_hard(dist, same)
    return -F.log_softmax(torch.stack((d_ap, d_an), 1), dim=1)[:, 1].mean()


def separate_stri(f: torch.Tensor, f_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    dist = _euclidean(f, f)
    same = (labels.view(-1, 1) == labels.view(1, -1)).float()
    d_ap, d_an, ap, an = _batch_hard(dist, same)
    logp = F.log_softmax(torch.stack((d_ap, d_an), 1), dim=1)
    dist_t = _euclidean(f_t, f_t)  # the FULL teacher matrix, then 2 entries per row are used
    t = torch.stack((dist_t.gather(1, ap.view(-1, 1)).squeeze(1), dist_t.gather(1, an.view(-1, 1)).squeeze(1)), 1)
    return (-F.softmax(t, dim=1).detach() * logp).mean(0).sum()


def separate_ce(p: torch.Tensor, labels: torch.Tensor, eps: float = 0.1) -> torch.Tensor:
    logp = F.log_softmax(p, dim=1)
    target = torch.zeros_like(logp).scatter_(1, labels.view(-1, 1), 1)
    target = (1 - eps) * target + eps / p.shape[1]
    return (-target * logp).mean(0).sum()


def separate_se(p: torch.Tensor, p_t: torch.Tensor) -> torch.Tensor:
    return (-F.softmax(p_t, dim=1).detach() * F.log_softmax(p, dim=1)).mean(0).sum()


def separate_mmt(f1, f2, f1_t, f2_t, p1, p2, p1_t, p2_t, labels, wce=0.5, wtri=0.8) -> torch.Tensor:
    f1_t, f2_t, p1_t, p2_t = f1_t.detach(), f2_t.detach(), p1_t.detach(), p2_t.detach()
    return ((1 - wce) * (separate_ce(p1, labels) + separate_ce(p2, labels))
            + (1 - wtri) * (separate_tri(f1, labels) + separate_tri(f2, labels))
            + wce * (separate_se(p1, p2_t) + separate_se(p2, p1_t))
            + wtri * (separate_stri(f1, f2_t, labels) + separate_stri(f2, f1_t, labels)))


# ---- harness ----------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")  # see bench/conftest.py


def _inputs(n: int, k: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(n * 10_000 + k)
    x = {name: (torch.randn(n, D, generator=g).abs() * 2).to(device) for name in ("f1", "f2", "f1_t", "f2_t")}
    x.update({name: (torch.randn(n, k, generator=g) * 3).to(device) for name in ("p1", "p2", "p1_t", "p2_t")})
    x["labels"] = torch.arange(n // 4).repeat_interleave(4)[torch.randperm(n, generator=g)].to(device)
    for name in ("f1", "f2", "p1", "p2"):
        x[name].requires_grad_()
    return x


def _step(fn, x: dict[str, torch.Tensor]):
    def run() -> None:
        for name in ("f1", "f2", "p1", "p2"):
            x[name].grad = None
        out = fn(**x)
        (out if isinstance(out, torch.Tensor) else out.total).backward()
        if x["f1"].is_cuda:
            torch.cuda.synchronize()
    return run


def _interleaved(run_ref, run_var, reps: int = 11) -> tuple[float, float, float, float]:
    """(median ref, median variant, min ref, min variant) in seconds from ALTERNATING calls, so a
    shared, fluctuating CPU load hits both sides alike."""
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


def _is_aten(ev) -> bool:
    return ev.name.startswith("aten::")


def count_launches(run) -> int:
    """Kernels one call runs: top-level aten ops (no aten ancestor) that are not views,
    allocations or no-op casts (``to``/``contiguous`` that call nothing)."""
    run()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    n = 0
    for ev in prof.events():
        if not _is_aten(ev) or ev.name in NO_KERNEL:
            continue
        parent = ev.cpu_parent
        while parent is not None and not _is_aten(parent):
            parent = parent.cpu_parent
        no_op = ev.name in ("aten::to", "aten::contiguous") and not any(_is_aten(c) for c in ev.cpu_children)
        if parent is None and not no_op:
            n += 1
    return n


def _record(benchmark, x, run) -> None:
    """Time ``run`` with pytest-benchmark and (a) against it, interleaved, for the ratios."""
    benchmark.group = f"mmt_loss N={x['f1'].shape[0]} K={x['p1'].shape[1]}"
    benchmark.pedantic(run, rounds=15, warmup_rounds=2, iterations=1)
    med_ref, med_var, min_ref, min_var = _interleaved(_step(separate_mmt, x), run)
    benchmark.extra_info.update(separate_median_s=med_ref, variant_median_s=med_var,
                                speedup_vs_separate=med_ref / med_var, speedup_vs_separate_min=min_ref / min_var)
    if not x["f1"].is_cuda:
        benchmark.extra_info["launches"] = count_launches(run)


def _torch_mmt(**kw):
    return mmt_loss(**kw, backend="torch")


def test_variants_agree() -> None:
    """The benchmarked variants compute the same objective (so the timings compare like with like)."""
    x = _inputs(64, 500)
    a = separate_mmt(**x)
    b = _torch_mmt(**x).total
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,k", CASES)
def test_separate_modules(benchmark, n, k):
    x = _inputs(n, k)
    _record(benchmark, x, _step(separate_mmt, x))


@pytest.mark.parametrize("n,k", CASES)
def test_mmt_loss_torch(benchmark, n, k):
    x = _inputs(n, k)
    _record(benchmark, x, _step(_torch_mmt, x))


_COMPILED = None


def _compiled_mmt(**kw):
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = torch.compile(_torch_mmt)  # one static graph, then one dynamic-shape graph
    return _COMPILED(**kw)


@pytest.mark.parametrize("n,k", CASES)
def test_mmt_loss_torch_compiled(benchmark, n, k):
    x = _inputs(n, k)
    run = _step(_compiled_mmt, x)
    try:
        run()
    except Exception as exc:  # noqa: BLE001 - report the compiler's failure, don't hide it
        pytest.skip(f"torch.compile failed on this machine: {type(exc).__name__}: {exc}")
    _record(benchmark, x, run)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernels are benchmarked on CUDA only")
@pytest.mark.parametrize("n,k", CASES)
def test_mmt_loss_triton_cuda(benchmark, n, k):
    x = _inputs(n, k, "cuda")
    _record(benchmark, x, _step(lambda **kw: mmt_loss(**kw, backend="triton"), x))


# ---- launch counts (not timed): python bench/bench_mmt_loss.py ---------------------------------
class _CountingKernel:
    """Stands in for a jitted Triton kernel: counts launches, computes nothing."""

    def __init__(self, counter: list[int]) -> None:
        self.counter = counter

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            self.counter[0] += 1
        return launch


def count_triton_variant(n: int = 64, k: int = 500) -> tuple[int, int]:
    """(Triton kernels, other aten kernels) of one ``mmt_loss(backend="triton")`` forward + backward.

    The Triton kernels are replaced by counting stubs (so it runs without a GPU; the values are
    then meaningless) and the remaining torch work is counted like the torch variants.
    """
    from fastmmt.kernels import distance, logits, triplet

    counter = [0]
    names = [(logits, "_logits_fwd"), (logits, "_logits_bwd"), (triplet, "_triplet_fwd"),
             (triplet, "_triplet_bwd"), (distance, "_pairwise_fwd"), (distance, "_pairwise_bwd")]
    saved = [getattr(mod, name) for mod, name in names]
    try:
        for mod, name in names:
            setattr(mod, name, _CountingKernel(counter))
        run = _step(lambda **kw: mmt_loss(**kw, backend="triton"), _inputs(n, k))
        run()
        counter[0] = 0
        others = count_launches(run)
        return counter[0] // 2, others  # count_launches runs the step twice
    finally:
        for (mod, name), fn in zip(names, saved):
            setattr(mod, name, fn)


if __name__ == "__main__":
    import os

    os.environ.setdefault("TRITON_INTERPRET", "1")  # import triton without a GPU (kernels are stubbed)
    x64 = _inputs(64, 500)
    print("separate modules (a):", count_launches(_step(separate_mmt, x64)), "aten kernels")
    print("mmt_loss torch   (b):", count_launches(_step(_torch_mmt, x64)), "aten kernels")
    tri, other = count_triton_variant()
    print(f"mmt_loss triton  (d): {tri} Triton kernels + {other} other aten kernels")

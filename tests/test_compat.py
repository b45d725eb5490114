"""fastmmt.ops.compat (MMT's loss-module signatures) against float64 plain-torch formulas.

The references below are the published formulas written out in float64 on the same (float32)
inputs, with fastmmt's documented conventions: self-distance exactly sqrt(1e-12), ties mined to
the lowest column index, rows without a negative adding 0 to the loss (``prec`` counts them as
ranked). Each case checks the loss, ``prec`` and the gradient (autograd on the reference) for every
backend, on the run's ``device`` (tests/conftest.py: CUDA tensors and compiled kernels when CUDA is
present, else CPU tensors and the Triton interpreter); the references run in float64 on CPU.
Inputs are random per run (seed printed, FASTMMT_TEST_SEED pins it); random features are redrawn
until no row's hardest positive or negative is within ``tol.tie_gap`` (relative to the largest
distance) of its runner-up, the gap outside which float32 mining on ``device`` must equal float64
mining. Exact ties are tested on small-integer features, where every distance is exact in both
precisions.

Tolerances: losses rtol max(5e-5, ``tol.loss``) / atol 1e-6 (float32 arithmetic on exact inputs,
sums over at most a few hundred rows or 1,500 classes; compiled CUDA kernels add approximate
exp/log, ``tol.loss``); gradients ``tol.grad`` of the largest reference entry (1e-4 on CPU).
"""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from fastmmt.ops import compat
from fastmmt.ops._dispatch import resolve_backend

BACKENDS = ["torch", "triton"]
LOSS_RTOL = 5e-5  # float32 arithmetic on exact inputs; see the module docstring


# ---- float64 references, written from the formulas ----------------------------------------------
def ref_dist(x: torch.Tensor) -> torch.Tensor:
    sq = (x * x).sum(1)
    d2 = sq[:, None] + sq[None, :] - 2.0 * x @ x.t()
    d2 = d2.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)
    return d2.clamp_min(1e-12).sqrt()


def _lowest_arg(values: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    cols = torch.arange(values.shape[1], device=values.device).expand_as(values)
    return torch.where(values == best[:, None], cols, values.shape[1]).min(1).values


def ref_mine(dist: torch.Tensor, labels: torch.Tensor):
    """(ap, an, has_neg): hardest positive (self included) / negative, lowest index on ties."""
    same = labels[:, None] == labels[None, :]
    pos = dist.masked_fill(~same, float("-inf"))
    neg = dist.masked_fill(same, float("inf"))
    ap, an = _lowest_arg(pos, pos.max(1).values), _lowest_arg(neg, neg.min(1).values)
    has_neg = (~same).any(1)
    return ap, torch.where(has_neg, an, 0), has_neg


def ref_normalize(x: torch.Tensor, on: bool) -> torch.Tensor:
    return x / (x * x).sum(1, keepdim=True).sqrt().clamp_min(1e-12) if on else x


def ref_mined(x: torch.Tensor, labels: torch.Tensor):
    dist = ref_dist(x)
    ap, an, has_neg = ref_mine(dist.detach(), labels)
    return dist.gather(1, ap[:, None])[:, 0], dist.gather(1, an[:, None])[:, 0], ap, an, has_neg


def ref_triplet(emb, labels, margin, normalize):
    d_ap, d_an, _, _, has_neg = ref_mined(ref_normalize(emb, normalize), labels)
    per_row = (d_ap - d_an + margin).clamp_min(0.0)  # MarginRankingLoss(d_an, d_ap, y=1)
    loss = torch.where(has_neg, per_row, 0.0).mean()
    prec = ((d_an > d_ap) | ~has_neg).double().mean()
    return loss, prec


def ref_soft_triplet(emb1, emb2, labels, margin, normalize):
    d_ap, d_an, ap, an, has_neg = ref_mined(ref_normalize(emb1, normalize), labels)
    logp = F.log_softmax(torch.stack((d_ap, d_an), 1), dim=1)
    if margin is not None:
        per_row = -margin * logp[:, 0] - (1 - margin) * logp[:, 1]
    else:
        dist2 = ref_dist(ref_normalize(emb2.detach(), normalize))
        target = F.softmax(torch.stack((dist2.gather(1, ap[:, None])[:, 0], dist2.gather(1, an[:, None])[:, 0]), 1), 1)
        per_row = (-target * logp).sum(1)
    return torch.where(has_neg, per_row, 0.0).mean()


def ref_ce(inputs, targets, num_classes, epsilon):
    logp = F.log_softmax(inputs, dim=1)
    target = torch.zeros_like(logp).scatter(1, targets[:, None], 1.0) * (1 - epsilon) + epsilon / num_classes
    return (-target * logp).sum(1).mean()


def ref_soft_entropy(inputs, targets):
    return (-F.softmax(targets.detach(), dim=1) * F.log_softmax(inputs, dim=1)).sum(1).mean()


# ---- data ----------------------------------------------------------------------------------------
def make_labels(n: int, scheme: str, gen: torch.Generator) -> torch.Tensor:
    if scheme == "one_id":
        return torch.full((n,), 7)
    if scheme == "distinct":
        return torch.randperm(n, generator=gen) * 3
    return torch.randint(0, max(2, n // 3), (n,), generator=gen)


def _clear_margins(x64: torch.Tensor, labels: torch.Tensor, gap: float) -> bool:
    """True when no row's hardest positive or negative is within ``gap`` * max distance of its runner-up."""
    dist = ref_dist(x64)
    same = labels[:, None] == labels[None, :]
    pos = dist.masked_fill(~same, float("-inf")).sort(1, descending=True).values
    neg = dist.masked_fill(same, float("inf")).sort(1).values
    min_gap = gap * dist.max()
    gaps = []
    if pos.shape[1] > 1:
        gaps += [pos[:, 0] - pos[:, 1], neg[:, 1] - neg[:, 0]]
    return all(bool((g.nan_to_num(nan=float("inf")) > min_gap).all()) for g in gaps)


def make_features(n: int, d: int, labels: torch.Tensor, gen: torch.Generator, gap: float,
                  normalize: bool = False) -> torch.Tensor:
    """Random float32 CPU features (ReLU-pooled-like, >= 0) with no near-tie (``gap``) in the mining."""
    for _ in range(50):
        x = torch.randn(n, d, generator=gen).abs().mul(2.0)
        if _clear_margins(ref_normalize(x.double(), normalize), labels, gap):
            return x
    raise AssertionError("could not draw untied features")


def _grad_close(got: torch.Tensor, want: torch.Tensor, tol) -> None:
    scale = want.abs().max().item()
    # 1e-7 floor: an all-zero reference gradient (one identity, one class) still admits float32 noise
    torch.testing.assert_close(got.double().cpu(), want.cpu(), rtol=tol.grad, atol=tol.grad * scale + 1e-7)


def _loss_close(got: torch.Tensor, want: torch.Tensor, tol) -> None:
    assert got.dim() == 0
    torch.testing.assert_close(got.double().cpu(), want.detach().cpu(), rtol=max(LOSS_RTOL, tol.loss), atol=1e-6)


# ---- the classification terms -------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,num_classes,eps", [(1, 1, None, 0.1), (7, 3, None, 0.1), (13, 500, None, 0.1),
                                                 (9, 1500, None, 0.3), (5, 33, 40, 0.1), (6, 17, None, 0.0)])
def test_cross_entropy_label_smooth(device, tol, backend, n, k, num_classes, eps, gen):
    c = k if num_classes is None else num_classes
    x = (torch.randn(n, k, generator=gen) * 3).to(device).requires_grad_()
    y = torch.randint(0, k, (n,), generator=gen).to(device)
    loss = compat.CrossEntropyLabelSmooth(c, epsilon=eps, backend=backend)(x, y)
    loss.backward()
    x64 = x.detach().cpu().double().requires_grad_()
    want = ref_ce(x64, y.cpu(), c, eps)
    want.backward()
    _loss_close(loss, want, tol)
    _grad_close(x.grad, x64.grad, tol)


def test_cross_entropy_default_epsilon_is_a_tenth(device, tol, gen):
    x, y = torch.randn(6, 11, generator=gen), torch.randint(0, 11, (6,), generator=gen)
    _loss_close(compat.CrossEntropyLabelSmooth(11, backend="torch")(x.to(device), y.to(device)),
                ref_ce(x.double(), y, 11, 0.1), tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k", [(1, 1), (7, 3), (13, 500), (9, 1500)])
def test_soft_entropy(device, tol, backend, n, k, gen):
    x = (torch.randn(n, k, generator=gen) * 3).to(device).requires_grad_()
    t = (torch.randn(n, k, generator=gen) * 3).to(device).requires_grad_()
    loss = compat.SoftEntropy(backend=backend)(x, t)
    loss.backward()
    x64 = x.detach().cpu().double().requires_grad_()
    want = ref_soft_entropy(x64, t.detach().cpu().double())
    want.backward()
    _loss_close(loss, want, tol)
    _grad_close(x.grad, x64.grad, tol)
    assert t.grad is None  # the teacher's logits are detached


# ---- the triplet terms -----------------------------------------------------------------------------
TRIPLET_SHAPES = [(1, 5, "one_id"), (7, 5, "ids"), (13, 33, "ids"), (11, 9, "one_id"), (9, 17, "distinct"),
                  (31, 129, "ids")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.3])
@pytest.mark.parametrize("n,d,scheme", TRIPLET_SHAPES)
def test_triplet_loss(device, tol, backend, normalize, margin, n, d, scheme, gen):
    labels = make_labels(n, scheme, gen)
    emb = make_features(n, d, labels, gen, tol.tie_gap, normalize)
    x = emb.to(device).requires_grad_()
    loss, prec = compat.TripletLoss(margin, normalize_feature=normalize, backend=backend)(x, labels.to(device))
    loss.backward()
    x64 = emb.detach().double().requires_grad_()
    want, want_prec = ref_triplet(x64, labels, margin, normalize)
    want.backward()
    _loss_close(loss, want, tol)
    assert isinstance(prec, torch.Tensor) and not prec.requires_grad and prec.device == x.device
    assert prec.item() == pytest.approx(want_prec.item(), abs=1e-6)
    _grad_close(x.grad, x64.grad, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("margin", [0.0, 0.3, None])
@pytest.mark.parametrize("n,d,scheme", TRIPLET_SHAPES)
def test_soft_triplet_loss(device, tol, backend, normalize, margin, n, d, scheme, gen):
    labels = make_labels(n, scheme, gen)
    emb1 = make_features(n, d, labels, gen, tol.tie_gap, normalize)
    emb2 = torch.randn(n, d, generator=gen).abs().mul(2.0)
    x, t = emb1.to(device).requires_grad_(), emb2.to(device).requires_grad_()
    loss = compat.SoftTripletLoss(margin=margin, normalize_feature=normalize, backend=backend)(x, t, labels.to(device))
    loss.backward()
    x64 = emb1.detach().double().requires_grad_()
    want = ref_soft_triplet(x64, emb2.double(), labels, margin, normalize)
    want.backward()
    _loss_close(loss, want, tol)
    _grad_close(x.grad, x64.grad, tol)
    assert t.grad is None  # emb2 only provides the detached soft target


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("margin", [0.0, 0.3, None])
@pytest.mark.parametrize("n,d", [(64, 2048), (130, 257)])
def test_soft_triplet_loss_large(device, tol, backend, margin, n, d, gen):
    labels = make_labels(n, "ids", gen)
    emb1, emb2 = make_features(n, d, labels, gen, tol.tie_gap), torch.randn(n, d, generator=gen).abs()
    x, ld = emb1.to(device, copy=True).requires_grad_(), labels.to(device)
    compat.SoftTripletLoss(margin, backend=backend)(x, emb2.to(device), ld).backward()
    x64 = emb1.detach().double().requires_grad_()
    ref_soft_triplet(x64, emb2.double(), labels, margin, False).backward()
    _grad_close(x.grad, x64.grad, tol)
    loss, prec = compat.TripletLoss(0.3, backend=backend)(emb1.to(device), ld)
    want, want_prec = ref_triplet(emb1.double(), labels, 0.3, False)
    _loss_close(loss, want, tol)
    assert prec.item() == pytest.approx(want_prec.item(), abs=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_couple_of_multi_block_shapes(device, tol, backend, gen):
    """Several row/column/feature blocks of the Triton kernels (N 45, D 130)."""
    n, d = 45, 130
    labels = make_labels(n, "ids", gen)
    emb1, emb2 = make_features(n, d, labels, gen, tol.tie_gap), torch.randn(n, d, generator=gen).abs()
    for margin in (0.3, None):
        x = emb1.to(device, copy=True).requires_grad_()
        loss = compat.SoftTripletLoss(margin, backend=backend)(x, emb2.to(device), labels.to(device))
        loss.backward()
        x64 = emb1.detach().double().requires_grad_()
        want = ref_soft_triplet(x64, emb2.double(), labels, margin, False)
        want.backward()
        _loss_close(loss, want, tol)
        _grad_close(x.grad, x64.grad, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_features(device, tol, backend, dtype, gen):
    """Half inputs are computed in float32: losses as for float32, gradients rounded to the dtype."""
    n, d = 21, 33
    labels = make_labels(n, "ids", gen)
    for _ in range(50):
        emb1 = make_features(n, d, labels, gen, tol.tie_gap).to(dtype)
        if _clear_margins(emb1.double(), labels, tol.tie_gap):
            break
    emb2 = torch.randn(n, d, generator=gen).abs().to(dtype)
    gtol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]  # the gradient is rounded to dtype
    ld = labels.to(device)
    for margin in (0.3, None):
        x = emb1.to(device, copy=True).requires_grad_()
        loss = compat.SoftTripletLoss(margin, backend=backend)(x, emb2.to(device), ld)
        tri, prec = compat.TripletLoss(0.3, backend=backend)(x, ld)
        (loss + tri).backward()
        assert x.grad.dtype == dtype
        x64 = emb1.double().requires_grad_()
        want = ref_soft_triplet(x64, emb2.double(), labels, margin, False)
        want_tri, want_prec = ref_triplet(x64, labels, 0.3, False)
        (want + want_tri).backward()
        _loss_close(loss, want, tol)
        _loss_close(tri, want_tri, tol)
        assert prec.item() == pytest.approx(want_prec.item(), abs=1e-6)
        scale = x64.grad.abs().max().item()
        torch.testing.assert_close(x.grad.cpu().double(), x64.grad, rtol=gtol, atol=gtol * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_go_to_the_lowest_index(device, tol, backend, gen):
    """Small-integer features: every distance is exact in float32 and float64, so ties are exact and
    the gradient (which lands on the mined rows) shows which of the tied columns was taken."""
    n, d = 24, 5
    x = torch.randint(-2, 3, (n, d), generator=gen).float()
    x[1::6] = x[0::6]  # exact duplicates: zero distance, clamped, zero gradient
    labels = torch.randint(0, 5, (n, ), generator=gen)
    # one certain tie: rows 1 and 2 are row 0's only positives, both at distance 1
    labels[:3] = 99
    x[1], x[2] = x[0], x[0]
    x[1, 0] += 1.0
    x[2, 0] -= 1.0
    t = torch.randint(-2, 3, (n, d), generator=gen).float()
    dist = ref_dist(x.double())
    same = labels[:, None] == labels[None, :]
    n_tied = ((dist.masked_fill(~same, -1) == dist.masked_fill(~same, -1).max(1, keepdim=True).values).sum(1) > 1)
    assert n_tied.any(), "the integer features should produce tied hardest positives"
    # distances are exact (small integers); only exp/log round: correctly on CPU, approx on CUDA
    gtol = 1e-5 if device.type == "cpu" else tol.grad
    td, ld = t.to(device), labels.to(device)
    for margin in (0.0, 0.3, None):
        xg, x64 = x.to(device, copy=True).requires_grad_(), x.double().requires_grad_()
        loss = compat.SoftTripletLoss(margin, backend=backend)(xg, td, ld)
        want = ref_soft_triplet(x64, t.double(), labels, margin, False)
        loss.backward()
        want.backward()
        _loss_close(loss, want, tol)
        torch.testing.assert_close(xg.grad.cpu().double(), x64.grad, rtol=gtol, atol=1e-6)
    xg, x64 = x.to(device, copy=True).requires_grad_(), x.double().requires_grad_()
    loss, prec = compat.TripletLoss(0.0, backend=backend)(xg, ld)
    want, want_prec = ref_triplet(x64, labels, 0.0, False)
    loss.backward()
    want.backward()
    _loss_close(loss, want, tol)
    assert prec.item() == pytest.approx(want_prec.item(), abs=1e-6)
    torch.testing.assert_close(xg.grad.cpu().double(), x64.grad, rtol=gtol, atol=1e-6)


# ---- shared mining between calls (torch backend) --------------------------------------------------
def test_two_calls_on_one_batch_mine_once_and_stay_correct(device, tol, gen, monkeypatch):
    calls = []
    real = compat._mine
    monkeypatch.setattr(compat, "_mine", lambda x, labels: calls.append(1) or real(x, labels))
    compat.clear_mining_cache()
    n, d = 16, 9
    labels_cpu = make_labels(n, "ids", gen)
    emb = make_features(n, d, labels_cpu, gen, tol.tie_gap).to(device).requires_grad_()
    t_cpu = torch.randn(n, d, generator=gen).abs()
    labels, t = labels_cpu.to(device), t_cpu.to(device)
    hard = compat.SoftTripletLoss(margin=0.0, backend="torch")
    soft = compat.SoftTripletLoss(margin=None, backend="torch")
    hard_loss = hard(emb, emb, labels)
    hard_loss.backward()  # the first graph is freed: the second call must not depend on it
    g_hard = emb.grad.clone()
    soft(emb, t, labels).backward()
    assert len(calls) == 1  # one mining for both calls
    x64 = emb.detach().cpu().double().requires_grad_()
    ref_soft_triplet(x64, t_cpu.double(), labels_cpu, 0.0, False).backward()
    torch.testing.assert_close(g_hard.cpu().double(), x64.grad, rtol=tol.grad, atol=1e-6)
    x64.grad = None
    ref_soft_triplet(x64, t_cpu.double(), labels_cpu, None, False).backward()
    torch.testing.assert_close((emb.grad - g_hard).cpu().double(), x64.grad, rtol=tol.grad, atol=1e-6)

    # normalize_feature, other labels and an in-place change each get their own mining
    compat.SoftTripletLoss(0.0, normalize_feature=True, backend="torch")(emb, emb, labels)
    assert len(calls) == 2
    compat.TripletLoss(0.3, backend="torch")(emb, labels.clone())
    assert len(calls) == 3
    with torch.no_grad():
        emb.mul_(-1.0).add_(torch.randn(n, d, generator=gen).to(device))
    loss = soft(emb, t, labels)
    assert len(calls) == 4
    _loss_close(loss, ref_soft_triplet(emb.detach().cpu().double(), t_cpu.double(), labels_cpu, None, False), tol)


def test_the_mining_cache_keeps_no_tensor_alive(device, tol, gen):
    import weakref

    compat.clear_mining_cache()
    labels = make_labels(10, "ids", gen)
    emb = make_features(10, 4, labels, gen, tol.tie_gap).to(device).requires_grad_()
    compat.SoftTripletLoss(0.0, backend="torch")(emb, emb, labels.to(device))
    assert len(compat._MINING_CACHE._entries) == 1
    probe = weakref.ref(emb)
    del emb
    assert probe() is None


# ---- no host sync, no device calls -------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_host_sync_on_cuda(device, backend, gen):
    """Every module forward and backward on CUDA tensors, with any host sync an error."""
    assert device.type == "cuda"  # gpu-marked: conftest skips it without CUDA
    n, d, k = 32, 64, 50
    labels = make_labels(n, "ids", gen).to(device)
    emb = torch.randn(n, d, generator=gen).to(device).requires_grad_()
    logits = torch.randn(n, k, generator=gen).to(device).requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, prec = compat.TripletLoss(0.3, True, backend=backend)(emb, labels)
        loss = loss + compat.SoftTripletLoss(0.0, backend=backend)(emb, emb, labels)
        loss = loss + compat.SoftTripletLoss(None, True, backend=backend)(emb, emb.detach() + 1, labels)
        loss = loss + compat.CrossEntropyLabelSmooth(k, backend=backend)(logits, labels)
        loss = loss + compat.SoftEntropy(backend=backend)(logits, logits.detach() * 2)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert prec.is_cuda


# ---- bad input ------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_gets_clear_errors(device, backend):
    x, lab = torch.randn(8, 5, device=device), torch.zeros(8, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match=r"label must have shape \(8,\)"):
        compat.TripletLoss(0.3, backend=backend)(x, lab[:7])
    with pytest.raises(ValueError, match=r"emb2 has shape \(8, 4\)"):
        compat.SoftTripletLoss(backend=backend)(x, torch.randn(8, 4, device=device), lab)
    with pytest.raises(ValueError, match="2-D"):
        compat.SoftTripletLoss(0.0, backend=backend)(x.view(-1), x, lab)
    with pytest.raises(ValueError, match=r"targets must have shape \(8,\)"):
        compat.CrossEntropyLabelSmooth(5, backend=backend)(x, lab[:5])
    with pytest.raises(ValueError, match=r"targets has shape"):
        compat.SoftEntropy(backend=backend)(x, x[:, :4])
    with pytest.raises(ValueError, match="margin"):
        compat.TripletLoss(None, backend=backend)
    with pytest.raises(ValueError, match="num_classes"):
        compat.CrossEntropyLabelSmooth(0, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        compat.SoftEntropy(backend="cuda")


def test_out_of_range_targets(device):
    """Torch raises; Triton (no host-side check, no sync) returns NaN rather than a wrong number.

    The torch half runs on CPU whatever ``device`` is: on CUDA an out-of-range index is a
    device-side assert, which would leave the CUDA context unusable for every later test."""
    x, y = torch.randn(4, 6), torch.tensor([0, 6, 2, 1])
    with pytest.raises((IndexError, RuntimeError)):
        compat.CrossEntropyLabelSmooth(6, backend="torch")(x, y)
    xd, negative = x.to(device), torch.tensor([0, -1, 2, 1], device=device)
    assert torch.isnan(compat.CrossEntropyLabelSmooth(6, backend="triton")(xd, y.to(device)))
    assert torch.isnan(compat.CrossEntropyLabelSmooth(6, backend="triton")(xd, negative))


# ---- the one-line swap in an MMT-style training loop ------------------------------------------------
# The loop as MMT-style code writes it, with the criteria moved by ``.to(device)`` where that code
# writes ``.cuda()`` (the same nn.Module call), so that it runs on the test's device.
MMT_LOOP = '''
{import_line}
import torch

def train(nets, emas, batches, num_classes, device, alpha=0.9, lr=0.05):
    criterion_ce = CrossEntropyLabelSmooth(num_classes).to(device)
    criterion_ce_soft = SoftEntropy().to(device)
    criterion_tri = SoftTripletLoss(margin=0.0).to(device)
    criterion_tri_soft = SoftTripletLoss(margin=None).to(device)
    criterion_triple = TripletLoss(margin=0.3)
    params = [p for net in nets for p in net.parameters()]
    optimizer = torch.optim.SGD(params, lr=lr)
    log = []
    for inputs_1, inputs_2, targets in batches:
        f_out_1, f_out_2 = nets[0](inputs_1), nets[1](inputs_2)
        p_out_1, p_out_2 = nets[2](f_out_1), nets[3](f_out_2)
        with torch.no_grad():
            f_out_1_ema, f_out_2_ema = emas[0](inputs_1), emas[1](inputs_2)
            p_out_1_ema, p_out_2_ema = emas[2](f_out_1_ema), emas[3](f_out_2_ema)
        loss_ce_1 = criterion_ce(p_out_1, targets)
        loss_ce_2 = criterion_ce(p_out_2, targets)
        loss_tri_1 = criterion_tri(f_out_1, f_out_1, targets)
        loss_tri_2 = criterion_tri(f_out_2, f_out_2, targets)
        loss_ce_soft = criterion_ce_soft(p_out_1, p_out_2_ema) + criterion_ce_soft(p_out_2, p_out_1_ema)
        loss_tri_soft = criterion_tri_soft(f_out_1, f_out_2_ema, targets) + \\
            criterion_tri_soft(f_out_2, f_out_1_ema, targets)
        loss_triple, prec = criterion_triple(f_out_1, targets)
        loss = (loss_ce_1 + loss_ce_2) * 0.5 + (loss_tri_1 + loss_tri_2) * 0.2 + \\
            loss_ce_soft * 0.5 + loss_tri_soft * 0.8 + 0.1 * loss_triple
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for ema, net in zip(emas, nets):
                for e, p in zip(ema.parameters(), net.parameters()):
                    e.mul_(alpha).add_(p, alpha=1 - alpha)
        log.append((loss.item(), prec.item()))
    return log
'''


class _RefCrossEntropyLabelSmooth(torch.nn.Module):
    def __init__(self, num_classes, epsilon=0.1):
        super().__init__()
        self.num_classes, self.epsilon = num_classes, epsilon

    def forward(self, inputs, targets):
        return ref_ce(inputs.double(), targets, self.num_classes, self.epsilon)


class _RefSoftEntropy(torch.nn.Module):
    def forward(self, inputs, targets):
        return ref_soft_entropy(inputs.double(), targets.double())


class _RefTripletLoss(torch.nn.Module):
    def __init__(self, margin, normalize_feature=False):
        super().__init__()
        self.margin, self.normalize_feature = margin, normalize_feature

    def forward(self, emb, label):
        return ref_triplet(emb.double(), label, self.margin, self.normalize_feature)


class _RefSoftTripletLoss(torch.nn.Module):
    def __init__(self, margin=None, normalize_feature=False):
        super().__init__()
        self.margin, self.normalize_feature = margin, normalize_feature

    def forward(self, emb1, emb2, label):
        return ref_soft_triplet(emb1.double(), emb2.double(), label, self.margin, self.normalize_feature)


def _run_loop(import_line: str, seed: int, device: torch.device):
    namespace: dict = {}
    exec(compile(MMT_LOOP.format(import_line=import_line), "<mmt-loop>", "exec"), namespace)
    g = torch.Generator().manual_seed(seed)
    n, d_in, d, k = 12, 10, 7, 5

    def net():  # linear features: no ReLU zeros, so no exact ties between float32 and float64 mining
        return torch.nn.Linear(d_in, d)

    torch.manual_seed(seed)
    nets = [net(), net(), torch.nn.Linear(d, k, bias=False), torch.nn.Linear(d, k, bias=False)]
    nets = [m.to(device) for m in nets]
    emas = [copy.deepcopy(m).requires_grad_(False) for m in nets]
    batches = [tuple(b.to(device) for b in (
        torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g),
        torch.arange(n // 3).repeat_interleave(3)[torch.randperm(n, generator=g)])) for _ in range(3)]
    return namespace["train"](nets, emas, batches, k, device), nets


@pytest.mark.parametrize("auto_resolves_to", BACKENDS)
def test_mmt_style_loop_runs_unchanged_after_the_import_swap(device, tol, auto_resolves_to, monkeypatch):
    """The same loop source, once importing reference modules written from the formulas (on CPU),
    once with ``from fastmmt.ops.compat import ...`` (on ``device``): the same losses, precisions
    and trained weights."""
    if device.type == "cuda":
        if auto_resolves_to == "torch":
            pytest.skip("backend='auto' always resolves to triton for CUDA tensors")
    else:  # on CPU, auto follows TRITON_INTERPRET (set here before any kernel runs in this test)
        monkeypatch.setenv("TRITON_INTERPRET", "1" if auto_resolves_to == "triton" else "0")
    assert resolve_backend("auto", torch.zeros(1, device=device)) == auto_resolves_to
    reference = types.ModuleType("mmt_reference_losses")
    reference.CrossEntropyLabelSmooth, reference.SoftEntropy = _RefCrossEntropyLabelSmooth, _RefSoftEntropy
    reference.TripletLoss, reference.SoftTripletLoss = _RefTripletLoss, _RefSoftTripletLoss
    monkeypatch.setitem(sys.modules, "mmt_reference_losses", reference)
    names = "CrossEntropyLabelSmooth, SoftEntropy, SoftTripletLoss, TripletLoss"
    seed = 1234  # fixed: a random draw could put two distances within float32 rounding of each other
    want_log, want_nets = _run_loop(f"from mmt_reference_losses import {names}", seed, torch.device("cpu"))
    got_log, got_nets = _run_loop(f"from fastmmt.ops.compat import {names}", seed, device)
    assert len(got_log) == len(want_log) == 3
    # 1e-4: several float32 loss terms summed (at least tol.loss); weights follow the gradients (tol.grad)
    for (got_loss, got_prec), (want_loss, want_prec) in zip(got_log, want_log):
        assert got_loss == pytest.approx(want_loss, rel=max(1e-4, tol.loss))
        assert got_prec == pytest.approx(want_prec, abs=1e-6)
    for got, want in zip(got_nets, want_nets):
        for p, q in zip(got.parameters(), want.parameters()):
            torch.testing.assert_close(p.cpu(), q, rtol=max(1e-4, tol.grad), atol=1e-5)


# ---- the CUDA path of the compat kernels, compiled without a GPU --------------------------------------
def test_compat_kernels_compile_for_sm90():
    """The kernel variants only the compat modules launch (hinge margin, constant soft weight, the
    classification term alone) go through Triton's real compiler to an sm_90 cubin."""
    from aot_compile import compile_for_sm90

    only = ("triplet_fwd[teacher=False,hinge=True]", "triplet_fwd[teacher=False]",
            "logits_fwd[teacher=False,labels=True]", "logits_bwd[teacher=False,labels=True]")
    sizes = compile_for_sm90(only, timeout=1200)
    assert sorted(sizes) == sorted(f"{k}[float32]" for k in only)
    assert all(size > 0 for size in sizes.values())

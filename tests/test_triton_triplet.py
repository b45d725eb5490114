"""Fused Triton triplet kernel (on ``device``: compiled on CUDA, interpreted on CPU) against
reference.py run in float64 on CPU.

Inputs are fresh random each run; the seed is printed (shown on failure) and can be pinned with
FASTMMT_TEST_SEED. Float64 reference = reference.py on float64 copies of the (dtype-rounded)
inputs. Loss tolerance: 2e-5 relative for every dtype (the kernel computes in float32 on the exact
input values). Gradient tolerance, relative to the largest reference entry: fp32 1e-4, fp16 2e-3,
bf16 1.6e-2 (the gradient is rounded to the input dtype).
"""
from __future__ import annotations


import pytest
import torch

from fastmmt.ops import losses
from fastmmt.ops import reference as ref
from fastmmt.ops import triton_ops
from fastmmt.kernels import triplet

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _labels(n: int, n_ids: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n_ids, (n,), generator=gen)


def _ref_at(x64: torch.Tensor, t64: torch.Tensor, labels: torch.Tensor, ap: torch.Tensor, an: torch.Tensor):
    """Reference (hard, soft) in float64 evaluated at the given mined indices."""
    dist = ref.pairwise_euclidean(x64)
    has_neg = (labels.view(-1, 1) != labels.view(1, -1)).any(1)
    m = ref.Mining(ap.long(), an.long(), has_neg)
    d_ap, d_an = ref._mined_student(dist, m)
    t_ap, t_an = ref.teacher_pair_distances(t64, m)
    return ref._hard_term(d_ap, d_an, has_neg), ref._soft_term(d_ap, d_an, t_ap, t_an, has_neg)


def _ambiguous_rows(x64: torch.Tensor, labels: torch.Tensor, rel: float = 1e-5) -> torch.Tensor:
    """Rows whose hardest positive or negative is within ``rel`` of the runner-up (float64)."""
    dist = ref.pairwise_euclidean(x64)
    same = labels.view(-1, 1) == labels.view(1, -1)
    pos = dist.masked_fill(~same, float("-inf")).sort(1, descending=True).values
    neg = dist.masked_fill(same, float("inf")).sort(1).values
    scale = dist.max()
    gap_p = (pos[:, 0] - pos[:, 1]).nan_to_num(nan=float("inf"), posinf=float("inf"))
    gap_n = (neg[:, 1] - neg[:, 0]).nan_to_num(nan=float("inf"), posinf=float("inf"))
    return (gap_p < rel * scale) | (gap_n < rel * scale)


def _check(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, gen: torch.Generator,
           device: torch.device, tol) -> None:
    """Mining, losses and gradient of the fused kernel on ``device`` against the float64 reference."""
    dtype = x.dtype
    xd = x.detach().to(device).requires_grad_()
    td, ld = t.to(device), labels.to(device)
    hard, soft = triton_ops.triplet_pair_losses(xd, td, ld)
    wh, ws = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    (wh * hard + ws * soft).backward()
    assert hard.dtype == soft.dtype == torch.float32 and xd.grad.dtype == dtype
    hard, soft, grad = hard.cpu(), soft.cpu(), xd.grad.cpu()

    x64, t64 = x.detach().double(), t.double()
    fwd = triplet.triplet_forward(xd.detach().contiguous(), td.contiguous(), ld)
    fwd = fwd._replace(ap_idx=fwd.ap_idx.cpu(), an_idx=fwd.an_idx.cpu())
    m = ref.batch_hard_mining(ref.pairwise_euclidean(x64), labels)
    clear = ~_ambiguous_rows(x64, labels, tol.tie_gap)
    assert clear.float().mean() > 0.8, "test data too tie-prone to check mining"
    assert torch.equal(fwd.ap_idx.long()[clear], m.ap_idx[clear])
    assert torch.equal(fwd.an_idx.long()[clear & m.has_neg], m.an_idx[clear & m.has_neg])
    # Near-ties (float64 gap below rounding): the kernel's pick must be a tie within tolerance.
    dist = ref.pairwise_euclidean(x64)
    rows = torch.arange(len(labels))
    gap = tol.tie_gap * dist.max()
    assert (dist[rows, fwd.ap_idx.long()] - dist[rows, m.ap_idx]).abs().max() <= gap
    assert ((dist[rows, fwd.an_idx.long()] - dist[rows, m.an_idx]).abs() * m.has_neg).max() <= gap

    x64.requires_grad_()
    r_hard, r_soft = _ref_at(x64, t64, labels, fwd.ap_idx, fwd.an_idx)
    (wh * r_hard + ws * r_soft).backward()
    torch.testing.assert_close(hard.double(), r_hard.detach(), rtol=tol.loss, atol=1e-6)
    torch.testing.assert_close(soft.double(), r_soft.detach(), rtol=tol.loss, atol=1e-6)
    scale = x64.grad.abs().max().item() + 1e-12
    gtol = tol.grad if dtype == torch.float32 else GRAD_TOL[dtype]
    err_bound = gtol * scale + _expansion_bound(x64.detach(), fwd.ap_idx.long(), fwd.an_idx.long(), x64.grad)
    excess = (grad.double() - x64.grad).abs() - (err_bound + gtol * x64.grad.abs())
    assert excess.max() <= 0, f"gradient off by {excess.max():.3g} beyond its bound (row {excess.max(1).values.argmax()})"


def _expansion_bound(x64: torch.Tensor, ap: torch.Tensor, an: torch.Tensor, g64: torch.Tensor) -> torch.Tensor:
    """Per-row float32 error allowance of the gradient, from the kernel's |a|^2 + |b|^2 - 2ab
    distances: their error in d^2 is ~eps (|a|^2 + |b|^2), so the pair's direction (a - b) / d is off
    by ~eps kappa / 2 relative, kappa = (|a|^2 + |b|^2) / d^2; large for close pairs in few dimensions
    (D = 3). A row gets the largest kappa of the mined pairs it is in (as anchor or as partner), times
    8 for margin (4 eps kappa), times its largest reference gradient. Pairs at the distance floor
    (the self-distance convention) have zero gradient and are left out."""
    eps = torch.finfo(torch.float32).eps / 2
    dist = ref.pairwise_euclidean(x64)
    sq = (x64 ** 2).sum(1)
    rows = torch.arange(len(x64))
    kappa = torch.zeros(len(x64), dtype=torch.float64)
    for partner in (ap, an):
        d = dist[rows, partner]
        k = torch.where(d > 1e-5, (sq + sq[partner]) / d.clamp_min(1e-5) ** 2, torch.zeros_like(d))
        kappa = torch.maximum(kappa, k)
        kappa.scatter_reduce_(0, partner, k, reduce="amax")
    return (4 * eps * kappa * g64.abs().max(1).values).view(-1, 1)


def _features(n: int, d: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(n, d, generator=gen).abs().mul(2.0).to(dtype)  # ReLU-pooled-like, >= 0


@pytest.mark.parametrize("n,d", [(4, 3), (6, 129), (64, 129), (130, 3)])
def test_fp32_matches_reference(n, d, gen, device, tol):
    x, t = _features(n, d, torch.float32, gen), _features(n, d, torch.float32, gen)
    _check(x, t, _labels(n, max(2, n // 4), gen), gen, device, tol)


@pytest.mark.slow
@pytest.mark.parametrize("n,d", [(4, 2048), (64, 2048), (130, 2048), (130, 129)])
def test_fp32_matches_reference_large(n, d, gen, device, tol):
    x, t = _features(n, d, torch.float32, gen), _features(n, d, torch.float32, gen)
    _check(x, t, _labels(n, max(2, n // 4), gen), gen, device, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_match_reference(dtype, gen, device, tol):
    x, t = _features(64, 129, dtype, gen), _features(64, 129, dtype, gen)
    _check(x, t, _labels(64, 16, gen), gen, device, tol)


def test_ties_integer_features_mine_lowest_index(gen, device, tol):
    """Integer features with duplicated rows: exact arithmetic, so mining equals the reference exactly."""
    n, d = 40, 6
    x = torch.randint(0, 3, (n, d), generator=gen).float()
    x[1::5] = x[0::5][: len(x[1::5])]  # exact duplicates (zero distance, clamped, zero gradient)
    labels = _labels(n, 5, gen)
    t = torch.randint(0, 4, (n, d), generator=gen).float()
    xd, td, ld = x.to(device), t.to(device), labels.to(device)
    fwd = triplet.triplet_forward(xd, td, ld)
    m = ref.batch_hard_mining(ref.pairwise_euclidean(x.double()), labels)
    assert torch.equal(fwd.ap_idx.long().cpu(), m.ap_idx) and torch.equal(fwd.an_idx.long().cpu(), m.an_idx)
    xg = xd.clone().requires_grad_()
    hard, soft = triton_ops.triplet_pair_losses(xg, td, ld)
    (hard + soft).backward()
    x64 = x.double().requires_grad_()
    r_hard, r_soft = ref.triplet_pair_losses(x64, t.double(), labels)
    (r_hard + r_soft).backward()
    # distances are exact (small integers); only exp/log round: correctly on CPU, approx on CUDA
    rtol, gtol = (1e-6, 1e-5) if device.type == "cpu" else (tol.loss, tol.grad)
    torch.testing.assert_close(hard.cpu().double(), r_hard.detach(), rtol=rtol, atol=1e-7)
    torch.testing.assert_close(soft.cpu().double(), r_soft.detach(), rtol=rtol, atol=1e-7)
    torch.testing.assert_close(xg.grad.cpu().double(), x64.grad, rtol=gtol, atol=1e-6)


def test_all_distinct_labels_self_is_positive(gen, device, tol):
    """Only self as positive: d_ap is exactly sqrt(1e-12) even for large-norm rows (no diagonal noise)."""
    n, d = 37, 129
    x = (torch.randn(n, d, generator=gen) * 30 + 50)
    labels = torch.randperm(n, generator=gen)
    fwd = triplet.triplet_forward(x.to(device), x.flip(0).contiguous().to(device), labels.to(device))
    assert torch.equal(fwd.ap_idx.long().cpu(), torch.arange(n))
    assert torch.all(fwd.d_ap.cpu() == torch.tensor(1e-12, dtype=torch.float32).sqrt())
    _check(x, x.flip(0).contiguous(), labels, gen, device, tol)


def test_one_identity_gives_zero_loss_and_gradient(gen, device, tol):
    x = _features(9, 33, torch.float32, gen).to(device, copy=True).requires_grad_()
    labels = torch.full((9,), 3, device=device)
    hard, soft = triton_ops.triplet_pair_losses(x, _features(9, 33, torch.float32, gen).to(device), labels)
    (hard + soft).backward()
    assert hard.item() == 0.0 and soft.item() == 0.0
    assert torch.count_nonzero(x.grad) == 0


def test_non_contiguous_inputs_and_teacher_gets_no_gradient(gen, device, tol):
    base = _features(129, 64, torch.float32, gen)
    x = base.t()[:, :64]  # (64 x 129) strided view
    t = _features(129, 64, torch.float32, gen).t()[:, :64]
    assert not x.is_contiguous() and not t.is_contiguous()
    t.requires_grad_()
    _check(x, t.detach(), _labels(64, 16, gen), gen, device, tol)
    t = t.detach().to(device).requires_grad_()
    hard, soft = triton_ops.triplet_pair_losses(x.detach().to(device).requires_grad_(), t,
                                                _labels(64, 16, gen).to(device))
    (hard + soft).backward()
    assert t.grad is None


def test_single_loss_wrappers_and_dispatch(gen, device, tol):
    n, d = 24, 17
    x, t, labels = _features(n, d, torch.float32, gen), _features(n, d, torch.float32, gen), _labels(n, 6, gen)
    x64 = x.double()
    xd, td, ld = x.to(device), t.to(device), labels.to(device)
    torch.testing.assert_close(losses.softmax_triplet_loss(xd, ld, backend="triton").cpu().double(),
                               ref.softmax_triplet_loss(x64, labels), rtol=tol.loss, atol=1e-6)
    torch.testing.assert_close(losses.soft_softmax_triplet_loss(xd, td, ld, backend="triton").cpu().double(),
                               ref.soft_softmax_triplet_loss(x64, t.double(), labels), rtol=tol.loss, atol=1e-6)
    # the hard-only kernel path (no teacher) has the hard loss's gradient
    xg, xr = xd.clone().requires_grad_(), x64.clone().requires_grad_()
    triton_ops.softmax_triplet_loss(xg, ld).backward()
    ref.softmax_triplet_loss(xr, labels).backward()
    torch.testing.assert_close(xg.grad.cpu().double(), xr.grad, rtol=tol.grad, atol=tol.grad * xr.grad.abs().max().item())


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(8, 5)
    lab = torch.zeros(8, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"teacher_features has shape \(8, 4\)"):
        triton_ops.triplet_pair_losses(x, torch.randn(8, 4), lab)
    with pytest.raises(ValueError, match=r"labels must have shape \(8,\)"):
        triton_ops.triplet_pair_losses(x, x, lab[:7])
    with pytest.raises(TypeError, match="labels must be int64"):
        triton_ops.softmax_triplet_loss(x, lab.int())
    with pytest.raises(ValueError, match="must be 2-D"):
        triton_ops.softmax_triplet_loss(x.view(-1), lab)
    with pytest.raises(TypeError, match="float64"):
        triton_ops.softmax_triplet_loss(x.double(), lab)
    with pytest.raises(ValueError, match="non-empty"):
        triton_ops.softmax_triplet_loss(torch.randn(0, 5), lab[:0])


def test_cuda_block_sizes_under_the_interpreter(gen, monkeypatch, device, tol):
    """The tile sizes the CUDA launchers use (64 x 64 x 32) give the same results."""
    from fastmmt.kernels import distance

    monkeypatch.setattr(distance, "INTERPRETER_BLOCKS", distance.CUDA_BLOCKS)
    x, t = _features(70, 40, torch.float32, gen), _features(70, 40, torch.float32, gen)
    _check(x, t, _labels(70, 17, gen), gen, device, tol)

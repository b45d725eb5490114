"""Fused Triton logits kernel (CE + soft entropy, on ``device``: compiled on CUDA, interpreted on
CPU) against reference.py in float64 on CPU.

Fresh random inputs each run (seed printed; pin with FASTMMT_TEST_SEED). Loss tolerance
``tol.loss`` relative for every dtype (float32 compute on the exact input values; conftest says
why CUDA's is wider). Gradient tolerance, relative to the largest reference entry: fp32
``tol.grad``, fp16 2e-3, bf16 1.6e-2 (rounded to the dtype).
"""
from __future__ import annotations


import pytest
import torch

from fastmmt.ops import losses
from fastmmt.ops import reference as ref
from fastmmt.ops import triton_ops

GRAD_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _logits(n: int, k: int, dtype: torch.dtype, gen: torch.Generator, scale: float = 4.0) -> torch.Tensor:
    return (torch.randn(n, k, generator=gen) * scale).to(dtype)


def _check_pair(s: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, eps: float, gen: torch.Generator,
                device: torch.device, tol) -> None:
    dtype = s.dtype
    sd = s.detach().to(device).requires_grad_()
    ce, se = triton_ops.logits_pair_losses(sd, t.to(device), labels.to(device), eps)
    w_ce, w_se = torch.rand(2, generator=gen, dtype=torch.float64) + 0.5
    (w_ce * ce + w_se * se).backward()
    assert ce.dtype == se.dtype == torch.float32 and sd.grad.dtype == dtype
    ce, se, grad = ce.cpu(), se.cpu(), sd.grad.cpu()

    s64 = s.detach().double().requires_grad_()
    r_ce = ref.cross_entropy_label_smooth(s64, labels, eps)
    r_se = ref.soft_entropy(s64, t.double())
    (w_ce * r_ce + w_se * r_se).backward()
    torch.testing.assert_close(ce.double(), r_ce.detach(), rtol=tol.loss, atol=1e-6)
    torch.testing.assert_close(se.double(), r_se.detach(), rtol=tol.loss, atol=1e-6)
    scale = s64.grad.abs().max().item()
    gtol = tol.grad if dtype == torch.float32 else GRAD_TOL[dtype]
    torch.testing.assert_close(grad.double(), s64.grad, rtol=gtol, atol=gtol * scale)


@pytest.mark.parametrize("n,k", [(4, 5), (6, 1503), (64, 500), (130, 5)])
def test_fp32_matches_reference(n, k, gen, device, tol):
    _check_pair(_logits(n, k, torch.float32, gen), _logits(n, k, torch.float32, gen),
                torch.randint(0, k, (n,), generator=gen), 0.1, gen, device, tol)


@pytest.mark.slow
@pytest.mark.parametrize("n,k", [(64, 1503), (130, 1503), (130, 500)])
def test_fp32_matches_reference_large(n, k, gen, device, tol):
    _check_pair(_logits(n, k, torch.float32, gen), _logits(n, k, torch.float32, gen),
                torch.randint(0, k, (n,), generator=gen), 0.1, gen, device, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_match_reference(dtype, gen, device, tol):
    _check_pair(_logits(33, 700, dtype, gen), _logits(33, 700, dtype, gen),
                torch.randint(0, 700, (33,), generator=gen), 0.1, gen, device, tol)


def test_online_softmax_rescales_across_blocks(gen, device, tol):
    """Rows whose maximum keeps growing block after block, with a large spread (exp would overflow)."""
    n, k = 8, 1100
    ramp = torch.linspace(-300.0, 300.0, k)
    s = ramp + torch.randn(n, k, generator=gen)
    t = ramp.flip(0) * 0.5 + torch.randn(n, k, generator=gen)
    t[::2] = ramp + torch.randn(n // 2, k, generator=gen)  # teacher max in the last block too
    _check_pair(s, t, torch.randint(0, k, (n,), generator=gen), 0.1, gen, device, tol)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_epsilon_and_single_loss_wrappers(eps, gen, device, tol):
    n, k = 10, 37
    s, t = _logits(n, k, torch.float32, gen), _logits(n, k, torch.float32, gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    sg, s64 = s.to(device, copy=True).requires_grad_(), s.double().requires_grad_()
    ce = losses.cross_entropy_label_smooth(sg, labels.to(device), eps, backend="triton")
    r_ce = ref.cross_entropy_label_smooth(s64, labels, eps)
    ce.backward()
    r_ce.backward()
    torch.testing.assert_close(ce.cpu().double(), r_ce.detach(), rtol=tol.loss, atol=1e-6)
    torch.testing.assert_close(sg.grad.cpu().double(), s64.grad, rtol=tol.grad, atol=1e-7)
    sg.grad, s64.grad = None, None
    se = losses.soft_entropy(sg, t.to(device), backend="triton")
    r_se = ref.soft_entropy(s64, t.double())
    se.backward()
    r_se.backward()
    torch.testing.assert_close(se.cpu().double(), r_se.detach(), rtol=tol.loss, atol=1e-6)
    torch.testing.assert_close(sg.grad.cpu().double(), s64.grad, rtol=tol.grad, atol=1e-7)


def test_only_one_term_used_in_backward(gen, device, tol):
    """The pair op with only CE (or only SE) feeding the loss gives that term's gradient."""
    n, k = 12, 50
    s, t = _logits(n, k, torch.float32, gen), _logits(n, k, torch.float32, gen)
    labels = torch.randint(0, k, (n,), generator=gen)
    for which in (0, 1):
        sg, s64 = s.to(device, copy=True).requires_grad_(), s.double().requires_grad_()
        triton_ops.logits_pair_losses(sg, t.to(device), labels.to(device), 0.1)[which].backward()
        r = ref.cross_entropy_label_smooth(s64, labels, 0.1) if which == 0 else ref.soft_entropy(s64, t.double())
        r.backward()
        torch.testing.assert_close(sg.grad.cpu().double(), s64.grad, rtol=tol.grad, atol=1e-7)


def test_non_contiguous_and_teacher_gets_no_gradient(gen, device, tol):
    s = _logits(300, 40, torch.float32, gen).t()  # (40 x 300) strided
    t = _logits(300, 40, torch.float32, gen).t()
    assert not s.is_contiguous()
    _check_pair(s, t, torch.randint(0, 300, (40,), generator=gen), 0.1, gen, device, tol)
    tg = t.to(device, copy=True).requires_grad_()
    ce, se = triton_ops.logits_pair_losses(s.to(device, copy=True).requires_grad_(), tg,
                                           torch.zeros(40, dtype=torch.int64, device=device))
    (ce + se).backward()
    assert tg.grad is None


def test_bad_inputs_raise_clear_errors():
    s = torch.randn(6, 9)
    lab = torch.zeros(6, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(6, 8\)"):
        triton_ops.logits_pair_losses(s, torch.randn(6, 8), lab)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\)"):
        triton_ops.logits_pair_losses(s, s, torch.full((6,), 9))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 9\)"):
        triton_ops.cross_entropy_label_smooth(s, torch.full((6,), -1))
    with pytest.raises(ValueError, match=r"labels must have shape \(6,\)"):
        triton_ops.cross_entropy_label_smooth(s, lab[:5])
    with pytest.raises(TypeError, match="labels must be int64"):
        triton_ops.cross_entropy_label_smooth(s, lab.int())
    with pytest.raises(ValueError, match="logits must be 2-D"):
        triton_ops.cross_entropy_label_smooth(s[None], lab)
    with pytest.raises(TypeError, match="float64"):
        triton_ops.soft_entropy(s.double(), s.double())


def test_cuda_block_sizes_under_the_interpreter(gen, monkeypatch, device, tol):
    """The tile sizes the CUDA launchers use (4 rows x 1024 classes) give the same results."""
    from fastmmt.kernels import logits

    monkeypatch.setattr(logits, "INTERPRETER_BLOCKS", logits.CUDA_BLOCKS)
    _check_pair(_logits(10, 1100, torch.float32, gen), _logits(10, 1100, torch.float32, gen),
                torch.randint(0, 1100, (10,), generator=gen), 0.1, gen, device, tol)

"""The losses compute distances (and everything else) in float32 under any autocast.

Under autocast ``xs @ ys.t()`` runs in bf16/fp16 even after ``.to(float32)``; the distance
expansion |a|^2 + |b|^2 - 2ab then cancels (|a|^2 ~ 2e3 for pooled ResNet-50 features, bf16 keeps
~3 significant digits) and mining, losses and gradients are wrong. The ops switch autocast off
around themselves, so under CPU bf16 autocast every MMT term of float32 inputs must stay within
1e-3 relative of the float64 value (float32 arithmetic is ~1e-6 off; bf16 was ~0.4 off), and
every gradient must equal the float32 run without autocast.
"""
from __future__ import annotations

import pytest
import torch

from fastmmt.ops import mmt_loss, pairwise_euclidean

TERMS = ("total", "ce", "tri", "soft_ce", "soft_tri")


def _pooled_like(n_ids: int, per_id: int, d: int, k: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Non-negative features like ReLU + average pooled ResNet-50 outputs: a large shared part
    (|x|^2 ~ 0.3 D), small per-identity offsets and per-image noise of the same size, so mining
    is not trivial and the losses are O(1); logits of a K-way classifier; P x K labels."""
    n = n_ids * per_id
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    shared = torch.rand(d, generator=gen)
    offsets = 0.05 * torch.randn(n_ids, d, generator=gen)
    feats = {name: (shared + offsets[labels] + 0.05 * torch.randn(n, d, generator=gen)).relu()
             for name in ("f1", "f2", "f1_t", "f2_t")}
    logits = {name: torch.randn(n, k, generator=gen) * 3 for name in ("p1", "p2", "p1_t", "p2_t")}
    return {**feats, **logits, "labels": labels}


def _run(inputs: dict[str, torch.Tensor], backend: str, dtype: torch.dtype, autocast: bool,
         device: torch.device = torch.device("cpu")):
    args = {k: (v.detach().to(device, dtype, copy=True).requires_grad_() if v.is_floating_point() else v.to(device))
            for k, v in inputs.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        out = mmt_loss(**{k: args[k] for k in args}, backend=backend)
    out.total.backward()
    return out, {k: args[k].grad for k in ("f1", "f2", "p1", "p2")}


@pytest.mark.parametrize("backend,d", [("torch", 2048), ("triton", 129)])
def test_mmt_loss_under_bf16_autocast_matches_float64(backend, d, gen, device):
    """16 identities x 4 images; torch at ResNet-50's D=2048, triton (compiled on CUDA, the
    interpreter on CPU) at a cheap D; each on the session's device, the reference in float64 on CPU."""
    inputs = _pooled_like(16, 4, d, 100, gen)
    out, grads = _run(inputs, backend, torch.float32, autocast=True, device=device)
    ref, ref_grads = _run(inputs, "torch", torch.float64, autocast=False)
    for name in TERMS:
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32, name
        rel = ((got.double().cpu() - want) / want).abs().item()
        assert rel <= 1e-3, f"{name}: relative error {rel:.3g} under bf16 autocast"
    # Gradients follow the mined pairs, and where two candidates of a row are closer than
    # float32's rounding, float32 and float64 may legitimately mine different ones (a near tie,
    # not an autocast error). So the gradients are checked against the same float32 arithmetic
    # without autocast: autocast must change nothing (bf16 matmuls would move them by ~1e-2).
    _, plain_grads = _run(inputs, backend, torch.float32, autocast=False, device=device)
    for name, g in grads.items():
        torch.testing.assert_close(g, plain_grads[name], rtol=1e-5, atol=1e-6 * plain_grads[name].abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: autocast changed the gradient: {m}")


def _float32_bound(x: torch.Tensor) -> torch.Tensor:
    """What float32 rounding allows in ``|a|^2 + |b|^2 - 2ab`` (squared distances): a few
    float32 epsilons of ``|a|^2 + |b|^2``. A bf16 product misses it by ~2^16."""
    sq = (x.double() ** 2).sum(1)
    return 8 * torch.finfo(torch.float32).eps * (sq[:, None] + sq[None, :])


def test_pairwise_euclidean_under_bf16_autocast(gen):
    """Under bf16 autocast the distances are the float32 ones (bit for bit) and within float32
    rounding of float64, squared distance by squared distance (a relative bound on the distance
    itself fails near-duplicate pairs on some seeds: cancellation, not autocast)."""
    x = _pooled_like(16, 4, 2048, 2, gen)["f1"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_euclidean(x, backend="torch")
    assert d.dtype == torch.float32
    assert torch.equal(d, pairwise_euclidean(x, backend="torch"))
    d64 = pairwise_euclidean(x.double(), backend="torch")
    bound = _float32_bound(x)
    assert ((d.double() ** 2 - d64 ** 2).abs() <= bound).all()
    bf16 = (x.bfloat16() @ x.bfloat16().t()).double()  # what an autocast matmul would compute
    sq = (x.double() ** 2).sum(1)
    assert ((sq[:, None] + sq[None, :] - 2 * bf16 - d64 ** 2).abs() > bound).any(), "the bound must catch bf16"

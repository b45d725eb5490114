"""The whole MMT objective through the Triton kernels (on ``device``) against ``mmt_loss`` on
float64 CPU copies.

Fresh random inputs each run (seed printed; pin with FASTMMT_TEST_SEED). Term tolerance
``tol.loss`` relative; gradient tolerance ``tol.grad`` (fp32) / 1.6e-2 (bf16) of the largest
reference entry (conftest says why CUDA's are wider).
"""
from __future__ import annotations

import pytest
import torch

from aot_compile import compile_for_sm90
from fastmmt.ops import MMTLoss, mmt_loss


def _inputs(n: int, d: int, k: int, n_ids: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    # Multiples of 1/8 in [0, 4]: every distance is exact in float32, so the mining (ties included)
    # must equal the float64 reference's on every row; no near-tie can flip with rounding.
    feats = {name: torch.randint(0, 33, (n, d), generator=gen) / 8.0 for name in ("f1", "f2", "f1_t", "f2_t")}
    logits = {name: torch.randn(n, k, generator=gen) * 3 for name in ("p1", "p2", "p1_t", "p2_t")}
    labels = torch.randint(0, n_ids, (n,), generator=gen)
    labels[: min(n, n_ids)] = torch.arange(min(n, n_ids))  # every pseudo-identity present
    return {**feats, **logits, "labels": labels % k}


def _run(inputs: dict[str, torch.Tensor], backend: str, dtype: torch.dtype | None = None, module: bool = False,
         device: torch.device | str = "cpu"):
    """Terms and student gradients (on CPU); teachers get requires_grad to check they get none."""
    args = {}
    for name, v in inputs.items():
        v = v.to(dtype) if (dtype is not None and v.is_floating_point()) else v.clone()
        v = v.to(device)
        args[name] = v.requires_grad_() if v.is_floating_point() else v
    fn = MMTLoss(backend=backend) if module else (lambda **kw: mmt_loss(**kw, backend=backend))
    out = fn(**args)
    out.total.backward()
    grads = {n: args[n].grad.cpu() for n in ("f1", "f2", "p1", "p2")}
    assert all(args[n].grad is None for n in ("f1_t", "f2_t", "p1_t", "p2_t"))
    return type(out)(*(t.cpu() for t in out)), grads


def _compare(inputs: dict[str, torch.Tensor], device: torch.device, tol, module: bool = False) -> None:
    out, grads = _run(inputs, "triton", module=module, device=device)
    ref, ref_grads = _run(inputs, "torch", dtype=torch.float64)
    for name in ("total", "ce", "tri", "soft_ce", "soft_tri"):
        got, want = getattr(out, name), getattr(ref, name)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.detach(), rtol=tol.loss, atol=1e-6, msg=name)
    for name, g in grads.items():
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(g.double(), ref_grads[name], rtol=tol.grad, atol=tol.grad * scale, msg=name)


def test_mmt_loss_triton_matches_float64_reference(gen, device, tol):
    _compare(_inputs(48, 129, 500, 12, gen), device, tol)


def test_mmt_loss_module_with_triton_backend(gen, device, tol):
    _compare(_inputs(16, 40, 7, 4, gen), device, tol, module=True)


def test_mmt_loss_bf16_inputs_give_float32_loss_and_bf16_grads(gen, device, tol):
    inputs = _inputs(32, 64, 50, 8, gen)
    out, grads = _run(inputs, "triton", dtype=torch.bfloat16, device=device)
    rounded = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in inputs.items()}
    ref, ref_grads = _run(rounded, "torch", dtype=torch.float64)
    torch.testing.assert_close(out.total.double(), ref.total.detach(), rtol=tol.loss, atol=1e-6)
    for name, g in grads.items():
        assert g.dtype == torch.bfloat16
        scale = ref_grads[name].abs().max().item()
        torch.testing.assert_close(g.double(), ref_grads[name], rtol=1.6e-2, atol=1.6e-2 * scale, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("n,k", [(64, 500), (128, 1500)])
def test_mmt_loss_triton_full_size(n, k, gen, device, tol):
    _compare(_inputs(n, 2048, k, n // 4, gen), device, tol)


_MMT_KERNELS = ("triplet_fwd[teacher=True]", "triplet_bwd", "logits_fwd[teacher=True,labels=True]",
                "logits_bwd[teacher=True,labels=True]")


def test_mmt_kernels_compile_for_sm90():
    """The GPU path of the kernels mmt_loss launches is compiled (not just interpreted) to a cubin."""
    sizes = compile_for_sm90(_MMT_KERNELS)
    assert sorted(sizes) == sorted(f"{k}[float32]" for k in _MMT_KERNELS)
    assert all(size > 0 for size in sizes.values())


def _variant(kernel: str, constexprs: dict) -> tuple:
    """A kernel variant: the kernel's name and its non-block constexpr flags."""
    return kernel.lstrip("_"), tuple(sorted((k, v) for k, v in constexprs.items() if not k.startswith("BLOCK_")))


def _launched_variants(monkeypatch, gen, device: torch.device) -> set[tuple]:
    """Every kernel variant the public ops launch, recorded at the launch: each op forward and
    backward (CE, soft entropy, both at once, hard/soft triplet, self and cross distances, and the
    compat modules' margin triplets)."""
    from fastmmt import ops
    from fastmmt.kernels import distance, logits, memory, triplet
    from fastmmt.ops import triton_ops

    seen: set[tuple] = set()

    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **constexprs):
                seen.add(_variant(self.name, constexprs))
                return self.kernel[grid](*args, **constexprs)
            return launch

    for mod in (distance, logits, triplet, memory):
        for name in [n for n in vars(mod) if n.endswith(("_fwd", "_bwd", "_update"))]:
            monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name)))
    x, y, s, t = (torch.randn(8, 6, generator=gen).to(device).requires_grad_() for _ in range(4))
    lab = torch.arange(8, device=device) % 3
    for loss in (ops.cross_entropy_label_smooth(s, lab, backend="triton"),
                 ops.soft_entropy(s, t, backend="triton"),
                 sum(ops.logits_pair_losses(s, t, lab, backend="triton")),
                 ops.softmax_triplet_loss(x, lab, backend="triton"),
                 sum(ops.triplet_pair_losses(x, y, lab, backend="triton")),
                 ops.pairwise_euclidean(x, backend="triton").sum(),
                 ops.pairwise_euclidean(x, y, backend="triton").sum(),
                 triton_ops.margin_triplet_loss(x, lab, 0.3)[0],  # the compat modules' variants
                 triton_ops.margin_softmax_triplet_loss(x, lab, 0.3)[0],
                 ops.cluster_memory_loss(x, lab, torch.randn(3, 6, device=device), backend="triton"),
                 ops.cluster_memory_loss(x, lab, torch.randn(3, 6, device=device), use_hard=True, backend="triton")):
        loss.backward()
    return seen


def test_aot_compiles_exactly_the_variants_the_launchers_launch(monkeypatch, gen, device):
    """kernels/aot.py's spec list is the set of variants the ops really launch: none is left
    uncompiled (a new kernel or flag without an AOT spec fails here) and none is dead."""
    from fastmmt.kernels import aot

    specs = [_variant(getattr(fn, "fn", fn).__name__, consts) for _, fn, _, consts in aot._specs("float32")]
    assert len(set(specs)) == len(specs)
    assert set(specs) == _launched_variants(monkeypatch, gen, device)


@pytest.mark.slow
def test_every_kernel_compiles_for_sm90_in_every_dtype():
    from fastmmt.kernels import aot

    dtypes = ("float32", "bfloat16", "float16")
    sizes = compile_for_sm90(None, dtypes=dtypes)
    # every spec in every dtype (which specs: exactly the launched variants, checked above)
    assert sorted(sizes) == sorted(f"{name}[{dt}]" for dt in dtypes for name, *_ in aot._specs(dt))
    assert all(size > 0 for size in sizes.values())


def test_cpu_tensors_without_the_interpreter_get_a_clear_error(monkeypatch, gen):
    """On a CUDA machine (no interpreter) a CPU tensor given to the triton backend is named, with
    what to do, instead of a pointer error from inside the launcher."""
    from fastmmt import ops

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(8, 6, generator=gen)
    for call in (lambda: ops.pairwise_euclidean(x, backend="triton"),
                 lambda: ops.softmax_triplet_loss(x, torch.arange(8) % 3, backend="triton"),
                 lambda: ops.cross_entropy_label_smooth(x, torch.arange(8) % 6, backend="triton")):
        with pytest.raises(ValueError, match=r"is on cpu: the triton backend runs compiled kernels on CUDA "
                                             r"tensors, or CPU tensors under the Triton interpreter"):
            call()
    assert ops.pairwise_euclidean(x, backend="auto").shape == (8, 8)  # auto takes the torch path

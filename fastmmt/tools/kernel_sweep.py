"""Call every Triton kernel forward and backward once at odd shapes (for compute-sanitizer).

``python -m fastmmt.tools.kernel_sweep`` runs the fused ops with ``backend="triton"`` at N 65,
D 129, K 1025 (none a multiple of a tile; K also the memory banks' rows) in float32, bfloat16 and float16 on CUDA (on the CPU
under ``TRITON_INTERPRET=1``), checks every output and gradient is finite and prints one line
per op. ``scripts/gpu_check.sh`` runs it under ``compute-sanitizer --tool memcheck``: an
out-of-bounds tile load or store shows up there, not in the values.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def _bank(k: int, d: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """A memory bank of ``k`` L2-normalised float32 rows."""
    return torch.nn.functional.normalize(torch.randn(k, d, generator=gen), dim=1).to(device)


def sweep(n: int = 65, d: int = 129, k: int = 1025, device: str = "cuda",
          dtypes: tuple[torch.dtype, ...] = DTYPES, seed: int = 0) -> list[str]:
    """Run every op forward + backward; return the names of the calls made (all checked finite)."""
    from fastmmt.ops import losses, memory

    gen = torch.Generator().manual_seed(seed)
    done = []
    for dtype in dtypes:
        feats = (torch.randn(n, d, generator=gen).abs() * 2).to(device, dtype)
        teach = (torch.randn(n, d, generator=gen).abs() * 2).to(device, dtype)
        other = (torch.randn(n + 3, d, generator=gen).abs() * 2).to(device, dtype)
        logits = (torch.randn(n, k, generator=gen) * 3).to(device, dtype)
        t_logits = (torch.randn(n, k, generator=gen) * 3).to(device, dtype)
        ids = torch.randint(0, max(2, n // 4), (n,), generator=gen).to(device)
        classes = torch.randint(0, k, (n,), generator=gen).to(device)
        calls: dict[str, tuple[Callable, tuple[torch.Tensor, ...]]] = {
            "pairwise_euclidean[self]": (lambda x: losses.pairwise_euclidean(x, backend="triton"), (feats,)),
            "pairwise_euclidean[cross]": (lambda x, y: losses.pairwise_euclidean(x, y, backend="triton"),
                                          (feats, other)),
            "softmax_triplet_loss": (lambda x: losses.softmax_triplet_loss(x, ids, backend="triton"), (feats,)),
            "triplet_pair_losses": (lambda x: losses.triplet_pair_losses(x, teach, ids, backend="triton"), (feats,)),
            "cross_entropy_label_smooth": (lambda p: losses.cross_entropy_label_smooth(p, classes, 0.1, "triton"),
                                           (logits,)),
            "soft_entropy": (lambda p: losses.soft_entropy(p, t_logits, backend="triton"), (logits,)),
            "logits_pair_losses": (lambda p: losses.logits_pair_losses(p, t_logits, classes, 0.1, "triton"),
                                   (logits,)),
            # memory banks: K rows of d features (float32, updated in place by the backward)
            "cluster_memory_loss": (lambda x: memory.cluster_memory_loss(x, classes, _bank(k, d, device, gen),
                                                                         backend="triton"), (feats,)),
            "cluster_memory_loss[hard]": (lambda x: memory.cluster_memory_loss(
                x, classes, _bank(k, d, device, gen), use_hard=True, backend="triton"), (feats,)),
            "hybrid_memory_loss": (lambda x: memory.hybrid_memory_loss(
                x, classes, _bank(k, d, device, gen), torch.arange(k, device=device) // 3, backend="triton"), (feats,)),
        }
        for name, (fn, inputs) in calls.items():
            leaves = [_leaf(x) for x in inputs]
            out = fn(*leaves)
            outs = out if isinstance(out, tuple) else (out,)
            sum((o.float() * (i + 1)).sum() for i, o in enumerate(outs)).backward()
            for t in (*outs, *(leaf.grad for leaf in leaves)):
                if not bool(torch.isfinite(t).all()):
                    raise RuntimeError(f"{name} [{dtype}]: non-finite values")
            done.append(f"{name}[{str(dtype).replace('torch.', '')}]")
    if device == "cuda":
        torch.cuda.synchronize()
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=65)
    p.add_argument("--d", type=int, default=129)
    p.add_argument("--k", type=int, default=1025)
    p.add_argument("--device", default="cuda")
    args = p.parse_args(argv)
    for name in sweep(args.n, args.d, args.k, args.device):
        print(f"ok {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

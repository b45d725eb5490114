"""Memory-bank contrastive losses of Cluster Contrast (``ClusterMemory``) and SpCL (``HybridMemory``).

A memory holds one L2-normalised row per cluster (Cluster Contrast) or per source class and target
image (SpCL). The loss is a softmax over ``x M^T / temp``; its gradient reads the memory as it was
BEFORE this step's update, and the update runs in the backward, as in the originals (a forward
without a backward leaves the memory unchanged). The update, per sample in batch order:
``c <- m c + (1 - m) x`` then ``c <- c / |c|``; samples of different rows may run in parallel,
samples of one row run in batch order (the result depends on it). ``hard``: one update per row,
with the row's sample of LOWEST similarity ``x . c`` (Cluster Contrast's ``CM_Hard``).

Backends (``backend=``): ``torch`` (plain torch: the update in rounds, one per sample of a row);
``triton`` (:mod:`fastmmt.kernels.memory`: fused ClusterMemory forward/backward and a one-launch
update; CUDA, or CPU under the Triton interpreter); ``ext`` (CPU tensors: the torch loss with the
update in the compiled extension ``fastmmt._C``, rows in parallel, each row's samples in batch
order). ``auto``: ``ext`` for CPU tensors when the extension is built and takes the memory
(float32/float64, rows contiguous), else Triton for CUDA tensors or under the interpreter, else
torch. All compute in float32 with autocast off (float64 memories stay float64 on the torch and
ext backends). The Triton backend reads nothing on the host; the torch backend's update reads the
largest per-row sample count once per step (its number of rounds); ``ext`` runs on the host.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmmt.ops._dispatch import BACKENDS, float32_region, resolve_backend, triton_interpreter_on
from fastmmt.ops.ema import load_extension

MEMORY_BACKENDS = BACKENDS + ("ext",)
_MEMORY_DTYPES = (torch.float32, torch.float64)


def _kernels():
    """:mod:`fastmmt.kernels.memory`, imported on first use (importing triton needs a GPU or the
    interpreter; the torch backend must not import it)."""
    from fastmmt.kernels import memory as module

    return module


def _ext():
    """``fastmmt._C`` when it is built with the memory update, else None (a build that predates
    the update has only the EMA)."""
    ext = load_extension()
    return ext if ext is not None and hasattr(ext, "memory_ordered_update_") else None


def _ext_takes(memory: torch.Tensor) -> bool:
    """True when the ext backend can update ``memory`` in place."""
    return (_ext() is not None and memory.device.type == "cpu" and memory.dtype in _MEMORY_DTYPES
            and (memory.shape[1] <= 1 or memory.stride(1) == 1))


def _check_ext(memory: torch.Tensor) -> None:
    """Why backend='ext' cannot update ``memory`` (a clear error), or nothing."""
    if _ext() is None:
        raise RuntimeError("backend='ext' requested but fastmmt._C is not built with the memory update "
                           "(reinstall with `pip install -e . --no-build-isolation`, or use backend='torch')")
    if memory.device.type != "cpu":
        raise ValueError(f"the memory is on {memory.device}: the ext backend runs on CPU tensors "
                         "(use backend='auto' or 'triton' on CUDA)")
    if memory.shape[1] > 1 and memory.stride(1) != 1:
        raise ValueError("the memory must have contiguous rows (stride 1 along features): it is updated in place")


def ordered_update_torch_(memory: torch.Tensor, x: torch.Tensor, indexes: torch.Tensor, momentum: float,
                          hard: bool = False) -> None:
    """The ordered momentum update in plain torch: round r updates, in parallel, every row's r-th
    sample of the batch (``hard``: one round with each row's least similar sample)."""
    x = x.to(memory.dtype)
    b = x.shape[0]
    pos = torch.arange(b, device=x.device)
    if hard:
        sims = (x * memory[indexes]).sum(1)
        lowest = torch.full((memory.shape[0],), float("inf"), dtype=sims.dtype, device=x.device)
        lowest = lowest.scatter_reduce(0, indexes, sims, "amin")
        cand = torch.where(sims == lowest[indexes], pos, b)
        first = torch.full((memory.shape[0],), b, dtype=pos.dtype, device=x.device)
        first = first.scatter_reduce(0, indexes, cand, "amin")
        picked = torch.nonzero(first[indexes] == pos).squeeze(1)  # one sample per row
        rows = indexes[picked]
        new = momentum * memory[rows] + (1.0 - momentum) * x[picked]
        memory[rows] = new / new.norm(dim=1, keepdim=True)
        return
    order = torch.argsort(indexes, stable=True)  # by row, batch order within a row
    sorted_rows = indexes[order]
    starts = torch.ones(b, dtype=torch.bool, device=x.device)
    starts[1:] = sorted_rows[1:] != sorted_rows[:-1]
    rank = pos - torch.cummax(torch.where(starts, pos, 0), 0).values  # position within its row
    by_round = torch.argsort(rank, stable=True)
    counts = torch.bincount(rank).tolist()  # the one host read: samples per round
    s = 0
    for count in counts:
        sel = order[by_round[s:s + count]]
        s += count
        rows = indexes.index_select(0, sel)  # distinct within a round
        new = memory.index_select(0, rows).mul_(momentum).add_(x.index_select(0, sel), alpha=1.0 - momentum)
        memory.index_copy_(0, rows, new.div_(new.norm(dim=1, keepdim=True)))


def _update(memory: torch.Tensor, x: torch.Tensor, indexes: torch.Tensor, momentum: float, hard: bool,
            backend: str) -> None:
    if backend == "triton":
        x = x.contiguous()
        ones = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        _kernels().ordered_update_(memory, x, ones, indexes.contiguous(), momentum, hard)
    elif backend == "ext":
        _ext().memory_ordered_update_(memory, x, indexes, momentum, hard)
    else:
        ordered_update_torch_(memory, x, indexes, momentum, hard)


class _MemoryProduct(torch.autograd.Function):
    """``x M^T``; the backward returns ``g M`` and then updates M in place (the originals' CM/HM)."""

    @staticmethod
    def forward(ctx, x, indexes, memory, momentum, hard, backend):
        ctx.memory, ctx.momentum, ctx.hard, ctx.backend = memory, momentum, hard, backend
        ctx.save_for_backward(x, indexes)
        return x.mm(memory.t())

    @staticmethod
    def backward(ctx, grad):
        x, indexes = ctx.saved_tensors
        gx = grad.mm(ctx.memory) if ctx.needs_input_grad[0] else None
        _update(ctx.memory, x.detach(), indexes, ctx.momentum, ctx.hard, ctx.backend)
        return gx, None, None, None, None, None


class _ClusterMemoryTriton(torch.autograd.Function):
    """Fused normalise + logits + mean cross-entropy; the backward then runs the ordered update."""

    @staticmethod
    def forward(ctx, x, targets, memory, temp, momentum, hard):
        fwd = _kernels().cluster_memory_forward(x, memory, targets, temp)
        ctx.save_for_backward(x, targets, fwd.logits, fwd.rows)
        ctx.memory, ctx.temp, ctx.momentum, ctx.hard = memory, temp, momentum, hard
        return fwd.rows[0].sum() / x.shape[0]

    @staticmethod
    def backward(ctx, grad):
        x, targets, logits, rows = ctx.saved_tensors
        k = _kernels()
        fwd = k.ClusterMemoryForward(logits, rows)
        gx = k.cluster_memory_backward(x, ctx.memory, targets, fwd, grad.reshape(1).to(torch.float32), ctx.temp)
        k.ordered_update_(ctx.memory, x, fwd.inv_norm, targets, ctx.momentum, ctx.hard)
        return gx, None, None, None, None, None


def _check_inputs(inputs: torch.Tensor, targets: torch.Tensor, memory: torch.Tensor, name: str) -> None:
    if not isinstance(inputs, torch.Tensor) or inputs.dim() != 2:
        shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a 2-D tensor (batch x features), got {shape}")
    if not inputs.is_floating_point():
        raise TypeError(f"inputs must be floating point, got {inputs.dtype}")
    if inputs.shape[0] == 0:
        raise ValueError("inputs is an empty batch")
    if memory.dim() != 2 or memory.shape[1] != inputs.shape[1]:
        raise ValueError(f"inputs have {inputs.shape[1]} features but the memory is {tuple(memory.shape)}")
    if memory.dtype not in _MEMORY_DTYPES:
        raise TypeError(f"the memory must be float32 or float64, got {memory.dtype}")
    if memory.device != inputs.device:
        raise ValueError(f"inputs are on {inputs.device} but the memory is on {memory.device}")
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != inputs.shape[0]:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {inputs.shape[0]} entries (one per input row), got {shape}")
    if targets.dtype != torch.int64:
        raise TypeError(f"{name} must be int64, got {targets.dtype}")
    if targets.device != inputs.device:
        raise ValueError(f"{name} are on {targets.device} but the inputs are on {inputs.device}")


def _memory_backend(backend: str, memory: torch.Tensor, inputs: torch.Tensor) -> str:
    if backend not in MEMORY_BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {MEMORY_BACKENDS}")
    if backend == "ext":
        _check_ext(memory)
        return "ext"
    if backend == "auto" and _ext_takes(memory):
        return "ext"
    chosen = resolve_backend(backend, inputs, memory)
    if chosen != "triton":
        return chosen
    if memory.dtype != torch.float32:
        if backend == "triton":
            raise TypeError(f"the triton backend keeps the memory in float32, got {memory.dtype} "
                            "(use backend='torch' for float64)")
        return "torch"
    if memory.stride(1) != 1:
        raise ValueError("the memory must have contiguous rows (stride 1 along features): it is updated in place")
    if memory.device.type != "cuda" and not triton_interpreter_on():
        raise ValueError(f"the memory is on {memory.device}: the triton backend runs on CUDA tensors, or on CPU "
                         "tensors under the Triton interpreter (TRITON_INTERPRET=1); use backend='torch'")
    return chosen


@float32_region
def cluster_memory_loss(inputs: torch.Tensor, targets: torch.Tensor, features: torch.Tensor, temp: float = 0.05,
                        momentum: float = 0.2, use_hard: bool = False, backend: str = "auto") -> torch.Tensor:
    """Cluster Contrast's loss: ``cross_entropy(normalize(inputs) features^T / temp, targets)``;
    the backward updates ``features`` (cluster centroids, K x D) in place, ordered per cluster.

    A target outside [0, K) makes the Triton loss NaN (its sample updates nothing); the torch and
    ext backends' indexing raises.
    """
    _check_inputs(inputs, targets, features, "targets")
    chosen = _memory_backend(backend, features, inputs)
    if chosen == "triton":
        x = inputs.contiguous()
        return _ClusterMemoryTriton.apply(x, targets.contiguous(), features, float(temp), float(momentum),
                                          bool(use_hard))
    x = F.normalize(inputs.to(features.dtype), dim=1)
    logits = _MemoryProduct.apply(x, targets, features, float(momentum), bool(use_hard), chosen)
    return F.cross_entropy(logits / temp, targets)


def _label_slots(labels: torch.Tensor, num_rows: int) -> int:
    """How many label slots HybridMemory sums into (see :func:`hybrid_memory_loss`)."""
    return num_rows if labels.is_cuda else int(labels.max()) + 1


@float32_region
def hybrid_memory_loss(inputs: torch.Tensor, indexes: torch.Tensor, features: torch.Tensor, labels: torch.Tensor,
                       temp: float = 0.05, momentum: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """SpCL's loss: logits ``inputs features^T / temp`` over all memory rows, averaged per label
    (``labels``: one per row), softmax over the labels that own a row with the original's epsilons
    (``exp(s) / (sum + 1e-6)``, ``-log(p + 1e-6)``), NLL of ``labels[indexes]``. The backward
    updates rows ``indexes`` of ``features`` in place, ordered per row. ``backend`` picks the update
    (Triton kernel, extension or torch rounds); the rest is torch.

    Label slots: ``labels.max() + 1`` like the original on CPU tensors (a free read there); on CUDA
    one slot per memory row (no host read), so labels must lie in [0, num rows) there (SpCL's do).
    Empty slots are masked out, so both give the original's result."""
    _check_inputs(inputs, indexes, features, "indexes")
    n = features.shape[0]
    if labels.dim() != 1 or labels.shape[0] != n or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 vector with one entry per memory row ({n}), "
                         f"got {labels.dtype} of shape {tuple(labels.shape)}")
    chosen = _memory_backend(backend, features, inputs)
    x = inputs.to(features.dtype)
    if chosen == "triton":
        x = x.contiguous()
    logits = _MemoryProduct.apply(x, indexes, features, float(momentum), False, chosen)
    slots = _label_slots(labels, n)
    sums = torch.zeros(slots, x.shape[0], dtype=logits.dtype, device=x.device).index_add(0, labels, logits.t())
    nums = torch.zeros(slots, dtype=logits.dtype, device=x.device).index_add(0, labels, torch.ones_like(labels, dtype=logits.dtype))
    mask = nums > 0
    exps = torch.where(mask, torch.exp(sums.t() * torch.where(mask, 1.0 / (nums * temp), 0.0)), 0.0)
    target = exps.gather(1, labels[indexes][:, None]).squeeze(1)
    probs = target / (exps.sum(1) + 1e-6)  # the NLL reads only the targets' probabilities
    return -torch.log(probs + 1e-6).mean()

"""torch.distributed for the trainer: launched by ``torchrun``, one process per device.

The process group comes from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT`` or a rendezvous endpoint): NCCL on CUDA, gloo on the CPU. Without
``WORLD_SIZE > 1`` every helper here is the single-process identity, so the trainer has one code
path. What the trainer relies on (see docs/distributed.md):

- :func:`shard_range` / :func:`gather_rows`: feature extraction split into contiguous shards and
  all-gathered back in dataset order;
- :func:`run_on_main`: work done once on rank 0 (clustering, checkpoint writes) with its result,
  or its error, handed to every rank, so a failure on rank 0 never leaves the others waiting;
- :func:`gather_batch`: each rank's share of the P x K batch concatenated into the global batch,
  the local share keeping its autograd graph, so the loss (batch-hard mining included) is the
  single-process loss;
- :func:`broadcast_buffers`: BN running statistics of every network copied from rank 0, the
  ``nn.DataParallel`` semantics the reference trained with (replica 0's statistics survive).
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import logging
import os
import pickle
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

log = logging.getLogger("fastmmt.train")
T = TypeVar("T")


class DistributedError(RuntimeError):
    """A distributed run cannot start or continue; the message says which rank and why."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes checkpoints, logs and progress bars."""
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_main_process() -> bool:
    """Whether this process is rank 0 (true outside torchrun); usable before :func:`setup`."""
    return int(os.environ.get("RANK", "0")) == 0


def setup(device: torch.device) -> DistContext:
    """Join (or reuse) the process group torchrun describes; returns this rank's context.

    ``device`` is the resolved run device: a CUDA device becomes ``cuda:LOCAL_RANK`` and the
    backend NCCL; on the CPU the backend is gloo. Outside torchrun: rank 0 of 1 on ``device``.
    """
    world = env_world_size()
    if world <= 1:
        if device.type == "cuda":  # cuda:N is the current device: Triton and FAISS launch there
            device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
            torch.cuda.set_device(device)
        return DistContext(device=device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA "
                                   "device(s) on this node: lower --nproc-per-node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
        except ValueError as e:  # missing MASTER_ADDR / RANK: not launched by torchrun
            raise DistributedError(f"WORLD_SIZE={world} but the process group cannot start ({e}); "
                                   "launch with torchrun") from None
    ctx = DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device)
    if ctx.world_size != world:
        raise DistributedError(f"process group has {ctx.world_size} ranks but WORLD_SIZE is {world}")
    return ctx


def _release_captured_group(pg: object) -> None:
    """Drop references to ``pg`` that torch keeps in function defaults.

    ``torch.distributed.nn.functional`` (imported by ``DistributedDataParallel`` on first use,
    after the group exists) binds ``group=group.WORLD`` at import: its functions' defaults then
    hold the default process group. Without this, :func:`cleanup` unregisters the group but the
    group lives on with its C++ threads (gloo: two ``pt_gloo_runloop`` workers and the TCP loop)
    until the garbage collector frees it in the middle of interpreter shutdown. ``None`` is what
    those functions treat as the default group.
    """
    mod = sys.modules.get("torch.distributed.nn.functional")
    for fn in vars(mod).values() if mod is not None else ():
        if inspect.isfunction(fn) and fn.__defaults__ and any(d is pg for d in fn.__defaults__):
            fn.__defaults__ = tuple(None if d is pg else d for d in fn.__defaults__)


def cleanup(wait_for_all: bool = False) -> None:
    """Leave the process group (no-op when there is none) and free it now, on this thread.

    The group is destroyed here, its worker threads joined, rather than by the garbage collector
    during interpreter shutdown (see :func:`_release_captured_group`). ``wait_for_all`` (after a
    command succeeded): a barrier first, so no rank exits while rank 0 still writes its last
    files; torchrun stops every rank as soon as one fails, so a rank dying on its way out could
    otherwise cut rank 0's final log line or results short. A barrier that fails (a rank already
    gone) is logged and the group destroyed all the same.
    """
    if dist.is_available() and dist.is_initialized():
        if wait_for_all:
            try:
                dist.barrier()
            except (RuntimeError, dist.DistBackendError) as e:
                log.warning("final barrier failed (%s); leaving the process group anyway", e)
        pg = dist.group.WORLD
        dist.destroy_process_group()
        _release_captured_group(pg)
        del pg
        gc.collect()  # the group may also sit in reference cycles (DDP modules, autograd hooks)


def shard_range(n: int, ctx: DistContext) -> range:
    """This rank's contiguous share of ``n`` items (ceil(n / world) each, the last may be shorter)."""
    if n < ctx.world_size:
        raise DistributedError(f"{n} items cannot be shared by {ctx.world_size} ranks")
    chunk = -(-n // ctx.world_size)
    return range(min(n, ctx.rank * chunk), min(n, (ctx.rank + 1) * chunk))


def gather_rows(local: torch.Tensor, n: int, ctx: DistContext) -> torch.Tensor:
    """Rows of every rank's :func:`shard_range` shard, concatenated back into the full (n, ...)
    tensor in dataset order, on every rank, on the rank's device (features stay where the
    model is)."""
    if not ctx.enabled:
        return local
    chunk = -(-n // ctx.world_size)
    pad = torch.zeros((chunk, *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    pad[:len(local)] = local.to(ctx.device)
    parts = [torch.empty_like(pad) for _ in range(ctx.world_size)]
    dist.all_gather(parts, pad)
    return torch.cat(parts)[:n]


def gather_batch(ctx: DistContext, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each tensor's global batch: every rank's share concatenated in rank order.

    The other ranks' shares are detached copies; this rank's share keeps its graph, so a loss on
    the global batch backpropagates into the local forward only. Every rank computes the same
    loss; multiply it by ``world_size`` before ``backward`` so that DDP's gradient average equals
    the gradient of the global loss.
    """
    if not ctx.enabled:
        return tensors
    out = []
    for t in tensors:
        parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[ctx.rank] = t
        out.append(torch.cat(parts))
    return tuple(out)


def all_true(flag: bool, ctx: DistContext) -> bool:
    """Logical AND of ``flag`` over the ranks (one tiny all-reduce)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_true_tensor(flag: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Logical AND of a bool tensor over the ranks, left on the device (no host read)."""
    if not ctx.enabled:
        return flag
    t = flag.to(torch.int32).reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t[0].bool()


def _broadcast_tensors(tensors: Sequence[torch.Tensor], ctx: DistContext) -> None:
    """Copy rank 0's values of ``tensors`` into every rank's (one flat broadcast per dtype)."""
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for ts in groups.values():
        flat = _flatten_dense_tensors([t.detach() for t in ts]).to(ctx.device)
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for t, v in zip(ts, _unflatten_dense_tensors(flat, ts)):
                t.copy_(v)


def broadcast_buffers(modules: Iterable[nn.Module], ctx: DistContext) -> None:
    """Every buffer (BN running statistics, batch counters) of ``modules`` <- rank 0's."""
    if ctx.enabled:
        _broadcast_tensors([b for m in modules for b in m.buffers()], ctx)


def broadcast_state(modules: Iterable[nn.Module], ctx: DistContext) -> None:
    """Every parameter and buffer of ``modules`` <- rank 0's (shapes must already agree)."""
    if ctx.enabled:
        _broadcast_tensors([t for m in modules for t in (*m.parameters(), *m.buffers())], ctx)


def _portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling, else a :class:`DistributedError` with its message."""
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return DistributedError(f"{type(err).__name__}: {err}")


def on_host(value: Any) -> Any:
    """``value`` with every tensor it holds (directly, in a tuple/list/dict or a dataclass field)
    moved to the CPU; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: on_host(getattr(value, f.name))
                                             for f in dataclasses.fields(value) if f.init})
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(on_host(v) for v in value)
    if isinstance(value, dict):
        return {k: on_host(v) for k, v in value.items()}
    return value


def run_on_main(ctx: DistContext, fn: Callable[..., T], *args: Any) -> T:
    """Run ``fn(*args)`` on rank 0 only; every rank returns its result or raises its error.

    The result must be picklable (it is broadcast with ``broadcast_object_list``); its tensors travel
    on the host (:func:`on_host`): a pickled CUDA tensor would unpickle onto rank 0's GPU on every
    rank, opening a context there. The caller moves what it needs to its own device.
    """
    if not ctx.enabled:
        return fn(*args)
    payload: list[Any] = [None]
    err: Exception | None = None
    if ctx.is_main:
        try:
            payload = [(True, on_host(fn(*args)))]
        except Exception as e:  # handed to every rank, re-raised below
            err = e
            payload = [(False, _portable(e))]
    dist.broadcast_object_list(payload, src=0)
    ok, value = payload[0]
    if ok:
        return value
    if err is not None:
        raise err
    raise value


def check_same_on_all_ranks(value: Any, what: str, ctx: DistContext) -> None:
    """Raise on every rank when ``value`` (picklable) differs between ranks, naming ``what``."""
    if not ctx.enabled:
        return
    values: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(values, value)
    if any(v != values[0] for v in values):
        raise DistributedError(f"{what} differs between ranks: {values}")


def wrap_ddp(module: nn.Module, ctx: DistContext) -> nn.Module:
    """``module`` in DistributedDataParallel (buffers are synchronised by the trainer, not DDP)."""
    if not ctx.enabled:
        return module
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp_cls = nn.parallel.DistributedDataParallel
    return ddp_cls(module, device_ids=ids, **no_buffer_sync_kwargs(ddp_cls))


def no_buffer_sync_kwargs(ddp_cls: type) -> dict[str, bool]:
    """DDP arguments that stop it syncing buffers in forward: ``broadcast_buffers=False`` (every
    torch fastmmt supports) and, where the class has it (torch >= 2.13), ``forward_sync_buffers=False``."""
    kwargs = {"broadcast_buffers": False}
    if "forward_sync_buffers" in inspect.signature(ddp_cls.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    return kwargs


def convert_sync_bn(modules: Iterable[nn.Module], ctx: DistContext) -> list[nn.Module]:
    """``run.sync_bn``: BatchNorm layers become SyncBatchNorm (statistics over the global batch)."""
    modules = list(modules)
    if not ctx.enabled:
        return modules
    if ctx.device.type == "cpu":
        raise DistributedError("run.sync_bn=true needs CUDA devices: torch's SyncBatchNorm has no CPU "
                               "kernel; use run.sync_bn=false (per-rank BN) on the CPU")
    return [nn.SyncBatchNorm.convert_sync_batchnorm(m) for m in modules]


def check_batch_shares(batch_size: int, num_instances: int, ctx: DistContext) -> int:
    """Images per rank; each rank must get whole identities: P = batch_size / K divisible by world."""
    p = batch_size // num_instances
    if ctx.enabled and p % ctx.world_size:
        raise DistributedError(f"data.batch_size={batch_size} is {p} identities x {num_instances}; {p} "
                               f"identities cannot be split evenly over {ctx.world_size} ranks: choose "
                               f"data.batch_size as a multiple of {num_instances * ctx.world_size}")
    return batch_size // ctx.world_size

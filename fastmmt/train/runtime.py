"""Device, precision, seeding and determinism: the few facts every stage needs about the machine,
and :func:`setup_run`, which settles them once per stage run."""
from __future__ import annotations

import contextlib
import os
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from fastmmt.machine import listed_nvidia_gpus
from fastmmt.train import distributed as ddp
from fastmmt.train.distributed import DistContext
from fastmmt.train.options import FP16_REFUSED, ExperimentOptions, check_options


def cuda_unusable_reason() -> str:
    """Why this torch cannot use a GPU the driver lists (for messages)."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; install a CUDA build of torch"
    return (f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no usable device: check the driver "
            "supports that CUDA version and CUDA_VISIBLE_DEVICES")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> first CUDA device when present, else CPU (with a warning when the driver lists a
    GPU this torch cannot use); a missing CUDA device is an error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        gpus = listed_nvidia_gpus()
        if gpus:
            warnings.warn(f"run.device=auto: nvidia-smi lists {len(gpus)} GPU(s) but {cuda_unusable_reason()}; "
                          "training on the CPU (set run.device=cpu to choose it explicitly)", RuntimeWarning,
                          stacklevel=2)
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise RuntimeError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} "
                           "CUDA device(s)")
    return dev


_AMP = {None: None, "none": None, "bf16": torch.bfloat16}


def amp_dtype(amp: str | None) -> torch.dtype | None:
    """The autocast dtype of ``run.amp`` (None: full precision); fp16 is refused (see FP16_REFUSED)."""
    if amp == "fp16":
        raise ValueError(FP16_REFUSED)
    if amp not in _AMP:
        raise ValueError(f"amp must be one of None, 'bf16'; got {amp!r}")
    return _AMP[amp]


def autocast(device: torch.device, amp: str | None):
    """Autocast context for ``amp`` (None | bf16); fp16 is refused (see FP16_REFUSED)."""
    dtype = amp_dtype(amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic algorithms for bit-reproducible runs (CPU, and CUDA with cuBLAS workspace)."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def configure_threads(num_threads: int | None) -> None:
    """``run.num_threads``: torch's intra-op threads (None leaves the default). Bit-identical CPU
    runs need the same thread count (reduction order in GEMMs can depend on it)."""
    if num_threads is None:
        return
    if num_threads < 1:
        raise ValueError(f"run.num_threads must be >= 1 or null, got {num_threads}")
    torch.set_num_threads(num_threads)


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream) so a resumed epoch replays exactly."""
    return (seed * 1_000_003 + epoch * 7919 + stream * 104_729) % (2**31 - 1)


@dataclass(frozen=True)
class Runtime:
    """What a stage runs on: the options, this process's place in the run, its device."""

    opts: ExperimentOptions
    ctx: DistContext
    seed: int

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    @property
    def is_main(self) -> bool:
        return self.ctx.is_main


def setup_run(opts: ExperimentOptions, seed: int | None = None) -> Runtime:
    """Check the options, join the process group (torchrun), set threads, determinism and seeds.

    ``seed`` defaults to ``run.seed`` (pre-training passes its own per model).
    """
    check_options(opts)
    r, d = opts.run, opts.data
    ctx = ddp.setup(resolve_device(r.device))
    ddp.check_batch_shares(d.batch_size, d.num_instances, ctx)
    configure_threads(r.num_threads)
    set_deterministic(r.deterministic)
    seed = r.seed if seed is None else seed
    seed_everything(seed)
    return Runtime(opts, ctx, seed)

"""Which device a run uses and how its objects reach it: the GPU a driver lists but torch cannot
use, ``cuda:N`` as the current device, results broadcast from rank 0 on the host, and the DDP
arguments of the installed torch."""
from __future__ import annotations

import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmmt.cluster.result import ClusterResult
from fastmmt.train import distributed as ddp
from fastmmt.train import runtime


def fake_nvidia_smi(folder: Path, gpus: int = 1) -> Path:
    """An ``nvidia-smi`` that lists ``gpus`` H100s (``-L``) and a driver version."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = "".join(f'echo "GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i})"\n' for i in range(gpus))
    smi = folder / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\nif [ "$1" = "-L" ]; then\n{lines}else\necho 580.159.04\nfi\n')
    smi.chmod(0o755)
    return folder


def test_auto_device_warns_when_a_listed_gpu_is_unusable(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no GPU listed: the CPU without a word
        assert runtime.resolve_device("auto") == torch.device("cpu")
    monkeypatch.setenv("PATH", str(fake_nvidia_smi(tmp_path / "bin", gpus=2)))
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.warns(RuntimeWarning, match=r"nvidia-smi lists 2 GPU\(s\) but torch .* is a CPU-only build; "
                                            r"install a CUDA build of torch; training on the CPU"):
        assert runtime.resolve_device("auto") == torch.device("cpu")
    from fastmmt.machine import listed_nvidia_gpus, nvidia_driver_version

    assert listed_nvidia_gpus()[0].startswith("GPU 0: NVIDIA H100") and nvidia_driver_version() == "580.159.04"


def test_single_process_cuda_n_becomes_the_current_device(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: chosen.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert ddp.setup(torch.device("cuda", 1)).device == torch.device("cuda", 1)
    assert ddp.setup(torch.device("cuda")).device == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]
    assert ddp.setup(torch.device("cpu")).device == torch.device("cpu") and len(chosen) == 2


@dataclass
class _Payload:
    t: torch.Tensor
    n: int


def test_results_broadcast_from_rank_0_travel_on_the_host():
    """``run_on_main`` pickles its result: a CUDA tensor inside would unpickle onto rank 0's GPU on
    every rank. ``on_host`` moves every tensor (in a ClusterResult, a tuple, a dict) to the CPU,
    keeping values; ``meta`` tensors stand in for device tensors here."""
    res = ClusterResult(np.arange(4), torch.randn(2, 3), 2, {"inertia": 1.5})
    moved = ddp.on_host(res)
    assert isinstance(moved, ClusterResult) and torch.equal(moved.centroids, res.centroids)
    assert moved.info == {"inertia": 1.5} and (moved.labels == res.labels).all()
    seen = []

    class Spy(torch.Tensor):
        def cpu(self, *a, **k):
            seen.append(tuple(self.shape))
            return torch.Tensor.cpu(self, *a, **k)

    nested = ddp.on_host({"a": (torch.ones(2).as_subclass(Spy), 3), "b": [_Payload(torch.ones(1, 2).as_subclass(Spy), 4)]})
    assert sorted(seen) == [(1, 2), (2,)] and nested["a"][1] == 3 and nested["b"][0].n == 4
    pickle.loads(pickle.dumps(moved))


def test_ddp_arguments_fit_the_installed_torch():
    class OldDDP:  # torch < 2.13: no forward_sync_buffers
        def __init__(self, module, device_ids=None, broadcast_buffers=True):
            pass

    class NewDDP:
        def __init__(self, module, device_ids=None, broadcast_buffers=True, forward_sync_buffers=True):
            pass

    assert ddp.no_buffer_sync_kwargs(OldDDP) == {"broadcast_buffers": False}
    assert ddp.no_buffer_sync_kwargs(NewDDP) == {"broadcast_buffers": False, "forward_sync_buffers": False}
    OldDDP(None, **ddp.no_buffer_sync_kwargs(OldDDP))  # accepted by the class itself
    import inspect

    real = torch.nn.parallel.DistributedDataParallel
    assert set(ddp.no_buffer_sync_kwargs(real)) <= set(inspect.signature(real.__init__).parameters)

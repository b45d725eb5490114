"""Facts about this machine that need no torch: the GPUs the NVIDIA driver lists.

Imported by the trainer (a GPU torch cannot use is worth a warning) and by the GPU check (which
must tell "no GPU here" from "a GPU this Python cannot use" before importing torch).
"""
from __future__ import annotations

import shutil
import subprocess


def _nvidia_smi(*args: str) -> list[str] | None:
    """Lines ``nvidia-smi ARGS`` prints, None without the tool or when it fails."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip().splitlines() if out.returncode == 0 else None


def listed_nvidia_gpus() -> list[str]:
    """The GPUs ``nvidia-smi -L`` lists (``GPU 0: NVIDIA H100 ...``); empty without the tool or a GPU."""
    return [ln.strip() for ln in _nvidia_smi("-L") or [] if ln.startswith("GPU ")]


def nvidia_driver_version() -> str | None:
    """The driver version of the first GPU (``580.159.04``), None without one."""
    lines = _nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return lines[0].strip() if lines else None

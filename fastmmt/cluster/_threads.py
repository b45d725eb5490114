"""Bound the CPU threads FAISS (OpenMP) and torch use for one clustering call."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import faiss
import torch


@contextmanager
def limited_threads(num_threads: int | None) -> Iterator[None]:
    """Within the block, FAISS and torch use at most ``num_threads`` threads (None: unchanged)."""
    if num_threads is None:
        yield
        return
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {num_threads}")
    old_faiss, old_torch = faiss.omp_get_max_threads(), torch.get_num_threads()
    faiss.omp_set_num_threads(num_threads)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old_faiss)
        torch.set_num_threads(old_torch)

"""Hooks of the epoch runner, in the manner of fast-reid's ``TrainerBase``: a user adds behaviour
(timing, extra logging, a profiler window) by passing hooks to ``pretrain(..., hooks=[...])`` or
``adapt(..., hooks=[...])`` instead of editing the loop.

The runner calls, on every rank, in this order: :meth:`Hook.before_epoch` after the epoch's set-up
(clusters, classifiers, optimiser), :meth:`Hook.after_step` after each training step, and
:meth:`Hook.after_epoch` once the epoch's record is complete (losses, timings, evaluation) and
written. ``after_step`` receives the step's outputs as DEVICE tensors: reading one (``.item()``,
``float()``) syncs the device every step, which the training loop itself never does.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


class Hook:
    """Override the callbacks you need; each default does nothing."""

    def before_epoch(self, epoch: int, global_step: int) -> None:
        """Called after the epoch's set-up, before its first step."""

    def after_step(self, epoch: int, it: int, out: dict[str, torch.Tensor]) -> None:
        """Called after step ``it`` of ``epoch``; ``out``: its loss terms and finite flag (device tensors)."""

    def after_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        """Called with the epoch's record (what ``log.jsonl`` holds) after it was written."""


class Hooks(Hook):
    """Several hooks called in order (what the runner holds)."""

    def __init__(self, hooks: Iterable[Hook] = ()) -> None:
        self.hooks: Sequence[Hook] = list(hooks)
        for h in self.hooks:
            if not isinstance(h, Hook):
                raise TypeError(f"hooks must be fastmmt.train.hooks.Hook instances, got {type(h).__name__}")

    def before_epoch(self, epoch: int, global_step: int) -> None:
        for h in self.hooks:
            h.before_epoch(epoch, global_step)

    def after_step(self, epoch: int, it: int, out: dict[str, torch.Tensor]) -> None:
        for h in self.hooks:
            h.after_step(epoch, it, out)

    def after_epoch(self, epoch: int, record: dict[str, Any]) -> None:
        for h in self.hooks:
            h.after_epoch(epoch, record)

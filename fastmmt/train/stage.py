"""What the epoch runner (:func:`fastmmt.train.loop.run_epochs`) drives: a :class:`Stage` (one
training stage described epoch by epoch) and the :class:`RunState` a checkpoint restores."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn


@dataclass
class RunState:
    """What a checkpoint restores besides the networks: counters, the history, the best epoch."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)


class Stage(Protocol):
    """One training stage as :func:`~fastmmt.train.loop.run_epochs` drives it."""

    name: str                      # the record's "stage" and the progress bar's label
    epochs: int
    iters: int                     # iterations per epoch
    images_per_step: int           # for images_per_second
    eval_every: int                # evaluate every N epochs and at the last (0: never)
    select_best: bool              # keep the best evaluated epoch as best.pt
    best_of: tuple[str, ...] | None  # the eval_models() names the best is chosen from (None: the first)

    def start(self) -> None: ...   # after a resume, before the first epoch (broadcast, DDP, compile)
    def state_dict(self, epoch: int, st: RunState) -> dict: ...
    def load_state_dict(self, ck: dict) -> RunState: ...
    def begin_epoch(self, epoch: int, st: RunState) -> dict: ...
    def batches(self, epoch: int) -> Iterable: ...
    def step(self, batch: Any, it: int, global_step: int, where: Callable[[], str]) -> dict[str, torch.Tensor]: ...
    def describe(self, epoch: int, it: int, global_step: int, indices: torch.Tensor | None) -> str: ...
    def end_epoch(self, epoch: int, record: dict) -> None: ...
    def eval_models(self) -> dict[str, nn.Module]: ...
    def evaluate(self, net: nn.Module) -> dict[str, float]: ...
    def model_file(self, name: str, **extra) -> dict: ...
    def write_epoch(self, state: dict, out_dir: Path) -> None: ...
    def trained_parameters(self) -> list[torch.Tensor]: ...   # what the divergence guard measures
    def learning_rate(self) -> str: ...                       # the options to name when it fires

"""Learning-rate schedule of source pre-training: linear warm-up then step decay (per epoch)."""
from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence


def warmup_multistep_factor(epoch: int, milestones: Sequence[int], gamma: float = 0.1,
                            warmup_factor: float = 0.01, warmup_epochs: int = 10) -> float:
    """LR multiplier at ``epoch``: warm-up from ``warmup_factor`` to 1 over ``warmup_epochs``
    (linear, as the reference's WarmupMultiStepLR), times ``gamma`` per milestone passed."""
    if list(milestones) != sorted(milestones):
        raise ValueError(f"milestones must be increasing, got {list(milestones)}")
    warm = 1.0
    if epoch < warmup_epochs:
        a = epoch / warmup_epochs
        warm = warmup_factor * (1 - a) + a
    return warm * gamma ** bisect_right(list(milestones), epoch)

"""The runner's own end-of-epoch hooks: evaluation, the checkpoint with its log record, the log line.

:func:`~fastmmt.train.loop.run_epochs` puts them first in its hook list, in this order, so a user
hook's ``after_epoch`` sees the record complete (metrics included) and already written. Each is a
:class:`~fastmmt.train.hooks.Hook` like a user's: replacing what happens at the end of an epoch is
a matter of the list, not of the loop.
"""
from __future__ import annotations

import logging
from pathlib import Path

from fastmmt.train import distributed as ddp
from fastmmt.train.checkpoint import atomic_save, save_checkpoint
from fastmmt.train.hooks import Hook
from fastmmt.train.logger import RunLogger
from fastmmt.train.resume_check import HEADER
from fastmmt.train.runtime import Runtime
from fastmmt.train.stage import RunState, Stage

log = logging.getLogger("fastmmt.train")


def evaluate_epoch(stage: Stage, epoch: int, st: RunState, record: dict, out_dir: Path, rt: Runtime,
                   select_best: bool, best_of: tuple[str, ...] | None) -> None:
    """Evaluate every network of the stage; the first's metrics are the record's, the others'
    mAP is logged as ``NAME_mAP`` and, with several, the largest as ``max_mAP`` (the official MMT
    script's per-epoch figure is the better of its two teachers); the best epoch over ``best_of``
    is kept as ``best.pt``."""
    nets = stage.eval_models()
    results = {name: stage.evaluate(net) for name, net in nets.items()}
    names = list(results)
    record.update(results[names[0]])
    for name in names[1:]:
        record[f"{name}_mAP"] = results[name]["mAP"]
        record["eval_seconds"] += results[name]["eval_seconds"]
    if len(names) > 1:
        record["max_mAP"] = max(results[n]["mAP"] for n in names)
    if not select_best:
        return
    pool = best_of or names[:1]
    # on a tie between networks the later one of best_of wins (the official MMT code kept
    # teacher 2 when the two teachers tied); across epochs only a strictly better mAP replaces
    name = max(reversed(pool), key=lambda n: results[n]["mAP"])
    met = results[name]
    if met["mAP"] > st.best.get("mAP", -1.0):
        st.best = {"epoch": epoch, **met} | ({"model": name} if len(pool) > 1 else {})
        ddp.run_on_main(rt.ctx, atomic_save, stage.model_file(name, epoch=epoch, network=name),
                        out_dir / "best.pt")


class Evaluation(Hook):
    """Every ``stage.eval_every`` epochs and at the last (0: never): evaluate the stage's networks
    into the record, and with ``stage.select_best`` keep the best epoch as ``best.pt``."""

    def __init__(self, stage: Stage, st: RunState, out_dir: Path, rt: Runtime) -> None:
        self.stage, self.st, self.out_dir, self.rt = stage, st, out_dir, rt

    def after_epoch(self, epoch: int, record: dict) -> None:
        every = self.stage.eval_every
        if every and ((epoch + 1) % every == 0 or epoch + 1 == self.stage.epochs):
            evaluate_epoch(self.stage, epoch, self.st, record, self.out_dir, self.rt, self.stage.select_best,
                           self.stage.best_of)


def write_epoch(stage: Stage, state: dict, record: dict, out_dir: Path, logger: RunLogger) -> None:
    """Rank 0's end of an epoch: checkpoint first (atomic), then the stage's files and the log."""
    save_checkpoint(state, out_dir / "ckpt")
    stage.write_epoch(state, out_dir)
    logger.log(record)


class Checkpoint(Hook):
    """The record joins the run's history; every rank builds the stage's state (with the run's
    defining options, compared on resume), rank 0 writes the checkpoint, the stage's files and
    the record (``logger``: rank 0's, None elsewhere)."""

    def __init__(self, stage: Stage, st: RunState, out_dir: Path, rt: Runtime, logger: RunLogger | None,
                 defines: dict | None) -> None:
        self.stage, self.st, self.out_dir, self.rt = stage, st, out_dir, rt
        self.logger, self.defines = logger, defines

    def after_epoch(self, epoch: int, record: dict) -> None:
        self.st.history.append(record)
        state = self.stage.state_dict(epoch, self.st)
        if self.defines is not None:
            state[HEADER] = {"options": self.defines}
        ddp.run_on_main(self.rt.ctx, write_epoch, self.stage, state, record, self.out_dir, self.logger)


class LogLine(Hook):
    """One log line per epoch on rank 0: the record's numbers."""

    def __init__(self, name: str, is_main: bool) -> None:
        self.name, self.is_main = name, is_main

    def after_epoch(self, epoch: int, record: dict) -> None:
        if self.is_main:
            log.info("%s epoch %d: %s", self.name, epoch,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))

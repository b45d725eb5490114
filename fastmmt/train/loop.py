"""The stage runner: epochs, resume, checkpoints, logging, the evaluation cadence.

A stage (pre-training, MMT, the baseline) describes one epoch through a small interface
(:class:`Stage`): what to do before the epoch (extract, cluster), its batches, one training step
that returns a dict of loss tensors, its checkpoint, the networks to evaluate. :func:`run_epochs`
does the rest, the same way for every stage.

The step reads nothing on the host. Its loss terms are summed on the device by
:class:`DeviceMeter` and read once every ``run.log_every`` iterations and at the end of the epoch,
together with the non-finite flags: ``run.on_nonfinite=stop`` stops at that read, naming the first
bad iteration and the window it was found in; ``skip`` counts the refused steps (the step itself
did not apply them, see the step functions). ``run.sync_each_step`` keeps the old step, which read
the loss before backward and every term after it (:class:`HostMeter`). The divergence guard
(:mod:`fastmmt.train.divergence`, ``run.diverge_factor``) is measured on the device and read in
the same transfer, so it adds no host read; it fires before the epoch's checkpoint is written.
A resumed run must have the defining options of its checkpoint (:mod:`fastmmt.train.resume_check`).
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from fastmmt.train import distributed as ddp
from fastmmt.train.checkpoint import CheckpointError, atomic_save, read_resume_checkpoint, save_checkpoint
from fastmmt.train.divergence import DivergenceGuard
from fastmmt.train.hooks import Hook, Hooks
from fastmmt.train.logger import RunLogger
from fastmmt.train.resume_check import HEADER, check_resume
from fastmmt.train.runtime import Runtime, epoch_seed, seed_everything
from fastmmt.train.update import check_window

log = logging.getLogger("fastmmt.train")

FINITE = "finite"  # the key of a step's output holding its all-finite flag (a bool tensor)


@dataclass
class RunState:
    """What a checkpoint restores besides the networks: counters, the history, the best epoch."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)


class Stage(Protocol):
    """One training stage as :func:`run_epochs` drives it."""

    name: str                      # the record's "stage" and the progress bar's label
    epochs: int
    iters: int                     # iterations per epoch
    images_per_step: int           # for images_per_second

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


class DeviceMeter:
    """Loss terms and non-finite flags of an epoch, accumulated on the device.

    :meth:`read` moves one small tensor to the host: the window's sums, how many of its steps
    were finite, the first bad iteration and its loss.
    """

    def __init__(self, device: torch.device, skip: bool) -> None:
        self.device, self.skip = device, skip
        self.keys: list[str] | None = None
        self.totals: dict[str, float] = {}
        self.done = 0
        self._reset()

    def _reset(self) -> None:
        self._acc: torch.Tensor | None = None  # [sums..., finite steps, bad steps, first bad it, its loss]

    def add(self, it: int, out: dict[str, torch.Tensor]) -> None:
        ok = out[FINITE]
        terms = {k: v for k, v in out.items() if k != FINITE}
        if self.keys is None:
            self.keys = list(terms)
        vals = torch.stack([terms[k].detach().to(torch.float64) for k in self.keys])
        if self.skip:  # refused steps do not count in the means
            vals = torch.where(ok, vals, torch.zeros_like(vals))
        okf = ok.to(torch.float64)
        if self._acc is None:
            n = len(self.keys)
            self._acc = torch.zeros(n + 4, dtype=torch.float64, device=vals.device)
            self._acc[n + 2] = -1.0
        n = len(self.keys)
        acc = self._acc
        first = (acc[n + 2] < 0) & ~ok
        head = torch.cat([vals, okf.view(1), (1.0 - okf).view(1)])
        acc[: n + 2] += head
        acc[n + 2] = torch.where(first, torch.full_like(acc[n + 2], it), acc[n + 2])
        acc[n + 3] = torch.where(first, terms["loss"].detach().to(torch.float64), acc[n + 3])

    def read(self, extra: torch.Tensor | None = None) -> dict | None:
        """The window since the last read (one host transfer), folded into the epoch totals;
        ``extra`` (a device vector, e.g. the divergence guard's measure) comes back as ``"extra"``
        in the same transfer."""
        if self._acc is None:
            return None
        acc = self._acc if extra is None else torch.cat([self._acc, extra.to(self._acc).flatten()])
        vals = acc.tolist()
        self._reset()
        n = len(self.keys)
        for k, v in zip(self.keys, vals[:n]):
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.done += int(vals[n])
        return {"finite": int(vals[n]), "bad": int(vals[n + 1]), "first_bad": int(vals[n + 2]),
                "bad_loss": vals[n + 3], "sums": dict(zip(self.keys, vals[:n])), "extra": vals[n + 4:]}


class HostMeter:
    """The old accounting (``run.sync_each_step``): every term read as a float after each step."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.done = 0
        self._window: dict | None = None

    def add(self, it: int, out: dict[str, torch.Tensor]) -> None:
        w = self._window or {"finite": 0, "bad": 0, "first_bad": -1, "bad_loss": 0.0, "sums": {}}
        self._window = w
        if not bool(out[FINITE]):  # the step already refused it (and, under stop, raised)
            w["bad"] += 1
            for k in out:
                if k != FINITE:
                    w["sums"].setdefault(k, 0.0)
            return
        w["finite"] += 1
        for k, v in out.items():
            if k != FINITE:
                w["sums"][k] = w["sums"].get(k, 0.0) + float(v.detach())

    def read(self) -> dict | None:
        w, self._window = self._window, None
        if w is None:
            return None
        for k, v in w["sums"].items():
            self.totals[k] = self.totals.get(k, 0.0) + v
        self.done += w["finite"]
        return w


def train_epoch(stage: Stage, rt: Runtime, epoch: int, st: RunState, hooks: Hooks,
                guard: DivergenceGuard | None = None) -> tuple[dict, int]:
    """One epoch of steps; returns (mean loss terms, refused steps) and advances ``st.global_step``.

    ``guard`` is checked at every read of the loss sums (with ``run.sync_each_step``: every
    ``run.log_every`` iterations and the last), after the non-finite check.

    ``global_step`` handed to a step is the host's count of the steps applied before it: exact
    with ``run.sync_each_step``; otherwise it counts every step, which is exact until a refused
    step (``stop`` ends the run at the next read; ``skip`` steps count on the device, see
    :func:`fastmmt.train.mmt.mmt_step`).
    """
    r = rt.opts.run
    sync = r.sync_each_step
    meter: DeviceMeter | HostMeter = HostMeter() if sync else DeviceMeter(rt.device, r.on_nonfinite == "skip")
    every = 1 if sync else r.log_every
    start = st.global_step
    window: dict[int, Any] = {}  # the window's image indices, to name a bad batch (read only then)

    def describe(it: int) -> str:
        return stage.describe(epoch, it, start + it, window.get(it))

    bar = tqdm(stage.batches(epoch), total=stage.iters, desc=f"{stage.name} ep{epoch}",
               disable=not (r.progress and rt.is_main and sys.stderr.isatty()), leave=False)
    first_it = 0
    applied = 0  # steps applied before the current one, as the host knows them
    for it, batch in enumerate(bar):
        window[it] = getattr(batch, "indices", None)
        gs = start + applied
        out = stage.step(batch, it, gs, lambda it=it, gs=gs: stage.describe(epoch, it, gs, window[it]))
        meter.add(it, out)
        hooks.after_step(epoch, it, out)
        applied += 1
        at_read = (it + 1) % r.log_every == 0 or it + 1 == stage.iters
        if sync:
            w = meter.read()
            applied = meter.done
            if w["finite"]:
                bar.set_postfix(loss=f"{w['sums']['loss']:.3f}")
            if guard is not None and at_read:  # the old step reads every step anyway
                guard.check(guard.measure().tolist(), lambda: describe(it))
        elif at_read:
            w = meter.read(None if guard is None else guard.measure())
            check_window(w, first_it, it, r.on_nonfinite, describe, every)
            if guard is not None:
                guard.check(w["extra"], lambda: describe(it))
            if w["finite"] and "loss" in w["sums"]:
                bar.set_postfix(loss=f"{w['sums']['loss'] / w['finite']:.3f}")
            first_it = it + 1
            applied = meter.done
        if sync or first_it == it + 1:
            window.clear()
    st.global_step = start + meter.done
    skipped = stage.iters - meter.done
    means = {k: (v / meter.done if meter.done else None) for k, v in meter.totals.items()}
    return means, skipped


def run_epochs(stage: Stage, rt: Runtime, out_dir: str | Path, logger: RunLogger | None, resume: bool = False,
               eval_every: int = 0, select_best: bool = False, best_of: tuple[str, ...] | None = None,
               record_extra: Callable[[int], dict] | None = None,
               start: Callable[[], None] | None = None, defines: dict | None = None,
               resume_changed: bool = False, hooks: Iterable[Hook] = ()) -> RunState:
    """Run ``stage`` from its first (or resumed) epoch to its last.

    ``resume``: restore ``out_dir/ckpt``'s last readable epoch (``stage.load_state_dict``); then
    ``start()`` (broadcast, DDP wrapping, compiling). Per epoch: seed, ``begin_epoch``, the steps
    (:func:`train_epoch`), ``end_epoch``, evaluation of every network of ``stage.eval_models()``
    every ``eval_every`` epochs and at the last (0: never), the best epoch by target mAP over the
    networks named in ``best_of`` (default: the first) written as ``best.pt`` when
    ``select_best``, then the checkpoint and the record (``logger``: rank 0's, None elsewhere).
    ``defines``: the run's defining options (:func:`~fastmmt.train.resume_check.defining_options`),
    recorded in every checkpoint and compared on resume (refused when they differ, unless
    ``resume_changed``). ``run.diverge_factor`` > 0: the divergence guard is on. ``hooks``: user
    callbacks (:mod:`fastmmt.train.hooks`) before each epoch, after each step and after each epoch.
    """
    hooks = Hooks(hooks)
    out_dir = Path(out_dir)
    ctx = rt.ctx
    st = RunState()
    if resume:
        found = read_resume_checkpoint(out_dir / "ckpt", rt.device, ctx)
        if found is not None:
            ck, path = found
            if defines is not None:
                check_resume(ck, path, defines, resume_changed)
            st = _restore(stage, ck, path)
            log.info("resumed %s at epoch %d (global step %d)", stage.name, st.epoch, st.global_step)
    if start is not None:
        start()
    r = rt.opts.run
    guard = DivergenceGuard(stage.trained_parameters, r.diverge_factor, stage.learning_rate) \
        if r.diverge_factor > 0 else None
    if logger is not None:
        logger.start_at(st.epoch)
    for epoch in range(st.epoch, stage.epochs):
        seed_everything(epoch_seed(rt.seed, epoch))
        record: dict[str, Any] = {"stage": stage.name, **(record_extra(epoch) if record_extra else {}),
                                  "epoch": epoch}
        extra = stage.begin_epoch(epoch, st)
        hooks.before_epoch(epoch, st.global_step)
        t0 = time.perf_counter()
        means, skipped = train_epoch(stage, rt, epoch, st, hooks, guard)
        seconds = time.perf_counter() - t0
        record.update(means)
        record.update(extra)
        record.update({"global_step": st.global_step, "train_seconds": seconds,
                       "images_per_second": stage.iters * stage.images_per_step / seconds,
                       "skipped_steps": skipped, "world_size": ctx.world_size})
        stage.end_epoch(epoch, record)
        if eval_every and ((epoch + 1) % eval_every == 0 or epoch + 1 == stage.epochs):
            _evaluate_epoch(stage, epoch, st, record, out_dir, rt, select_best, best_of)
        st.history.append(record)
        state = stage.state_dict(epoch, st)
        if defines is not None:
            state[HEADER] = {"options": defines}
        ddp.run_on_main(ctx, _write_epoch, stage, state, record, out_dir, logger)
        if ctx.is_main:
            log.info("%s epoch %d: %s", stage.name, epoch,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))
        hooks.after_epoch(epoch, record)
        st.epoch = epoch + 1
    return st


def _restore(stage: Stage, ck: dict, path: Path) -> RunState:
    """``stage.load_state_dict(ck)``; a checkpoint that does not fit the stage's networks or keys
    is one error naming the file (not a state-dict dump)."""
    try:
        return stage.load_state_dict(ck)
    except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        what = f"missing {e}" if isinstance(e, KeyError) else " ".join(lines[:2])[:300]
        raise CheckpointError(f"{path} does not fit this run ({type(e).__name__}: {what}); it was written by another "
                              f"kind of run or network: use that run's settings or another output folder") from None


def _evaluate_epoch(stage: Stage, epoch: int, st: RunState, record: dict, out_dir: Path, rt: Runtime,
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


def _write_epoch(stage: Stage, state: dict, record: dict, out_dir: Path, logger: RunLogger) -> None:
    """Rank 0's end of an epoch: checkpoint first (atomic), then the stage's files and the log."""
    save_checkpoint(state, out_dir / "ckpt")
    stage.write_epoch(state, out_dir)
    logger.log(record)

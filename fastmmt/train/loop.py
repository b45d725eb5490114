"""The stage runner: resume, epochs, the steps; the end of each epoch through hooks.

A stage (pre-training, MMT, the baseline) describes one epoch through a small interface
(:class:`Stage`): what to do before the epoch (extract, cluster), its batches, one training step
that returns a dict of loss tensors, its checkpoint, the networks to evaluate. :func:`run_epochs`
does the rest, the same way for every stage: evaluation, checkpoint and log record are its own
hooks (:mod:`fastmmt.train.epoch_hooks`), followed by the user's (:mod:`fastmmt.train.hooks`).

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
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastmmt.train.checkpoint import CheckpointError, read_resume_checkpoint
from fastmmt.train.divergence import DivergenceGuard
from fastmmt.train.epoch_hooks import Checkpoint, Evaluation, LogLine
from fastmmt.train.hooks import Hook, Hooks
from fastmmt.train.logger import RunLogger
from fastmmt.train.resume_check import check_resume
from fastmmt.train.runtime import Runtime, epoch_seed, seed_everything
from fastmmt.train.stage import RunState, Stage
from fastmmt.train.update import check_window

log = logging.getLogger("fastmmt.train")

FINITE = "finite"  # the key of a step's output holding its all-finite flag (a bool tensor)


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


def run_epochs(stage: Stage, rt: Runtime, out_dir: str | Path, logger: RunLogger | None, *, resume: bool = False,
               resume_changed: bool = False, defines: dict | None = None, hooks: Iterable[Hook] = ()) -> RunState:
    """Run ``stage`` from its first (or resumed) epoch to its last.

    ``resume``: restore ``out_dir/ckpt``'s last readable epoch (``stage.load_state_dict``); then
    ``stage.start()`` (broadcast, DDP wrapping, compiling). Per epoch: seed, ``begin_epoch``, the
    steps (:func:`train_epoch`), ``end_epoch``, then the hooks' ``after_epoch``: first the
    runner's own (:mod:`fastmmt.train.epoch_hooks`: evaluation every ``stage.eval_every`` epochs
    and at the last, the best epoch as ``best.pt`` with ``stage.select_best``; the checkpoint and
    the record, ``logger`` being rank 0's and None elsewhere; the log line), then the user's
    ``hooks`` (:mod:`fastmmt.train.hooks`). ``defines``: the run's defining options
    (:func:`~fastmmt.train.resume_check.defining_options`), recorded in every checkpoint and
    compared on resume (refused when they differ, unless ``resume_changed``).
    ``run.diverge_factor`` > 0: the divergence guard is on.
    """
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
    stage.start()
    r = rt.opts.run
    guard = DivergenceGuard(stage.trained_parameters, r.diverge_factor, stage.learning_rate) \
        if r.diverge_factor > 0 else None
    hooks = Hooks([Evaluation(stage, st, out_dir, rt), Checkpoint(stage, st, out_dir, rt, logger, defines),
                   LogLine(stage.name, ctx.is_main), *hooks])
    if logger is not None:
        logger.start_at(st.epoch)
    for epoch in range(st.epoch, stage.epochs):
        seed_everything(epoch_seed(rt.seed, epoch))
        record: dict[str, Any] = {"stage": stage.name, "epoch": epoch}
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

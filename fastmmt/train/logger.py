"""Per-epoch run log: JSON lines (always), TensorBoard (when installed), a PNG plot of the curves.

The record is written (and flushed) on the calling thread; the plot is redrawn on a thread of its
own (matplotlib's object API, no pyplot state), at most once every ``PLOT_INTERVAL`` seconds (the
first ``PLOT_INTERVAL`` seconds after the logger is made, so a short run draws once, at the end) and
at :meth:`RunLogger.close` (which waits for it), so drawing it neither holds up the next epoch nor,
on a busy CPU, takes much of its time: the first draw imports matplotlib, and on a CPU whose cores
all train, any work beside the training threads slows them by more than its own time
(bench/RESULTS.md, "one adaptation epoch by phase").
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastmmt.train.checkpoint import temp_file_beside

log = logging.getLogger(__name__)

PLOT_INTERVAL = 30.0  # seconds between redraws of curves.png during a run


class RunLogger:
    """Append one JSON object per epoch to ``out_dir/log.jsonl`` and redraw ``out_dir/curves.png``."""

    def __init__(self, out_dir: str | Path, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.out_dir / "log.jsonl"
        self._start: int | None = None
        self._tb = None
        self._plotter = ThreadPoolExecutor(1, thread_name_prefix="fastmmt-plot")
        self._queued: Future | None = None
        self._last_plot = time.monotonic()  # when the last redraw was requested (the first: made)
        self._stale = False           # a record was logged after it
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.out_dir / "tb"))
            except (ImportError, ModuleNotFoundError):
                self._tb = None

    def records(self) -> list[dict[str, Any]]:
        """Every record logged so far (including those of an earlier, resumed run)."""
        if not self.path.exists():
            return []
        with open(self.path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def start_at(self, epoch: int) -> None:
        """The run (re)starts at ``epoch``: when it logs its first record, the records of ``epoch``
        on (and any final record) are dropped first.

        A resumed run replays the epochs after its checkpoint; without this, an epoch logged before
        a crash whose checkpoint was lost (the ``prev.pt`` fallback) would appear twice, and a new
        run in an old folder would mix with the old log. Nothing is dropped before the run has an
        epoch to log (a run that fails first leaves the log as it was), and the file is rewritten
        atomically.
        """
        self._start = epoch

    def _drop_from(self, epoch: int) -> None:
        recs = self.records()
        kept = [r for r in recs if not r.get("final") and r.get("epoch", -1) < epoch]
        if len(kept) == len(recs):
            return
        fd, tmp = temp_file_beside(self.path)  # removed by the next run if this one is killed here
        with os.fdopen(fd, "w") as f:
            f.writelines(json.dumps(r, default=float) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` (flushed at once), mirror scalars to TensorBoard, redraw the plot."""
        if self._start is not None:
            self._drop_from(self._start)
            self._start = None
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
            f.flush()
        if self._tb is not None and "epoch" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()
        now = time.monotonic()
        if now - self._last_plot >= PLOT_INTERVAL:
            self._last_plot = now
            self._request_plot()
        else:
            self._stale = True

    def _request_plot(self) -> None:
        """Redraw ``curves.png`` on the plot thread, unless a redraw that has not started yet is queued
        (it will read this record: the line is written before the request)."""
        self._stale = False
        q = self._queued
        if q is not None and not q.running() and not q.done():
            return
        self._queued = self._plotter.submit(self._plot_logged)

    def _plot_logged(self) -> None:
        try:
            self.plot()
        except Exception as e:  # a plot must never stop training: the log itself is written
            log.warning("could not draw %s: %s", self.out_dir / "curves.png", e)

    def plot(self) -> Path | None:
        """Target mAP / rank-1 and loss terms per epoch, as ``curves.png``."""
        recs = [r for r in self.records() if "epoch" in r]
        if not recs:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4))
        FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2)
        for key, label in (("mAP", "target mAP"), ("rank1", "target rank-1")):
            pts = [(r["epoch"], 100 * r[key]) for r in recs if isinstance(r.get(key), (int, float))]
            if pts:
                a1.plot(*zip(*pts), marker="o", label=label)
        a1.set_xlabel("epoch"); a1.set_ylabel("%"); a1.grid(alpha=0.3)
        if a1.lines:
            a1.legend()
        loss_keys = sorted({k for r in recs for k in r if k.startswith("loss")})
        for key in loss_keys:
            pts = [(r["epoch"], r[key]) for r in recs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                a2.plot(*zip(*pts), marker=".", label=key)
        a2.set_xlabel("epoch"); a2.set_ylabel("loss"); a2.grid(alpha=0.3)
        if a2.lines:
            a2.legend(fontsize=7)
        fig.tight_layout()
        out = self.out_dir / "curves.png"
        fig.savefig(out, dpi=80)
        return out

    def close(self) -> None:
        """Draw the last records, wait for the plot; close TensorBoard."""
        if self._stale:
            self._request_plot()
        self._plotter.shutdown(wait=True)
        if self._tb is not None:
            self._tb.close()

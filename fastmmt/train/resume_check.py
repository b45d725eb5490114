"""What ``--resume`` accepts: the options that define a run, recorded in every checkpoint and
compared when the run resumes.

A run is defined by its stage (pre-training, or the adaptation method), its data (dataset names
and folders), its network (``arch``, ``base_width``, ``dropout``), the image size and batch shape,
and the clustering settings of its method. Resuming with any of them changed would continue a
different experiment over the old one, so :func:`check_resume` refuses with the list of
differences unless the change is meant (``--resume-changed``). Everything else (learning rate,
number of epochs, logging, evaluation cadence, backends) may change on a resume.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from fastmmt.train.options import ExperimentOptions

log = logging.getLogger("fastmmt.train")

HEADER = "fastmmt"  # the checkpoint key holding {"options": defining options}
CLUSTER_KEYS = {"kmeans": ("k",), "baseline": ("k",), "dbscan": ("k1", "k2", "rho", "min_samples"), "oracle": ()}
SHAPE_KEYS = ("height", "width", "batch_size", "num_instances")
NETWORK_KEYS = ("arch", "base_width", "dropout")


class ResumeMismatchError(ValueError):
    """The checkpoint belongs to a run with other defining options."""


def defining_options(stage: str, opts: ExperimentOptions, datasets: dict[str, Any], network: Any) -> dict[str, Any]:
    """The options that define a run of ``stage`` ("pretrain" or an adaptation method).

    ``datasets``: role ("source", "target") -> the dataset trained on (its ``name`` and ``root``);
    ``network``: the model options the networks were built with (for adaptation: those of the
    initial model files).
    """
    out: dict[str, Any] = {"stage": stage}
    for role, ds in datasets.items():
        out[f"data.{role}"] = None if ds is None else ds.name
        out[f"data.{role}_root"] = None if ds is None else os.path.abspath(ds.root)
    out.update({f"data.{k}": getattr(opts.data, k) for k in SHAPE_KEYS})
    out.update({f"model.{k}": getattr(network, k) for k in NETWORK_KEYS})
    out.update({f"adapt.{k}": getattr(opts.adapt, k) for k in CLUSTER_KEYS.get(stage, ())})
    return out


def differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every defining option that differs."""
    keys = list(saved) + [k for k in now if k not in saved]
    return [f"{k}: {saved.get(k, '(not recorded)')} -> {now.get(k, '(not used)')}"
            for k in keys if saved.get(k) != now.get(k)]


def check_resume(ck: dict, path: Path, now: dict[str, Any], allow_changed: bool) -> None:
    """Refuse to resume from ``ck`` (read from ``path``) when its defining options differ from
    ``now``, naming every difference; with ``allow_changed`` only warn. A checkpoint of another
    stage is always refused; one written before fastmmt recorded options is resumed with a warning.
    """
    head = ck.get(HEADER)
    if not isinstance(head, dict) or not isinstance(head.get("options"), dict):
        log.warning("%s records no run options (written by an older fastmmt): resuming without comparing them",
                    path)
        return
    saved = head["options"]
    if saved.get("stage") != now["stage"]:
        raise ResumeMismatchError(f"cannot resume from {path}: it is a checkpoint of {saved.get('stage')}, this "
                                  f"run is {now['stage']}; use that stage's output folder or start a new run")
    diff = differences(saved, now)
    if not diff:
        return
    if not allow_changed:
        raise ResumeMismatchError(
            f"cannot resume from {path}: options that define the run differ from the checkpoint's ("
            + "; ".join(diff) + "); resume with the checkpoint's values, start a new run in another output "
            "folder, or pass --resume-changed if the change is meant")
    log.warning("resuming from %s with changed options (--resume-changed): %s", path, "; ".join(diff))

"""The model-file format (``model.pt``) and what a stage returns (:class:`StageResult`).

A model file holds the weights, the classifier size and the options that shape the network
(``arch``, ``base_width``, ``dropout``), plus whatever the stage adds (seed, method, epoch).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fastmmt.train.common import make_model
from fastmmt.train.options import ExperimentOptions

log = logging.getLogger("fastmmt.train")

ARCH_KEYS = ("arch", "base_width", "dropout")  # the model options a model file fixes


@dataclass
class StageResult:
    """What a stage leaves behind: the model file, final target metrics, per-stage seconds."""

    model_path: str
    metrics: dict
    seconds: dict


def model_file(model: torch.nn.Module, num_classes: int, **extra) -> dict:
    """What a ``model.pt`` holds: weights, classifier size and the options the network was built
    with (by :func:`~fastmmt.train.common.make_model`)."""
    return {"model": model.state_dict(), "num_classes": int(num_classes),
            "model_options": asdict(model.model_options), **extra}


def load_model_file(path: str | Path, opts: ExperimentOptions, device: torch.device):
    """Build the network a ``model.pt`` describes and load its weights.

    The architecture comes from the options saved in the file (older files without them: the
    run's ``model`` options); the run keeps its own channels_last and BN split.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (run `fastmmt pretrain` first)")
    state = torch.load(path, map_location=device, weights_only=False)
    mopts = opts.model
    saved = {k: v for k, v in (state.get("model_options") or {}).items() if k in ARCH_KEYS}
    differ = {k: v for k, v in saved.items() if getattr(mopts, k) != v}
    if differ:
        log.warning("%s holds a %s network; building that, not the run's model options (%s)", path,
                    ", ".join(f"{k}={v}" for k, v in differ.items()),
                    ", ".join(f"{k}={getattr(mopts, k)}" for k in differ))
        mopts = replace(mopts, **differ)
    model = make_model(mopts, state["num_classes"], device, opts.run.bn_split, fused_bn_split=opts.run.fused_bn_split)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"model file {path} does not fit model.arch={mopts.arch} "
                         f"model.base_width={mopts.base_width}: {str(e).splitlines()[0]}") from None
    return model

"""The model-file format (``model.pt``) and what a stage returns (:class:`StageResult`).

A model file holds the weights, the classifier size and the options that shape the network
(``arch``, ``base_width``, ``dropout``), plus whatever the stage adds (seed, method, epoch).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fastmmt.models.official import is_official_checkpoint, load_official_weights, official_checkpoint_from
from fastmmt.safe_load import safe_load
from fastmmt.models.factory import make_model
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
    with (by :func:`~fastmmt.models.factory.make_model`)."""
    return {"model": model.state_dict(), "num_classes": int(num_classes),
            "model_options": asdict(model.model_options), **extra}


def _is_model_file(obj: object) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "num_classes" in obj


def _fixed_options(path: Path, mopts, saved: dict):
    """The run's model options with the values the file fixes (a warning names the changes)."""
    differ = {k: v for k, v in saved.items() if getattr(mopts, k) != v}
    if differ:
        log.warning("%s holds a %s network; building that, not the run's model options (%s)", path,
                    ", ".join(f"{k}={v}" for k, v in differ.items()),
                    ", ".join(f"{k}={getattr(mopts, k)}" for k in differ))
        mopts = replace(mopts, **differ)
    return mopts


def load_model_file(path: str | Path, opts: ExperimentOptions, device: torch.device):
    """Build the network a model file describes and load its weights.

    Two formats: fastmmt's ``model.pt`` (the architecture from the options saved in it; older
    files without them: the run's ``model`` options) and the official MMT release's ``*.pth.tar``
    (``{"state_dict", "epoch", "best_mAP"}``, keys ``module.base.N...``: converted by
    :func:`fastmmt.models.official.official_checkpoint_from`, the architecture read from the
    tensors). The run keeps its own channels_last and BN split. Anything else is a ``ValueError``
    naming both formats.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} does not exist (run `fastmmt pretrain` first)")
    state = safe_load(path, map_location=device)  # never runs code stored in the file
    r = opts.run
    if not _is_model_file(state):
        if not is_official_checkpoint(state):
            keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is neither a fastmmt model file (a dict with 'model', 'num_classes', "
                             f"'model_options', written by fastmmt pretrain/adapt) nor an official MMT release "
                             f"file ('state_dict' with keys 'module.base.N...', 'module.feat_bn.*', "
                             f"'module.classifier.weight'); found {keys}")
        ck = official_checkpoint_from(state, path)
        # the file fixes the shapes; dropout (not stored in it) stays the run's
        mopts = _fixed_options(path, opts.model, {"arch": ck.arch, "base_width": ck.base_width})
        model = make_model(mopts, ck.num_classes, device, r.bn_split, fused_bn_split=r.fused_bn_split)
        load_official_weights(model, ck, path)
        log.info("%s: official MMT release file (%s, epoch %s, best mAP %s) converted", path, ck.arch,
                 ck.epoch, ck.best_mAP)
        return model
    saved = {k: v for k, v in (state.get("model_options") or {}).items() if k in ARCH_KEYS}
    mopts = _fixed_options(path, opts.model, saved)
    model = make_model(mopts, state["num_classes"], device, r.bn_split, fused_bn_split=r.fused_bn_split)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"model file {path} does not fit model.arch={mopts.arch} "
                         f"model.base_width={mopts.base_width}: {str(e).splitlines()[0]}") from None
    return model

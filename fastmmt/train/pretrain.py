"""Stage I: supervised source pre-training (label-smoothed CE + softmax-triplet) with target BN
adaptation (a target batch is forwarded in train mode each iteration and its output discarded)."""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastmmt.data import ReIDDataset
from fastmmt.data.factory import build_train_loader
from fastmmt.data.loaders import TrainBatch
from fastmmt.models.factory import compile_backbones, make_model
from fastmmt.train import distributed as ddp
from fastmmt.train.batches import check_label_range, data_device_id, to_device, train_augment
from fastmmt.train.checkpoint import atomic_save
from fastmmt.train.extraction import RunExtraction, make_decoded_cache
from fastmmt.train.hooks import Hook
from fastmmt.train.logger import RunLogger
from fastmmt.train.loop import FINITE, run_epochs
from fastmmt.train.stage import RunState
from fastmmt.train.model_file import StageResult, model_file
from fastmmt.train.optim import adam, adam_impl, trunk_parameters
from fastmmt.train.options import ExperimentOptions, PretrainOptions
from fastmmt.train.resume_check import defining_options
from fastmmt.train.run_lock import hold_folder
from fastmmt.train.runtime import Runtime, autocast, setup_run
from fastmmt.train.schedule import warmup_multistep_factor
from fastmmt.train.supervised import supervised_losses
from fastmmt.train.update import StepContext, apply_update

log = logging.getLogger("fastmmt.train")


def pretrain_step(sc: StepContext, batch: TrainBatch, target_batch: TrainBatch | None,
                  where: str | Callable[[], str] = "") -> dict[str, torch.Tensor]:
    """One pre-training step; returns its loss terms (and accuracy) as device tensors.

    ``sc.nets[0]`` is ``sc.students[0]`` as trained (DDP-wrapped under torchrun). Without ``run.sync_each_step``
    the step reads nothing on the host: the runner reads the finite flag at the next log point
    (``stop`` ends the run there; under ``skip`` the flag reaches the fused optimiser as its
    ``found_inf`` and nothing is updated).
    The target batch (BN adaptation, train mode, output discarded) is forwarded after the source
    forward and BEFORE the backward pass, on the pre-step weights, as the official trainer did.
    """
    p, m, r = sc.opts.pretrain, sc.opts.model, sc.opts.run
    device, ctx = sc.rt.device, sc.rt.ctx
    model = sc.students[0]
    logits, y, ce, tri = supervised_losses(sc, batch, p.epsilon)
    loss = ce + tri
    acc = (logits.detach().argmax(1) == y).float().mean()
    terms = {"loss_ce": ce.detach(), "loss_tri": tri.detach(), "acc": acc}
    if target_batch is not None:
        with torch.no_grad(), autocast(device, r.amp):
            model(to_device(target_batch.views[0], device, m.channels_last))  # BN statistics only
    ok = apply_update(loss, sc.optimizer, [model], r, ctx, where)
    return {**terms, "loss": loss.detach(), FINITE: torch.tensor(False) if ok is None else ok}


def lr_factor(p: PretrainOptions) -> Callable[[int], float]:
    """The learning-rate factor of each epoch (a ``LambdaLR`` lambda, stepped after each epoch).

    ``pretrain.lr_timing: official`` shifts the schedule by one epoch: the official loop called
    ``lr_scheduler.step()`` at the START of each epoch, so under PyTorch >= 1.1 epoch e trained
    with the factor of e + 1 (0.109x at epoch 0, the full rate from epoch 9, x0.1 at 39 and 69).
    """
    shift = 1 if p.lr_timing == "official" else 0
    return lambda e: warmup_multistep_factor(e + shift, p.milestones, p.gamma, p.warmup_factor, p.warmup_epochs)


class _Pretrain:
    """Stage I as :func:`~fastmmt.train.loop.run_epochs` drives it."""

    def __init__(self, source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions, rt: Runtime):
        d, m, p, r = opts.data, opts.model, opts.pretrain, opts.run
        self.opts, self.rt, self.target, self.source = opts, rt, target, source
        self.name, self.epochs, self.iters = "pretrain", p.epochs, p.iters
        # the runner evaluates nothing per epoch: pretrain.select evaluates the source in end_epoch
        self.eval_every, self.select_best, self.best_of = 0, False, None
        # pretrain.select=source_best: the best source test mAP so far and that epoch's weights
        self.best: dict = {}
        self.best_state: dict | None = None
        self.num_classes = source.num_train_pids
        model = make_model(m, self.num_classes, rt.device, r.bn_split, pretrained=m.pretrained,
                           fused_bn_split=r.fused_bn_split)
        if r.sync_bn:
            (model,) = ddp.convert_sync_bn([model], rt.ctx)
        self.model = model
        self.optimizer = adam([model], p.lr, p.weight_decay, adam_impl(r))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(p))
        shard = dict(rank=rt.ctx.rank, world_size=rt.ctx.world_size, local_rank=data_device_id(rt.ctx),
                     augment=train_augment(d))
        labels = np.array([x.pid for x in source.train])
        check_label_range(labels, self.num_classes, f"source dataset {source.name}")
        # data.decode_cache: the training images of both domains decoded once for the run
        self.src = build_train_loader(source.train, labels, d.height, d.width,
                                      batch_size=d.batch_size, num_instances=d.num_instances, num_views=1,
                                      workers=d.workers, seed=rt.seed, erase=p.erase, backend=d.backend,
                                      decoded_cache=make_decoded_cache(source, d, ("train",)), **shard)
        self.tgt = None
        if target is not None and p.target_bn_forward:
            # K = 1 with one "identity" per image: a random permutation of the target images.
            self.tgt = build_train_loader(target.train, np.arange(len(target.train)), d.height, d.width,
                                          batch_size=d.batch_size, num_instances=1, num_views=1,
                                          workers=d.workers, seed=rt.seed + 7, erase=p.erase,
                                          backend=d.backend, decoded_cache=make_decoded_cache(target, d, ("train",)),
                                          **shard)
        self.images_per_step = d.batch_size * (2 if self.tgt is not None else 1)
        # test-set extraction set up once per run (loaders kept with data.persistent_loaders)
        self.source_test = RunExtraction(source, d, r, m, rt.device, rt.ctx)
        self.target_test = RunExtraction(target, d, r, m, rt.device, rt.ctx) if target is not None else None
        self._tgt_iter = None

    def start(self) -> None:
        """After a resume: broadcast rank 0's weights, wrap for DDP, compile."""
        ddp.broadcast_state([self.model], self.rt.ctx)
        self.net = ddp.wrap_ddp(self.model, self.rt.ctx)
        self.sc = StepContext([self.net], [self.model], self.optimizer, self.opts, self.rt)
        if self.opts.run.compile:
            compile_backbones([self.model])

    def state_dict(self, epoch: int, st: RunState) -> dict:
        return {"epoch": epoch, "global_step": st.global_step, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.sched.state_dict(),
                "source_best": self.best, "source_best_model": self.best_state}

    def load_state_dict(self, ck: dict) -> RunState:
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        self.best, self.best_state = ck.get("source_best") or {}, ck.get("source_best_model")
        return RunState(ck["epoch"] + 1, ck.get("global_step", 0))

    def begin_epoch(self, epoch: int, st: RunState) -> dict:
        self.model.train()
        self._tgt_iter = self.tgt.epoch(epoch, self.iters) if self.tgt is not None else None
        return {"seed": self.rt.seed, "lr": self.optimizer.param_groups[0]["lr"]}

    def batches(self, epoch: int):
        return self.src.epoch(epoch, self.iters)

    def step(self, batch: TrainBatch, it: int, global_step: int, where: Callable[[], str]) -> dict:
        tb = next(self._tgt_iter) if self._tgt_iter is not None else None
        return pretrain_step(self.sc, batch, tb, where)

    def describe(self, epoch: int, it: int, global_step: int, indices: torch.Tensor | None) -> str:
        imgs = f" (images {indices[:4].tolist()}...)" if indices is not None else ""
        return f"pre-training epoch {epoch} iteration {it}{imgs}"

    def end_epoch(self, epoch: int, record: dict) -> None:
        self.sched.step()
        p = self.opts.pretrain
        if p.select == "source_best" and ((epoch + 1) % p.eval_every == 0 or epoch + 1 == p.epochs):
            self._source_eval(epoch, record)
        if self.rt.is_main:
            log.info("pretrain seed %d epoch %d: ce %s tri %s acc %s (%.1f img/s)", self.rt.seed, epoch,
                     *(f"{record[k]:.3f}" if record[k] is not None else "-" for k in ("loss_ce", "loss_tri", "acc")),
                     record["images_per_second"])

    def _source_eval(self, epoch: int, record: dict) -> None:
        """Source test mAP of this epoch; keep the weights when it beats every earlier one (strictly,
        as the official code: on a tie the earlier epoch stays)."""
        met = self.source_test.evaluate(self.model)
        record.update({f"source_{k}": v for k, v in met.items()})
        if met["mAP"] > self.best.get("mAP", -1.0):
            self.best = {"epoch": epoch, **{k: met[k] for k in ("mAP", "rank1", "rank5", "rank10")}}
            self.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        record["source_best_epoch"] = self.best["epoch"]

    def select_model(self) -> dict:
        """Load the weights Stage II starts from (``pretrain.select``); returns what the model file
        records about the choice."""
        if self.opts.pretrain.select != "source_best":
            return {"select": "last", "epoch": self.epochs - 1}
        if self.best_state is None:
            raise RuntimeError("pretrain.select=source_best but no source evaluation ran")
        self.model.load_state_dict(self.best_state)
        return {"select": "source_best", "epoch": self.best["epoch"], "source_mAP": self.best["mAP"]}

    def eval_models(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def evaluate(self, net: nn.Module) -> dict[str, float]:
        return self.target_test.evaluate(net)

    def model_file(self, name: str, **extra) -> dict:
        return model_file(self.model, self.num_classes, seed=self.rt.seed, **extra)

    def write_epoch(self, state: dict, out_dir: Path) -> None:
        pass

    def trained_parameters(self) -> list[torch.Tensor]:
        return trunk_parameters(self.model)

    def learning_rate(self) -> str:
        return f"pretrain.lr={self.opts.pretrain.lr:g}, {self.optimizer.param_groups[0]['lr']:.3g} in this epoch"


def pretrain(source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions, seed: int,
             out_dir: str | Path, resume: bool = False, resume_changed: bool = False,
             hooks: Iterable[Hook] = ()) -> StageResult:
    """Train one source model with ``seed``; write ``out_dir/model.pt``; evaluate on ``target``.

    ``target`` may be None (no BN adaptation, no evaluation). With ``resume`` the run continues
    from ``out_dir/ckpt``'s last readable epoch. ``model.pt`` (and the target metrics) are those
    of the last epoch, or with ``pretrain.select: source_best`` of the epoch with the best
    SOURCE test mAP among the evaluation epochs (every ``pretrain.eval_every`` and the last),
    the official code's ``model_best.pth.tar``. The run holds ``out_dir`` for its duration
    (:mod:`fastmmt.train.run_lock`); ``resume_changed``: resume even when the options that define
    the run differ from the checkpoint's (:mod:`fastmmt.train.resume_check`). ``hooks``: user
    callbacks of the epoch runner (:mod:`fastmmt.train.hooks`).
    """
    d, p = opts.data, opts.pretrain
    if p.select == "source_best" and not (source.query and source.gallery):
        raise ValueError(f"pretrain.select=source_best evaluates on the source test set, but source dataset "
                         f"{source.name} ({source.root}) has {len(source.query)} query and "
                         f"{len(source.gallery)} gallery images; set pretrain.select=last")
    _check_enough(source, "source", source.num_train_pids, d.batch_size, d.num_instances)
    if target is not None and p.target_bn_forward:
        _check_enough(target, "target", len(target.train), d.batch_size, 1)
    out_dir = Path(out_dir)
    rt = setup_run(opts, seed)
    with hold_folder(out_dir, rt.ctx):
        return _pretrain(source, target, opts, seed, out_dir, resume, resume_changed, rt, hooks)


def _pretrain(source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions, seed: int, out_dir: Path,
              resume: bool, resume_changed: bool, rt: Runtime, hooks: Iterable[Hook]) -> StageResult:
    """:func:`pretrain` once the run holds ``out_dir``."""
    stage = _Pretrain(source, target, opts, rt)
    logger = RunLogger(out_dir) if rt.is_main else None
    defines = defining_options("pretrain", opts, {"source": source, "target": target}, opts.model)
    st = run_epochs(stage, rt, out_dir, logger, resume=resume, resume_changed=resume_changed, defines=defines,
                    hooks=hooks)
    chosen = stage.select_model()
    model_path = ddp.run_on_main(rt.ctx, atomic_save, stage.model_file("model", **chosen), out_dir / "model.pt")
    metrics: dict = {}
    eval_seconds = 0.0
    if target is not None:
        metrics = stage.evaluate(stage.model)
        eval_seconds = metrics.pop("eval_seconds")
        if logger is not None:
            logger.log({"stage": "pretrain", "seed": seed, "final": True, **metrics,
                        "selected_epoch": chosen["epoch"]})
    if logger is not None:
        logger.close()
    train_seconds = sum(h["train_seconds"] for h in st.history)
    return StageResult(str(model_path), metrics, {"train": train_seconds, "eval": eval_seconds})


def _check_enough(dataset: ReIDDataset, role: str, available: int, batch_size: int, num_instances: int) -> None:
    """A P x K batch needs P distinct identities (K = 1: P images); say which option to change."""
    need = batch_size // max(num_instances, 1)
    if available < need:
        what = "training identities" if num_instances > 1 else "training images"
        raise ValueError(f"{role} dataset {dataset.name} ({dataset.root}) has {available} {what} but a batch of "
                         f"data.batch_size={batch_size} with {num_instances} image(s) each needs {need}; "
                         f"lower data.batch_size")

"""Stage I: supervised source pre-training (label-smoothed CE + softmax-triplet) with target BN
adaptation (a target batch is forwarded in train mode each iteration and its output discarded)."""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fastmmt.data import ReIDDataset
from fastmmt.data.factory import build_train_loader
from fastmmt.ops import cross_entropy_label_smooth, softmax_triplet_loss
from fastmmt.train import distributed as ddp
from fastmmt.train.checkpoint import atomic_save, read_resume_checkpoint, save_checkpoint
from fastmmt.train.common import (
    adam,
    check_policy,
    data_device_id,
    evaluate,
    make_model,
    step_is_finite,
    to_device,
    train_augment,
)
from fastmmt.train.logger import RunLogger
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.runtime import (
    autocast,
    configure_threads,
    epoch_seed,
    resolve_device,
    seed_everything,
    set_deterministic,
)
from fastmmt.train.schedule import warmup_multistep_factor

log = logging.getLogger("fastmmt.train")


@dataclass
class StageResult:
    """What a stage leaves behind: the model file, final target metrics, per-stage seconds."""

    model_path: str
    metrics: dict
    seconds: dict


def pretrain(source: ReIDDataset, target: ReIDDataset | None, opts: ExperimentOptions, seed: int,
             out_dir: str | Path, resume: bool = False) -> StageResult:
    """Train one source model with ``seed``; write ``out_dir/model.pt``; evaluate on ``target``.

    ``target`` may be None (no BN adaptation, no evaluation). With ``resume`` the run continues
    from ``out_dir/ckpt``'s last readable epoch.
    """
    d, m, p, r = opts.data, opts.model, opts.pretrain, opts.run
    check_policy(r.on_nonfinite)
    if r.sync_bn and r.bn_split:
        raise ValueError("run.sync_bn and run.bn_split exclude each other: set run.bn_split=0 with SyncBN")
    _check_enough(source, "source", source.num_train_pids, d.batch_size, d.num_instances)
    if target is not None and p.target_bn_forward:
        _check_enough(target, "target", len(target.train), d.batch_size, 1)
    out_dir = Path(out_dir)
    ctx = ddp.setup(resolve_device(r.device))
    device = ctx.device
    ddp.check_batch_shares(d.batch_size, d.num_instances, ctx)
    configure_threads(r.num_threads)
    set_deterministic(r.deterministic)
    seed_everything(seed)
    model = make_model(m, source.num_train_pids, device, r.bn_split, pretrained=m.pretrained)
    if r.sync_bn:
        (model,) = ddp.convert_sync_bn([model], ctx)
    optimizer = adam([model], p.lr, p.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda e: warmup_multistep_factor(e, p.milestones, p.gamma, p.warmup_factor, p.warmup_epochs))
    start = 0
    if resume and (state := read_resume_checkpoint(out_dir / "ckpt", device, ctx)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = state["epoch"] + 1
        log.info("resumed pre-training at epoch %d from %s", start, out_dir / "ckpt")
    ddp.broadcast_state([model], ctx)
    net = ddp.wrap_ddp(model, ctx)

    shard = dict(rank=ctx.rank, world_size=ctx.world_size, local_rank=data_device_id(ctx),
                 augment=train_augment(d))
    src = build_train_loader(source.train, np.array([x.pid for x in source.train]), d.height, d.width,
                             batch_size=d.batch_size, num_instances=d.num_instances, num_views=1,
                             workers=d.workers, seed=seed, erase=p.erase, backend=d.backend, **shard)
    tgt = None
    if target is not None and p.target_bn_forward:
        # K = 1 with one "identity" per image: a random permutation of the target images.
        tgt = build_train_loader(target.train, np.arange(len(target.train)), d.height, d.width,
                                 batch_size=d.batch_size, num_instances=1, num_views=1,
                                 workers=d.workers, seed=seed + 7, erase=p.erase, backend=d.backend, **shard)
    logger = RunLogger(out_dir) if ctx.is_main else None
    if logger is not None:
        logger.start_at(start)
    train_seconds = 0.0
    for epoch in range(start, p.epochs):
        seed_everything(epoch_seed(seed, epoch))
        model.train()
        t0 = time.perf_counter()
        sums = {"loss_ce": 0.0, "loss_tri": 0.0, "acc": 0.0}
        skipped = 0
        tgt_iter = tgt.epoch(epoch, p.iters) if tgt is not None else None
        bar = tqdm(src.epoch(epoch, p.iters), total=p.iters, desc=f"pretrain s{seed} ep{epoch}",
                   disable=not (r.progress and ctx.is_main and sys.stderr.isatty()), leave=False)
        for it, batch in enumerate(bar):
            x = to_device(batch.views[0], device, m.channels_last)
            y = batch.labels.to(device)
            with autocast(device, r.amp):
                f, logits = net(x)
                f, logits, y = ddp.gather_batch(ctx, f, logits, y)
                ce = cross_entropy_label_smooth(logits, y, p.epsilon, backend=r.loss_backend)
                tri = softmax_triplet_loss(f, y, backend=r.loss_backend)
                loss = ce + tri
            tb = next(tgt_iter) if tgt_iter is not None else None
            where = f"pre-training epoch {epoch} iteration {it} (images {batch.indices[:4].tolist()}...)"
            if not step_is_finite(loss, where, r.on_nonfinite, ctx):
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            (loss * ctx.world_size).backward()  # DDP averages: the gradient of the global loss
            optimizer.step()
            if tb is not None:
                with torch.no_grad(), autocast(device, r.amp):
                    model(to_device(tb.views[0], device, m.channels_last))  # BN statistics only
            ddp.broadcast_buffers([model], ctx)  # BN statistics: rank 0's (DataParallel's)
            sums["loss_ce"] += ce.item()
            sums["loss_tri"] += tri.item()
            sums["acc"] += (logits.argmax(1) == y).float().mean().item()
            bar.set_postfix(ce=f"{ce.item():.3f}", tri=f"{tri.item():.3f}")
        sched.step()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        n_img = p.iters * d.batch_size * (2 if tgt is not None else 1)
        done = max(p.iters - skipped, 1)
        record = {"stage": "pretrain", "seed": seed, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                  **{k: v / done for k, v in sums.items()}, "train_seconds": seconds,
                  "images_per_second": n_img / seconds, "skipped_steps": skipped, "world_size": ctx.world_size}
        state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": sched.state_dict()}
        ddp.run_on_main(ctx, _write_epoch, state, record, out_dir, logger)
        if ctx.is_main:
            log.info("pretrain seed %d epoch %d: ce %.3f tri %.3f acc %.3f (%.1f img/s)", seed, epoch,
                     record["loss_ce"], record["loss_tri"], record["acc"], record["images_per_second"])

    model_path = ddp.run_on_main(ctx, atomic_save, model_file(model, source.num_train_pids, seed=seed),
                                 out_dir / "model.pt")
    metrics = {}
    eval_seconds = 0.0
    if target is not None:
        metrics = evaluate(model, target, d, r, device, m, ctx)
        eval_seconds = metrics.pop("eval_seconds")
        if logger is not None:
            logger.log({"stage": "pretrain", "seed": seed, "final": True, **metrics})
    if logger is not None:
        logger.close()
    return StageResult(str(model_path), metrics, {"train": train_seconds, "eval": eval_seconds})


def _check_enough(dataset: ReIDDataset, role: str, available: int, batch_size: int, num_instances: int) -> None:
    """A P x K batch needs P distinct identities (K = 1: P images); say which option to change."""
    need = batch_size // max(num_instances, 1)
    if available < need:
        what = "training identities" if num_instances > 1 else "training images"
        raise ValueError(f"{role} dataset {dataset.name} ({dataset.root}) has {available} {what} but a batch of "
                         f"data.batch_size={batch_size} with {num_instances} image(s) each needs {need}; "
                         f"lower data.batch_size")


def _write_epoch(state: dict, record: dict, out_dir: Path, logger: RunLogger) -> None:
    """Rank 0's end of an epoch: checkpoint first (atomic), then the log."""
    save_checkpoint(state, out_dir / "ckpt")
    logger.log(record)


ARCH_KEYS = ("arch", "base_width", "dropout")  # the model options a model file fixes


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
    model = make_model(mopts, state["num_classes"], device, opts.run.bn_split)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise ValueError(f"model file {path} does not fit model.arch={mopts.arch} "
                         f"model.base_width={mopts.base_width}: {str(e).splitlines()[0]}") from None
    return model

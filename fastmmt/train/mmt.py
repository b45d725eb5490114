"""Stage II: Mutual Mean-Teaching (k-means or DBSCAN pseudo-labels) and the single-model baseline.

MMT, per epoch: extract target features with both mean teachers (eval mode), average them,
cluster, set the classifier of all four networks to the L2-normalised centroids, build a fresh
Adam, then train on two-view P x K batches with all four networks in train mode, cross
supervision (S1 <- T2, S2 <- T1) and a parameter-only mean-teacher update after every step.
"""
from __future__ import annotations

import copy
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastmmt.cluster import ClusterError, ClusterResult, build_clusterer
from fastmmt.data import ReIDDataset
from fastmmt.data.factory import build_train_loader
from fastmmt.evaluation import pseudo_label_quality
from fastmmt.ops import (
    cross_entropy_label_smooth,
    ema_alpha,
    ema_update_module_,
    mmt_loss,
    softmax_triplet_loss,
)
from fastmmt.train import distributed as ddp
from fastmmt.train.checkpoint import atomic_save, read_resume_checkpoint, save_checkpoint
from fastmmt.train.common import (
    adam,
    check_policy,
    data_device_id,
    evaluate,
    extract,
    step_is_finite,
    to_device,
    train_augment,
)
from fastmmt.train.logger import RunLogger
from fastmmt.train.options import ADAPT_METHODS, AdaptOptions, DataOptions, ExperimentOptions
from fastmmt.train.pretrain import StageResult, load_model_file, model_file
from fastmmt.train.runtime import (
    autocast,
    configure_threads,
    epoch_seed,
    resolve_device,
    seed_everything,
    set_deterministic,
)

log = logging.getLogger("fastmmt.train")


@dataclass
class _State:
    """Mutable run state that a checkpoint restores."""

    epoch: int = 0
    global_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=dict)


def _make_teacher(student: nn.Module) -> nn.Module:
    teacher = copy.deepcopy(student)
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher


def _set_classifiers(students: list[nn.Module], teachers: list[nn.Module], centroids: torch.Tensor) -> None:
    """Classifier of every network <- L2-normalised centroids (K = number of clusters)."""
    w = F.normalize(centroids.float(), dim=1)
    for net in students + teachers:
        net.reset_classifier(w)
    for t in teachers:
        t.classifier.weight.requires_grad_(False)


def _cluster(clusterer, cf: torch.Tensor, epoch: int, a: AdaptOptions, d: DataOptions) -> ClusterResult:
    """Pseudo-labels of ``epoch``; an unusable clustering names the epoch and what to change."""
    hint = ("lower adapt.k (at most the number of target training images)" if a.method != "dbscan" else
            "raise adapt.rho (a wider eps) or lower adapt.min_samples")
    try:
        res = clusterer(cf, epoch)
    except ClusterError as e:
        raise ClusterError(f"epoch {epoch}: clustering {len(cf)} target images failed: {e}; {hint}") from None
    p = d.batch_size // d.num_instances
    if res.num_clusters < p:
        outliers = int((np.asarray(res.labels) < 0).sum())
        raise ClusterError(
            f"epoch {epoch}: clustering gave {res.num_clusters} clusters ({outliers} outliers) but a batch of "
            f"data.batch_size={d.batch_size} ({p} identities x data.num_instances={d.num_instances}) needs at "
            f"least {p}; lower data.batch_size, or "
            + ("raise adapt.k" if a.method != "dbscan" else "raise adapt.rho or lower adapt.min_samples"))
    return res


def _epoch_state(epoch: int, st: _State, nets: list[nn.Module], labels: np.ndarray, clusterer) -> dict:
    """The checkpoint of the end of ``epoch`` (built on every rank, written by rank 0)."""
    return {"epoch": epoch, "global_step": st.global_step, "history": st.history, "best": st.best,
            "nets": [net.state_dict() for net in nets], "labels": labels,
            "clusterer": clusterer.state_dict() if hasattr(clusterer, "state_dict") else None}


def _write_epoch(state: dict, record: dict, out_dir: Path, logger: RunLogger) -> None:
    """Rank 0's end of an epoch: checkpoint first (atomic), then pseudo-labels and the log."""
    save_checkpoint(state, out_dir / "ckpt")
    np.save(out_dir / "pseudo_labels.npy", state["labels"])
    logger.log(record)


def _resume(out_dir: Path, nets: list[nn.Module], teachers: list[nn.Module], clusterer,
            device: torch.device, ctx: ddp.DistContext) -> _State | None:
    """Restore networks, clusterer state and counters from ``out_dir/ckpt`` (None: nothing there)."""
    ck = read_resume_checkpoint(out_dir / "ckpt", device, ctx)
    if ck is None:
        return None
    for net, sd in zip(nets, ck["nets"]):
        net.reset_classifier(sd["classifier.weight"])
        net.load_state_dict(sd)
    for t in teachers:
        for q in t.parameters():
            q.requires_grad_(False)
    if hasattr(clusterer, "load_state_dict") and ck.get("clusterer") is not None:
        clusterer.load_state_dict(ck["clusterer"])
    return _State(ck["epoch"] + 1, ck["global_step"], ck["history"], ck.get("best", {}))


def adapt(target: ReIDDataset, init_models: list[str], opts: ExperimentOptions, out_dir: str | Path,
          resume: bool = False) -> StageResult:
    """Run Stage II on ``target`` from pre-trained model files (two for MMT, one for the baseline).

    ``kmeans`` / ``dbscan``: MMT on clusters; ``baseline``: one model on its own k-means clusters;
    ``oracle``: MMT on the target's TRUE identities instead of clusters (what MMT reaches with
    perfect pseudo-labels; for comparison only, it needs a labelled target).

    Writes a checkpoint every epoch (``out_dir/ckpt``), ``log.jsonl``, ``curves.png`` and the final
    teacher as ``out_dir/model.pt``. Returns the target metrics of the reported model: the last
    epoch's mean teacher 1 (or, with ``run.select_best``, the epoch of best target mAP).
    Under torchrun every rank calls this; see :mod:`fastmmt.train.distributed`.
    """
    a, d, m, r = opts.adapt, opts.data, opts.model, opts.run
    if a.method not in ADAPT_METHODS:
        raise ValueError(f"adapt.method must be one of {', '.join(ADAPT_METHODS)}; got {a.method!r}")
    mmt = a.method != "baseline"
    if len(init_models) != (2 if mmt else 1):
        raise ValueError(f"method {a.method} needs {2 if mmt else 1} pre-trained model(s), got {len(init_models)}")
    check_policy(r.on_nonfinite)
    if r.sync_bn and r.bn_split:
        raise ValueError("run.sync_bn and run.bn_split exclude each other: set run.bn_split=0 with SyncBN")
    out_dir = Path(out_dir)
    ctx = ddp.setup(resolve_device(r.device))
    device = ctx.device
    ddp.check_batch_shares(d.batch_size, d.num_instances, ctx)
    configure_threads(r.num_threads)
    set_deterministic(r.deterministic)
    seed_everything(r.seed)
    students = [load_model_file(pth, opts, device) for pth in init_models]
    if r.sync_bn:
        students = ddp.convert_sync_bn(students, ctx)
    teachers = [_make_teacher(s) for s in students] if mmt else []
    if a.method == "dbscan":
        clusterer = build_clusterer("dbscan", k1=a.k1, k2=a.k2, rho=a.rho, min_samples=a.min_samples,
                                    seed=r.seed, num_threads=r.num_threads)
    elif a.method == "oracle":
        clusterer = build_clusterer("known", labels=np.array([x.pid for x in target.train]))
    else:
        clusterer = build_clusterer("kmeans", k=a.k, seed=r.seed, backend=a.cluster_backend,
                                    num_threads=r.num_threads)
    st = _State()
    if resume and (restored := _resume(out_dir, students + teachers, teachers, clusterer, device, ctx)):
        st = restored
        log.info("resumed %s at epoch %d (global step %d)", a.method, st.epoch, st.global_step)
    ddp.broadcast_state(students + teachers, ctx)  # every rank starts from rank 0's networks

    logger = RunLogger(out_dir) if ctx.is_main else None
    if logger is not None:
        logger.start_at(st.epoch)
    loader = None
    records = target.train
    true_ids = np.array([x.pid for x in records])  # for the logged diagnostic only, never trained on
    true_cams = np.array([x.camid for x in records])
    eval_net = teachers[0] if mmt else students[0]
    for epoch in range(st.epoch, a.epochs):
        seed_everything(epoch_seed(r.seed, epoch))
        times = {}
        # 1. features of the target training set from the teachers (the student for one model)
        t0 = time.perf_counter()
        feats = [extract(net, records, d, r, device, m, f"extract ep{epoch}", ctx) for net in (teachers or students)]
        cf = torch.stack(feats).mean(0)
        if a.method == "dbscan":
            cf = F.normalize(cf, dim=1)
        times["extract_seconds"] = time.perf_counter() - t0
        # 2. cluster once (rank 0) -> pseudo-labels and centroids on every rank
        t0 = time.perf_counter()
        res = ddp.run_on_main(ctx, _cluster, clusterer, cf, epoch, a, d)
        labels = np.asarray(res.labels, dtype=np.int64)
        times["cluster_seconds"] = time.perf_counter() - t0
        quality = {f"pseudo_{k}": v for k, v in pseudo_label_quality(labels, true_ids, true_cams).items()}
        # 3. classifiers of all networks <- normalised centroids; 4. fresh optimiser
        _set_classifiers(students, teachers, res.centroids.to(device))
        optimizer = adam(students, a.lr, a.weight_decay)
        nets = [ddp.wrap_ddp(s, ctx) for s in students]  # re-wrapped: the classifiers are new
        if loader is None:
            loader = build_train_loader(records, labels, d.height, d.width, batch_size=d.batch_size,
                                        num_instances=d.num_instances, num_views=2 if mmt else 1,
                                        workers=d.workers, seed=r.seed, erase=a.erase, backend=d.backend,
                                        rank=ctx.rank, world_size=ctx.world_size,
                                        local_rank=data_device_id(ctx), augment=train_augment(d))
        else:
            loader.set_labels(labels)
        # 5. train
        if ctx.is_main:
            log.info("%s epoch %d: training %d iterations on %d clusters (NMI to the true ids %.3f, "
                     "cross-camera pair recall %.3f)", a.method, epoch, a.iters, res.num_clusters,
                     quality["pseudo_nmi"], quality["pseudo_pair_recall_cross_cam"])
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        skipped = 0
        for net in students + teachers:
            net.train()
        bar = tqdm(loader.epoch(epoch, a.iters), total=a.iters, desc=f"{a.method} ep{epoch}",
                   disable=not (r.progress and ctx.is_main and sys.stderr.isatty()), leave=False)
        ema_backend = None
        for it, batch in enumerate(bar):
            y = batch.labels.to(device)
            where = f"epoch {epoch} iteration {it} (global step {st.global_step})"
            if mmt:
                x1 = to_device(batch.views[0], device, m.channels_last)
                x2 = to_device(batch.views[1], device, m.channels_last)
                with autocast(device, r.amp):
                    f1, p1 = nets[0](x1)
                    f2, p2 = nets[1](x2)
                    with torch.no_grad():
                        f1t, p1t = teachers[0](x1)
                        f2t, p2t = teachers[1](x2)
                    f1, f2, f1t, f2t, p1, p2, p1t, p2t, y = ddp.gather_batch(ctx, f1, f2, f1t, f2t, p1, p2, p1t, p2t, y)
                    out = mmt_loss(f1, f2, f1t, f2t, p1, p2, p1t, p2t, y, a.soft_ce_weight,
                                   a.soft_tri_weight, a.epsilon, backend=r.loss_backend)
                loss = out.total
                terms = {"loss": loss, "loss_ce": out.ce, "loss_tri": out.tri,
                         "loss_soft_ce": out.soft_ce, "loss_soft_tri": out.soft_tri}
            else:
                x = to_device(batch.views[0], device, m.channels_last)
                with autocast(device, r.amp):
                    f, p = nets[0](x)
                    f, p, y = ddp.gather_batch(ctx, f, p, y)
                    ce = cross_entropy_label_smooth(p, y, a.epsilon, backend=r.loss_backend)
                    tri = softmax_triplet_loss(f, y, backend=r.loss_backend)
                loss = ce + tri
                terms = {"loss": loss, "loss_ce": ce, "loss_tri": tri}
            if not step_is_finite(loss, where, r.on_nonfinite, ctx):
                skipped += 1
                continue
            optimizer.zero_grad(set_to_none=True)
            (loss * ctx.world_size).backward()  # DDP averages: the gradient of the global loss
            optimizer.step()
            ddp.broadcast_buffers(students + teachers, ctx)  # BN statistics: rank 0's (DataParallel's)
            if mmt:
                ema_backend = ema_update_module_(teachers, students, ema_alpha(st.global_step, a.ema_alpha),
                                                 backend=r.ema_backend)
            st.global_step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        times["train_seconds"] = time.perf_counter() - t0
        n_img = a.iters * d.batch_size * (2 if mmt else 1)
        done = a.iters - skipped
        record = {"stage": a.method, "epoch": epoch, **{k: v / done for k, v in sums.items()},
                  "num_clusters": int(res.num_clusters), "num_outliers": int((labels < 0).sum()),
                  "global_step": st.global_step, **times, "images_per_second": n_img / times["train_seconds"],
                  "ema_backend": ema_backend, "skipped_steps": skipped, "world_size": ctx.world_size, **quality}
        # 6. evaluate
        if r.eval_every and ((epoch + 1) % r.eval_every == 0 or epoch + 1 == a.epochs):
            met = evaluate(eval_net, target, d, r, device, m, ctx)
            record.update(met)
            if mmt:
                met2 = evaluate(teachers[1], target, d, r, device, m, ctx)
                record["T2_mAP"] = met2["mAP"]
                record["eval_seconds"] += met2["eval_seconds"]
            if r.select_best and met["mAP"] > st.best.get("mAP", -1.0):
                st.best = {"epoch": epoch, **met}
                ddp.run_on_main(ctx, atomic_save, model_file(eval_net, res.num_clusters, epoch=epoch),
                                out_dir / "best.pt")
        st.history.append(record)
        ddp.run_on_main(ctx, _write_epoch, _epoch_state(epoch, st, students + teachers, labels, clusterer),
                        record, out_dir, logger)
        if ctx.is_main:
            log.info("%s epoch %d: %s", a.method, epoch,
                     ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))

    final_path = ddp.run_on_main(ctx, atomic_save, model_file(eval_net, eval_net.classifier.out_features,
                                                              method=a.method), out_dir / "model.pt")
    last = st.history[-1] if st.history else {}
    metrics = {k: last[k] for k in ("mAP", "rank1", "rank5", "rank10") if k in last}
    if not metrics:
        metrics = evaluate(eval_net, target, d, r, device, m, ctx)
        metrics.pop("eval_seconds")
    if r.select_best and st.best:
        metrics = {k: st.best[k] for k in ("mAP", "rank1", "rank5", "rank10")} | {"epoch": st.best["epoch"]}
    seconds = {k: sum(h.get(f"{k}_seconds", 0.0) for h in st.history) for k in ("extract", "cluster", "train", "eval")}
    if logger is not None:
        logger.log({"stage": a.method, "final": True, **metrics})
        logger.close()
    return StageResult(str(final_path), metrics, seconds)

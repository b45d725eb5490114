"""Stage II: Mutual Mean-Teaching (k-means or DBSCAN pseudo-labels) and the single-model baseline.

MMT, per epoch: extract target features with both mean teachers (eval mode), average them,
cluster, set the classifier of all four networks to the L2-normalised centroids, build a fresh
Adam, then train on two-view P x K batches with all four networks in train mode, cross
supervision (S1 <- T2, S2 <- T1) and a parameter-only mean-teacher update after every step.
"""
from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from fastmmt.cluster import build_clusterer
from fastmmt.data import ReIDDataset
from fastmmt.data.factory import build_train_loader
from fastmmt.ops import (
    cross_entropy_label_smooth,
    ema_alpha,
    ema_update_module_,
    mmt_loss,
    softmax_triplet_loss,
)
from fastmmt.train.checkpoint import atomic_save, load_checkpoint, save_checkpoint
from fastmmt.train.common import adam, check_finite, evaluate, extract, to_device
from fastmmt.train.logger import RunLogger
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.pretrain import StageResult, load_model_file
from fastmmt.train.runtime import autocast, epoch_seed, resolve_device, seed_everything, set_deterministic

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


def adapt(target: ReIDDataset, init_models: list[str], opts: ExperimentOptions, out_dir: str | Path,
          resume: bool = False) -> StageResult:
    """Run Stage II on ``target`` from pre-trained model files (two for MMT, one for the baseline).

    Writes a checkpoint every epoch (``out_dir/ckpt``), ``log.jsonl``, ``curves.png`` and the final
    teacher as ``out_dir/model.pt``. Returns the target metrics of the reported model: the last
    epoch's mean teacher 1 (or, with ``run.select_best``, the epoch of best target mAP).
    """
    a, d, m, r = opts.adapt, opts.data, opts.model, opts.run
    if a.method not in ("kmeans", "dbscan", "baseline"):
        raise ValueError(f"adapt.method must be kmeans, dbscan or baseline; got {a.method!r}")
    mmt = a.method != "baseline"
    if len(init_models) != (2 if mmt else 1):
        raise ValueError(f"method {a.method} needs {2 if mmt else 1} pre-trained model(s), got {len(init_models)}")
    out_dir = Path(out_dir)
    device = resolve_device(r.device)
    set_deterministic(r.deterministic)
    seed_everything(r.seed)
    students = [load_model_file(pth, opts, device) for pth in init_models]
    teachers = [_make_teacher(s) for s in students] if mmt else []
    clusterer = (build_clusterer("kmeans", k=a.k, seed=r.seed, backend=a.cluster_backend, num_threads=r.num_threads)
                 if a.method in ("kmeans", "baseline") else
                 build_clusterer("dbscan", k1=a.k1, k2=a.k2, rho=a.rho, min_samples=a.min_samples,
                                 seed=r.seed, num_threads=r.num_threads))
    st = _State()
    if resume and (ck := load_checkpoint(out_dir / "ckpt", device)) is not None:
        for net, sd in zip(students + teachers, ck["nets"]):
            net.reset_classifier(sd["classifier.weight"])
            net.load_state_dict(sd)
        for t in teachers:
            for q in t.parameters():
                q.requires_grad_(False)
        if hasattr(clusterer, "load_state_dict") and ck.get("clusterer") is not None:
            clusterer.load_state_dict(ck["clusterer"])
        st = _State(ck["epoch"] + 1, ck["global_step"], ck["history"], ck.get("best", {}))
        log.info("resumed %s at epoch %d (global step %d)", a.method, st.epoch, st.global_step)

    logger = RunLogger(out_dir)
    loader = None
    records = target.train
    eval_net = teachers[0] if mmt else students[0]
    for epoch in range(st.epoch, a.epochs):
        seed_everything(epoch_seed(r.seed, epoch))
        times = {}
        # 1. features of the target training set from the teachers (the student for the baseline)
        t0 = time.perf_counter()
        feats = [extract(net, records, d, r, device, m, f"extract ep{epoch}") for net in (teachers or students)]
        cf = torch.stack(feats).mean(0)
        if a.method == "dbscan":
            cf = F.normalize(cf, dim=1)
        times["extract_seconds"] = time.perf_counter() - t0
        # 2. cluster -> pseudo-labels and centroids
        t0 = time.perf_counter()
        res = clusterer(cf, epoch)
        labels = np.asarray(res.labels, dtype=np.int64)
        times["cluster_seconds"] = time.perf_counter() - t0
        # 3. classifiers of all networks <- normalised centroids; 4. fresh optimiser
        _set_classifiers(students, teachers, res.centroids.to(device))
        optimizer = adam(students, a.lr, a.weight_decay)
        if loader is None:
            loader = build_train_loader(records, labels, d.height, d.width, batch_size=d.batch_size,
                                        num_instances=d.num_instances, num_views=2 if mmt else 1,
                                        workers=d.workers, seed=r.seed, erase=a.erase, backend=d.backend)
        else:
            loader.set_labels(labels)
        # 5. train
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        for net in students + teachers:
            net.train()
        bar = tqdm(loader.epoch(epoch, a.iters), total=a.iters, desc=f"{a.method} ep{epoch}",
                   disable=not r.progress, leave=False)
        ema_backend = None
        for it, batch in enumerate(bar):
            y = batch.labels.to(device)
            where = f"epoch {epoch} iteration {it} (global step {st.global_step})"
            if mmt:
                x1 = to_device(batch.views[0], device, m.channels_last)
                x2 = to_device(batch.views[1], device, m.channels_last)
                with autocast(device, r.amp):
                    f1, p1 = students[0](x1)
                    f2, p2 = students[1](x2)
                    with torch.no_grad():
                        f1t, p1t = teachers[0](x1)
                        f2t, p2t = teachers[1](x2)
                    out = mmt_loss(f1, f2, f1t, f2t, p1, p2, p1t, p2t, y, a.soft_ce_weight,
                                   a.soft_tri_weight, a.epsilon, backend=r.loss_backend)
                loss = out.total
                terms = {"loss": loss, "loss_ce": out.ce, "loss_tri": out.tri,
                         "loss_soft_ce": out.soft_ce, "loss_soft_tri": out.soft_tri}
            else:
                x = to_device(batch.views[0], device, m.channels_last)
                with autocast(device, r.amp):
                    f, p = students[0](x)
                    ce = cross_entropy_label_smooth(p, y, a.epsilon, backend=r.loss_backend)
                    tri = softmax_triplet_loss(f, y, backend=r.loss_backend)
                loss = ce + tri
                terms = {"loss": loss, "loss_ce": ce, "loss_tri": tri}
            check_finite(loss, where)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if mmt:
                ema_backend = ema_update_module_(teachers, students, ema_alpha(st.global_step, a.ema_alpha),
                                                 backend=r.ema_backend)
            st.global_step += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        times["train_seconds"] = time.perf_counter() - t0
        n_img = a.iters * d.batch_size * (2 if mmt else 1)
        record = {"stage": a.method, "epoch": epoch, **{k: v / a.iters for k, v in sums.items()},
                  "num_clusters": int(res.num_clusters), "num_outliers": int((labels < 0).sum()),
                  "global_step": st.global_step, **times, "images_per_second": n_img / times["train_seconds"],
                  "ema_backend": ema_backend}
        # 6. evaluate
        if r.eval_every and ((epoch + 1) % r.eval_every == 0 or epoch + 1 == a.epochs):
            met = evaluate(eval_net, target, d, r, device, m)
            record.update(met)
            if mmt:
                met2 = evaluate(teachers[1], target, d, r, device, m)
                record["T2_mAP"] = met2["mAP"]
                record["eval_seconds"] += met2["eval_seconds"]
            if r.select_best and met["mAP"] > st.best.get("mAP", -1.0):
                st.best = {"epoch": epoch, **met}
                atomic_save({"model": eval_net.state_dict(), "num_classes": int(res.num_clusters)},
                            out_dir / "best.pt")
        st.history.append(record)
        save_checkpoint({"epoch": epoch, "global_step": st.global_step, "history": st.history, "best": st.best,
                         "nets": [net.state_dict() for net in students + teachers], "labels": labels,
                         "clusterer": clusterer.state_dict() if hasattr(clusterer, "state_dict") else None},
                        out_dir / "ckpt")
        np.save(out_dir / "pseudo_labels.npy", labels)
        logger.log(record)
        log.info("%s epoch %d: %s", a.method, epoch,
                 ", ".join(f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)))

    final_path = atomic_save({"model": eval_net.state_dict(), "num_classes": int(eval_net.classifier.out_features),
                              "method": a.method}, out_dir / "model.pt")
    last = st.history[-1] if st.history else {}
    metrics = {k: last[k] for k in ("mAP", "rank1", "rank5", "rank10") if k in last}
    if not metrics:
        metrics = evaluate(eval_net, target, d, r, device, m)
        metrics.pop("eval_seconds")
    if r.select_best and st.best:
        metrics = {k: st.best[k] for k in ("mAP", "rank1", "rank5", "rank10")} | {"epoch": st.best["epoch"]}
    seconds = {k: sum(h.get(f"{k}_seconds", 0.0) for h in st.history) for k in ("extract", "cluster", "train", "eval")}
    logger.log({"stage": a.method, "final": True, **metrics})
    logger.close()
    return StageResult(str(final_path), metrics, seconds)

"""Stage II: Mutual Mean-Teaching (k-means or DBSCAN pseudo-labels) and the single-model baseline.

MMT, per epoch: extract target features with both mean teachers (eval mode), average them,
cluster, set the classifier of all four networks to the L2-normalised centroids, build a fresh
Adam, then train on two-view P x K batches with all four networks in train mode, cross
supervision (S1 <- T2, S2 <- T1) and a parameter-only mean-teacher update after every step.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmmt.cluster import ClusterError, ClusterResult, build_clusterer
from fastmmt.data import ReIDDataset
from fastmmt.data.factory import build_train_loader
from fastmmt.data.loaders import TrainBatch
from fastmmt.evaluation import pseudo_label_quality
from fastmmt.models.factory import compile_backbones
from fastmmt.ops import mmt_loss
from fastmmt.train import distributed as ddp
from fastmmt.train.batches import check_label_range, data_device_id, to_device, train_augment
from fastmmt.train.checkpoint import atomic_save
from fastmmt.train.extraction import RunExtraction, make_decoded_cache
from fastmmt.train.hooks import Hook
from fastmmt.train.logger import RunLogger
from fastmmt.train.loop import FINITE, run_epochs
from fastmmt.train.stage import RunState
from fastmmt.train.mean_teacher import MeanTeacher
from fastmmt.train.model_file import StageResult, load_model_file, model_file
from fastmmt.train.optim import adam, adam_impl, trunk_parameters
from fastmmt.train.options import AdaptOptions, DataOptions, ExperimentOptions
from fastmmt.train.resume_check import defining_options
from fastmmt.train.run_lock import hold_folder
from fastmmt.train.supervised import supervised_losses
from fastmmt.train.runtime import Runtime, autocast, setup_run
from fastmmt.train.update import StepContext, apply_update

log = logging.getLogger("fastmmt.train")


def _set_classifiers(students: list[nn.Module], teachers: list[nn.Module], centroids: torch.Tensor) -> None:
    """Classifier of every network <- L2-normalised centroids (K = number of clusters)."""
    w = F.normalize(centroids.float(), dim=1)
    for net in students + teachers:
        net.reset_classifier(w)
    for t in teachers:
        t.classifier.weight.requires_grad_(False)


# what else gives more clusters, per method (the oracle's clusters are the true identities)
FEWER_CLUSTERS_HINT = {"kmeans": ", or raise adapt.k", "baseline": ", or raise adapt.k",
                       "dbscan": ", or raise adapt.rho or lower adapt.min_samples"}


def make_clusterer(opts: ExperimentOptions, target: ReIDDataset):
    """The pseudo-label clusterer of ``adapt.method``: DBSCAN on Jaccard distances, the target's
    true identities (oracle), or k-means (MMT's k-means variant and the baseline)."""
    a, r = opts.adapt, opts.run
    if a.method == "dbscan":
        return build_clusterer("dbscan", k1=a.k1, k2=a.k2, rho=a.rho, min_samples=a.min_samples, seed=r.seed,
                               num_threads=r.num_threads)
    if a.method == "oracle":
        return build_clusterer("known", labels=np.array([x.pid for x in target.train]))
    return build_clusterer("kmeans", k=a.k, seed=r.seed, backend=a.cluster_backend, num_threads=r.num_threads,
                           nredo=a.kmeans_restarts, niter=a.kmeans_iters, seed_dim=a.kmeans_seed_dim)


def _cluster(clusterer, cf: torch.Tensor, epoch: int, a: AdaptOptions, d: DataOptions) -> ClusterResult:
    """Pseudo-labels of ``epoch``; an unusable clustering names the epoch and what to change."""
    # the hint says which way to move the option only where that is the cause
    if a.method == "dbscan":
        hint = "; raise adapt.rho (a wider eps) or lower adapt.min_samples"
    elif a.method in ("kmeans", "baseline") and a.k > len(cf):
        hint = f"; lower adapt.k (at most the number of target training images, {len(cf)})"
    else:
        hint = ""
    try:
        res = clusterer(cf, epoch)
    except ClusterError as e:
        raise ClusterError(f"epoch {epoch}: clustering {len(cf)} target images failed: {e}{hint}") from None
    p = d.batch_size // d.num_instances
    if res.num_clusters < p:
        outliers = int((np.asarray(res.labels) < 0).sum())
        raise ClusterError(
            f"epoch {epoch}: clustering gave {res.num_clusters} clusters ({outliers} outliers) but a batch of "
            f"data.batch_size={d.batch_size} ({p} identities x data.num_instances={d.num_instances}) needs at "
            f"least {p}; lower data.batch_size" + FEWER_CLUSTERS_HINT.get(a.method, ""))
    return res


def mmt_step(sc: StepContext, batch: TrainBatch, global_step: int,
             where: str | Callable[[], str] = "") -> dict[str, torch.Tensor]:
    """One MMT step (both students, cross supervision, optimiser, mean-teacher update).

    Returns the loss terms as device tensors and the step's finite flag (``"finite"``). Without
    ``run.sync_each_step`` it reads nothing on the host. Under ``run.on_nonfinite=skip`` the flag
    goes to the fused optimiser (``found_inf``: a non-finite step changes no weight) and to the
    mean-teacher update as ``alpha = 1``, with the step counted on the device by ``sc.mean_teacher``
    (incremented only by applied steps). Under ``stop`` the step is applied and the mean-teacher
    update takes ``alpha`` of the host's ``global_step``: the runner reads the flag
    at the next log point and ends the run before anything is written.
    ``sc.info["ema_backend"]`` receives the name of the mean-teacher backend that ran.
    """
    a, m, r = sc.opts.adapt, sc.opts.model, sc.opts.run
    device, ctx = sc.rt.device, sc.rt.ctx
    sync = r.sync_each_step
    nets, students, teachers = sc.nets, sc.students, sc.mean_teacher.teachers
    y = batch.labels.to(device, non_blocking=True)
    x1 = to_device(batch.views[0], device, m.channels_last)
    x2 = to_device(batch.views[1], device, m.channels_last)
    with autocast(device, r.amp):
        f1, p1 = nets[0](x1)
        f2, p2 = nets[1](x2)
        with torch.no_grad():
            f1t, p1t = teachers[0](x1)
            f2t, p2t = teachers[1](x2)
        f1, f2, f1t, f2t, p1, p2, p1t, p2t, y = ddp.gather_batch(ctx, f1, f2, f1t, f2t, p1, p2, p1t, p2t, y)
        out = mmt_loss(f1, f2, f1t, f2t, p1, p2, p1t, p2t, y, a.soft_ce_weight, a.soft_tri_weight, a.epsilon,
                       backend=r.loss_backend, check_labels=sync)
    loss = out.total
    terms = {"loss": loss.detach(), "loss_ce": out.ce.detach(), "loss_tri": out.tri.detach(),
             "loss_soft_ce": out.soft_ce.detach(), "loss_soft_tri": out.soft_tri.detach()}
    ok = apply_update(loss, sc.optimizer, students + teachers, r, ctx, where, sc.mean_teacher, students,
                      global_step, sc.info)
    return {**terms, FINITE: torch.tensor(False) if ok is None else ok}


def baseline_step(sc: StepContext, batch: TrainBatch, where: str | Callable[[], str] = "") -> dict[str, torch.Tensor]:
    """One step of the single-model baseline (CE + softmax-triplet on its own clusters); the loss
    terms as device tensors and the finite flag, read on the host as :func:`mmt_step` says."""
    _, _, ce, tri = supervised_losses(sc, batch, sc.opts.adapt.epsilon)
    loss = ce + tri
    terms = {"loss": loss.detach(), "loss_ce": ce.detach(), "loss_tri": tri.detach()}
    ok = apply_update(loss, sc.optimizer, sc.students[:1], sc.opts.run, sc.rt.ctx, where)
    return {**terms, FINITE: torch.tensor(False) if ok is None else ok}


class _Adapt:
    """Stage II (MMT, the baseline, the oracle) as :func:`~fastmmt.train.loop.run_epochs` drives it."""

    def __init__(self, target: ReIDDataset, init_models: list[str], opts: ExperimentOptions, rt: Runtime):
        a, d, r = opts.adapt, opts.data, opts.run
        self.opts, self.rt, self.target = opts, rt, target
        self.mmt = a.method != "baseline"
        self.name, self.epochs, self.iters = a.method, a.epochs, a.iters
        # run.select_best: the best target-test mAP over the epochs and BOTH mean teachers, as the
        # official code chose its figure (on the test set: opt-in)
        self.eval_every, self.select_best = r.eval_every, r.select_best
        self.best_of = ("T1", "T2") if self.mmt else ("S1",)
        self.images_per_step = d.batch_size * (2 if self.mmt else 1)
        # the networks: students from the model files, their mean teachers
        students = [load_model_file(pth, opts, rt.device) for pth in init_models]
        if r.sync_bn:
            students = ddp.convert_sync_bn(students, rt.ctx)
        self.students = students
        self.mean_teacher = MeanTeacher(students, a.ema_alpha, r.ema_backend) if self.mmt else None
        self.teachers = self.mean_teacher.teachers if self.mmt else []
        # the pseudo-labels' clusterer; the target's images and their extraction
        self.clusterer = make_clusterer(opts, target)
        self.records = target.train
        # decode the target's images once (data.decode_cache) and build its extraction loaders once
        # (data.persistent_loaders): same features and batches as without, only faster
        self.decoded_cache = make_decoded_cache(target, d)
        self.extraction = RunExtraction(target, d, r, opts.model, rt.device, rt.ctx, self.decoded_cache)
        self.true_ids = np.array([x.pid for x in self.records])  # for the logged diagnostic only
        self.true_cams = np.array([x.camid for x in self.records])
        self.eval_net = self.teachers[0] if self.mmt else self.students[0]
        self.loader = None
        self.labels: np.ndarray | None = None
        self.res: ClusterResult | None = None
        self.sc: StepContext | None = None  # the step's context, rebuilt each epoch (new optimiser)

    @property
    def nets_all(self) -> list[nn.Module]:
        return self.students + self.teachers

    def start(self) -> None:
        """Every rank from rank 0's networks; compile the backbones (``run.compile``)."""
        ddp.broadcast_state(self.nets_all, self.rt.ctx)
        if self.opts.run.compile:
            compile_backbones(self.nets_all)

    def state_dict(self, epoch: int, st: RunState) -> dict:
        """The checkpoint of the end of ``epoch`` (built on every rank, written by rank 0); its
        networks: the students, then the mean teachers."""
        teachers = self.mean_teacher.state_dict() if self.mmt else []
        return {"epoch": epoch, "global_step": st.global_step, "history": st.history, "best": st.best,
                "nets": [s.state_dict() for s in self.students] + teachers, "labels": self.labels,
                "clusterer": self.clusterer.state_dict() if hasattr(self.clusterer, "state_dict") else None}

    def load_state_dict(self, ck: dict) -> RunState:
        nets = ck["nets"]  # students, then teachers (as state_dict writes them)
        for net, sd in zip(self.students, nets):
            net.reset_classifier(sd["classifier.weight"])
            net.load_state_dict(sd)
        if self.mmt:
            self.mean_teacher.load_state_dict(nets[len(self.students):])
        if hasattr(self.clusterer, "load_state_dict") and ck.get("clusterer") is not None:
            self.clusterer.load_state_dict(ck["clusterer"])
        return RunState(ck["epoch"] + 1, ck["global_step"], ck["history"], ck.get("best", {}))

    def begin_epoch(self, epoch: int, st: RunState) -> dict:
        """Steps 1-4: features, clusters, classifiers, a fresh optimiser (and the epoch's labels)."""
        a, d, r = self.opts.adapt, self.opts.data, self.opts.run
        ctx, device = self.rt.ctx, self.rt.device
        times = {}
        # 1. features of the target training set from the teachers (the student for one model)
        t0 = time.perf_counter()
        feats = self.extraction.features_of(self.teachers or self.students, "train", f"extract ep{epoch}")
        cf = torch.stack(feats).mean(0)
        if a.method == "dbscan":
            cf = F.normalize(cf, dim=1)
        times["extract_seconds"] = time.perf_counter() - t0
        # 2. cluster once (rank 0) -> pseudo-labels and centroids on every rank
        t0 = time.perf_counter()
        res = ddp.run_on_main(ctx, _cluster, self.clusterer, cf, epoch, a, d)
        labels = np.asarray(res.labels, dtype=np.int64)
        times["cluster_seconds"] = time.perf_counter() - t0
        # the label range, once per epoch (the steps' loss ops do not check it)
        check_label_range(labels, res.num_clusters, f"epoch {epoch} pseudo-labels")
        self.res, self.labels = res, labels
        quality = {f"pseudo_{k}": v for k, v in pseudo_label_quality(labels, self.true_ids, self.true_cams).items()}
        # 3. classifiers of all networks <- normalised centroids; 4. fresh optimiser
        _set_classifiers(self.students, self.teachers, res.centroids.to(device))
        self.optimizer = adam(self.students, a.lr, a.weight_decay, adam_impl(r))
        self.nets = [ddp.wrap_ddp(s, ctx) for s in self.students]  # re-wrapped: the classifiers are new
        if self.loader is None:
            self.loader = build_train_loader(self.records, labels, d.height, d.width, batch_size=d.batch_size,
                                             num_instances=d.num_instances, num_views=2 if self.mmt else 1,
                                             workers=d.workers, seed=r.seed, erase=a.erase, backend=d.backend,
                                             rank=ctx.rank, world_size=ctx.world_size,
                                             local_rank=data_device_id(ctx), augment=train_augment(d),
                                             decoded_cache=self.decoded_cache)
        else:
            self.loader.set_labels(labels)
        if ctx.is_main:
            log.info("%s epoch %d: training %d iterations on %d clusters (NMI to the true ids %.3f, "
                     "cross-camera pair recall %.3f)", a.method, epoch, a.iters, res.num_clusters,
                     quality["pseudo_nmi"], quality["pseudo_pair_recall_cross_cam"])
        for net in self.nets_all:
            net.train()
        # skip without host reads: the mean teacher's step count lives on the device
        if self.mmt:
            on_device = not r.sync_each_step and r.on_nonfinite == "skip"
            self.mean_teacher.count_on_device(st.global_step if on_device else None)
        self.sc = StepContext(self.nets, self.students, self.optimizer, self.opts, self.rt, self.mean_teacher)
        return {"num_clusters": int(res.num_clusters), "num_outliers": int((labels < 0).sum()), **times,
                **quality}

    def batches(self, epoch: int):
        return self.loader.epoch(epoch, self.iters)

    def step(self, batch: TrainBatch, it: int, global_step: int, where: Callable[[], str]) -> dict:
        if not self.mmt:
            return baseline_step(self.sc, batch, where)
        return mmt_step(self.sc, batch, global_step, where)

    def describe(self, epoch: int, it: int, global_step: int, indices: torch.Tensor | None) -> str:
        return f"epoch {epoch} iteration {it} (global step {global_step})"

    def end_epoch(self, epoch: int, record: dict) -> None:
        record["ema_backend"] = self.sc.info.get("ema_backend")

    def eval_models(self) -> dict[str, nn.Module]:
        return dict(zip(self.best_of, self.teachers if self.mmt else self.students))

    def evaluate(self, net: nn.Module) -> dict[str, float]:
        return self.extraction.evaluate(net)

    def model_file(self, name: str, **extra) -> dict:
        net = self.eval_models()[name]
        return model_file(net, net.classifier.out_features, **extra)

    def write_epoch(self, state: dict, out_dir: Path) -> None:
        np.save(out_dir / "pseudo_labels.npy", state["labels"])

    def trained_parameters(self) -> list[torch.Tensor]:
        return [p for s in self.students for p in trunk_parameters(s)]

    def learning_rate(self) -> str:
        return f"adapt.lr={self.opts.adapt.lr:g}"


def adapt(target: ReIDDataset, init_models: list[str], opts: ExperimentOptions, out_dir: str | Path,
          resume: bool = False, resume_changed: bool = False, hooks: Iterable[Hook] = ()) -> StageResult:
    """Run Stage II on ``target`` from pre-trained model files (two for MMT, one for the baseline).

    ``kmeans`` / ``dbscan``: MMT on clusters; ``baseline``: one model on its own k-means clusters;
    ``oracle``: MMT on the target's TRUE identities instead of clusters (what MMT reaches with
    perfect pseudo-labels; for comparison only, it needs a labelled target).

    Writes a checkpoint every epoch (``out_dir/ckpt``), ``log.jsonl``, ``curves.png`` and the final
    teacher as ``out_dir/model.pt``. Returns the target metrics of the reported model: the last
    epoch's mean teacher 1; with ``run.select_best``, the best target-test mAP over the evaluated
    epochs and both mean teachers (``best.pt``; the metrics name its ``epoch`` and ``model``,
    T1 or T2), which is how the official code chose its figure: on the test set.
    Under torchrun every rank calls this; see :mod:`fastmmt.train.distributed`. The run holds
    ``out_dir`` for its duration (:mod:`fastmmt.train.run_lock`); ``resume_changed``: resume even
    when the options that define the run differ from the checkpoint's
    (:mod:`fastmmt.train.resume_check`). ``hooks``: user callbacks of the epoch runner
    (:mod:`fastmmt.train.hooks`).
    """
    a = opts.adapt
    mmt = a.method != "baseline"
    if len(init_models) != (2 if mmt else 1):
        raise ValueError(f"method {a.method} needs {2 if mmt else 1} pre-trained model(s), got {len(init_models)}")
    out_dir = Path(out_dir)
    rt = setup_run(opts)
    with hold_folder(out_dir, rt.ctx):
        return _adapt(target, init_models, opts, out_dir, resume, resume_changed, rt, hooks)


def _adapt(target: ReIDDataset, init_models: list[str], opts: ExperimentOptions, out_dir: Path, resume: bool,
           resume_changed: bool, rt: Runtime, hooks: Iterable[Hook]) -> StageResult:
    """:func:`adapt` once the run holds ``out_dir``."""
    a, r = opts.adapt, opts.run
    stage = _Adapt(target, init_models, opts, rt)
    logger = RunLogger(out_dir) if rt.is_main else None
    defines = defining_options(a.method, opts, {"target": target}, stage.students[0].model_options)
    st = run_epochs(stage, rt, out_dir, logger, resume=resume, resume_changed=resume_changed, defines=defines,
                    hooks=hooks)
    eval_net = stage.eval_net
    final_path = ddp.run_on_main(rt.ctx, atomic_save, model_file(eval_net, eval_net.classifier.out_features,
                                                                 method=a.method), out_dir / "model.pt")
    last = st.history[-1] if st.history else {}
    metrics = {k: last[k] for k in ("mAP", "rank1", "rank5", "rank10") if k in last}
    if not metrics:
        metrics = stage.evaluate(eval_net)
        metrics.pop("eval_seconds")
    if r.select_best and st.best:
        metrics = {k: st.best[k] for k in ("mAP", "rank1", "rank5", "rank10")} | {
            "epoch": st.best["epoch"], "model": st.best.get("model", stage.best_of[0])}
    seconds = {k: sum(h.get(f"{k}_seconds", 0.0) for h in st.history) for k in ("extract", "cluster", "train", "eval")}
    if logger is not None:
        logger.log({"stage": a.method, "final": True, **metrics})
        logger.close()
    return StageResult(str(final_path), metrics, seconds)

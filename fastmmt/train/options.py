"""Typed options of the training stages; defaults are the paper's recipe (docs/training.md, and
docs/fidelity.md for where fastmmt differs from the official code as it ran).

:func:`option_choices` is the one list of allowed values, read from the library's own lists
(architectures, backends, policies); :func:`check_options` checks a whole set of options before
a stage starts, and the CLI runs it when a config loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class DataOptions:
    """Where the data is and how it is fed."""

    source: str = "dukemtmc"          # dataset name for fastmmt.data.load_dataset
    target: str = "market1501"
    root: str = "data"                # --data-root: folder holding the dataset folders
    source_root: str | None = None    # per-domain folder when the two live apart (default: root)
    target_root: str | None = None
    height: int = 256
    width: int = 128
    batch_size: int = 64              # P x K with K = num_instances
    num_instances: int = 4
    workers: int = 2
    test_batch_size: int = 128
    backend: str = "auto"             # auto | dali | torch
    augment: bool = True              # false: no flip, crop or erasing (checks, ablations)
    decode_cache: bool = True         # decode each training/target image once per run, kept decoded (False: every pass)
    decode_cache_mb: float | None = None  # the decoded-image cache's bound (None: half the available memory)
    persistent_loaders: bool = True   # build the extraction loaders once per run (False: on every extraction)


@dataclass
class ModelOptions:
    """Backbone and head."""

    arch: str = "resnet50"
    base_width: int = 64
    dropout: float = 0.0
    pretrained: str | None = None     # local ImageNet weights file (no downloads); "none" in a config = from scratch
    require_pretrained: bool = False  # `pretrain` refuses to start without `pretrained` (the paper configs)
    channels_last: bool = False


@dataclass
class PretrainOptions:
    """Stage I: supervised source training with target BN adaptation."""

    epochs: int = 80
    iters: int = 100
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    warmup_epochs: int = 10
    warmup_factor: float = 0.01
    milestones: tuple[int, ...] = (40, 70)
    gamma: float = 0.1
    epsilon: float = 0.1
    erase: bool = False
    seeds: tuple[int, ...] = (1, 2)
    target_bn_forward: bool = True    # forward a target batch each iteration (adapts BN stats)
    lr_timing: str = "after_epoch"    # after_epoch: epoch e at factor(e); official: factor(e+1) (see LR_TIMINGS)
    select: str = "last"              # last | source_best: the epoch Stage II starts from (see PRETRAIN_SELECT)
    eval_every: int = 40              # source test evaluation cadence for select=source_best (and the last epoch)


ADAPT_METHODS = ("kmeans", "dbscan", "baseline", "oracle")  # MMT on clusters x 2, one model, MMT on true ids
# Stage I learning-rate timing: "after_epoch" steps the scheduler after each epoch (epoch e trains
# with the warm-up/step factor of e); "official" does what the official code did under PyTorch
# >= 1.1, stepping at the START of each epoch, so epoch e trains with the factor of e + 1.
LR_TIMINGS = ("after_epoch", "official")
# The Stage I model written as model.pt (what Stage II starts from): the last epoch, or the best
# SOURCE test mAP at the evaluation epochs (every pretrain.eval_every and the last), as the
# official code's model_best.pth.tar.
PRETRAIN_SELECT = ("last", "source_best")
NONFINITE_POLICIES = ("stop", "skip")  # NaN/inf loss: stop the run, or skip the step


@dataclass
class AdaptOptions:
    """Stage II: MMT (kmeans | dbscan), the single-model baseline, or the true-label oracle."""

    method: str = "kmeans"            # kmeans | dbscan | baseline | oracle (true target ids)
    epochs: int = 40
    iters: int = 400
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    k: int = 500
    soft_ce_weight: float = 0.5
    soft_tri_weight: float = 0.8
    ema_alpha: float = 0.999
    epsilon: float = 0.1
    erase: bool = True
    k1: int = 20
    k2: int = 6
    rho: float = 1.6e-3
    min_samples: int = 4
    cluster_backend: str = "auto"
    kmeans_restarts: int = 1          # k-means restarts (FAISS nredo); the official code: 10
    kmeans_iters: int = 100           # k-means iteration limit (FAISS niter); the official code: 300
    kmeans_seed_dim: int | None = 256  # k-means++ seeding in a random projection of this size (faster);
                                       # null: in the full space, as the official code's scikit-learn


@dataclass
class RunOptions:
    """How a run executes: device, precision, logging, checkpoints."""

    out_dir: str = "runs/mmt"
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    amp: str | None = None            # None | bf16 (fp16 is refused: no gradient scaler)
    bn_split: int = 0                 # BN statistics over sub-batches of this size (0 = whole batch)
    sync_bn: bool = False             # distributed: SyncBatchNorm (CUDA) instead of per-rank BN
    on_nonfinite: str = "stop"        # NaN/inf loss: stop the run, or skip the step (refused either way)
    seed: int = 1
    eval_every: int = 1               # evaluate the target test set every N epochs (0 = only at the end)
    select_best: bool = False         # report the epoch with the best target test mAP (the reference's way)
    loss_backend: str = "auto"
    ema_backend: str = "auto"
    progress: bool = True
    deterministic: bool = False
    num_threads: int | None = None    # CPU threads for torch/FAISS (None = all cores)
    log_every: int = 50               # iterations between host reads of the loss sums (and the NaN check)
    sync_each_step: bool = False      # the old step: read every loss term and the NaN flag each step
    fused_bn_split: bool = False      # run.bn_split in one pass (False: the per-chunk loop, faster in eager on a CPU)
    compile: bool = False             # torch.compile the backbones
    diverge_factor: float = 10.0      # stop when the trained weights' norm passes this x its start (0 = off)


@dataclass
class ExperimentOptions:
    """Everything one command needs; the CLI builds it from a config file and --set overrides."""

    data: DataOptions = field(default_factory=DataOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    pretrain: PretrainOptions = field(default_factory=PretrainOptions)
    adapt: AdaptOptions = field(default_factory=AdaptOptions)
    run: RunOptions = field(default_factory=RunOptions)

    def __post_init__(self) -> None:
        check_options(self)  # a set of options made in Python is checked where it is made, as a config is


AMP_CHOICES = (None, "bf16")  # run.amp
# fp16 needs a GradScaler (small gradients underflow in fp16) and the trainers have none; bf16 has
# float32's exponent range and needs no scaling.
FP16_REFUSED = ("amp='fp16' is not supported: fp16 training needs gradient scaling, which the "
                "trainers do not do (small gradients would underflow to zero); use amp='bf16'")


def option_choices() -> dict[tuple[str, str], tuple]:
    """(section, key) -> the values the library accepts for that option."""
    from fastmmt.cluster.kmeans import KMEANS_BACKENDS
    from fastmmt.data.factory import BACKENDS as DATA_BACKENDS
    from fastmmt.models import ARCHS
    from fastmmt.ops._dispatch import BACKENDS as LOSS_BACKENDS
    from fastmmt.ops.ema import EMA_BACKENDS

    return {
        ("data", "backend"): DATA_BACKENDS,
        ("model", "arch"): tuple(ARCHS),
        ("adapt", "method"): ADAPT_METHODS,
        ("pretrain", "lr_timing"): LR_TIMINGS,
        ("pretrain", "select"): PRETRAIN_SELECT,
        ("adapt", "cluster_backend"): KMEANS_BACKENDS,
        ("run", "amp"): AMP_CHOICES,
        ("run", "loss_backend"): LOSS_BACKENDS,
        ("run", "ema_backend"): EMA_BACKENDS,
        ("run", "on_nonfinite"): NONFINITE_POLICIES,
    }


@dataclass(frozen=True)
class Range:
    """The allowed values of a numeric option: ``lo`` (open or closed) up to ``hi`` (or no bound)."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def __contains__(self, v: float) -> bool:
        above = v > self.lo if self.lo_open else v >= self.lo
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return math.isfinite(v) and above and below

    def __str__(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"


COUNT, SOME, POSITIVE, FRACTION = Range(1), Range(0), Range(0, lo_open=True), Range(0, 1, hi_open=True)
# Every numeric option's range, checked where options are made (a config load, a stage start):
# counts are >= 1 where zero would train, cluster or read nothing
RANGES: dict[tuple[str, str], Range] = {
    ("data", "height"): COUNT, ("data", "width"): COUNT, ("data", "batch_size"): COUNT,
    ("data", "num_instances"): COUNT, ("data", "workers"): SOME, ("data", "test_batch_size"): COUNT,
    ("data", "decode_cache_mb"): POSITIVE,
    ("model", "base_width"): COUNT, ("model", "dropout"): FRACTION,
    ("pretrain", "epochs"): COUNT, ("pretrain", "iters"): COUNT, ("pretrain", "lr"): POSITIVE,
    ("pretrain", "weight_decay"): SOME, ("pretrain", "warmup_epochs"): SOME,
    ("pretrain", "warmup_factor"): Range(0, 1, lo_open=True), ("pretrain", "gamma"): POSITIVE,
    ("pretrain", "epsilon"): FRACTION, ("pretrain", "eval_every"): COUNT,
    ("adapt", "epochs"): COUNT, ("adapt", "iters"): COUNT, ("adapt", "lr"): POSITIVE,
    ("adapt", "weight_decay"): SOME, ("adapt", "k"): COUNT, ("adapt", "soft_ce_weight"): SOME,
    ("adapt", "soft_tri_weight"): SOME, ("adapt", "ema_alpha"): Range(0, 1), ("adapt", "epsilon"): FRACTION,
    ("adapt", "k1"): COUNT, ("adapt", "k2"): COUNT, ("adapt", "rho"): Range(0, 1, lo_open=True),
    ("adapt", "min_samples"): COUNT, ("adapt", "kmeans_restarts"): COUNT, ("adapt", "kmeans_iters"): COUNT,
    ("adapt", "kmeans_seed_dim"): COUNT,  # or null: the full space
    ("run", "bn_split"): SOME, ("run", "eval_every"): SOME, ("run", "log_every"): COUNT,
    ("run", "num_threads"): COUNT, ("run", "diverge_factor"): SOME,
    ("run", "seed"): SOME,  # numpy's generators (sampler, k-means restarts) take no negative seed
}


def check_options(opts: ExperimentOptions) -> None:
    """Raise ``ValueError`` naming the first option whose value the library does not accept."""
    if opts.run.amp == "fp16":
        raise ValueError(f"run.amp: {FP16_REFUSED}")
    for (section, key), allowed in option_choices().items():
        value = getattr(getattr(opts, section), key)
        if value not in allowed:
            raise ValueError(f"{section}.{key} = {value!r} is not allowed; choose one of {list(allowed)}")
    for (section, key), allowed in RANGES.items():
        value = getattr(getattr(opts, section), key)
        if value is not None and value not in allowed:  # None: the option's "not set" (where allowed)
            raise ValueError(f"{section}.{key} must be {allowed}, got {value}")
    if not opts.pretrain.seeds:
        raise ValueError("pretrain.seeds must name at least one seed, got []")
    if any(seed < 0 for seed in opts.pretrain.seeds):
        raise ValueError(f"pretrain.seeds must be integers >= 0, got {list(opts.pretrain.seeds)}")
    if any(m < 0 for m in opts.pretrain.milestones):
        raise ValueError(f"pretrain.milestones must be epochs >= 0, got {list(opts.pretrain.milestones)}")
    d = opts.data
    if d.batch_size % d.num_instances:
        raise ValueError(f"data.batch_size ({d.batch_size}) must be a multiple of data.num_instances "
                         f"({d.num_instances}): a batch is P identities x K images")
    r = opts.run
    if 0 < r.diverge_factor <= 1:
        raise ValueError(f"run.diverge_factor must be 0 (off) or > 1 (a growth factor), got {r.diverge_factor}")
    if r.sync_bn and r.bn_split:
        raise ValueError("run.sync_bn and run.bn_split exclude each other: set run.bn_split=0 with SyncBN")

"""A short synthetic MMT run at the paper's shape on CUDA, under the profiler and sync debugging.

``python -m fastmmt.tools.gpu_profile --out DIR`` generates the synthetic domains at 256 x 128,
pre-trains two ResNet-50s for a few iterations (source only), then runs one MMT epoch (k-means,
batch 64 = 16 ids x 4, two views) once per non-finite policy (``stop``, then ``skip``: its step
keeps the mean-teacher alpha on the device). Host syncs are counted with
``torch.cuda.set_sync_debug_mode("warn")`` switched on inside each training step only, so
extraction, k-means++ seeding and evaluation, which may read the device, do not count; the
``stop`` run is also profiled (``torch.profiler``). ``DIR/profile.json`` holds which backend ran
for the losses, the EMA, the data (the loader the trainer built) and the clustering, the step's
syncs per policy with the lines that caused them, and seconds per phase.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

# Kernel-name evidence of each backend in a CUDA profile.
LOSS_KERNELS = re.compile(r"_(pairwise|triplet|logits)_(fwd|bwd)")
EMA_EXT_KERNEL = "ema_kernel"
FOREACH_KERNELS = re.compile(r"multi_tensor_apply|foreach", re.IGNORECASE)
SYNC_WARNING = "synchronizing"


def profile_rows(prof) -> list[dict]:
    """(name, calls, self CPU us, self device us) of every op/kernel in a torch profiler run."""
    rows = []
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0.0)
        rows.append({"name": evt.key, "calls": int(evt.count), "self_cpu_us": float(evt.self_cpu_time_total),
                     "self_device_us": float(device_us or 0.0)})
    return rows


def summarize_profile(rows: list[dict], top: int = 15) -> dict:
    """Top ops by device time (else CPU time) and the backends their names show."""
    key = "self_device_us" if any(r["self_device_us"] > 0 for r in rows) else "self_cpu_us"
    ranked = sorted(rows, key=lambda r: r[key], reverse=True)[:top]
    names = [r["name"] for r in rows]
    losses = sorted({m.group(0) for n in names for m in [LOSS_KERNELS.search(n)] if m})
    ema = ("ext (fastmmt._C CUDA kernel)" if any(EMA_EXT_KERNEL in n for n in names)
           else "foreach" if any(FOREACH_KERNELS.search(n) for n in names) else "not seen")
    return {"ranked_by": key, "top": ranked, "loss_kernels": losses,
            "loss_backend": "triton" if losses else "not seen (torch ops)", "ema_backend_seen": ema}


def summarize_syncs(messages: list[tuple[str, str]], steps: int, top: int = 8) -> dict:
    """Host syncs from sync-debug warnings ``(message, "file:line")``: total, per step, where."""
    syncs = [where for msg, where in messages if SYNC_WARNING in msg]
    return {"total": len(syncs), "steps": steps, "per_step": len(syncs) / max(steps, 1),
            "where": Counter(syncs).most_common(top)}


# The paper's shape; ``run(..., shape=SMOKE)`` is the CPU test's miniature of the same run.
PAPER = {"arch": "resnet50", "base_width": 64, "height": 256, "width": 128, "batch": 64, "size": "demo", "k": 60}
SMOKE = {"arch": "resnet18", "base_width": 8, "height": 32, "width": 16, "batch": 16, "size": "tiny", "k": 6}


def _options(out: Path, iters: int, shape: dict):
    from fastmmt.train.options import ExperimentOptions

    o = ExperimentOptions()
    o.data.source = o.data.target = "synthetic"
    o.data.height, o.data.width = shape["height"], shape["width"]
    o.data.batch_size, o.data.num_instances = shape["batch"], 4  # P identities x 4 images
    o.data.workers, o.data.backend = 4, "auto"
    o.model.arch, o.model.base_width = shape["arch"], shape["base_width"]
    o.pretrain.epochs, o.pretrain.iters, o.pretrain.warmup_epochs = 1, 3, 0
    o.pretrain.target_bn_forward = False
    o.adapt.method, o.adapt.epochs, o.adapt.iters, o.adapt.k = "kmeans", 1, iters, shape["k"]
    o.run.out_dir, o.run.eval_every, o.run.progress = str(out), 0, False
    return o


POLICIES = ("stop", "skip")


@contextlib.contextmanager
def step_sync_debug(cuda: bool):
    """Count host syncs inside the MMT training step only: patches the trainer's step to switch
    sync debugging on around it. Yields ``(messages, seen)``: ``(message, "file:line")`` of every
    warning raised in a step, and what the steps used (``steps``, the loader class, EMA backend)."""
    import torch

    from fastmmt.train import mmt

    messages: list[tuple[str, str]] = []
    seen: dict = {"steps": 0, "loader": None, "ema_backend": None}
    original = mmt._Adapt.step

    def step(self, *args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(self, *args, **kwargs)
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode(0)
                seen["steps"] += 1
                seen["loader"] = type(self.loader).__name__
                seen["ema_backend"] = self.sc.info.get("ema_backend")
                messages.extend((str(w.message), f"{w.filename}:{w.lineno}") for w in caught)

    mmt._Adapt.step = step
    try:
        yield messages, seen
    finally:
        mmt._Adapt.step = original


def run(out: Path, iters: int = 20, shape: dict = PAPER, policies: tuple[str, ...] = POLICIES) -> dict:
    """Pre-train briefly, then one MMT epoch per non-finite policy (the first profiled); returns
    (and writes) the summary."""
    import torch

    from fastmmt.cluster.kmeans import resolve_kmeans_backend
    from fastmmt.data import generate_domains, load_dataset
    from fastmmt.train.mmt import adapt
    from fastmmt.train.pretrain import pretrain

    out.mkdir(parents=True, exist_ok=True)
    o = _options(out, iters, shape)
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    src, tgt = generate_domains(str(out / "data"), seed=0, size=shape["size"], height=shape["height"],
                                width=shape["width"])
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    phases = {"generate_seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    inits = [pretrain(source, None, o, seed=s, out_dir=out / "pretrain" / f"seed{s}").model_path for s in (1, 2)]
    phases["pretrain_seconds"] = time.perf_counter() - t0
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    step_syncs, prof, used = {}, None, {}
    for i, policy in enumerate(policies):
        o.run.on_nonfinite = policy
        with step_sync_debug(cuda) as (messages, seen):
            if i == 0:
                with torch.profiler.profile(activities=activities) as prof:
                    res = adapt(target, inits, o, out / f"mmt_{policy}")
                phases.update(res.seconds)  # extract, cluster, train, eval (seconds, MMT epoch)
            else:
                adapt(target, inits, o, out / f"mmt_{policy}")
        step_syncs[policy] = summarize_syncs(messages, seen["steps"])
        used[policy] = {"loader": seen["loader"], "ema_backend": seen["ema_backend"]}
    loader = used[policies[0]]["loader"] or ""
    summary = {
        "shape": {**shape, "views": 2, "iters": iters, "device": "cuda" if cuda else "cpu"},
        "backends": {"data": "dali" if loader.startswith("Dali") else "torch",
                     "clustering": resolve_kmeans_backend(o.adapt.cluster_backend),
                     **{f"EMA ({p})": u["ema_backend"] for p, u in used.items()}},
        "profile": summarize_profile(profile_rows(prof)),
        "step_syncs": step_syncs,
        "seconds": phases,
    }
    (out / "profile.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu_check/mmt_run")
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_profile: no CUDA device; nothing to profile")
        return 0
    run(Path(args.out), args.iters)
    return 0


if __name__ == "__main__":
    sys.exit(main())

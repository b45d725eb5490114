"""The demo's own stages with every issue-14 switch off and on, in the same process: the
pre-training of one source model and the MMT (k-means) phase of ``fastmmt demo`` (seed 0, the
committed recipe, 40 epochs x 20 iterations), each reported with its ratio.

``off``: today's behaviour before the switches (``bench_epoch.OFF``: decoding on every pass,
extraction loaders rebuilt, the host-syncing step, contiguous tensors); ``on``: the demo's
settings (``bench_epoch.ON``). Both MMT runs start from the same two source models (pre-trained
once with the ``on`` settings). The mAP of each run is printed beside its time: the switches
change only the time, except ``model.channels_last``, whose convolutions sum in another order
(so the two runs' mAPs differ as runs at two thread counts do).

Run (quiet machine, about 15 minutes at one thread):
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest bench/bench_demo.py -q -s
The two source models one after another (every core) vs side by side (``test_pretrain_pair``):
    OMP_NUM_THREADS=2 .venv/bin/python -m pytest bench/bench_demo.py -q -s -k "pretrain_pair or report"
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from bench_epoch import OFF, ON

import fastmmt.train.demo as demo
from fastmmt.data import generate_domains, load_dataset
from fastmmt.train.demo import demo_options
from fastmmt.train.mmt import adapt
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.pretrain import pretrain

SEED = 0
RESULTS: dict[str, dict[str, dict[str, float]]] = {}


def options(switches: dict, out_dir: Path) -> ExperimentOptions:
    o = demo_options(out_dir=str(out_dir), seed=SEED)
    o.run.progress = False
    o.run.loss_backend = "torch"  # as the demo on a CPU (the conftest turns the Triton interpreter on)
    for (section, key), value in switches.items():
        setattr(getattr(o, section), key, value)
    return o


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    src, tgt = generate_domains(str(root / "data"), seed=SEED, size="demo")
    return load_dataset("synthetic", src), load_dataset("synthetic", tgt), root


@pytest.fixture(scope="module")
def inits(domains):
    """The demo's two source models (``on`` settings), the start of both MMT runs."""
    source, target, root = domains
    o = options(ON, root / "init")
    return [pretrain(source, target, o, seed=SEED * 100 + s, out_dir=root / "init" / f"seed{s}").model_path
            for s in o.pretrain.seeds]


@pytest.mark.parametrize("variant", ["off", "on"])
def test_pretrain(benchmark, domains, variant):
    source, target, root = domains
    o = options(OFF if variant == "off" else ON, root / f"pretrain_{variant}")

    def run():
        t0 = time.perf_counter()
        res = pretrain(source, target, o, seed=SEED * 100 + 1, out_dir=root / f"pretrain_{variant}")
        return {"seconds": time.perf_counter() - t0, "mAP": res.metrics["mAP"]}

    RESULTS.setdefault("pretrain (one source model)", {})[variant] = out = benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(out)
    assert out["seconds"] > 0 and 0.0 <= out["mAP"] <= 1.0


@pytest.mark.parametrize("variant", ["off", "on"])
def test_pretrain_pair(benchmark, domains, variant, monkeypatch):
    """The demo's two source models: one after another with every core (off) vs side by side in
    processes of their own, each with its share of the cores (on, what the demo does)."""
    source, target, root = domains
    o = options(ON, root / f"pair_{variant}")
    runs = [(SEED * 100 + s, root / f"pair_{variant}" / f"seed{s}") for s in o.pretrain.seeds]
    if variant == "off":
        monkeypatch.setattr(demo, "side_by_side_threads", lambda opts, n: None)
    elif demo.side_by_side_threads(o, len(runs)) is None:
        pytest.skip("fewer cores than source models: the demo trains them one after another")

    def run():
        t0 = time.perf_counter()
        results = demo.pretrain_models(source, target, o, runs)
        return {"seconds": time.perf_counter() - t0,
                "mAP": sum(r.metrics["mAP"] for r, _ in results) / len(results)}

    RESULTS.setdefault("pre-training both source models", {})[variant] = out = benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(out)
    assert out["seconds"] > 0 and 0.0 <= out["mAP"] <= 1.0


@pytest.mark.parametrize("variant", ["off", "on"])
def test_mmt_phase(benchmark, domains, inits, variant):
    _, target, root = domains
    o = options(OFF if variant == "off" else ON, root / f"mmt_{variant}")

    def run():
        t0 = time.perf_counter()
        res = adapt(target, inits, o, root / f"mmt_{variant}")
        return {"seconds": time.perf_counter() - t0, "mAP": res.metrics["mAP"],
                **{f"{k}_seconds": v for k, v in res.seconds.items()}}

    RESULTS.setdefault("MMT k-means (40 epochs)", {})[variant] = out = benchmark.pedantic(run, rounds=1)
    benchmark.extra_info.update(out)
    assert out["seconds"] > 0 and 0.0 <= out["mAP"] <= 1.0


def test_report():
    """Both stages' times off and on, the ratio, and each run's mAP."""
    if not RESULTS:
        pytest.skip("no stage was timed in this session")
    lines = [f"{'stage':<30}{'off (s)':>9}{'on (s)':>9}{'off/on':>8}{'mAP off':>9}{'mAP on':>8}"]
    for stage, res in RESULTS.items():
        off, on = res.get("off", {}), res.get("on", {})
        ratio = off.get("seconds", float("nan")) / on.get("seconds", float("nan"))
        lines.append(f"{stage:<30}{off.get('seconds', float('nan')):9.1f}{on.get('seconds', float('nan')):9.1f}"
                     f"{ratio:8.2f}{100 * off.get('mAP', float('nan')):9.1f}{100 * on.get('mAP', float('nan')):8.1f}")
    print("\n" + "\n".join(lines))
    out = Path(__file__).parent / "results" / "demo.json"
    out.write_text(json.dumps({"seed": SEED, "threads": torch.get_num_threads(), "results": RESULTS}, indent=2))

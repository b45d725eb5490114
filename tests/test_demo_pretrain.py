"""The demo's source models train side by side where there is a core for each, with the results
of training them one after another (same seeds, same thread count)."""
from __future__ import annotations

import pytest
import torch

import fastmmt.train.demo as demo
from fastmmt.data import load_dataset
from fastmmt.safe_load import safe_load
from fastmmt.train import pretrain
from synthetic_fixtures import tiny_options


@pytest.mark.parametrize("cores,device,world,threads,expected", [
    (1, "cpu", 1, None, None),     # no core for the second
    (2, "cpu", 1, None, 1),
    (8, "cpu", 1, None, 4),
    (8, "cpu", 1, 3, 3),           # run.num_threads set: kept
    (8, "cuda", 1, None, None),    # one after another on a GPU
    (8, "cpu", 2, None, None),     # under torchrun
])
def test_side_by_side_threads(monkeypatch, cores, device, world, threads, expected):
    monkeypatch.setattr(demo.os, "sched_getaffinity", lambda _: set(range(cores)), raising=False)
    monkeypatch.setattr(demo, "resolve_device", lambda d: torch.device(device))
    monkeypatch.setattr(demo, "env_world_size", lambda: world)
    o = tiny_options("unused")
    o.run.num_threads = threads
    assert demo.side_by_side_threads(o, 2) == expected


def test_side_by_side_models_equal_one_after_another(tiny_folders, tmp_path, restore_torch_globals):
    src, tgt = tiny_folders
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    o = tiny_options(tmp_path)
    o.run.num_threads, o.run.deterministic = 1, True
    assert demo.side_by_side_threads(o, 2) == 1, "this test needs 2 cores (CI has them)"
    runs = [(s, tmp_path / "parallel" / f"seed{s}") for s in (1, 2)]
    results = demo.pretrain_models(source, target, o, runs)
    assert [r.model_path for r, _ in results] == [str(d / "model.pt") for _, d in runs]
    assert all(sec > 0 for _, sec in results)
    for (s, d), (res, _) in zip(runs, results):
        alone = pretrain(source, target, o, seed=s, out_dir=tmp_path / "alone" / f"seed{s}")
        assert res.metrics == alone.metrics
        a, b = safe_load(res.model_path)["model"], safe_load(alone.model_path)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"seed {s}"

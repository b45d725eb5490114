"""Option ranges are checked where options are made, and hints point the right way
(docs/reliability.md): counts that would train or cluster nothing are refused when the config
loads, naming the option and its range; every numeric option has a range.
"""
from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from fastmmt.cli import main as cli_main
from fastmmt.cli.config import ConfigError, load_options
from fastmmt.train.options import AdaptOptions, DataOptions, ExperimentOptions, RunOptions
from reliability_env import one_line, run_cli


@pytest.fixture
def env(tiny_run):
    return tiny_run


@pytest.mark.parametrize("override,expected", [
    ("pretrain.epochs=0", "pretrain.epochs must be >= 1, got 0"),
    ("pretrain.iters=-3", "pretrain.iters must be >= 1, got -3"),
    ("adapt.epochs=0", "adapt.epochs must be >= 1"),
    ("adapt.iters=0", "adapt.iters must be >= 1"),
    ("adapt.k=0", "adapt.k must be >= 1, got 0"),
    ("data.batch_size=0", "data.batch_size must be >= 1"),
    ("data.num_instances=0", "data.num_instances must be >= 1"),
    ("data.batch_size=10", "data.batch_size (10) must be a multiple of data.num_instances (4)"),
    ("data.height=0", "data.height must be >= 1"),
    ("data.workers=-1", "data.workers must be >= 0"),
    ("pretrain.lr=0", "pretrain.lr must be > 0"),
    ("adapt.lr=-0.0001", "adapt.lr must be > 0"),
    ("adapt.ema_alpha=1.5", "adapt.ema_alpha must be in [0, 1]"),
    ("adapt.rho=0", "adapt.rho must be in (0, 1]"),
    ("adapt.min_samples=0", "adapt.min_samples must be >= 1"),
    ("model.dropout=1.0", "model.dropout must be in [0, 1)"),
    ("pretrain.seeds=[]", "pretrain.seeds must name at least one seed"),
    ("pretrain.seeds=[1,-2]", "pretrain.seeds must be integers >= 0, got [1, -2]"),
    ("run.seed=-1", "run.seed must be >= 0, got -1"),
    ("run.diverge_factor=0.5", "run.diverge_factor must be 0 (off) or > 1"),
    ("run.eval_every=-1", "run.eval_every must be >= 0"),
    ("adapt.soft_ce_weight=-0.5", "adapt.soft_ce_weight must be >= 0"),
    ("pretrain.warmup_factor=0", "pretrain.warmup_factor must be in (0, 1]"),
    ("data.decode_cache_mb=0", "data.decode_cache_mb must be > 0"),
])
def test_option_out_of_range_is_refused_when_made(override, expected):
    with pytest.raises(ConfigError) as e:
        load_options(None, [override])
    assert expected in str(e.value)


def test_every_numeric_option_has_a_range():
    """A new int/float option without a range would slip through: the table covers them all."""
    from fastmmt.train.options import RANGES

    numeric = set()
    for section in fields(ExperimentOptions):
        for f in fields(section.default_factory()):
            if any(t in str(f.type) for t in ("int", "float")) and "tuple" not in str(f.type):
                numeric.add((section.name, f.name))
    assert numeric - set(RANGES) == set()


def test_zero_epochs_is_refused_before_anything_is_written(env, capsys, tmp_path):
    out = tmp_path / "o"
    rc, err = run_cli(capsys, ["pretrain", "--config", str(env["cfg"]), "--out", str(out), "--seed", "1",
                            "--set", "pretrain.epochs=0"])
    one_line(rc, err, "pretrain.epochs must be >= 1, got 0", code=2)
    assert not out.exists()
    with pytest.raises(SystemExit) as e:  # argparse: exit 2 with the usage and the reason
        cli_main(["visualize", "--config", str(env["cfg"]), "--model", env["inits"][0], "--topk", "0"])
    assert e.value.code == 2 and "--topk: must be >= 1, got 0" in capsys.readouterr().err


def test_clustering_hints_point_the_right_way(env):
    from fastmmt.cluster import ClusterError
    from fastmmt.train.mmt import _cluster

    o = ExperimentOptions()
    feats = torch.randn(20, 4)

    def failing(msg):
        def clusterer(cf, epoch):
            raise ClusterError(msg)
        return clusterer
    o.adapt.k = 30  # more clusters than images: lower k
    with pytest.raises(ClusterError, match=r"lower adapt\.k \(at most the number of target training images, 20\)"):
        _cluster(failing("k-means with k=30 clusters needs at least k samples"), feats, 0, o.adapt, o.data)
    o.adapt.k = 5  # a failure that k does not cause: no hint to change k
    with pytest.raises(ClusterError) as e:
        _cluster(failing("k-means backend 'faiss-gpu' requested but faiss.get_num_gpus() == 0"), feats, 0,
                 o.adapt, o.data)
    assert "adapt.k" not in str(e.value)
    # the oracle's clusters are the true identities: too few for a batch is not fixed by adapt.k
    from fastmmt.cluster import ClusterResult

    def two_identities(cf, epoch):
        return ClusterResult(np.arange(len(cf)) % 2, torch.zeros(2, 4), 2)
    o.adapt.method = "oracle"
    with pytest.raises(ClusterError, match=r"needs at least 16; lower data\.batch_size$"):
        _cluster(two_identities, feats, 0, o.adapt, o.data)
    o.adapt.method = "kmeans"
    with pytest.raises(ClusterError, match=r"lower data\.batch_size, or raise adapt\.k$"):
        _cluster(two_identities, feats, 0, o.adapt, o.data)


@pytest.mark.parametrize("make,expected", [
    (lambda: ExperimentOptions(run=RunOptions(amp="fp16")), "run.amp: amp='fp16' is not supported"),
    (lambda: ExperimentOptions(data=DataOptions(batch_size=30, num_instances=4)), "multiple of data.num_instances"),
    (lambda: ExperimentOptions(adapt=AdaptOptions(k=0)), "adapt.k must be >= 1, got 0"),
    (lambda: ExperimentOptions(adapt=AdaptOptions(method="spectral")), "adapt.method = 'spectral' is not allowed"),
])
def test_options_made_in_python_are_checked_where_made(make, expected):
    with pytest.raises(ValueError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        make()

"""The tests' synthetic data and tiny run options, in one place.

Every test that trains end to end uses the same tiny domains (fastmmt's generator, seed 3) and
the same tiny options; a test changes the few options it is about. The session-wide copy of the
domains (``tiny_folders`` in conftest.py) is read-only: a test that damages images makes its own
with :func:`tiny_domain_folders`. (The compatibility fixtures keep their own frozen options:
tests/fixtures/make_compat_fixtures.py.)
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import yaml

from fastmmt.data import ReIDDataset, generate_domains, load_dataset
from fastmmt.train.demo import demo_options
from fastmmt.train.options import ExperimentOptions

TINY_SEED = 3


def tiny_options(out_dir: str | Path) -> ExperimentOptions:
    """A tiny network and one or two short epochs per stage, evaluated every epoch."""
    o = demo_options(out_dir=str(out_dir))
    o.data.height, o.data.width = 32, 16
    o.data.batch_size, o.data.num_instances, o.data.test_batch_size = 16, 4, 64
    o.model.base_width = 8
    o.pretrain.epochs, o.pretrain.iters, o.pretrain.warmup_epochs, o.pretrain.milestones = 1, 2, 1, (5,)
    o.adapt.epochs, o.adapt.iters, o.adapt.k = 2, 2, 6
    o.adapt.rho = 0.1  # a wider eps so DBSCAN finds clusters on barely-trained features
    o.run.progress = False
    o.run.eval_every = 1
    return o


def tiny_domain_folders(root: str | Path, height: int = 64, width: int = 32) -> tuple[str, str]:
    """The tiny source and target domain folders under ``root``."""
    return generate_domains(str(root), seed=TINY_SEED, size="tiny", height=height, width=width)


def tiny_domains(root: str | Path, height: int = 64, width: int = 32) -> tuple[ReIDDataset, ReIDDataset]:
    """The tiny source and target datasets, generated under ``root``."""
    src, tgt = tiny_domain_folders(root, height, width)
    return load_dataset("synthetic", src), load_dataset("synthetic", tgt)


def write_config(opts: ExperimentOptions, path: str | Path) -> Path:
    """``opts`` as a YAML config file the CLI reads."""
    path = Path(path)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(asdict(opts)))))
    return path

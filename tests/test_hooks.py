"""The epoch runner's hooks: called in order on a real (tiny) run, and the docs' example hook
(docs/training.md, the block between the hook-example markers) works as written."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from fastmmt.data import load_dataset
from fastmmt.safe_load import safe_load
from fastmmt.train import pretrain
from fastmmt.train.hooks import Hook, Hooks
from fastmmt.train.mmt import adapt
from fixtures.make_compat_fixtures import fixture_domains, fixture_options
from synthetic_fixtures import tiny_domain_folders

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
FIXTURE_MODEL = Path(__file__).resolve().parent / "fixtures" / "v2026_12_06" / "model.pt"


def _doc_example() -> dict:
    text = DOCS.read_text()
    block = re.search(r"<!-- hook-example -->\n```python\n(.*?)```\n<!-- /hook-example -->", text, re.S)
    assert block, "docs/training.md lost its hook example"
    namespace: dict = {}
    exec(compile(block.group(1), str(DOCS), "exec"), namespace)
    return namespace


class Recorder(Hook):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def before_epoch(self, epoch, global_step):
        self.calls.append(("before", epoch, global_step))

    def after_step(self, epoch, it, out):
        assert {"loss", "finite"} <= set(out)
        self.calls.append(("step", epoch, it))

    def after_epoch(self, epoch, record):
        self.calls.append(("after", epoch, record["global_step"], "train_seconds" in record))


def test_hooks_are_called_in_order_and_the_docs_timer_times_every_step(tmp_path):
    src, _ = tiny_domain_folders(tmp_path / "data", 32, 16)
    o = fixture_options(tmp_path / "run")
    o.pretrain.epochs, o.pretrain.iters, o.pretrain.eval_every = 2, 3, 2
    timer, rec = _doc_example()["StepTimer"](), Recorder()
    pretrain(load_dataset("synthetic", src), None, o, seed=1, out_dir=tmp_path / "run" / "s1", hooks=[timer, rec])
    assert rec.calls == [("before", 0, 0), ("step", 0, 0), ("step", 0, 1), ("step", 0, 2), ("after", 0, 3, True),
                         ("before", 1, 3), ("step", 1, 0), ("step", 1, 1), ("step", 1, 2), ("after", 1, 6, True)]
    assert sorted(timer.seconds) == [0, 1] and all(len(v) == 3 and min(v) > 0 for v in timer.seconds.values())


def test_hooks_must_be_hooks():
    with pytest.raises(TypeError, match="Hook instances, got function"):
        Hooks([lambda *a: None])


class SeesWrittenEpoch(Hook):
    """A user hook runs after the runner's own: the record holds both teachers' metrics, and the
    epoch's checkpoint and log line are already on disk."""

    def __init__(self, run: Path) -> None:
        self.run, self.seen = run, []

    def after_epoch(self, epoch, record):
        logged = [json.loads(line) for line in (self.run / "log.jsonl").read_text().splitlines()]
        ck = safe_load(self.run / "ckpt" / "last.pt")
        self.seen.append((epoch, "mAP" in record and "T2_mAP" in record, logged[-1] == record, ck["epoch"],
                          len(ck["history"])))


def test_user_hooks_follow_evaluation_and_the_checkpoint(tmp_path):
    _, target = fixture_domains(tmp_path / "data")
    o = fixture_options(tmp_path / "run")
    o.adapt.epochs = 2
    run = tmp_path / "run" / "kmeans"
    hook = SeesWrittenEpoch(run)
    adapt(target, [str(FIXTURE_MODEL)] * 2, o, run, hooks=[hook])
    assert hook.seen == [(0, True, True, 0, 1), (1, True, True, 1, 2)]

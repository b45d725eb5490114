"""Files written by fastmmt before the Stage II restructure (tests/fixtures/v2026_12_06, made by
tests/fixtures/make_compat_fixtures.py on 2026-12-06) still load and resume: a model file builds its
network with the stored weights, and an MMT checkpoint resumes into a second epoch."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fastmmt.safe_load import safe_load
from fastmmt.train.mmt import adapt
from fastmmt.train.model_file import load_model_file
from fixtures.make_compat_fixtures import fixture_domains, fixture_options

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "v2026_12_06"


def test_model_file_loads_with_its_weights(tmp_path):
    o = fixture_options(tmp_path)
    net = load_model_file(FIXTURES / "model.pt", o, torch.device("cpu"))
    stored = safe_load(FIXTURES / "model.pt")
    weights = next(v for v in stored.values() if isinstance(v, dict) and "classifier.weight" in v)
    for k, v in net.state_dict().items():
        assert torch.equal(v.cpu(), weights[k].to(v.dtype)), k
    with torch.no_grad():
        feats = net.eval()(torch.randn(3, 3, o.data.height, o.data.width))
    assert feats.shape == (3, net.feat_dim) and torch.isfinite(feats).all()
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(3))


@pytest.mark.parametrize("changed", [False, True])
def test_checkpoint_resumes_into_the_next_epoch(tmp_path, changed):
    """Resuming the fixture's epoch-0 checkpoint trains epoch 1 only. The regenerated data lives in
    another folder than the one recorded, a run-defining change: refused, unless meant."""
    _, target = fixture_domains(tmp_path / "data")
    o = fixture_options(tmp_path / "run")
    o.adapt.epochs = 2
    run = tmp_path / "run" / "kmeans"
    (run / "ckpt").mkdir(parents=True)
    shutil.copy(FIXTURES / "last.pt", run / "ckpt" / "last.pt")
    inits = [str(FIXTURES / "model.pt")] * 2
    if not changed:
        with pytest.raises(ValueError, match="data"):
            adapt(target, inits, o, run, resume=True)
        return
    adapt(target, inits, o, run, resume=True, resume_changed=True)
    epochs = [json.loads(line)["epoch"] for line in (run / "log.jsonl").read_text().splitlines()
              if '"epoch"' in line]
    assert epochs and epochs[-1] == 1 and 0 not in epochs  # epoch 0 came from the fixture
    ck = safe_load(run / "ckpt" / "last.pt")
    assert ck["epoch"] == 1 and ck["global_step"] == 2 * o.adapt.iters

"""fastmmt.evaluation.extract_features: order, eval mode, memory format, autocast, errors, progress."""
from __future__ import annotations

import io
import sys

import pytest
import torch
import torch.nn.functional as F

from fastmmt.evaluation import extract_features
from fastmmt.models import build_model

N = 10


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(N, 3, 32, 16, generator=g)
    pids = torch.arange(N) * 3 + 1
    camids = torch.arange(N) % 4
    return images, pids, camids


def shuffled_batches(data, batch: int = 3, seed: int = 1):
    """Batches ``(images, pids, camids, indices)`` over a permutation of the dataset."""
    images, pids, camids = data
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    return [(images[i], pids[i], camids[i], i) for i in perm.split(batch)]


def make_model():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, base_width=8)
    with torch.no_grad():  # non-trivial running statistics so eval vs train mode would differ
        model.bn_neck.running_mean.normal_()
        model.bn_neck.running_var.uniform_(0.5, 2.0)
    return model.train()


def test_features_in_dataset_order_eval_mode_and_restored(data) -> None:
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    feats, pids, camids = extract_features(model, shuffled_batches(data), progress=False)
    assert model.training  # restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed: extraction must not update BN statistics"
    with torch.no_grad():
        ref = model.eval()(data[0])
    assert feats.dtype == torch.float32 and feats.shape == (N, model.feat_dim)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(feats.norm(dim=1), torch.ones(N))
    assert torch.equal(pids, data[1]) and torch.equal(camids, data[2])
    assert pids.dtype == camids.dtype == torch.int64


def test_channels_last_and_bf16_autocast(data) -> None:
    model = make_model()
    ref, _, _ = extract_features(model, shuffled_batches(data), progress=False)
    model_cl = model.to(memory_format=torch.channels_last)
    cl, _, _ = extract_features(model_cl, shuffled_batches(data, seed=2), progress=False, channels_last=True)
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-4)
    bf, _, _ = extract_features(model, shuffled_batches(data), progress=False, amp_dtype=torch.bfloat16)
    assert bf.dtype == torch.float32
    assert F.cosine_similarity(bf, ref).min() > 0.98


def test_bad_loaders_are_named(data) -> None:
    model = make_model()
    batches = shuffled_batches(data)
    with pytest.raises(ValueError, match="repeated dataset indices"):
        extract_features(model, batches + batches[:1], progress=False)
    with pytest.raises(ValueError, match=r"\(images, pids, camids, indices\), got tuple of length 2"):
        extract_features(model, [b[:2] for b in batches], progress=False)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [], progress=False)
    images, pids, camids, idx = batches[0]
    with pytest.raises(ValueError, match="pids 2"):
        extract_features(model, [(images, pids[:2], camids, idx)], progress=False)
    assert model.training


class _FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(data, capsys, monkeypatch) -> None:
    model = make_model()
    extract_features(model, shuffled_batches(data), progress=True)  # captured stderr: not a TTY
    assert capsys.readouterr().err == ""
    tty = _FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    extract_features(model, shuffled_batches(data), progress=True)
    assert "extract" in tty.getvalue()
    tty.truncate(0)
    extract_features(model, shuffled_batches(data), progress=False)
    assert tty.getvalue() == ""


def test_several_models_from_one_pass_equal_one_model_at_a_time(data) -> None:
    """extract_features_of: the loader is read once (counted), each model's features equal its own
    extraction, and every model's mode is restored (one in train mode, one in eval mode)."""
    from fastmmt.evaluation import extract_features_of

    a = make_model()
    torch.manual_seed(1)
    b = build_model("resnet18", 5, base_width=8).eval()
    passes = []

    class Counted:
        def __init__(self, batches):
            self.batches = batches

        def __iter__(self):
            passes.append(1)
            return iter(self.batches)

    feats, pids, camids = extract_features_of([a, b], Counted(shuffled_batches(data)), progress=False)
    assert len(passes) == 1 and len(feats) == 2
    assert a.training and not b.training
    for model, f in zip((a, b), feats):
        one, p1, c1 = extract_features(model, shuffled_batches(data, seed=4), progress=False)
        torch.testing.assert_close(f, one, rtol=1e-5, atol=1e-6)
        assert torch.equal(p1, pids) and torch.equal(c1, camids)
    assert not torch.allclose(feats[0], feats[1])
    with pytest.raises(ValueError, match="at least one model"):
        extract_features_of([], shuffled_batches(data), progress=False)

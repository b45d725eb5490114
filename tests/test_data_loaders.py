"""TorchTrainLoader and build_torch_test_loader on tiny JPEGs written here."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmt.data import ImageRecord, TestTransform, TorchTrainLoader, build_torch_test_loader, load_image

H, W = 16, 8


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    recs = []
    for pid in range(6):
        for j in range(5):
            path = os.path.join(root, f"{pid}_{j}.png")  # lossless: exact pixel checks below
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
            recs.append(ImageRecord(path, pid, j % 2))
    return recs


def _variants(clean: torch.Tensor, pad: int = 10) -> list[torch.Tensor]:
    """Every flip/pad/crop of a normalised image (padding is 0 before normalisation)."""
    zero = ((0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])).view(3, 1, 1)
    out = []
    for img in (clean, clean.flip(-1)):
        big = zero.expand(3, H + 2 * pad, W + 2 * pad).clone()
        big[:, pad:pad + H, pad:pad + W] = img
        out += [big[:, t:t + H, l:l + W] for t in range(2 * pad + 1) for l in range(2 * pad + 1)]
    return out


def test_batches_structure_and_views(records):
    labels = np.array([r.pid for r in records])
    loader = TorchTrainLoader(records, labels, H, W, batch_size=8, num_instances=4, num_views=2,
                              workers=0, seed=1, erase=False)
    batches = list(loader.epoch(0, iters=5))  # 6 ids x 4 = 3 batches per pass: restarts once
    assert len(batches) == 5
    test_t = TestTransform(H, W)
    for b in batches:
        assert len(b.views) == 2 and all(v.shape == (8, 3, H, W) for v in b.views)
        assert torch.equal(b.labels, torch.from_numpy(labels)[b.indices])
        assert torch.equal(b.camids, torch.tensor([records[i].camid for i in b.indices]))
        runs = b.labels.view(-1, 4)
        assert (runs == runs[:, :1]).all() and len(set(runs[:, 0].tolist())) == 2
        for k in (0, 5):  # each view is one flip/crop of the test-transformed image
            clean = test_t(load_image(records[int(b.indices[k])].path))
            for v in b.views:
                assert any(torch.allclose(v[k], c, atol=1e-6) for c in _variants(clean))
    # the two views are augmented independently
    assert any(not torch.equal(b.views[0], b.views[1]) for b in batches)
    # a pass covers every identity once before restarting
    first_pass = torch.cat([b.labels for b in batches[:3]])
    assert sorted(set(first_pass.tolist())) == list(range(6)) and len(first_pass) == 24


def test_deterministic_and_independent_of_workers(records):
    labels = np.array([r.pid for r in records])
    make = lambda workers: TorchTrainLoader(records, labels, H, W, batch_size=8, num_instances=4,  # noqa: E731
                                            num_views=2, workers=workers, seed=3)
    a = list(make(0).epoch(4, 3))
    b = list(make(2).epoch(4, 3))
    c = list(make(0).epoch(5, 3))
    for x, y in zip(a, b):
        assert torch.equal(x.indices, y.indices)
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    assert any(not torch.equal(x.indices, z.indices) or not torch.equal(x.views[0], z.views[0])
               for x, z in zip(a, c))


def test_set_labels_excludes_and_validates(records):
    labels = np.array([r.pid for r in records])
    loader = TorchTrainLoader(records, labels, H, W, batch_size=8, num_instances=4, workers=0)
    new = labels % 3
    new[:5] = -1                                   # identity 0's images become outliers
    loader.set_labels(new)
    for b in loader.epoch(1, 4):
        assert (b.indices >= 5).all() and torch.equal(b.labels, torch.from_numpy(new)[b.indices])
    with pytest.raises(ValueError, match=r"shape \(30,\)"):
        loader.set_labels(labels[:10])
    with pytest.raises(ValueError, match="only 1 labelled identities"):
        loader.set_labels(np.where(labels == 2, 2, -1))
    with pytest.raises(ValueError, match="multiple of num_instances"):
        TorchTrainLoader(records, labels, H, W, batch_size=10, num_instances=4)


@pytest.mark.parametrize("workers", [0, 1])
def test_test_loader_order_and_values(records, workers):
    """Normalised per batch (in the worker when there is one): the per-image transform's values."""
    loader = build_torch_test_loader(records, 32, 16, batch_size=7, workers=workers)
    got = list(loader)
    assert [len(b[0]) for b in got] == [7, 7, 7, 7, 2]           # last partial batch kept
    imgs, pids, cams, idx = (torch.cat(x) for x in zip(*got))
    assert idx.tolist() == list(range(30))
    assert pids.tolist() == [r.pid for r in records] and cams.tolist() == [r.camid for r in records]
    assert (imgs.dtype, pids.dtype, cams.dtype, idx.dtype) == (torch.float32,) + (torch.int64,) * 3
    t = TestTransform(32, 16)
    assert torch.equal(imgs, torch.stack([t(load_image(r.path)) for r in records]))


def test_torch_loaders_pin_for_a_cuda_device(records, monkeypatch):
    """Feeding a CUDA device (a ``local_rank``) the torch loaders pin their batches, so the step's
    copies are asynchronous; on the CPU (no ``local_rank``, or no CUDA) they do not."""
    from fastmmt.data.factory import build_test_loader, build_train_loader, pin_for

    labels = np.array([r.pid for r in records])
    assert not pin_for(None)
    assert pin_for(0) == torch.cuda.is_available()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    train = build_train_loader(records, labels, 32, 16, batch_size=4, num_instances=2, workers=0,
                               backend="torch", local_rank=0)
    assert train.pin_memory and train._get_loader().pin_memory
    assert build_test_loader(records, 32, 16, workers=0, backend="torch", local_rank=0).pin_memory
    cpu_train = build_train_loader(records, labels, 32, 16, batch_size=4, num_instances=2, workers=0,
                                   backend="torch", local_rank=None)
    assert not cpu_train.pin_memory and not cpu_train._get_loader().pin_memory
    assert not build_test_loader(records, 32, 16, workers=0, backend="torch").pin_memory


@pytest.mark.gpu
def test_pinned_batches_on_cuda(records):
    from fastmmt.data.factory import build_train_loader

    labels = np.array([r.pid for r in records])
    loader = build_train_loader(records, labels, 32, 16, batch_size=4, num_instances=2, workers=0,
                                backend="torch", local_rank=0)
    batch = next(iter(loader.epoch(0, 1)))
    assert batch.views[0].is_pinned() and batch.labels.is_pinned()

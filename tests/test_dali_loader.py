"""DALI loaders: P x K batches, labels, epochs, errors, and the backend factory.

The loaders' default device is used: DALI's GPU graph on a CUDA machine, its CPU graph here.
"""
from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from fastmmt.data import ImageReadError, ImageRecord, TestTransform, TorchTrainLoader, load_image
from fastmmt.data.augment import AugmentSpec
from fastmmt.data.dali import DaliTestLoader, DaliTrainLoader
from fastmmt.data.sampler import BatchPlanner
from fastmmt.data.factory import build_test_loader, build_train_loader, resolve_data_backend

pytestmark = pytest.mark.dali  # skipped, with the reason, where DALI is not installed

H, W = 32, 16
OUT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the default loaders put images


def jpeg_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:20]
    arr = np.stack([yy * 6, xx * 12, np.full_like(yy, 40 + seed % 200)], -1) + rng.integers(0, 20, (40, 20, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture
def dataset(tmp_path) -> list[ImageRecord]:
    """12 identities x 5 images over 3 cameras, each a distinct JPEG."""
    recs = []
    for pid in range(12):
        for k in range(5):
            path = tmp_path / f"{pid:02d}_c{k % 3}_{k}.jpg"
            path.write_bytes(jpeg_bytes(pid * 5 + k))
            recs.append(ImageRecord(str(path), pid, k % 3))
    return recs


def pids_of(recs):
    return np.array([r.pid for r in recs], dtype=np.int64)


def check_pk(batch, labels: np.ndarray, recs, p: int, k: int) -> None:
    """P x K: P distinct labels, K consecutive images each, labels/cameras of the indices."""
    idx = batch.indices.numpy()
    assert len(idx) == p * k and all(v.shape == (p * k, 3, H, W) for v in batch.views)
    np.testing.assert_array_equal(batch.labels.numpy(), labels[idx])
    np.testing.assert_array_equal(batch.camids.numpy(), [recs[i].camid for i in idx])
    groups = batch.labels.numpy().reshape(p, k)
    assert (groups == groups[:, :1]).all() and len(set(groups[:, 0])) == p
    assert (groups >= 0).all()


def test_batches_are_pk_with_right_labels_and_match_torch_plan(dataset):
    labels = pids_of(dataset)
    dali = DaliTrainLoader(dataset, labels, H, W, batch_size=16, num_instances=4, num_views=2, seed=4)
    ref = TorchTrainLoader(dataset, labels, H, W, batch_size=16, num_instances=4, workers=0, seed=4)
    # 12 identities -> 3 batches per sampler pass: 7 iterations cross two pass boundaries
    got = list(dali.epoch(2, 7))
    want = list(ref.epoch(2, 7))
    assert len(got) == 7
    for g, w in zip(got, want):
        check_pk(g, labels, dataset, 4, 4)
        assert torch.equal(g.indices, w.indices)  # same sampler, same batch plan
        assert g.views[0].dtype == torch.float32 and g.views[0].device.type == OUT_DEVICE
        assert not torch.equal(g.views[0], g.views[1])  # two independent augmentations


@pytest.fixture
def exact_dataset(tmp_path) -> list[ImageRecord]:
    """12 identities x 5 lossless PNGs already at H x W: no resize, so both pipelines see the
    same pixels and (same normalisation arithmetic) must give the same bits."""
    rng = np.random.default_rng(1)
    recs = []
    for pid in range(12):
        for k in range(5):
            path = tmp_path / f"{pid:02d}_c{k % 3}_{k}.png"
            Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(path)
            recs.append(ImageRecord(str(path), pid, k % 3))
    return recs


@pytest.mark.parametrize("world", [1, 2])
def test_torch_and_dali_loaders_consume_one_plan_and_one_augmentation(exact_dataset, world):
    """Item by item: for the same (seed, epoch, rank) both loaders yield the planner's indices,
    augmentation off (each view = the test transform of the image) and on (identical views:
    the same draws from the same seeds, applied to the same pixels)."""
    labels = pids_of(exact_dataset)
    test_t = TestTransform(H, W)
    clean = torch.stack([test_t(load_image(r.path)) for r in exact_dataset])
    for rank in range(world):
        planner = BatchPlanner(labels, [r.camid for r in exact_dataset], 16, 4, seed=4, rank=rank,
                               world_size=world)
        want_idx = planner.plan(3, 5).indices  # 3 batches per pass: crosses a pass boundary
        for off in (True, False):
            kw = dict(batch_size=16, num_instances=4, num_views=2, seed=4, rank=rank, world_size=world,
                      augment=AugmentSpec(H, W).off() if off else None)
            dali = list(DaliTrainLoader(exact_dataset, labels, H, W, **kw).epoch(3, 5))
            ref = list(TorchTrainLoader(exact_dataset, labels, H, W, workers=0, **kw).epoch(3, 5))
            assert len(dali) == len(ref) == 5
            for b, (g, w) in enumerate(zip(dali, ref)):
                np.testing.assert_array_equal(g.indices.numpy(), want_idx[b])
                assert torch.equal(g.indices, w.indices) and torch.equal(g.labels, w.labels)
                assert len(set(g.labels.tolist())) == 4 // world
                for gv, wv in zip(g.views, w.views):
                    assert torch.equal(gv, wv)
                    if off:
                        assert torch.equal(gv, clean[g.indices])
            if not off:  # augmented: views differ from the clean images and between views
                assert not torch.equal(dali[0].views[0], clean[dali[0].indices])
                assert not torch.equal(dali[0].views[0], dali[0].views[1])


def test_set_labels_changes_labels_without_rebuilding(dataset):
    labels = pids_of(dataset)
    loader = DaliTrainLoader(dataset, labels, H, W, batch_size=8, num_instances=4, seed=1)
    first = list(loader.epoch(0, 2))
    pipe = loader._runner._pipe
    assert pipe is not None
    # new pseudo-labels: merge identities pairwise and drop identity 11 as outliers
    new = labels // 2
    new[labels == 11] = -1
    loader.set_labels(new)
    batches = list(loader.epoch(1, 4))
    assert loader._runner._pipe is pipe  # the same DALI pipeline served both label sets
    for b in batches:
        check_pk(b, new, dataset, 2, 4)
        assert not np.isin(b.indices.numpy(), np.flatnonzero(labels == 11)).any()
    assert {int(x) for b in first for x in b.labels} <= set(range(12))
    with pytest.raises(ValueError, match=r"shape \(60,\)"):
        loader.set_labels(new[:-1])


def test_epochs_are_deterministic_and_early_exit_leaks_nothing(dataset):
    labels = pids_of(dataset)
    a = DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=9)
    b = DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=9)
    for batch in a.epoch(0, 5):  # leave after one batch: later in-flight batches are dropped
        break
    got = list(a.epoch(1, 3))
    want = list(b.epoch(1, 3))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.indices, w.indices) and torch.equal(g.views[0], w.views[0])
    other = list(b.epoch(2, 3))
    assert not torch.equal(other[0].views[0], want[0].views[0])


def test_channels_last_output_has_same_values(dataset):
    labels = pids_of(dataset)
    a = next(iter(DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=2).epoch(0, 1)))
    b = next(iter(DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=2,
                                  channels_last=True).epoch(0, 1)))
    assert b.views[0].shape == a.views[0].shape
    assert b.views[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.views[0], b.views[0])


def truncate(path: str) -> None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


def break_keeping_end_marker(path: str) -> None:
    """Truncated but ending in a JPEG end marker: passes the cheap check, DALI fails on it."""
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2] + b"\xff\xd9")


@pytest.mark.parametrize("damage", [truncate, break_keeping_end_marker])
def test_unreadable_image_fail_mode_names_path(dataset, damage):
    bad = dataset[7]
    damage(bad.path)
    labels = pids_of(dataset)
    train = DaliTrainLoader(dataset, labels, H, W, batch_size=48, num_instances=4, seed=0)
    with pytest.raises(ImageReadError) as err:  # 12 ids x 4 = every identity in each batch
        for _ in train.epoch(0, 3):
            pass
    assert err.value.path == bad.path and bad.path in str(err.value)
    test = DaliTestLoader(dataset, H, W, batch_size=16)
    with pytest.raises(ImageReadError, match=bad.path):
        list(test)


@pytest.mark.parametrize("damage", [truncate, break_keeping_end_marker])
def test_unreadable_image_skip_mode_substitutes_same_label(dataset, damage):
    bad_index = 7
    damage(dataset[bad_index].path)
    labels = pids_of(dataset)
    train = DaliTrainLoader(dataset, labels, H, W, batch_size=48, num_instances=4, seed=0,
                            on_error="skip")
    with pytest.warns(RuntimeWarning, match=dataset[bad_index].path):
        batches = list(train.epoch(0, 4))
    assert len(batches) == 4
    for b in batches:
        check_pk(b, labels, dataset, 12, 4)  # still P x K, the stand-in has the same label
        assert bad_index not in b.indices.tolist()
    assert train.skipped >= 1 and train.policy.bad_paths == [dataset[bad_index].path]
    test = DaliTestLoader(dataset, H, W, batch_size=16, on_error="skip")
    with pytest.warns(RuntimeWarning):
        seen = [i for *_, idx in test for i in idx.tolist()]
    assert seen == [i for i in range(len(dataset)) if i != bad_index] and test.skipped == 1


def test_missing_file_and_unsubstitutable_identity(dataset, tmp_path):
    recs = dataset + [ImageRecord(str(tmp_path / "gone.jpg"), 99, 0)]
    labels = np.append(pids_of(dataset), 99)
    test = DaliTestLoader(recs, H, W, batch_size=16)
    with pytest.raises(ImageReadError, match="gone.jpg.*no such file"):
        list(test)
    only = labels.copy()
    only[:] = -1
    only[-1] = 0  # a single identity whose only image is missing: nothing to substitute
    only[:4] = 1
    loader = DaliTrainLoader(recs, only, H, W, batch_size=8, num_instances=4, on_error="skip")
    with pytest.warns(RuntimeWarning), pytest.raises(ImageReadError, match="no readable image of label 0"):
        list(loader.epoch(0, 1))


def test_bad_arguments_are_named(dataset):
    labels = pids_of(dataset)
    with pytest.raises(ValueError, match="on_error"):
        DaliTrainLoader(dataset, labels, H, W, batch_size=8, on_error="ignore")
    with pytest.raises(ValueError, match="multiple of num_instances"):
        DaliTrainLoader(dataset, labels, H, W, batch_size=10)
    with pytest.raises(ValueError, match="device"):
        DaliTestLoader(dataset, H, W, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            DaliTestLoader(dataset, H, W, device="gpu")


def test_factory_backends(dataset):
    labels = pids_of(dataset)
    assert resolve_data_backend("auto") == "dali"  # DALI imports in this environment
    assert isinstance(build_train_loader(dataset, labels, H, W, batch_size=8), DaliTrainLoader)
    torch_loader = build_train_loader(dataset, labels, H, W, batch_size=8, workers=0, backend="torch")
    assert isinstance(torch_loader, TorchTrainLoader)
    with pytest.raises(TypeError, match="on_error"):
        build_train_loader(dataset, labels, H, W, batch_size=8, backend="torch", on_error="skip")
    with pytest.raises(ValueError, match="data backend"):
        build_test_loader(dataset, H, W, backend="opencv")
    d = build_test_loader(dataset, H, W, batch_size=16, backend="dali")
    t = build_test_loader(dataset, H, W, batch_size=16, workers=0, backend="torch")
    for (xd, pd, cd, id_), (xt, pt, ct, it) in zip(d, t, strict=True):
        xd, pd, cd, id_ = xd.cpu(), pd.cpu(), cd.cpu(), id_.cpu()  # DALI's GPU graph on a CUDA machine
        assert torch.equal(id_, it) and torch.equal(pd, pt) and torch.equal(cd, ct)
        assert (xd - xt).abs().max() <= 0.105  # resize kernels differ (see test_dali_pipeline)
    counts = Counter(int(i) for b in build_train_loader(dataset, labels, H, W, batch_size=8).epoch(0, 3)
                     for i in b.labels)
    assert all(c % 4 == 0 for c in counts.values())
    # distributed: auto still picks DALI, and each rank's pipeline reads only its share
    cuda = torch.cuda.is_available()
    shares = [build_train_loader(dataset, labels, H, W, batch_size=16, seed=2, rank=r, world_size=2,
                                 local_rank=0 if cuda else r) for r in range(2)]
    assert all(isinstance(s, DaliTrainLoader) for s in shares)
    assert all(s.torch_device == (torch.device("cuda", 0) if cuda else torch.device("cpu")) for s in shares)
    full = build_train_loader(dataset, labels, H, W, batch_size=16, seed=2, workers=0, backend="torch")
    for b, *parts in zip(full.epoch(1, 3), *(s.epoch(1, 3) for s in shares), strict=True):
        assert [len(p.indices) for p in parts] == [8, 8]
        assert torch.equal(torch.cat([p.indices.cpu() for p in parts]), b.indices)


def test_gpu_copies_run_on_torchs_current_stream(monkeypatch):
    """DALI -> torch copies are issued on torch.cuda.current_stream() of the destination (as
    DALI's own iterator does), not on a DALI-internal stream racing torch's allocator."""
    from nvidia.dali import tensors as dali_tensors
    from nvidia.dali.plugin import pytorch as dali_torch

    from fastmmt.data import dali as dali_mod

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: ("current", device))
    assert dali_mod._copy_stream(torch.device("cuda", 1)) == ("current", torch.device("cuda", 1))
    assert dali_mod._copy_stream(torch.device("cpu")) is None

    seen = []
    real_feed = dali_torch.feed_ndarray

    def feed(dali_tensor, arr, cuda_stream=None):
        seen.append(cuda_stream)
        return real_feed(dali_tensor, arr)

    monkeypatch.setattr(dali_torch, "feed_ndarray", feed)
    monkeypatch.setattr(dali_mod, "_copy_stream", lambda device: ("stream for", device))
    arr = np.arange(2 * 4 * 3 * 3, dtype=np.float32).reshape(2, 4, 3, 3)
    out = dali_mod._to_torch(dali_tensors.TensorListCPU(arr), torch.device("cpu"), channels_last=True)
    assert seen == [("stream for", torch.device("cpu"))]
    assert torch.equal(out, torch.from_numpy(arr).permute(0, 3, 1, 2))


@pytest.mark.gpu
def test_gpu_loader_batches_on_a_side_stream_match_default_stream(dataset):
    """Consumed on a non-default torch stream without any synchronize: the same values."""
    labels = pids_of(dataset)
    want = [b.views[0].cpu() for b in DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=3,
                                                      device="gpu").epoch(0, 3)]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        got = [(b.views[0] * 1.0) for b in DaliTrainLoader(dataset, labels, H, W, batch_size=8, seed=3,
                                                           device="gpu").epoch(0, 3)]
        got = [g.to("cpu", non_blocking=False) for g in got]
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


@pytest.fixture
def fresh_probe():
    """The probe and its warning are cached per process: start and end each test uncached."""
    from fastmmt.data import factory

    factory.dali_gpu_probe.cache_clear()
    factory._warn_gpu_fallback.cache_clear()
    yield factory
    factory.dali_gpu_probe.cache_clear()
    factory._warn_gpu_fallback.cache_clear()


def test_auto_falls_back_to_torch_when_the_gpu_probe_fails(monkeypatch, fresh_probe, dataset):
    """A CUDA machine whose driver is too old for DALI: auto warns once, naming why, and uses torch."""
    factory = fresh_probe
    runs = []

    def failing_probe():
        runs.append(1)
        raise RuntimeError("nvJPEG: CUDA driver version is insufficient for CUDA runtime version\nmore")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(factory, "_run_gpu_probe", failing_probe)
    with pytest.warns(RuntimeWarning, match=r"GPU pipeline cannot run.*RuntimeError: nvJPEG: CUDA driver "
                                            r"version is insufficient.*torch loader") as rec:
        assert resolve_data_backend("auto") == "torch"
    assert len(rec) == 1 and "more" not in str(rec[0].message)  # first line of the reason only
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, no second probe
        assert resolve_data_backend("auto") == "torch"
        labels = pids_of(dataset)
        loader = build_train_loader(dataset, labels, H, W, batch_size=8, workers=0)
        assert isinstance(loader, TorchTrainLoader)
        assert resolve_data_backend("auto", device="cpu") == "dali"  # CPU DALI needs no probe
        assert resolve_data_backend("torch") == "torch"
    assert runs == [1]


def test_auto_keeps_dali_when_the_gpu_probe_runs(monkeypatch, fresh_probe):
    factory = fresh_probe
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(factory, "_run_gpu_probe", lambda: None)
    assert resolve_data_backend("auto") == "dali"
    assert factory.dali_gpu_probe() is None


def test_real_gpu_probe_reports_why_it_cannot_run(fresh_probe):
    """The probe builds the real GPU test graph; without CUDA that fails with a named reason."""
    factory = fresh_probe
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine: test_gpu_probe_runs covers it")
    assert factory.dali_gpu_probe() == "ValueError: device='gpu' requested but CUDA is not available"
    assert resolve_data_backend("auto") == "dali"  # no CUDA: the loaders run DALI on the CPU


@pytest.mark.gpu
def test_gpu_probe_runs(fresh_probe):
    """On a CUDA machine with a driver DALI supports, the tiny GPU pipeline runs."""
    assert fresh_probe.dali_gpu_probe() is None
    assert resolve_data_backend("auto") == "dali"

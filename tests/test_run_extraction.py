"""fastmmt.train.extraction: the run's extraction set up once gives the features of a loader
built per call (the old way), with or without the decoded-image cache."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import fastmmt.data.decoded_cache as cache_mod
from fastmmt.data import ImageRecord, ReIDDataset
from fastmmt.data.decoded_cache import DecodedCacheError
from fastmmt.data.factory import build_test_loader
from fastmmt.evaluation import evaluate_features, extract_features
from fastmmt.models.factory import make_model
from fastmmt.train.extraction import RunExtraction, make_decoded_cache
from fastmmt.train.options import ExperimentOptions


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> ReIDDataset:
    root = tmp_path_factory.mktemp("target")
    rng = np.random.default_rng(0)

    def split(name: str, ids: range, per_id: int) -> list[ImageRecord]:
        out = []
        for pid in ids:
            for k in range(per_id):
                path = root / f"{name}_{pid:03d}_c{k % 3}_{k}.jpg"
                arr = rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)
                Image.fromarray(arr).save(path, quality=90)
                out.append(ImageRecord(str(path), pid, k % 3))
        return out

    return ReIDDataset("tiny", str(root), train=split("train", range(8), 4), query=split("query", range(5), 1),
                       gallery=split("gallery", range(5), 4))


def extract(model, records, o: ExperimentOptions) -> torch.Tensor:
    """The old way: a loader built for this call, every image decoded."""
    d = o.data
    loader = build_test_loader(records, d.height, d.width, batch_size=d.test_batch_size, workers=0, backend="torch")
    return extract_features(model, loader, torch.device("cpu"), progress=False)[0]


def options(**data) -> ExperimentOptions:
    o = ExperimentOptions()
    o.data.height, o.data.width, o.data.workers, o.data.test_batch_size, o.data.backend = 32, 16, 0, 7, "torch"
    o.model.arch, o.model.base_width = "resnet18", 8
    o.run.progress = False
    for k, v in data.items():
        setattr(o.data, k, v)
    return o


@pytest.mark.parametrize("decode_cache", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_features_and_metrics_equal_the_per_call_loader(dataset, decode_cache, persistent, monkeypatch):
    o = options(decode_cache=decode_cache, persistent_loaders=persistent)
    dev = torch.device("cpu")
    torch.manual_seed(0)
    models = [make_model(o.model, 5, dev), make_model(o.model, 5, dev)]
    cache = make_decoded_cache(dataset, o.data)
    assert (cache is not None) == decode_cache
    run = RunExtraction(dataset, o.data, o.run, o.model, dev, decoded_cache=cache)
    def no_decode(path):
        raise AssertionError(f"decoded {path} again")

    for epoch in range(2):
        for m in models:
            want = extract(m, dataset.train, o)  # the old way: decodes
            if decode_cache and epoch == 1:  # the cache is full: our extraction decodes nothing
                assert cache.num_filled == len(dataset.train)
                monkeypatch.setattr(cache_mod, "load_image", no_decode)
                monkeypatch.setattr("fastmmt.data.loaders.load_image", no_decode)
            got = run.features(m)
            monkeypatch.undo()
            assert torch.equal(got, want)
    met = run.evaluate(models[0])
    qf, gf = extract(models[0], dataset.query, o), extract(models[0], dataset.gallery, o)
    r = evaluate_features(qf, gf, [x.pid for x in dataset.query], [x.pid for x in dataset.gallery],
                          [x.camid for x in dataset.query], [x.camid for x in dataset.gallery])
    assert met["mAP"] == r.mAP and met["rank1"] == r.cmc[0]
    assert (len(run._extractors) == 3) == persistent  # train, query, gallery loaders kept
    if decode_cache:
        assert cache.num_filled == len(dataset.train) + len(dataset.query) + len(dataset.gallery)


def test_cache_over_the_bound_fails_naming_the_option(dataset):
    o = options(decode_cache=True, decode_cache_mb=0.01)
    with pytest.raises(DecodedCacheError, match=r"57 images need 0\.1 MiB.*over the bound.*data\.decode_cache_mb"):
        make_decoded_cache(dataset, o.data)

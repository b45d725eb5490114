"""Features stay on the device: extraction returns them there, and k-means, the Jaccard k-NN and
the ranking metrics take torch tensors (same results as numpy inputs where the arithmetic is the
same: exactly on the CPU; CUDA variants are marked ``gpu``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastmmt.cluster import k_reciprocal_jaccard, kmeans
from fastmmt.cluster.knn import knn_exact
from fastmmt.evaluation import FeatureExtractor, evaluate_features, extract_features, rank_metrics
from fastmmt.models import build_model
from test_cluster_jaccard import blobs
from test_metrics import random_problem, reference_metrics

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class CountingLoader:
    """A re-iterable test loader that counts its passes (built once, iterated per call)."""

    def __init__(self, n: int = 11, batch: int = 4) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 3, 32, 16, generator=g)
        self.pids, self.camids = torch.arange(n) + 1, torch.arange(n) % 3
        self.batch, self.passes = batch, 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch)

    def __iter__(self):
        self.passes += 1
        for s in range(0, len(self.images), self.batch):
            idx = torch.arange(s, min(s + self.batch, len(self.images))).flip(0)  # any order
            yield self.images[idx], self.pids[idx], self.camids[idx], idx


def small_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("resnet18", 5, base_width=8)


def test_extractor_reuses_one_loader_and_matches_extract_features():
    loader = CountingLoader()
    ext = FeatureExtractor(loader, "cpu")
    models = [small_model(0), small_model(1)]
    feats = [ext(m) for m in models]
    assert loader.passes == 2  # one loader, one pass per model
    for m, f in zip(models, feats):
        ref, pids, camids = extract_features(m, loader, progress=False)
        assert torch.equal(f, ref) and f.device.type == "cpu"
        with torch.no_grad():
            torch.testing.assert_close(f, m.eval()(loader.images), rtol=1e-5, atol=1e-6)
    assert torch.equal(ext.pids, loader.pids) and torch.equal(ext.camids, loader.camids)
    assert not torch.equal(feats[0], feats[1])


@cuda
@pytest.mark.gpu
def test_extraction_features_stay_on_cuda():
    loader = CountingLoader()
    model = small_model(0).cuda()
    feats = FeatureExtractor(loader, "cuda")(model)
    assert feats.is_cuda
    ref, _, _ = extract_features(model.cpu(), loader, device="cpu", progress=False)
    torch.testing.assert_close(feats.cpu(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kmeans_tensor_input_equals_numpy_input(dtype):
    x, _ = blobs(600, 24, 15, 0.9, seed=3)
    x = x.astype(dtype)
    a = kmeans(x, 15, seed=2, backend="faiss")
    b = kmeans(torch.from_numpy(x), 15, seed=2, backend="faiss")
    np.testing.assert_array_equal(a.labels, b.labels)
    assert torch.equal(a.centroids, b.centroids) and a.info["inertia"] == b.info["inertia"]
    # the final assignment through FAISS's torch interop is the exact nearest centroid
    d2 = ((torch.from_numpy(x).double()[:, None] - b.centroids.double()[None]) ** 2).sum(-1)
    assert (d2.gather(1, torch.as_tensor(b.labels)[:, None])[:, 0] <= d2.min(1).values + 1e-6).all()


@cuda
@pytest.mark.gpu
def test_kmeans_takes_cuda_features():
    x, _ = blobs(600, 24, 15, 0.9, seed=3)
    cpu = kmeans(torch.from_numpy(x).float(), 15, seed=2, backend="faiss-gpu")
    dev = kmeans(torch.from_numpy(x).float().cuda(), 15, seed=2, backend="faiss-gpu")
    np.testing.assert_array_equal(cpu.labels, dev.labels)
    assert dev.centroids.is_cuda
    torch.testing.assert_close(dev.centroids.cpu(), cpu.centroids)


def test_jaccard_and_knn_tensor_input_equal_numpy_input():
    x, _ = blobs(200, 16, 10, 0.8, seed=4)
    x32 = x.astype(np.float32)
    a = k_reciprocal_jaccard(x32, 20, 6, dense=True)
    b = k_reciprocal_jaccard(torch.from_numpy(x32), 20, 6, dense=True)
    np.testing.assert_array_equal(a, b)
    # the torch branch of the k-NN (what CUDA features take) against the FAISS one on the CPU
    t = knn_exact(torch.from_numpy(x), 21)  # float64: torch matmul, as on a GPU
    f = knn_exact(torch.from_numpy(x32), 21)  # float32 CPU: FAISS
    np.testing.assert_allclose(t.dist, f.dist, atol=1e-5)
    assert (t.ids == f.ids).mean() > 0.99  # only near-ties may swap


@cuda
@pytest.mark.gpu
def test_jaccard_takes_cuda_features():
    x, _ = blobs(200, 16, 10, 0.8, seed=4)
    cpu = torch.from_numpy(x.astype(np.float32))
    a = k_reciprocal_jaccard(cpu, 20, 6, dense=True)
    b = k_reciprocal_jaccard(cpu.cuda(), 20, 6, dense=True)
    assert np.abs(a - b).max() < 1e-4


def test_rank_metrics_tensor_input_equals_numpy_input():
    dist, qp, gp, qc, gc = random_problem(40, 300, 25, 4, seed=5)
    a = rank_metrics(dist.astype(np.float32), qp, gp, qc, gc)
    b = rank_metrics(torch.from_numpy(dist.astype(np.float32)), *(torch.from_numpy(v) for v in (qp, gp, qc, gc)))
    assert a.mAP == b.mAP and np.array_equal(a.cmc, b.cmc) and a.num_valid_queries == b.num_valid_queries
    ref_map, ref_cmc, n = reference_metrics(dist.astype(np.float32), qp, gp, qc, gc)
    assert b.mAP == pytest.approx(ref_map, abs=1e-12) and np.allclose(b.cmc, ref_cmc) and n == b.num_valid_queries


@cuda
@pytest.mark.gpu
def test_rank_metrics_and_evaluate_features_on_cuda():
    g = torch.Generator().manual_seed(6)
    qf = torch.nn.functional.normalize(torch.randn(30, 16, generator=g), dim=1)
    gf = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    _, qp, gp, qc, gc = random_problem(30, 200, 20, 4, seed=6)
    a = evaluate_features(qf, gf, qp, gp, qc, gc)
    b = evaluate_features(qf.cuda(), gf.cuda(), *(torch.from_numpy(v).cuda() for v in (qp, gp, qc, gc)))
    assert a.mAP == pytest.approx(b.mAP, abs=1e-9) and np.allclose(a.cmc, b.cmc)

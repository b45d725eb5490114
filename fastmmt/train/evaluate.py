"""Evaluate a saved model file on a dataset's test split (optionally with k-reciprocal re-ranking),
or draw its rank lists."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastmmt.data import ReIDDataset
from fastmmt.evaluation import rank_metrics
from fastmmt.train.extraction import RunExtraction
from fastmmt.train.model_file import load_model_file
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.runtime import resolve_device


def _load_for_test(path: str | Path, dataset: ReIDDataset, opts: ExperimentOptions
                   ) -> tuple[RunExtraction, torch.nn.Module]:
    """The dataset's test-set extraction and the model of ``path``, on ``run.device``."""
    device = resolve_device(opts.run.device)
    return RunExtraction(dataset, opts.data, opts.run, opts.model, device), load_model_file(path, opts, device)


def evaluate_model_file(path: str | Path, dataset: ReIDDataset, opts: ExperimentOptions,
                        rerank: bool = False) -> dict[str, float]:
    """mAP and rank-1/5/10 of the model in ``path`` on ``dataset``'s query/gallery."""
    run, model = _load_for_test(path, dataset, opts)
    if not rerank:
        metrics = run.evaluate(model)
        metrics.pop("eval_seconds")
        return metrics
    from fastmmt.evaluation.reranking import re_ranking_features

    qf, gf = run.features(model, "query"), run.features(model, "gallery")
    dist = torch.as_tensor(np.asarray(re_ranking_features(qf, gf)))
    r = rank_metrics(dist, np.array([x.pid for x in dataset.query]), np.array([x.pid for x in dataset.gallery]),
                     np.array([x.camid for x in dataset.query]), np.array([x.camid for x in dataset.gallery]))
    return {"mAP": float(r.mAP), "rank1": float(r.cmc[0]), "rank5": float(r.cmc[4]), "rank10": float(r.cmc[9])}


def visualize_model_file(path: str | Path, dataset: ReIDDataset, opts: ExperimentOptions, out_dir: str | Path, *,
                         topk: int = 10, num_queries: int = 20, seed: int = 0, rerank: bool = False) -> list[Path]:
    """Rank-list pictures of the model in ``path`` on ``dataset``'s query/gallery
    (:func:`fastmmt.evaluation.visualize.visualize_ranked_results`): ``num_queries`` queries
    drawn at random with ``seed`` (all when there are fewer), the k-reciprocal re-ranked list
    (k1 20, k2 6, lambda 0.3) beside the plain one with ``rerank``. Returns the PNG paths."""
    from fastmmt.evaluation import pairwise_sq_euclidean
    from fastmmt.evaluation.reranking import re_ranking_features
    from fastmmt.evaluation.visualize import visualize_ranked_results

    if num_queries < 1:
        raise ValueError(f"num_queries must be >= 1, got {num_queries}")
    run, model = _load_for_test(path, dataset, opts)
    qf, gf = run.features(model, "query"), run.features(model, "gallery")
    nq = len(dataset.query)
    queries = np.sort(np.random.default_rng(seed).choice(nq, size=min(num_queries, nq), replace=False)).tolist()
    reranked = re_ranking_features(qf, gf, k1=20, k2=6, lambda_value=0.3) if rerank else None
    return visualize_ranked_results(pairwise_sq_euclidean(qf, gf), dataset.query, dataset.gallery, out_dir,
                                    topk=topk, queries=queries, reranked_distmat=reranked)

"""Evaluate a saved model file on a dataset's test split (optionally with k-reciprocal re-ranking)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastmmt.data import ReIDDataset
from fastmmt.evaluation import rank_metrics
from fastmmt.train.common import evaluate, extract
from fastmmt.train.options import ExperimentOptions
from fastmmt.train.model_file import load_model_file
from fastmmt.train.runtime import resolve_device


def evaluate_model_file(path: str | Path, dataset: ReIDDataset, opts: ExperimentOptions,
                        rerank: bool = False) -> dict[str, float]:
    """mAP and rank-1/5/10 of the model in ``path`` on ``dataset``'s query/gallery."""
    device = resolve_device(opts.run.device)
    model = load_model_file(path, opts, device)
    if not rerank:
        metrics = evaluate(model, dataset, opts.data, opts.run, device, opts.model)
        metrics.pop("eval_seconds")
        return metrics
    from fastmmt.evaluation.reranking import re_ranking_features

    qf = extract(model, dataset.query, opts.data, opts.run, device, opts.model, "query")
    gf = extract(model, dataset.gallery, opts.data, opts.run, device, opts.model, "gallery")
    dist = torch.as_tensor(np.asarray(re_ranking_features(qf, gf, k1=20, k2=6, lambda_value=0.3)))
    r = rank_metrics(dist, np.array([x.pid for x in dataset.query]), np.array([x.pid for x in dataset.gallery]),
                     np.array([x.camid for x in dataset.query]), np.array([x.camid for x in dataset.gallery]))
    return {"mAP": float(r.mAP), "rank1": float(r.cmc[0]), "rank5": float(r.cmc[4]), "rank10": float(r.cmc[9])}

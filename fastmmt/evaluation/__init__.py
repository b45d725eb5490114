"""Re-ID evaluation: feature extraction, distances and mAP/CMC (Market-1501 protocol)."""
from fastmmt.evaluation.distance import pairwise_sq_euclidean
from fastmmt.evaluation.extract import extract_features
from fastmmt.evaluation.metrics import RankMetrics, evaluate_features, rank_metrics

__all__ = ["RankMetrics", "evaluate_features", "extract_features", "pairwise_sq_euclidean", "rank_metrics"]

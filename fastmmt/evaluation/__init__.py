"""Re-ID evaluation: feature extraction, distances, mAP/CMC (Market-1501 protocol), re-ranking,
rank-list pictures."""
from fastmmt.evaluation.clustering import pseudo_label_quality
from fastmmt.evaluation.distance import pairwise_sq_euclidean
from fastmmt.evaluation.extract import FeatureExtractor, extract_features, extract_features_of
from fastmmt.evaluation.metrics import RankMetrics, evaluate_features, rank_metrics
from fastmmt.evaluation.reranking import re_ranking
from fastmmt.evaluation.visualize import RankLayout, RankList, rank_lists, visualize_ranked_results

__all__ = ["FeatureExtractor", "RankLayout", "RankList", "RankMetrics", "evaluate_features", "extract_features",
           "extract_features_of",
           "pairwise_sq_euclidean", "pseudo_label_quality", "rank_lists", "rank_metrics", "re_ranking",
           "visualize_ranked_results"]

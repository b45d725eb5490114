"""Training stages: source pre-training, MMT (k-means / DBSCAN), the single-model baseline, the demo."""
from fastmmt.train.evaluate import evaluate_model_file, visualize_model_file
from fastmmt.train.mmt import adapt
from fastmmt.train.options import (
    AdaptOptions,
    DataOptions,
    ExperimentOptions,
    ModelOptions,
    PretrainOptions,
    RunOptions,
)
from fastmmt.train.model_file import StageResult, load_model_file, model_file
from fastmmt.train.pretrain import pretrain

__all__ = [
    "AdaptOptions", "DataOptions", "ExperimentOptions", "ModelOptions", "PretrainOptions", "RunOptions",
    "StageResult", "adapt", "evaluate_model_file", "load_model_file", "model_file", "pretrain",
    "visualize_model_file",
]

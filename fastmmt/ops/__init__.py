"""Fused MMT ops, usable alone by other re-ID code (imports nothing else of fastmmt).

Every op takes ``backend``: ``"auto"`` (Triton on CUDA or under ``TRITON_INTERPRET=1``, else
torch), ``"torch"`` (the reference in :mod:`fastmmt.ops.reference`) or ``"triton"``.
:mod:`fastmmt.ops.compat` holds the loss modules, with the signatures of MMT's own classes (also
exported here); the functions are fastmmt's own calls.
"""
from fastmmt.ops._dispatch import resolve_backend
from fastmmt.ops.ema import ema_update_, ema_update_module_
from fastmmt.ops.losses import (
    cross_entropy_label_smooth,
    logits_pair_losses,
    pairwise_euclidean,
    soft_entropy,
    soft_softmax_triplet_loss,
    softmax_triplet_loss,
    triplet_pair_losses,
)
from fastmmt.ops.compat import CrossEntropyLabelSmooth, SoftEntropy, SoftTripletLoss, TripletLoss
from fastmmt.ops.mmt_loss import MMTLossOutput, mmt_loss
from fastmmt.ops.modules import MMTLoss
from fastmmt.ops.memory import cluster_memory_loss, hybrid_memory_loss
from fastmmt.ops.memory_modules import ClusterMemory, HybridMemory

__all__ = [
    "ClusterMemory", "CrossEntropyLabelSmooth", "HybridMemory", "MMTLoss", "MMTLossOutput", "SoftEntropy", "SoftTripletLoss", "TripletLoss",
    "cluster_memory_loss", "cross_entropy_label_smooth", "ema_update_", "hybrid_memory_loss",
    "ema_update_module_",
    "logits_pair_losses", "mmt_loss", "pairwise_euclidean", "resolve_backend", "soft_entropy",
    "soft_softmax_triplet_loss", "softmax_triplet_loss", "triplet_pair_losses",
]

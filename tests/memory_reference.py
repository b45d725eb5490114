"""Plain transcriptions of the original memory modules and re-ranking Jaccard, written from reading
Cluster Contrast (clustercontrast/models/cm.py: CM, CM_Hard, ClusterMemory), SpCL
(spcl/models/hm.py: HM, HybridMemory) and their shared utils/faiss_rerank.py
(compute_jaccard_distance). Per-sample Python loops like the originals; the tests run them in
float64 on CPU as the reference. The only change: the Jaccard transcription takes the k-NN ranks
(``initial_rank``, N x k1) instead of running a FAISS search, so both sides see the same neighbours.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import autograd


def cm_update_ref(features, inputs, targets, momentum):
    """CM's update: per sample in batch order."""
    for x, y in zip(inputs, targets):
        features[y] = momentum * features[y] + (1.0 - momentum) * x
        features[y] /= features[y].norm()


def cm_hard_update_ref(features, inputs, targets, momentum):
    """CM_Hard's update: per cluster once, with its sample of the lowest similarity (np.argmin)."""
    batch_centers: dict[int, list[torch.Tensor]] = {}
    for feature, index in zip(inputs, targets.tolist()):
        batch_centers.setdefault(index, []).append(feature)
    for index, feats in batch_centers.items():
        distances = []
        for feature in feats:
            distances.append(feature.unsqueeze(0).mm(features[index].unsqueeze(0).t())[0][0].cpu().numpy())
        chosen = int(np.argmin(np.array(distances)))
        features[index] = features[index] * momentum + (1 - momentum) * feats[chosen]
        features[index] /= features[index].norm()


def _memory_product(update, doc: str) -> type[autograd.Function]:
    """The originals' CM / CM_Hard: ``inputs @ features^T``; backward ``grad @ features``, then
    ``update`` of the features in place (the two differ only there)."""

    class MemoryProduct(autograd.Function):
        @staticmethod
        def forward(ctx, inputs, targets, features, momentum):
            ctx.features = features
            ctx.momentum = momentum
            ctx.save_for_backward(inputs, targets)
            return inputs.mm(ctx.features.t())

        @staticmethod
        def backward(ctx, grad_outputs):
            inputs, targets = ctx.saved_tensors
            grad_inputs = grad_outputs.mm(ctx.features) if ctx.needs_input_grad[0] else None
            update(ctx.features, inputs, targets, ctx.momentum)
            return grad_inputs, None, None, None

    MemoryProduct.__doc__ = doc
    return MemoryProduct


CMRef = _memory_product(cm_update_ref, "inputs @ features^T; backward: grad @ features, then the per-sample "
                                       "momentum update.")
CMHardRef = _memory_product(cm_hard_update_ref, "As CMRef; the update: per cluster, once, with the sample of "
                                                "the lowest similarity.")


def cluster_memory_ref(inputs, targets, features, temp=0.05, momentum=0.2, use_hard=False):
    """ClusterMemory.forward: normalise, memory logits / temp, cross-entropy."""
    inputs = F.normalize(inputs, dim=1)
    fn = CMHardRef if use_hard else CMRef
    outputs = fn.apply(inputs, targets, features, momentum)
    outputs = outputs / temp
    return F.cross_entropy(outputs, targets)


def hybrid_memory_ref(inputs, indexes, features, labels, temp=0.05, momentum=0.2):
    """HybridMemory.forward: per-label mean of the logits, masked softmax, NLL with the epsilons."""
    inputs = CMRef.apply(inputs, indexes, features, momentum)  # HM is the same function as CM
    inputs = inputs / temp
    b = inputs.size(0)

    def masked_softmax(vec, mask, dim=1, epsilon=1e-6):
        exps = torch.exp(vec)
        masked_exps = exps * mask.to(vec.dtype).clone()
        masked_sums = masked_exps.sum(dim, keepdim=True) + epsilon
        return masked_exps / masked_sums

    targets = labels[indexes].clone()
    labels = labels.clone()
    num_samples = features.shape[0]
    sim = torch.zeros(int(labels.max()) + 1, b, dtype=inputs.dtype, device=inputs.device)
    sim.index_add_(0, labels, inputs.t().contiguous())
    nums = torch.zeros(int(labels.max()) + 1, 1, dtype=inputs.dtype, device=inputs.device)
    nums.index_add_(0, labels, torch.ones(num_samples, 1, dtype=inputs.dtype, device=inputs.device))
    mask = (nums > 0).to(inputs.dtype)
    sim = sim / (mask * nums + (1 - mask)).clone().expand_as(sim)
    mask = mask.expand_as(sim)
    masked_sim = masked_softmax(sim.t().contiguous(), mask.t().contiguous())
    return F.nll_loss(torch.log(masked_sim + 1e-6), targets)


def _k_reciprocal_neigh(initial_rank, i, k1):
    forward_k_neigh_index = initial_rank[i, :k1 + 1]
    backward_k_neigh_index = initial_rank[forward_k_neigh_index, :k1 + 1]
    fi = np.where(backward_k_neigh_index == i)[0]
    return forward_k_neigh_index[fi]


def jaccard_ref(target_features: torch.Tensor, initial_rank: np.ndarray, k1: int = 20, k2: int = 6,
                mat_type=np.float32) -> np.ndarray:
    """compute_jaccard_distance after its k-NN search (``initial_rank``: N x k1, self first)."""
    n = target_features.size(0)
    nn_k1, nn_k1_half = [], []
    for i in range(n):
        nn_k1.append(_k_reciprocal_neigh(initial_rank, i, k1))
        nn_k1_half.append(_k_reciprocal_neigh(initial_rank, i, int(np.around(k1 / 2))))
    v = np.zeros((n, n), dtype=mat_type)
    for i in range(n):
        k_reciprocal_index = nn_k1[i]
        expansion = k_reciprocal_index
        for candidate in k_reciprocal_index:
            cand_half = nn_k1_half[candidate]
            if len(np.intersect1d(cand_half, k_reciprocal_index)) > 2 / 3 * len(cand_half):
                expansion = np.append(expansion, cand_half)
        expansion = np.unique(expansion)
        dist = 2 - 2 * torch.mm(target_features[i].unsqueeze(0).contiguous(), target_features[expansion].t())
        v[i, expansion] = F.softmax(-dist, dim=1).view(-1).cpu().numpy().astype(mat_type)
    if k2 != 1:
        v_qe = np.zeros_like(v, dtype=mat_type)
        for i in range(n):
            v_qe[i, :] = np.mean(v[initial_rank[i, :k2], :], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, i] != 0)[0] for i in range(n)]
    jaccard_dist = np.zeros((n, n), dtype=mat_type)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=mat_type)
        ind_non_zero = np.where(v[i, :] != 0)[0]
        ind_images = [inv_index[ind] for ind in ind_non_zero]
        for j in range(len(ind_non_zero)):
            temp_min[0, ind_images[j]] = temp_min[0, ind_images[j]] + np.minimum(
                v[i, ind_non_zero[j]], v[ind_images[j], ind_non_zero[j]])
        jaccard_dist[i] = 1 - temp_min / (2 - temp_min)
    jaccard_dist[jaccard_dist < 0] = 0.0
    return jaccard_dist

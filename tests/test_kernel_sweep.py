"""The compute-sanitizer sweep calls every fused op forward and backward (interpreter on CPU)."""
from fastmmt.tools.kernel_sweep import sweep

OPS = ["pairwise_euclidean[self]", "pairwise_euclidean[cross]", "softmax_triplet_loss", "triplet_pair_losses",
       "cross_entropy_label_smooth", "soft_entropy", "logits_pair_losses", "cluster_memory_loss",
       "cluster_memory_loss[hard]", "hybrid_memory_loss"]


def test_sweep_covers_every_op_and_dtype(device):
    import torch

    done = sweep(n=9, d=5, k=7, device=device.type, dtypes=(torch.float32, torch.bfloat16))
    assert done == [f"{op}[{dt}]" for dt in ("float32", "bfloat16") for op in OPS]

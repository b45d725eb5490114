"""Triton kernels of the fused MMT losses (imported as ``fastmmt.kernels``).

- :mod:`fastmmt.kernels.distance`: the spec's Euclidean distance matrix, forward and backward.
- :mod:`fastmmt.kernels.triplet`: batch-hard mining + hard and teacher-guided soft softmax-triplet.
- :mod:`fastmmt.kernels.logits`: label-smoothed cross-entropy + soft entropy in one pass.
- :mod:`fastmmt.kernels.memory`: memory-bank cross-entropy (ClusterMemory) and the ordered update.

Importing triton needs a CUDA driver or ``TRITON_INTERPRET=1`` (CPU interpreter); the public,
autograd-aware entry points are in :mod:`fastmmt.ops.triton_ops`.
"""

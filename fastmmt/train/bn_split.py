"""BatchNorm statistics over sub-batches (``bn_split``): the reference's 4-GPU set-up on one device.

The reference trained with ``nn.DataParallel`` on 4 GPUs, 16 images each: every BN layer normalised
each 16-image chunk with that chunk's own statistics, and only replica 0's running-statistics update
survived (DataParallel re-broadcasts device 0's buffers every forward). :class:`SplitBatchNorm`
does the same on one device: chunk ``i`` is normalised with its own batch statistics and the
running statistics are updated from chunk 0 only. In eval mode it is an ordinary BatchNorm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d) whose training statistics are computed per chunk of ``split`` samples."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, split: int) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if split < 1:
            raise ValueError(f"bn_split must be >= 1, got {split}")
        self.split = split
        self._dim = 4 if isinstance(bn, nn.BatchNorm2d) else 2
        self.load_state_dict(bn.state_dict())
        if bn.affine:
            self.weight.requires_grad_(bn.weight.requires_grad)
            self.bias.requires_grad_(bn.bias.requires_grad)
        self.to(bn.weight.device if bn.affine else bn.running_mean.device)

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"SplitBatchNorm expects 2-4 dims, got {x.dim()}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.shape[0] <= self.split:
            return super().forward(x)
        chunks = x.split(self.split, 0)
        mom = 0.1 if self.momentum is None else self.momentum
        out = [F.batch_norm(chunks[0], self.running_mean, self.running_var, self.weight, self.bias,
                            True, mom, self.eps)]
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        out += [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks[1:]]
        return torch.cat(out, 0)


def convert_bn_split(module: nn.Module, split: int) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` (in place) by :class:`SplitBatchNorm`.

    ``split <= 0`` leaves the module unchanged. The state-dict keys stay the same, so checkpoints
    load either way.
    """
    if split <= 0:
        return module
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, SplitBatchNorm):
            setattr(module, name, SplitBatchNorm(child, split))
        else:
            convert_bn_split(child, split)
    return module

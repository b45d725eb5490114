"""BatchNorm statistics over sub-batches (``bn_split``): the reference's 4-GPU set-up on one device.

The reference trained with ``nn.DataParallel`` on 4 GPUs, 16 images each: every BN layer normalised
each 16-image chunk with that chunk's own statistics, and only replica 0's running-statistics update
survived (DataParallel re-broadcasts device 0's buffers every forward). :class:`SplitBatchNorm`
does the same on one device: chunk ``i`` is normalised with its own batch statistics and the
running statistics are updated from chunk 0 only. In eval mode it is an ordinary BatchNorm.

``fused=True`` (``run.fused_bn_split``) does this in one pass: the batch is viewed as (chunks,
split, ...), one ``var_mean`` gives every chunk's statistics, and one ``addcmul`` normalises the
whole batch with per-chunk scale and shift; its backward is autograd's through those ops.
``fused=False`` (the default) keeps the per-chunk loop of ``F.batch_norm`` calls and a
``torch.cat``, whose forward and backward are torch's native BN kernels: in eager mode on a CPU
the loop is the faster of the two (``bench/bench_bn_split.py``); the one-pass form launches a
fixed number of kernels whatever the number of chunks. The loop also runs when the batch is not a
multiple of ``split``. The two agree up to float32 rounding: the statistics are summed in another
order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SplitBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm (1d/2d) whose training statistics are computed per chunk of ``split`` samples."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, split: int, fused: bool = False) -> None:
        super().__init__(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        if split < 1:
            raise ValueError(f"bn_split must be >= 1, got {split}")
        self.split = split
        self.fused = fused
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
        mom = 0.1 if self.momentum is None else self.momentum
        if self.fused and x.shape[0] % self.split == 0:
            return self._forward_fused(x, mom)
        chunks = x.split(self.split, 0)
        out = [F.batch_norm(chunks[0], self.running_mean, self.running_var, self.weight, self.bias,
                            True, mom, self.eps)]
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        out += [F.batch_norm(c, None, None, self.weight, self.bias, True, 0.0, self.eps) for c in chunks[1:]]
        return torch.cat(out, 0)

    def _forward_fused(self, x: torch.Tensor, mom: float) -> torch.Tensor:
        """Every chunk's biased statistics from one ``var_mean``, one fused normalisation."""
        g, c = x.shape[0] // self.split, x.shape[1]
        xv = x.unflatten(0, (g, self.split))                      # (G, split, C, ...), a view
        xs = xv.float() if x.dtype in (torch.float16, torch.bfloat16) else xv
        dims = (1, *range(3, xv.dim()))                            # per chunk and channel
        var, mean = torch.var_mean(xs, dim=dims, correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.eps)
        shape = (1, 1, c) + (1,) * (xv.dim() - 3)
        if self.weight is not None:
            scale = scale * self.weight.view(shape)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(shape)
        out = torch.addcmul(shift, xs, scale).to(x.dtype).flatten(0, 1)
        if self.training and self.track_running_stats and self.running_mean is not None:
            n = xv[0].numel() // c                                 # values per channel in a chunk
            with torch.no_grad():                                  # chunk 0, as F.batch_norm does
                m0, v0 = mean[0].reshape(c), var[0].reshape(c) * (n / max(n - 1, 1))
                self.running_mean.mul_(1 - mom).add_(m0.to(self.running_mean.dtype), alpha=mom)
                self.running_var.mul_(1 - mom).add_(v0.to(self.running_var.dtype), alpha=mom)
            if self.num_batches_tracked is not None:
                self.num_batches_tracked.add_(1)
        return out


def convert_bn_split(module: nn.Module, split: int, fused: bool = False) -> nn.Module:
    """Replace every BatchNorm1d/2d in ``module`` (in place) by :class:`SplitBatchNorm`.

    ``split <= 0`` leaves the module unchanged. The state-dict keys stay the same, so checkpoints
    load either way. ``fused``: the one-pass forward (``run.fused_bn_split``).
    """
    if split <= 0:
        return module
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)) and not isinstance(child, SplitBatchNorm):
            setattr(module, name, SplitBatchNorm(child, split, fused))
        else:
            convert_bn_split(child, split, fused)
    return module

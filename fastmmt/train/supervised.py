"""The supervised losses of Stage I and of the single-model baseline: one forward of the batch's
first view, then label-smoothed cross-entropy and the hard softmax-triplet loss."""
from __future__ import annotations

import torch

from fastmmt.data.loaders import TrainBatch
from fastmmt.ops import cross_entropy_label_smooth, softmax_triplet_loss
from fastmmt.train import distributed as ddp
from fastmmt.train.batches import to_device
from fastmmt.train.runtime import autocast
from fastmmt.train.update import StepContext


def supervised_losses(sc: StepContext, batch: TrainBatch,
                      epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, labels, ce, tri)`` of ``sc.nets[0]`` on ``batch`` (gathered over ranks under
    torchrun); ``epsilon``: the label smoothing. Reads nothing on the host unless
    ``run.sync_each_step`` (then the labels' range is checked)."""
    m, r = sc.opts.model, sc.opts.run
    device = sc.rt.device
    x = to_device(batch.views[0], device, m.channels_last)
    y = batch.labels.to(device, non_blocking=True)
    with autocast(device, r.amp):
        f, logits = sc.nets[0](x)
        f, logits, y = ddp.gather_batch(sc.rt.ctx, f, logits, y)
        ce = cross_entropy_label_smooth(logits, y, epsilon, backend=r.loss_backend, check_labels=r.sync_each_step)
        tri = softmax_triplet_loss(f, y, backend=r.loss_backend)
    return logits, y, ce, tri

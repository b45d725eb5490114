"""``run.compile``: the backbones compiled with torch.compile (CPU, inductor) compute what the
eager network computes, forward and backward, and keep their parameter names."""
import copy

import pytest
import torch

from fastmmt.models.factory import compile_backbones, make_model
from fastmmt.train.options import ModelOptions


@pytest.mark.slow  # inductor compiles forward and backward: minutes on a loaded 2-core CPU
def test_compiled_backbone_matches_eager(gen):
    torch.manual_seed(0)
    eager = make_model(ModelOptions(arch="resnet18", base_width=8), 5, torch.device("cpu"), bn_split=4)
    compiled = copy.deepcopy(eager)
    keys = list(compiled.state_dict())
    compile_backbones([compiled])
    assert list(compiled.state_dict()) == keys  # checkpoints and the EMA pairing see the same names
    assert compiled.backbone._compiled_call_impl is not None and eager.backbone._compiled_call_impl is None
    x = torch.randn(8, 3, 32, 16, generator=gen)
    w = torch.randn(8, 5, generator=gen)
    outs = []
    for net in (eager, compiled):
        net.train()
        f, p = net(x)
        ((p * w).sum() + f.square().mean()).backward()
        outs.append((f.detach(), p.detach(), {n: q.grad.clone() for n, q in net.named_parameters() if q.requires_grad}))
    (fe, pe, ge), (fc, pc, gc) = outs
    # Compiled and eager code sum in different orders. An element's float32 error scales with the
    # terms summed into it, not with the element (an entry near 0 is a cancellation of large
    # terms: a fixed rtol failed the classifier gradient on some seeds), so each tensor is
    # compared against a fraction of its largest entry: 1e-4 for the outputs, 1e-3 for the
    # gradients (the backward chains ~20 layers more); the worst seen was 5e-6 and 2e-5.
    def close(got: torch.Tensor, want: torch.Tensor, frac: float, what: str) -> None:
        err, scale = float((got - want).abs().max()), float(want.abs().max())
        assert err <= frac * scale, f"{what}: off by {err:.3g}, over {frac:g} of its largest entry {scale:.3g}"

    close(fc, fe, 1e-4, "features")
    close(pc, pe, 1e-4, "logits")
    assert len(ge) > 20
    for n in ge:
        close(gc[n], ge[n], 1e-3, n)
    # BN running statistics are updated by the compiled forward as by the eager one
    torch.testing.assert_close(compiled.state_dict()["backbone.bn1.running_mean"],
                               eager.state_dict()["backbone.bn1.running_mean"], rtol=1e-5, atol=1e-6)

"""``run.compile``: the backbones compiled with torch.compile (CPU, inductor) compute what the
eager network computes, forward and backward, and keep their parameter names."""
import copy

import pytest
import torch

from fastmmt.train.common import compile_backbones, make_model
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
    torch.testing.assert_close(fc, fe, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pc, pe, rtol=1e-4, atol=1e-5)
    assert len(ge) > 20
    for n in ge:
        torch.testing.assert_close(gc[n], ge[n], rtol=1e-3, atol=1e-5, msg=n)
    # BN running statistics are updated by the compiled forward as by the eager one
    torch.testing.assert_close(compiled.state_dict()["backbone.bn1.running_mean"],
                               eager.state_dict()["backbone.bn1.running_mean"], rtol=1e-5, atol=1e-6)

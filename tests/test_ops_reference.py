"""The plain-torch reference ops against independent float64 loop implementations."""
import math

import pytest
import torch
import torch.nn.functional as F

from fastmmt import ops


def _seed(request) -> torch.Generator:
    g = torch.Generator().manual_seed(abs(hash(request.node.name)) % (2**31))
    return g


def loop_dist(a: torch.Tensor, b: torch.Tensor, i: int, j: int, same: bool) -> torch.Tensor:
    """Spec distance between a[i] and b[j]; exactly sqrt(1e-12) on the self-diagonal."""
    if same and i == j:
        return torch.tensor(1e-6, dtype=torch.float64)
    d2 = a[i].pow(2).sum() + b[j].pow(2).sum() - 2 * (a[i] * b[j]).sum()
    return d2.clamp(min=1e-12).sqrt()


def loop_mine(f: torch.Tensor, y: torch.Tensor):
    """Per-row batch-hard mining with lowest-index tie breaking, by explicit loops."""
    n = f.shape[0]
    out = []
    for i in range(n):
        dists = [loop_dist(f, f, i, j, True).item() for j in range(n)]
        pos = [j for j in range(n) if y[j] == y[i]]
        neg = [j for j in range(n) if y[j] != y[i]]
        ap = max(pos, key=lambda j: (dists[j], -j))
        an = min(neg, key=lambda j: (dists[j], j)) if neg else None
        out.append((ap, an))
    return out


def loop_triplets(f: torch.Tensor, t: torch.Tensor, y: torch.Tensor):
    """(hard, soft) softmax-triplet terms of the spec, float64, one row at a time."""
    mined = loop_mine(f.detach(), y)
    hard, soft = [], []
    for i, (ap, an) in enumerate(mined):
        if an is None:
            hard.append(f.sum() * 0)
            soft.append(f.sum() * 0)
            continue
        d_ap, d_an = loop_dist(f, f, i, ap, True), loop_dist(f, f, i, an, True)
        hard.append(torch.log1p(torch.exp(d_ap - d_an)))
        t_ap, t_an = loop_dist(t, t, i, ap, True), loop_dist(t, t, i, an, True)
        w = torch.softmax(torch.stack([t_ap, t_an]), 0)
        lp = torch.log_softmax(torch.stack([d_ap, d_an]), 0)
        soft.append(-(w * lp).sum())
    return torch.stack(hard).mean(), torch.stack(soft).mean()


def make_case(kind: str, n: int, d: int, g: torch.Generator):
    f = torch.randn(n, d, generator=g, dtype=torch.float64)
    t = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "pk":
        y = torch.arange(n) // 2
    elif kind == "distinct":
        y = torch.arange(n)
    elif kind == "one_id":
        y = torch.zeros(n, dtype=torch.long)
    elif kind == "ties":  # duplicated rows and integer features: many equal distances
        f = torch.randint(-2, 3, (n, d), generator=g).double()
        f[1] = f[0]
        y = torch.arange(n) % 3
    else:
        raise ValueError(kind)
    return f, t, y


CASES = [("pk", 8, 5), ("pk", 6, 3), ("distinct", 5, 4), ("one_id", 4, 3), ("ties", 9, 3), ("pk", 13, 17)]


@pytest.mark.parametrize("kind,n,d", CASES)
def test_triplet_terms_match_loop_reference(kind, n, d, request):
    f, t, y = make_case(kind, n, d, _seed(request))
    f_ref = f.clone().requires_grad_(True)
    hard_ref, soft_ref = loop_triplets(f_ref, t, y)
    (hard_ref + 2 * soft_ref).backward()

    f_op = f.clone().requires_grad_(True)
    hard, soft = ops.triplet_pair_losses(f_op, t, y, backend="torch")
    (hard + 2 * soft).backward()
    torch.testing.assert_close(hard, hard_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(soft, soft_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f_op.grad, f_ref.grad, rtol=1e-9, atol=1e-12)

    # the single-term public ops agree with the shared-mining pair
    torch.testing.assert_close(ops.softmax_triplet_loss(f, y, backend="torch"), hard_ref.detach())
    torch.testing.assert_close(ops.soft_softmax_triplet_loss(f, t, y, backend="torch"), soft_ref.detach())


def test_mining_tie_rule_lowest_index():
    # anchor 0; columns 1 and 2 are both positives at equal distance, 3 and 4 equal negatives
    f = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 0, 1, 1])
    from fastmmt.ops.reference import batch_hard_mining, pairwise_euclidean

    m = batch_hard_mining(pairwise_euclidean(f), y)
    assert m.ap_idx[0].item() == 1 and m.an_idx[0].item() == 3


def test_hand_computed_triplet():
    # 1-D features: x = [0, 1, 3, 7], labels [0, 0, 1, 1]
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1])
    # row0: ap=1 (d=1), an=2 (d=3); row1: ap=0 (1), an=2 (2); row2: ap=3 (4), an=1 (2); row3: ap=2 (4), an=1 (6)
    expected = sum(math.log1p(math.exp(a - b)) for a, b in [(1, 3), (1, 2), (4, 2), (4, 6)]) / 4
    assert ops.softmax_triplet_loss(f, y, backend="torch").item() == pytest.approx(expected, rel=1e-12)


def test_only_self_positive_has_zero_gradient_on_diagonal():
    f = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.arange(5)  # every anchor's hardest positive is itself
    loss = ops.softmax_triplet_loss(f, y, backend="torch")
    d_an = torch.cdist(f.detach(), f.detach()).fill_diagonal_(float("inf")).min(1).values
    expected = F.softplus(torch.full_like(d_an, 1e-6) - d_an).mean()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert torch.isfinite(f.grad).all()


def test_single_identity_gives_zero_triplet():
    f = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(4, dtype=torch.long)
    hard, soft = ops.triplet_pair_losses(f, torch.randn(4, 3, dtype=torch.float64), y, backend="torch")
    assert hard.item() == 0.0 and soft.item() == 0.0
    (hard + soft).backward()
    assert torch.count_nonzero(f.grad) == 0


def test_pairwise_euclidean_matches_cdist(request):
    g = _seed(request)
    x, y = torch.randn(7, 9, generator=g, dtype=torch.float64), torch.randn(5, 9, generator=g, dtype=torch.float64)
    torch.testing.assert_close(ops.pairwise_euclidean(x, y, backend="torch"), torch.cdist(x, y))
    dxx = ops.pairwise_euclidean(x, backend="torch")
    off = ~torch.eye(7, dtype=torch.bool)
    torch.testing.assert_close(dxx[off], torch.cdist(x, x)[off])
    assert torch.all(dxx.diagonal() == 1e-6)


@pytest.mark.parametrize("n,k,eps", [(6, 5, 0.1), (3, 11, 0.0), (8, 2, 0.3)])
def test_label_smoothed_ce_and_soft_entropy(n, k, eps, request):
    g = _seed(request)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(n, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    ce = ops.cross_entropy_label_smooth(logits, y, eps, backend="torch")
    ref = F.cross_entropy(logits, y, label_smoothing=eps)
    torch.testing.assert_close(ce, ref)
    # hand-rolled per-row loops
    rows = []
    for i in range(n):
        lse = torch.logsumexp(logits[i], 0)
        target = torch.full((k,), eps / k, dtype=torch.float64)
        target[y[i]] += 1 - eps
        rows.append(-(target * (logits[i] - lse)).sum())
    torch.testing.assert_close(ce, torch.stack(rows).mean())
    g1 = torch.autograd.grad(ce, logits)[0]
    g2 = torch.autograd.grad(torch.stack(rows).mean(), logits)[0]
    torch.testing.assert_close(g1, g2)

    se = ops.soft_entropy(logits, teacher, backend="torch")
    p = torch.softmax(teacher, 1)
    ref_se = sum(-(p[i] * torch.log_softmax(logits[i], 0)).sum() for i in range(n)) / n
    torch.testing.assert_close(se, ref_se)
    # gradient of soft entropy wrt student logits: (softmax(s) - p) / n; teacher gets none
    t_req = teacher.clone().requires_grad_(True)
    gs, gt = torch.autograd.grad(ops.soft_entropy(logits, t_req, backend="torch"), (logits, t_req), allow_unused=True)
    torch.testing.assert_close(gs, (torch.softmax(logits, 1) - p).detach() / n)
    assert gt is None or torch.count_nonzero(gt) == 0


def test_mmt_loss_combines_terms_with_cross_supervision(request):
    g = _seed(request)
    n, d, k = 8, 6, 4
    f1, f2, f1t, f2t = (torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(4))
    p1, p2, p1t, p2t = (torch.randn(n, k, generator=g, dtype=torch.float64) for _ in range(4))
    y = torch.arange(n) // 2
    out = ops.mmt_loss(f1, f2, f1t, f2t, p1, p2, p1t, p2t, y, 0.5, 0.8, backend="torch")
    h1, s1 = loop_triplets(f1, f2t, y)   # S1 learns from T2
    h2, s2 = loop_triplets(f2, f1t, y)   # S2 learns from T1
    ce = F.cross_entropy(p1, y, label_smoothing=0.1) + F.cross_entropy(p2, y, label_smoothing=0.1)
    se = ops.soft_entropy(p1, p2t, backend="torch") + ops.soft_entropy(p2, p1t, backend="torch")
    torch.testing.assert_close(out.tri, h1 + h2)
    torch.testing.assert_close(out.soft_tri, s1 + s2)
    torch.testing.assert_close(out.ce, ce)
    torch.testing.assert_close(out.soft_ce, se)
    torch.testing.assert_close(out.total, 0.5 * ce + 0.2 * (h1 + h2) + 0.5 * se + 0.8 * (s1 + s2))


def test_fp32_and_half_inputs_compute_in_fp32(request):
    g = _seed(request)
    f = torch.randn(8, 16, generator=g)
    y = torch.arange(8) // 2
    ref = ops.softmax_triplet_loss(f.double(), y, backend="torch")
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        x = f.to(dt)
        out = ops.softmax_triplet_loss(x, y, backend="torch")
        assert out.dtype == torch.float32
        ref_dt = ops.softmax_triplet_loss(x.double(), y, backend="torch")
        torch.testing.assert_close(out.double(), ref_dt, rtol=1e-5, atol=1e-5)
    assert torch.isclose(ops.softmax_triplet_loss(f, y, backend="torch").double(), ref, rtol=1e-5)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown backend"):
        ops.softmax_triplet_loss(torch.randn(4, 3), torch.arange(4), backend="cuda-magic")

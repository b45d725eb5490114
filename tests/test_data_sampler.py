"""IdentitySampler: P x K structure, camera preference, singleton fix, determinism; BatchPlanner:
the epoch stream, augmentation seeds and rank shares."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fastmmt.data import IdentitySampler
from fastmmt.data.sampler import BatchPlanner


def _toy():
    # pid 0: 3 cams x 3 images; pid 1: one camera, 3 images; pid 2: singleton;
    # pid 3: 2 images on cam 0 + 1 on cam 1; pid -1: outliers (excluded)
    pids = [0] * 9 + [1] * 3 + [2] + [3] * 3 + [-1] * 4
    cams = [0, 0, 0, 1, 1, 1, 2, 2, 2] + [4] * 3 + [0] + [0, 0, 1] + [0, 1, 2, 3]
    return np.array(pids), np.array(cams)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_runs_of_k_per_identity(k):
    pids, cams = _toy()
    s = IdentitySampler(pids, cams, num_instances=k, seed=3)
    for epoch in range(5):
        s.set_epoch(epoch)
        idx = np.fromiter(iter(s), np.int64)
        assert len(idx) == len(s) == 4 * k
        runs = pids[idx].reshape(-1, k)
        assert (runs == runs[:, :1]).all()                            # a run shares its identity
        assert sorted(runs[:, 0].tolist()) == [0, 1, 2, 3]            # each identity exactly once
        assert (pids[idx] >= 0).all()


def test_cross_camera_preference_and_fallbacks():
    pids, cams = _toy()
    s = IdentitySampler(pids, cams, num_instances=4, seed=0)
    for p in range(30):
        run = {int(pids[r[0]]): r for r in s.order(0, p).reshape(-1, 4)}
        a, rest = run[0][0], run[0][1:]
        # pid 0 has 6 images on other cameras: 3 distinct images, none on the anchor's camera
        assert (cams[rest] != cams[a]).all() and len(set(rest.tolist())) == 3
        # pid 1 has one camera: the other two images, drawn with replacement, never the anchor
        assert run[1][0] not in run[1][1:] and set(run[1][1:].tolist()) <= set(range(9, 12))
        # singleton: its only image K times
        assert run[2].tolist() == [12] * 4
        # pid 3: anchor on cam 0 -> all three from cam 1 (image 15); anchor 15 -> images 13, 14
        if run[3][0] == 15:
            assert set(run[3][1:].tolist()) <= {13, 14}
        else:
            assert run[3][1:].tolist() == [15, 15, 15]


def test_without_replacement_only_from_k_candidates():
    # The official sampler's threshold: K-1 draws without replacement only when there are at least
    # K candidates. pid 0: anchor on cam 0 has exactly 3 = K-1 images on other cameras (cam 1);
    # pid 1 (one camera): 4 = K other images; pid 2 (one camera): exactly 3 = K-1 other images.
    pids = np.array([0, 0, 0, 0] + [1] * 5 + [2] * 4)
    cams = np.array([0, 1, 1, 1] + [3] * 5 + [4] * 4)
    s = IdentitySampler(pids, cams, num_instances=4, seed=0)
    repeats, seen = Counter(), Counter()
    for p in range(300):
        for run in s.order(0, p).reshape(-1, 4):
            pid, a, rest = int(pids[run[0]]), int(run[0]), run[1:].tolist()
            assert a not in rest  # the anchor itself is never drawn again
            if pid == 0 and a != 0:
                continue  # anchor on cam 1: image 0 is the only other-camera image
            if pid == 0:
                assert set(rest) <= {1, 2, 3}
            seen[pid] += 1
            repeats[pid] += len(set(rest)) < 3
    assert repeats[1] == 0 and seen[1] == 300  # 4 candidates: without replacement, never a repeat
    # 3 candidates, with replacement: all distinct with probability 3!/3^3 = 2/9 only
    assert repeats[0] > seen[0] / 2 and repeats[2] > seen[2] / 2


def test_anchor_and_order_are_random_but_deterministic():
    pids, cams = _toy()
    s = IdentitySampler(pids, cams, num_instances=4, seed=7)
    s.set_epoch(2)
    first, second = list(s), list(s)          # each iter() is the next pass
    assert first == s.order(2, 0).tolist() and second == s.order(2, 1).tolist()
    s.set_epoch(2)
    assert list(s) == first                   # set_epoch restarts the passes
    again = IdentitySampler(list(pids), list(cams), num_instances=4, seed=7)
    assert again.order(2, 0).tolist() == first
    assert IdentitySampler(pids, cams, 4, seed=8).order(2, 0).tolist() != first
    # identity order and anchors vary over passes: every identity leads a pass at some point,
    # and every image of pid 0 serves as its anchor
    leads, anchors = Counter(), Counter()
    for p in range(200):
        o = s.order(0, p).reshape(-1, 4)
        leads[int(pids[o[0, 0]])] += 1
        anchors.update(int(r[0]) for r in o if pids[r[0]] == 0)
    assert set(leads) == {0, 1, 2, 3} and set(anchors) == set(range(9))


def test_bad_input():
    with pytest.raises(ValueError, match="equal length"):
        IdentitySampler([0, 1], [0], 4)
    with pytest.raises(ValueError, match="no identity"):
        IdentitySampler([-1, -1], [0, 1], 4)
    with pytest.raises(ValueError, match="num_instances"):
        IdentitySampler([0], [0], 0)


def _planner_toy():
    # 10 identities x 5 images over 3 cameras, plus a singleton identity 10 and outliers (-1)
    pids = np.array([p for p in range(10) for _ in range(5)] + [10] + [-1] * 3)
    cams = np.array([j % 3 for _ in range(10) for j in range(5)] + [1] + [0, 1, 2])
    return pids, cams


def test_planner_stream_is_sampler_passes_cut_to_whole_batches():
    pids, cams = _planner_toy()
    planner = BatchPlanner(pids, cams, batch_size=16, num_instances=4, seed=5)
    # 11 identities x 4 = 44 per pass -> 2 whole batches of 16; the remainder 12 is dropped
    plan = planner.global_plan(3, 5)
    assert plan.indices.shape == plan.seeds.shape == (5, 16)
    sampler = IdentitySampler(pids, cams, 4, seed=5)
    want = np.concatenate([sampler.order(3, r)[:32] for r in range(3)])[:80]
    np.testing.assert_array_equal(plan.indices.reshape(-1), want)
    runs = pids[plan.indices].reshape(5, 4, 4)
    assert (runs == runs[..., :1]).all() and (runs >= 0).all()
    single = np.flatnonzero(pids == 10)[0]  # the singleton rule: K copies of its only image
    flat = plan.indices.reshape(-1, 4)
    assert all((row == single).all() for row in flat if single in row)
    # seeds: distinct, a pure function of (seed, epoch, position)
    assert len(np.unique(plan.seeds)) == plan.seeds.size and (plan.seeds >= 0).all()
    again = BatchPlanner(pids.tolist(), cams.tolist(), batch_size=16, num_instances=4, seed=5).global_plan(3, 5)
    assert np.array_equal(again.indices, plan.indices) and np.array_equal(again.seeds, plan.seeds)
    np.testing.assert_array_equal(planner.global_plan(3, 2).seeds, plan.seeds[:2])
    other = planner.global_plan(4, 5)
    assert not np.array_equal(other.indices, plan.indices) and not np.isin(other.seeds, plan.seeds).any()
    assert planner.global_plan(3, 0).indices.shape == (0, 16)


@pytest.mark.parametrize("world", [2, 4])
def test_planner_rank_shares_are_disjoint_whole_identities(world):
    pids, cams = _planner_toy()
    full = BatchPlanner(pids, cams, batch_size=16, num_instances=4, seed=1).global_plan(2, 4)
    shares = [BatchPlanner(pids, cams, batch_size=16, num_instances=4, seed=1, rank=r, world_size=world)
              for r in range(world)]
    assert all(s.share_size == 16 // world for s in shares)
    plans = [s.plan(2, 4) for s in shares]
    np.testing.assert_array_equal(np.concatenate([p.indices for p in plans], axis=1), full.indices)
    np.testing.assert_array_equal(np.concatenate([p.seeds for p in plans], axis=1), full.seeds)
    for b in range(4):
        ids = [set(pids[p.indices[b]].tolist()) for p in plans]
        assert all(len(i) == 4 // world for i in ids)
        assert sum(len(i) for i in ids) == len(set().union(*ids))  # disjoint across ranks


def test_planner_labels_and_arguments():
    pids, cams = _planner_toy()
    planner = BatchPlanner(pids, cams, batch_size=8, num_instances=4)
    merged = np.where(pids >= 0, pids // 2, -1)
    planner.set_labels(merged)
    idx = planner.global_plan(0, 3).indices
    assert (merged[idx] >= 0).all() and np.array_equal(planner.labels, merged)
    with pytest.raises(ValueError, match=r"shape \(54,\)"):
        planner.set_labels(pids[:10])
    with pytest.raises(ValueError, match="only 1 labelled identities"):
        planner.set_labels(np.where(pids == 3, 3, -1))
    with pytest.raises(ValueError, match="multiple of num_instances"):
        BatchPlanner(pids, cams, batch_size=10, num_instances=4)
    with pytest.raises(ValueError, match="whole identities over 3 ranks"):
        BatchPlanner(pids, cams, batch_size=16, num_instances=4, rank=0, world_size=3)
    with pytest.raises(ValueError, match="iters"):
        planner.plan(0, -1)

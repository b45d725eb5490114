"""IdentitySampler: P x K structure, camera preference, singleton fix, determinism."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from fastmmt.data import IdentitySampler


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

"""bench/fidelity/side_by_side.py's table: a run's two teachers reduced to their mean or to the
better one (the official per-epoch figure), the official seeds' range and where fastmmt lies."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "fidelity" / "side_by_side.py"


@pytest.fixture(scope="module")
def sbs():
    spec = importlib.util.spec_from_file_location("side_by_side", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# one epoch, two seeds per side, [T1, T2] mAP per run: fastmmt's teachers spread more, so it lies
# below the official range on the teachers' mean and above it on the better teacher
RESULTS = {"official": {1: [[0.10, 0.10]], 2: [[0.11, 0.11]]},
           "fastmmt": {1: [[0.06, 0.12]], 2: [[0.07, 0.11]]}}


def _row(text: str) -> list[str]:
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["epoch", "official"]
    assert len(lines) == 2
    return lines[1].split()


def test_table_mean_of_the_teachers(sbs):
    # official runs 10, 11 -> 10.50 +- 0.71, range 10-11; fastmmt 9, 9 -> 9.00 +- 0;
    # z = -1.5 / sqrt(0.5 / 2) = -3
    assert _row(sbs.table(RESULTS, 1, "mean")) == ["0", "10.50", "+-", "0.71", "(2)", "10.00-11.00", "9.00", "+-",
                                                    "0.00", "(2)", "-1.50", "-3.00", "below"]


def test_table_best_of_the_teachers(sbs):
    # official 10, 11 as before; fastmmt 12, 11 -> 11.50 +- 0.71; z = 1 / sqrt(0.25 + 0.25) = 1.41
    assert _row(sbs.table(RESULTS, 1, "best")) == ["0", "10.50", "+-", "0.71", "(2)", "10.00-11.00", "11.50", "+-",
                                                    "0.71", "(2)", "+1.00", "1.41", "above"]


def test_table_a_mean_on_the_range_edge_is_in(sbs):
    res = {"official": {1: [[0.10, 0.10]], 2: [[0.12, 0.12]]}, "fastmmt": {1: [[0.12, 0.12]]}}
    assert _row(sbs.table(res, 1, "mean"))[-1] == "in"

"""bench/fidelity/side_by_side.py's table: a run's two teachers reduced to their mean or to the
better one (the official per-epoch figure), the official seeds' range and where fastmmt lies."""
from __future__ import annotations

import importlib.util
import json
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


def test_official_losses_read_the_epoch_lines_and_sum_the_students(sbs, tmp_path):
    # the official trainer's line format (tab-separated); mid-epoch lines are not epoch averages
    line = ("Epoch: [{e}][{i}/20]\tTime 1.6 (1.6)\tData 0.03 (0.03)\tLoss_ce {a} / {b}\tLoss_tri {c} / {d}\t"
            "Loss_ce_soft {s}\tLoss_tri_soft {t}\tPrec 0.47% / 0.63%\t")
    (tmp_path / "log.txt").write_text("\n".join([
        "==> Create pseudo labels for unlabeled data",
        line.format(e=0, i=10, a=9.0, b=9.0, c=9.0, d=9.0, s=9.0, t=9.0),
        line.format(e=0, i=20, a=4.755, b=4.722, c=1.462, d=1.289, s=9.541, t=1.679),
        " * Finished epoch   0  model no.1 mAP: 6.6%  model no.2 mAP: 7.0%  best: 7.0%",
        line.format(e=1, i=20, a=4.5, b=4.25, c=1.5, d=1.25, s=9.125, t=1.75)]) + "\n")
    got = sbs.official_losses(tmp_path)
    assert got == [pytest.approx({"ce": 9.477, "tri": 2.751, "soft_ce": 9.541, "soft_tri": 1.679}),
                   pytest.approx({"ce": 8.75, "tri": 2.75, "soft_ce": 9.125, "soft_tri": 1.75})]


def test_fastmmt_losses_read_the_epoch_records_in_epoch_order(sbs, tmp_path):
    (tmp_path / "kmeans").mkdir()
    rec = lambda e, x: {"stage": "kmeans", "epoch": e, "loss_ce": x, "loss_tri": x + 1, "loss_soft_ce": x + 2,
                        "loss_soft_tri": x + 3, "mAP": 0.1}
    lines = [{"event": "start"}, rec(1, 20.0), rec(0, 10.0), {**rec(1, 99.0), "final": True}]
    (tmp_path / "kmeans" / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert sbs.fastmmt_losses(tmp_path) == [{"ce": 10.0, "tri": 11.0, "soft_ce": 12.0, "soft_tri": 13.0},
                                            {"ce": 20.0, "tri": 21.0, "soft_ce": 22.0, "soft_tri": 23.0}]


def test_loss_table_row(sbs):
    run = lambda x: [{"ce": x, "tri": x, "soft_ce": x, "soft_tri": x}]
    losses = {"official": {1: run(9.0), 2: run(9.2)}, "fastmmt": {1: run(9.3), 2: run(9.3)}}
    rows = [r.split() for r in sbs.loss_table(losses, 1).splitlines()[1:]]
    # official 9.1 +- 0.141, fastmmt 9.3 +- 0; z = 0.2 / sqrt(0.02 / 2) = 2
    assert [r[0] for r in rows] == list(sbs.LOSSES)
    assert rows[0] == ["ce", "0", "9.100", "+-", "0.14", "9.300", "+-", "0.00", "+0.200", "2.00"]


def test_teacher_spread_and_its_permutation_p(sbs):
    # per run mean |T1 - T2| in mAP %: official 1 and 1, fastmmt 3 and 3 (epochs 2 and 4 -> 3);
    # of the 6 ways to pick 2 of the 4 runs, only fastmmt's own pair gives a difference >= +2
    res = {"official": {1: [[0.10, 0.11]], 2: [[0.12, 0.11]]},
           "fastmmt": {1: [[0.10, 0.13]], 2: [[0.10, 0.12], [0.10, 0.14]]}}
    lines = sbs.teacher_spread(res).splitlines()
    assert lines[0].split() == ["official:", "1.00", "1.00", "mean", "1.00"]
    assert lines[1].split() == ["fastmmt:", "3.00", "3.00", "mean", "3.00"]
    assert lines[2] == "fastmmt - official +2.00, permutation p (fastmmt larger) 0.167"


def _runs(*per_epoch: float) -> list[list[float]]:
    return [[v / 100, v / 100] for v in per_epoch]  # both teachers alike: mean = best


def test_range_bar_by_chance_one_epoch(sbs):
    # official 10, 11; fastmmt 12, 13 (mean 12.5: outside). Of the 6 ways to call 2 of the 4 runs
    # fastmmt's, {10, 11} against 12-13 and {12, 13} against 10-11 are outside, the 4 mixed ones in
    res = {"official": {1: _runs(10), 2: _runs(11)}, "fastmmt": {1: _runs(12), 2: _runs(13)}}
    assert sbs.range_bar_by_chance(res, 1, "mean") == ("mean: 1 of 1 epochs outside; over the 6 relabellings, "
                                                        "0.33 put 1 or more outside, 0.33 put 1 or more")


def test_range_bar_by_chance_two_epochs(sbs):
    # runs o1 10,5  o2 11,9  f1 12,6  f2 13,7: as labelled, epoch 0 is outside, epoch 1 in (6.5 in 5-9).
    # Relabelled: {o1,o2} 1 out (epoch 0), {o1,f1} 1 (5.5 < 7), {o1,f2} 0, {o2,f1} 1 (7.5 > 7),
    # {o2,f2} 1 (8 > 6), {f1,f2} 1: 5 of 6 have one epoch outside, none two
    res = {"official": {1: _runs(10, 5), 2: _runs(11, 9)}, "fastmmt": {1: _runs(12, 6), 2: _runs(13, 7)}}
    assert sbs.range_bar_by_chance(res, 2, "best") == ("best: 1 of 2 epochs outside; over the 6 relabellings, "
                                                        "0.83 put 1 or more outside, 0.83 put 1 or more")
    assert sbs.epochs_outside([[10, 5], [11, 9]], [[12, 6], [13, 7]]) == 1
    assert sbs.epochs_outside([[12, 6], [13, 7]], [[10, 5], [11, 9]]) == 1
    assert sbs.epochs_outside([[10, 5], [12, 6]], [[11, 9], [13, 7]]) == 1


def test_range_bar_by_chance_needs_runs(sbs):
    res = {"official": {1: _runs(10)}, "fastmmt": {1: _runs(12)}}
    assert sbs.range_bar_by_chance(res, 1) == "mean: needs 2 official runs and 1 fastmmt run of 1 epochs"


def _flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


def test_paper_shape_commands(sbs, tmp_path, monkeypatch):
    """--paper (the GPU run, not executed here): both sides get the paper's shape and schedule,
    and the same values wherever both take one."""
    args = sbs.parse_args(["--official", "MMT", "--paper", "--kmeans", "faiss"])
    assert (args.height, args.width, args.batch, args.k, args.epochs, args.iters) == (256, 128, 64, 500, 40, 400)
    assert (args.lr, args.alpha, args.pre_epochs, args.pre_milestones) == (3.5e-4, 0.999, 80, [40, 70])
    seen = []

    def fake_run(cmd, log, env=None):  # record the command; leave what the code would have written
        seen.append(cmd)
        out = log.parent
        out.mkdir(parents=True, exist_ok=True)
        if "examples/mmt_train_kmeans.py" in cmd:
            (out / "evals.jsonl").write_text("".join(json.dumps({"mAP": 0.1 * (i % 2 + 1)}) + "\n" for i in range(81)))
        else:
            (out / "kmeans").mkdir(parents=True)
            (out / "kmeans" / "log.jsonl").write_text(
                "".join(json.dumps({"epoch": e, "mAP": 0.1, "T2_mAP": 0.2}) + "\n" for e in range(40)))

    monkeypatch.setattr(sbs, "run", fake_run)
    inits = [tmp_path / "a.pth.tar", tmp_path / "b.pth.tar"]
    official = sbs.official_mmt(args, tmp_path / "data", inits, tmp_path / "off", 3)
    fast = sbs.fastmmt_mmt(args, tmp_path / "data", inits, tmp_path / "fm", 3)
    assert official == [[0.1, 0.2]] * 40 and fast == [[0.1, 0.2]] * 40
    off_cmd, fm_cmd = seen
    sets = dict(s.split("=", 1) for s in fm_cmd[fm_cmd.index("--no-progress") + 1:] if s != "--set")
    pairs = {"--height": "data.height", "--width": "data.width", "-b": "data.batch_size",
             "--num-instances": "data.num_instances", "--num-clusters": "adapt.k", "--epochs": "adapt.epochs",
             "--iters": "adapt.iters", "--lr": "adapt.lr", "--alpha": "adapt.ema_alpha", "--seed": "run.seed"}
    for flag, key in pairs.items():
        assert float(_flag(off_cmd, flag)) == float(sets[key]), (flag, key)
    assert _flag(off_cmd, "-a") == sets["model.arch"] == "resnet50"
    assert (sets["adapt.cluster_backend"], sets["adapt.kmeans_restarts"], sets["adapt.kmeans_iters"]) == ("faiss", "10", "300")
    assert _flag(fm_cmd, "--init") == str(inits[0]) and _flag(off_cmd, "--init-1") == str(inits[0])

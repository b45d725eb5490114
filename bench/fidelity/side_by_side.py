"""Side by side: the official MMT code and fastmmt from the same source models, on the same data.

    python bench/fidelity/side_by_side.py --official /path/to/MMT --work runs/fidelity

1. Synthetic source and target domains from fastmmt's generator, laid out as the official code
   reads them (``data/dukemtmc/DukeMTMC-reID`` = source, ``data/market1501/Market-1501-v15.09.15``
   = target; target pids renumbered into Market's 1..1501).
2. The official ``examples/source_pretrain.py`` trains the two starting models (seeds 1 and 2).
3. For every seed: the official ``examples/mmt_train_kmeans.py`` (unchanged, through
   ``official_runner.py``) and ``fastmmt adapt --init`` from the same two ``model_best.pth.tar``,
   both evaluating both mean teachers after every epoch.
4. Two tables: per epoch, each side's mAP as mean +- sd over the seeds and the difference
   fastmmt - official, with each run's two teachers reduced (a) to their mean and (b) to the
   better of the two (the official code's per-epoch figure). Then each side's training losses per
   epoch (both students' summed, as both codes log them) and how far a run's two teachers lie
   apart, and how often the range bar (issue 26's: fastmmt's mean inside the official seeds'
   range at every epoch) fails when the runs are relabelled at random. Also written as
   ``WORK/summary.json``.

Steps whose outputs exist are not run again (delete the folder to redo one). Every process runs
alone, with the thread count of ``OMP_NUM_THREADS``. README.md beside this file has the set-up.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "official_runner.py"

# The small CPU shape (default) and the paper's shape (--paper, for a GPU): what differs.
# The official ResNet sets layer4's stride on a Bottleneck's conv2: its resnet18/34 do not run, so
# the smallest network both codes share is ResNet-50; 32x16 inputs and P = 8 keep it to minutes.
SMALL = dict(size="demo", height=32, width=16, arch="resnet50", batch=32, instances=4, k=120,
             pre_epochs=20, pre_iters=20, pre_lr=1e-3, pre_warmup=2, pre_milestones=[15],
             epochs=6, iters=20, lr=7e-4, alpha=0.98)
PAPER = dict(size="large", height=256, width=128, arch="resnet50", batch=64, instances=4, k=500,
             pre_epochs=80, pre_iters=100, pre_lr=3.5e-4, pre_warmup=10, pre_milestones=[40, 70],
             epochs=40, iters=400, lr=3.5e-4, alpha=0.999)


# fastmmt's k-means per --kmeans: the paper configs' (the official KMeans), FAISS with the official
# values (the paper configs before issue 26's twelve-epoch runs), fastmmt's defaults
_OFFICIAL_VALUES = {"adapt.kmeans_restarts": 10, "adapt.kmeans_iters": 300}
KMEANS_SETS = {"official": {**_OFFICIAL_VALUES, "adapt.cluster_backend": "sklearn"},
               "faiss": {**_OFFICIAL_VALUES, "adapt.kmeans_seed_dim": "null", "adapt.cluster_backend": "faiss"},
               "fast": {}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, help="the user's copy of github.com/yxgeee/MMT")
    p.add_argument("--work", default="runs/fidelity", help="output folder (data, models, logs, summary)")
    p.add_argument("--paper", action="store_true", help="the paper's shape (ResNet-50, 256x128, 40x400; a GPU)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="Stage II seeds, run on each side")
    p.add_argument("--sides", nargs="+", default=["official", "fastmmt"], choices=["official", "fastmmt"],
                   help="the sides to run (the table also shows the other side's finished runs)")
    p.add_argument("--python", default=sys.executable, help="the Python of both sides (torch, sklearn, ...)")
    p.add_argument("--official-path", default="", help="extra sys.path for the official side (e.g. torchvision)")
    p.add_argument("--imagenet", default="none", help="local torchvision ImageNet weights for the official "
                   "pre-training (none: from scratch)")
    p.add_argument("--data-seed", type=int, default=0)
    for key, val in SMALL.items():
        kw = dict(nargs="+", type=int) if isinstance(val, list) else dict(type=type(val))
        p.add_argument("--" + key.replace("_", "-"), dest=key, default=None, **kw,
                       help=f"default {val} (--paper: {PAPER[key]})")
    p.add_argument("--kmeans", choices=list(KMEANS_SETS), default="official",
                   help="fastmmt's k-means: official = the paper configs' (scikit-learn's KMeans, 10 restarts x "
                        "300 iterations, as the official code calls it); faiss = FAISS with those values and "
                        "k-means++ in the full space; fast = fastmmt's defaults")
    p.add_argument("--fastmmt-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra fastmmt --set (an A/B of one fastmmt option)")
    p.add_argument("--fastmmt-name", default="fastmmt",
                   help="folder of the fastmmt runs under WORK (another name keeps an A/B's runs apart)")
    args = p.parse_args(argv)
    shape = PAPER if args.paper else SMALL
    for key, val in shape.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    return args


def make_data(work: Path, size: str, seed: int) -> Path:
    """Generate the two domains once and lay them out for both codes; returns the data folder."""
    data = work / "data"
    done = data / ".done"
    if done.exists():
        return data
    from fastmmt.data.synthetic import generate_domains

    src, tgt = generate_domains(str(work / "raw"), seed=seed, size=size)
    layout = {Path(src): data / "dukemtmc" / "DukeMTMC-reID", Path(tgt): data / "market1501" / "Market-1501-v15.09.15"}
    for base, dest in layout.items():
        for split in ("bounding_box_train", "query", "bounding_box_test"):
            (dest / split).mkdir(parents=True, exist_ok=True)
            for f in sorted((base / split).glob("*.jpg")):
                pid, rest = f.name.split("_", 1)
                if int(pid) > 5000:  # target pids 5001.. -> Market's range (the official loader asserts <= 1501)
                    pid = f"{int(pid) - 5000:04d}"
                shutil.copyfile(f, dest / split / f"{pid}_{rest}")
    done.write_text("ok\n")
    return data


def run(cmd: list[str], log: Path, env: dict | None = None) -> None:
    """Run one process alone; its output goes to ``log``; a failure names the log."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {' '.join(cmd)}\n  (log: {log})", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    if rc:
        raise SystemExit(f"failed (exit {rc}) after {time.time() - t0:.0f} s; see {log}")
    print(f"  done in {time.time() - t0:.0f} s", flush=True)


def official_env(args: argparse.Namespace, eval_log: Path) -> dict:
    path = [x for x in (args.official_path, os.environ.get("PYTHONPATH", "")) if x]
    return {"PYTHONPATH": os.pathsep.join(path), "FIDELITY_EVAL_LOG": str(eval_log), "FIDELITY_IMAGENET": args.imagenet}


def pretrain(args: argparse.Namespace, data: Path, work: Path, seed: int) -> Path:
    out = work / "pretrain" / f"seed{seed}"
    best = out / "model_best.pth.tar"
    if best.exists():
        return best
    evals = out / "evals.jsonl"
    evals.unlink(missing_ok=True)
    cmd = [args.python, str(RUNNER), args.official, "examples/source_pretrain.py",
           "-ds", "dukemtmc", "-dt", "market1501", "-a", args.arch, "--seed", str(seed), "--margin", "0.0",
           "--num-instances", str(args.instances), "-b", str(args.batch), "-j", "0", "--height", str(args.height),
           "--width", str(args.width), "--warmup-step", str(args.pre_warmup), "--lr", str(args.pre_lr),
           "--milestones", *map(str, args.pre_milestones), "--iters", str(args.pre_iters),
           "--epochs", str(args.pre_epochs), "--eval-step", str(max(1, args.pre_epochs // 2)),
           "--data-dir", str(data), "--logs-dir", str(out)]
    run(cmd, out / "run.log", official_env(args, evals))
    return best


def official_mmt(args: argparse.Namespace, data: Path, inits: list[Path], out: Path, seed: int) -> list[list[float]]:
    """Per epoch [T1 mAP, T2 mAP] of one official run."""
    evals = out / "evals.jsonl"
    if not (out / "done").exists():
        evals.unlink(missing_ok=True)
        cmd = [args.python, str(RUNNER), args.official, "examples/mmt_train_kmeans.py",
               "-dt", "market1501", "-a", args.arch, "--num-clusters", str(args.k),
               "--num-instances", str(args.instances),
               "--lr", str(args.lr), "--alpha", str(args.alpha), "--iters", str(args.iters), "-b", str(args.batch),
               "--epochs", str(args.epochs), "--soft-ce-weight", "0.5", "--soft-tri-weight", "0.8",
               "--dropout", "0", "--init-1", str(inits[0]), "--init-2", str(inits[1]), "--seed", str(seed),
               "--eval-step", "1", "-j", "0", "--height", str(args.height), "--width", str(args.width),
               "--print-freq", str(max(1, args.iters)), "--data-dir", str(data), "--logs-dir", str(out)]
        run(cmd, out / "run.log", official_env(args, evals))
        (out / "done").write_text("ok\n")
    recs = [json.loads(x) for x in evals.read_text().splitlines()]
    per_epoch = recs[: 2 * args.epochs]  # T1, T2 per epoch; the last record is the best model's test
    return [[per_epoch[2 * e]["mAP"], per_epoch[2 * e + 1]["mAP"]] for e in range(args.epochs)]


def fastmmt_log(out: Path) -> Path:
    """The epoch records of a fastmmt run (``fastmmt adapt`` writes under OUT/METHOD)."""
    return out / "kmeans" / "log.jsonl"


def fastmmt_epochs(out: Path, field: str) -> list[dict]:
    """The epoch records of a fastmmt run that carry ``field``, in epoch order (the final record,
    a repeat of the reported epoch, left out)."""
    recs = [json.loads(x) for x in fastmmt_log(out).read_text().splitlines()]
    return sorted((r for r in recs if "epoch" in r and field in r and not r.get("final")), key=lambda r: r["epoch"])


def fastmmt_mmt(args: argparse.Namespace, data: Path, inits: list[Path], out: Path, seed: int) -> list[list[float]]:
    """Per epoch [T1 mAP, T2 mAP] of one fastmmt run."""
    log = fastmmt_log(out)
    if not (out / "done").exists():
        sets = {"data.target": "market1501", "data.target_root": str(data / "market1501"),
                "data.source": "dukemtmc", "data.source_root": str(data / "dukemtmc"),
                "data.height": args.height, "data.width": args.width, "data.batch_size": args.batch,
                "data.num_instances": args.instances, "data.workers": 0, "data.backend": "torch",
                "model.arch": args.arch, "adapt.method": "kmeans", "adapt.k": args.k, "adapt.epochs": args.epochs,
                "adapt.iters": args.iters, "adapt.lr": args.lr, "adapt.ema_alpha": args.alpha,
                "adapt.soft_ce_weight": 0.5, "adapt.soft_tri_weight": 0.8, "model.dropout": 0.0,
                "run.seed": seed, "run.eval_every": 1,
                "run.num_threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
        sets.update(KMEANS_SETS[args.kmeans])
        cmd = [args.python, "-m", "fastmmt", "adapt", "--init", str(inits[0]), str(inits[1]), "--out", str(out),
               "--no-progress"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        for s in args.fastmmt_set:
            cmd += ["--set", s]
        if log.exists():
            log.unlink()
        run(cmd, out / "run.log")
        (out / "done").write_text("ok\n")
    return [[r["mAP"], r["T2_mAP"]] for r in fastmmt_epochs(out, "mAP")]


# The training losses both codes log per epoch, as epoch averages: both students' cross-entropy and
# triplet losses summed, and the two soft losses (already sums over the two students).
LOSSES = ("ce", "tri", "soft_ce", "soft_tri")
_OFFICIAL_EPOCH_LINE = re.compile(r"Epoch: \[(\d+)\]\[(\d+)/\2\].*?Loss_ce ([\d.]+) / ([\d.]+)\s+Loss_tri ([\d.]+) / "
                                  r"([\d.]+)\s+Loss_ce_soft ([\d.]+)\s+Loss_tri_soft ([\d.]+)")


def official_losses(out: Path) -> list[dict[str, float]]:
    """Per epoch, the official run's epoch-average losses: the line its trainer prints after an
    epoch's last iteration (``--print-freq`` = iterations, so the meters hold the epoch's averages)."""
    rows = []
    for line in (out / "log.txt").read_text().splitlines():
        m = _OFFICIAL_EPOCH_LINE.search(line)
        if m:
            ce1, ce2, tri1, tri2, sce, stri = map(float, m.groups()[2:])
            rows.append({"ce": ce1 + ce2, "tri": tri1 + tri2, "soft_ce": sce, "soft_tri": stri})
    return rows


def fastmmt_losses(out: Path) -> list[dict[str, float]]:
    """Per epoch, the fastmmt run's epoch-average losses from its ``log.jsonl``."""
    return [{k: r[f"loss_{k}"] for k in LOSSES} for r in fastmmt_epochs(out, "loss_ce")]


def loss_table(losses: dict[str, dict[int, list[dict[str, float]]]], epochs: int) -> str:
    """Per loss and epoch: each side's mean over seeds, the difference fastmmt - official and its z."""
    lines = [f"{'loss':>8} {'epoch':>5} {'official':>16} {'fastmmt':>16} {'diff':>7} {'z':>6}"]
    for name in LOSSES:
        for e in range(epochs):
            stats = {}
            for side in ("official", "fastmmt"):
                vals = [run[e][name] for run in losses.get(side, {}).values() if len(run) > e]
                if vals:
                    stats[side] = (*mean_sd(vals), len(vals))
            if len(stats) < 2:
                continue
            (m1, s1, n1), (m2, s2, n2) = stats["official"], stats["fastmmt"]
            z = z_text(m1, s1, n1, m2, s2, n2)
            lines.append(f"{name:>8} {e:5d} {m1:9.3f} +- {s1:4.2f} {m2:9.3f} +- {s2:4.2f} {m2 - m1:+7.3f} {z:>6}")
    return "\n".join(lines)


def teacher_spread(results: dict[str, dict[int, list[list[float]]]]) -> str:
    """Per run, the mean over epochs of |T1 - T2| (mAP %), each side's mean, and the exact
    permutation p of a difference at least as large as fastmmt - official (one-sided, fastmmt
    larger): the spread lifts the better-teacher reading and not the mean of the two."""
    per_run = {side: [sum(abs(a - b) for a, b in runs[s]) / len(runs[s]) * 100 for s in sorted(runs)]
               for side, runs in results.items()}
    lines = [f"{side:>9}: " + " ".join(f"{v:.2f}" for v in vals) + f"  mean {sum(vals) / len(vals):.2f}"
             for side, vals in per_run.items() if vals]
    if all(per_run.get(side) for side in ("official", "fastmmt")):
        o, f = per_run["official"], per_run["fastmmt"]
        pooled, observed = o + f, sum(f) / len(f) - sum(o) / len(o)
        diffs = [sum(a) / len(a) - sum(b) / len(b) for a, b in relabellings(pooled, len(f))]
        p = sum(d >= observed - 1e-12 for d in diffs) / len(diffs)
        lines.append(f"fastmmt - official {observed:+.2f}, permutation p (fastmmt larger) {p:.3f}")
    return "\n".join(lines)


def relabellings(pooled: list, k: int):
    """Every way to call ``k`` of the pooled runs fastmmt's and the rest official's, as
    ``(fastmmt, official)`` lists: the exact permutation tests below (runs are exchangeable
    when both codes behave alike)."""
    for pick in itertools.combinations(range(len(pooled)), k):
        chosen = set(pick)
        yield [pooled[i] for i in pick], [v for i, v in enumerate(pooled) if i not in chosen]


def range_place(m: float, lo: float, hi: float) -> str:
    """Where a mean lies against the official range [lo, hi]: ``in`` (the edges included),
    ``above`` or ``below`` (issue 26's closing bar)."""
    return "above" if m > hi else "below" if m < lo else "in"


def epochs_outside(official: list[list[float]], fastmmt: list[list[float]]) -> int:
    """How many epochs fastmmt's mean over runs lies outside the official runs' range (each run
    a list of per-epoch values): issue 26's closing bar counts these."""
    count = 0
    for e in range(len(official[0])):
        vals = [r[e] for r in official]
        count += range_place(sum(r[e] for r in fastmmt) / len(fastmmt), min(vals), max(vals)) != "in"
    return count


def range_bar_by_chance(results: dict[str, dict[int, list[list[float]]]], epochs: int, of: str = "mean") -> str:
    """How often the range bar fails when the two sides differ only by chance: the epochs outside
    the official range as the runs are, then over every relabelling of the pooled runs (exact
    permutation) the share with at least one epoch outside and with at least as many as seen.
    Runs that stopped early are left out (every run must cover ``epochs``)."""
    reduce = TEACHERS[of]
    rows = {side: [[100 * reduce(r[e]) for e in range(epochs)] for r in results.get(side, {}).values()
                   if len(r) >= epochs] for side in ("official", "fastmmt")}
    o, f = rows["official"], rows["fastmmt"]
    if len(o) < 2 or not f:
        return f"{of}: needs 2 official runs and 1 fastmmt run of {epochs} epochs"
    seen = epochs_outside(o, f)
    counts = [epochs_outside(b, a) for a, b in relabellings(o + f, len(f))]
    any_out = sum(c >= 1 for c in counts) / len(counts)
    as_many = sum(c >= seen for c in counts) / len(counts)
    return (f"{of}: {seen} of {epochs} epochs outside; over the {len(counts)} relabellings, "
            f"{any_out:.2f} put 1 or more outside, {as_many:.2f} put {seen} or more")


def z_text(m1: float, s1: float, n1: int, m2: float, s2: float, n2: int) -> str:
    """The z of the difference of two means (a side of one run adds no variance), as the tables
    print it; empty when neither side has a spread."""
    se = math.sqrt((s1 ** 2 / n1 if n1 > 1 else 0) + (s2 ** 2 / n2 if n2 > 1 else 0))
    return f"{(m2 - m1) / se:6.2f}" if se > 0 else ""


def mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else float("nan")
    return m, sd


# How one run's two teachers at one epoch become one number: their mean, or the better one (the
# official script's per-epoch figure: it prints both and keeps the better as its best model).
TEACHERS = {"mean": lambda t: sum(t) / len(t), "best": max}


def table(results: dict[str, dict[int, list[list[float]]]], epochs: int, of: str = "mean") -> str:
    """Per epoch: each side's mean +- sd over seeds of mAP (%), a run's two teachers reduced by
    ``TEACHERS[of]``; the official seeds' range, the difference fastmmt - official and its z, and
    where fastmmt's mean lies against that range (issue 26's closing bar: ``in`` at every epoch)."""
    reduce = TEACHERS[of]
    lines = [f"{'epoch':>5} {'official':>16} {'official range':>15} {'fastmmt':>16} {'diff':>7} {'z':>6} {'range':>6}"]
    for e in range(epochs):
        cells, stats = [], {}
        for side in ("official", "fastmmt"):
            vals = [100 * reduce(r[e]) for r in results.get(side, {}).values() if len(r) > e]
            if vals:
                m, sd = mean_sd(vals)
                stats[side] = (m, sd, len(vals), min(vals), max(vals))
                cells.append(f"{m:6.2f} +- {sd:4.2f} ({len(vals)})")
            else:
                cells.append(f"{'-':>16}")
        span = f"{stats['official'][3]:6.2f}-{stats['official'][4]:.2f}" if "official" in stats else "-"
        diff = z = where = ""
        if len(stats) == 2:
            (m1, s1, n1, lo, hi), (m2, s2, n2, _, _) = stats["official"], stats["fastmmt"]
            diff = f"{m2 - m1:+7.2f}"
            z = z_text(m1, s1, n1, m2, s2, n2)
            where = range_place(m2, lo, hi)
        lines.append(f"{e:5d} {cells[0]:>16} {span:>15} {cells[1]:>16} {diff:>7} {z:>6} {where:>6}")
    return "\n".join(lines)


def side_folder(args: argparse.Namespace, side: str) -> str:
    """The folder under WORK that holds a side's runs (``--fastmmt-name`` for fastmmt's)."""
    return "official" if side == "official" else args.fastmmt_name


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.official = str(Path(args.official).resolve())
    if not (Path(args.official) / "examples" / "mmt_train_kmeans.py").is_file():
        raise SystemExit(f"--official {args.official}: examples/mmt_train_kmeans.py not found (a copy of "
                         "github.com/yxgeee/MMT is expected)")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = make_data(work, args.size, args.data_seed)
    inits = [pretrain(args, data, work, s) for s in (1, 2)]
    results: dict[str, dict[int, list[list[float]]]] = {}
    for seed in args.seeds:
        for side in ("official", "fastmmt"):
            fn = official_mmt if side == "official" else fastmmt_mmt
            folder = side_folder(args, side)
            if side not in args.sides and not (work / folder / f"seed{seed}" / "done").exists():
                continue  # a side not asked for is shown only where its runs exist
            results.setdefault(side, {})[seed] = fn(args, data, inits, work / folder / f"seed{seed}", seed)
            print(table(results, args.epochs, "best"), flush=True)
    losses = {side: {seed: (official_losses if side == "official" else fastmmt_losses)(
                  work / side_folder(args, side) / f"seed{seed}") for seed in runs} for side, runs in results.items()}
    summary = {"args": vars(args), "mAP_T1_T2_per_epoch": results, "losses_per_epoch": losses}
    (work / "summary.json").write_text(json.dumps(summary, indent=1))
    for of, what in (("mean", "the mean of the two mean teachers"),
                     ("best", "the better of the two mean teachers (the official per-epoch figure)")):
        print(f"\nmAP (%) on the target test set, {what}, mean +- sd over seeds:\n{table(results, args.epochs, of)}")
    print("\nThe range bar by chance: epochs where fastmmt's mean lies outside the official range, and how "
          "often relabelling the runs at random does as much:")
    for of in TEACHERS:
        print(range_bar_by_chance(results, args.epochs, of))
    print(f"\nTraining losses, epoch averages (both students summed), mean +- sd over seeds:\n"
          f"{loss_table(losses, args.epochs)}")
    print(f"\nHow far a run's two teachers lie apart, mean over epochs of |T1 - T2| (mAP %), per seed:\n"
          f"{teacher_spread(results)}")
    print(f"(written to {work / 'summary.json'})")


if __name__ == "__main__":
    main()

"""``fastmmt`` command line: a thin layer over the library (see ``fastmmt <command> --help``)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from fastmmt.cli.config import CHOICES, ConfigError, check_pretrained, load_options, options_to_dict
from fastmmt.evaluation.reranking import RERANK_K1, RERANK_K2, RERANK_LAMBDA

log = logging.getLogger("fastmmt")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set adapt.k=700 (repeatable)")
    p.add_argument("--data-root", help="folder holding the dataset folders (sets data.root)")
    p.add_argument("--out", help="output folder (sets run.out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _options(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.no_progress:
        overrides.append("run.progress=false")
    return load_options(args.config, overrides)


def _is_main() -> bool:
    """Rank 0 under torchrun (or the only process): the one that writes and prints results."""
    from fastmmt.train.distributed import is_main_process
    return is_main_process()


def _hold(folders: list[Path]):
    """Rank 0 takes the run folders before writing anything in them (the stage takes them again,
    re-entrantly, under torchrun too); a folder another run holds stops here, untouched."""
    import contextlib

    from fastmmt.train.run_lock import hold_folders
    return hold_folders(folders) if _is_main() else contextlib.nullcontext()


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _save_config(opts, out_dir: Path) -> None:
    """Write ``out_dir/config.yaml``; a different earlier one is kept as ``config.N.yaml``."""
    if not _is_main():
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    text = yaml.safe_dump(json.loads(json.dumps(options_to_dict(opts))), sort_keys=False)
    if path.exists() and path.read_text() != text:
        n = 1
        while (out_dir / f"config.{n}.yaml").exists():
            n += 1
        path.rename(out_dir / f"config.{n}.yaml")
    path.write_text(text)


def _dataset(opts, role: str):
    """The run's ``role`` dataset ("source" or "target"), read from its own folder or data.root."""
    from fastmmt.data import load_dataset

    d = opts.data
    return load_dataset(getattr(d, role), getattr(d, f"{role}_root") or d.root)


def _print_metrics(name: str, metrics: dict) -> None:
    if not _is_main():
        return
    print(f"{name}: mAP {100 * metrics['mAP']:.1f}  rank-1 {100 * metrics['rank1']:.1f}  "
          f"rank-5 {100 * metrics['rank5']:.1f}  rank-10 {100 * metrics['rank10']:.1f}")


def cmd_synth(args: argparse.Namespace) -> int:
    from fastmmt.data import generate_domains

    src, tgt = generate_domains(args.out_dir, seed=args.seed, size=args.size)
    print(f"source domain: {src}\ntarget domain: {tgt}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from fastmmt.train import pretrain

    opts = _options(args)
    check_pretrained(opts)
    out = Path(opts.run.out_dir)
    seeds = [args.seed] if args.seed is not None else list(opts.pretrain.seeds)
    with _hold([out / "pretrain" / f"seed{s}" for s in seeds]):
        _save_config(opts, out)
        source = _dataset(opts, "source")
        target = _dataset(opts, "target") if opts.data.target else None
        for s in seeds:
            res = pretrain(source, target, opts, seed=s, out_dir=out / "pretrain" / f"seed{s}", resume=args.resume,
                           resume_changed=args.resume_changed)
            if _is_main():
                print(f"seed {s}: model {res.model_path}")
            if res.metrics:
                _print_metrics(f"source-only seed {s} on target", res.metrics)
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from fastmmt.train import adapt

    opts = _options(args)
    if args.method:
        opts.adapt.method = args.method
    out = Path(opts.run.out_dir)
    inits = args.init or [str(out / "pretrain" / f"seed{s}" / "model.pt") for s in opts.pretrain.seeds]
    if opts.adapt.method == "baseline":
        inits = inits[:1]
    run_dir = out / opts.adapt.method
    with _hold([run_dir]):
        _save_config(opts, run_dir)
        target = _dataset(opts, "target")
        res = adapt(target, inits, opts, run_dir, resume=args.resume, resume_changed=args.resume_changed)
        _print_metrics(f"{opts.adapt.method} on target", res.metrics)
        if _is_main():
            (run_dir / "results.json").write_text(json.dumps({"metrics": res.metrics, "seconds": res.seconds},
                                                             indent=2))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fastmmt.train import evaluate_model_file

    opts = _options(args)
    target = _dataset(opts, "target")
    metrics = evaluate_model_file(args.model, target, opts, rerank=args.rerank)
    _print_metrics(f"{args.model} on {opts.data.target}" + (" (re-ranked)" if args.rerank else ""), metrics)
    return 0


def cmd_visualize(args: argparse.Namespace) -> int:
    from fastmmt.train import visualize_model_file

    opts = _options(args)
    target = _dataset(opts, "target")
    out = Path(args.out or Path(opts.run.out_dir) / "rank_lists")
    paths = visualize_model_file(args.model, target, opts, out, topk=args.topk, num_queries=args.num_queries,
                                 seed=args.seed, rerank=args.rerank)
    if _is_main():
        print(f"{len(paths)} rank lists of {args.model} on {opts.data.target} in {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from fastmmt.safe_load import convert_trusted_file

    if not args.trust_file:
        raise ValueError(f"convert loads {args.src} with a full pickle load, which runs any code stored in it: "
                         f"pass --trust-file to confirm that you trust where {args.src} came from")
    dropped = convert_trusted_file(args.src, args.dst)
    print(f"{args.dst}: tensors and plain values of {args.src}, loadable without running code"
          + (f"; left out: {', '.join(dropped)}" if dropped else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastmmt.train.demo import demo_options, format_table, run_demo

    opts = demo_options(out_dir=args.out, seed=args.seed)
    if args.no_progress:
        opts.run.progress = False
    methods = ("kmeans", "dbscan") if args.with_dbscan else ("kmeans",)
    res = run_demo(opts, seed=args.seed, methods=methods)
    print(f"\nfastmmt demo (seed {args.seed}) on the synthetic target domain's test set:")
    print(format_table(res["rows"]))
    print("\ntime per stage (s): " + ", ".join(f"{k} {v:.1f}" for k, v in res["stage_seconds"].items()))
    print(f"total {res['total_seconds']:.1f} s; results in {Path(args.out) / 'results.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmmt", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="generate the synthetic source/target domains (Market-1501 layout)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="demo", help="preset size (see docs/data.md)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("pretrain", help="Stage I: source pre-training (both seeds unless --seed)")
    _common(p)
    p.add_argument("--seed", type=int, help="train only this seed")
    _resume_flags(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("adapt", help="Stage II: MMT (kmeans|dbscan), the single-model baseline, or the "
                                     "oracle (MMT on the target's true ids)")
    _common(p)
    p.add_argument("--method", choices=CHOICES[("adapt", "method")])
    p.add_argument("--init", nargs="+", help="pre-trained model files (default: OUT/pretrain/seed*/model.pt); "
                                             "official MMT release files (*.pth.tar) too")
    _resume_flags(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser("evaluate", help="evaluate a model file on the target test set")
    _common(p)
    p.add_argument("--model", required=True, help="a model.pt written by pretrain or adapt, or an official MMT "
                                                    "release file (*.pth.tar)")
    p.add_argument("--rerank", action="store_true", help=f"k-reciprocal re-ranking (k1 {RERANK_K1}, k2 {RERANK_K2}, "
                                                         f"lambda {RERANK_LAMBDA})")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("visualize", help="draw rank lists (query, top-k gallery, green/red frames) as PNG")
    _common(p)  # --out: the folder of the pictures (default OUT/rank_lists)
    p.add_argument("--model", required=True, help="a model.pt written by pretrain or adapt, or an official MMT "
                                                    "release file (*.pth.tar)")
    p.add_argument("--topk", type=_positive_int, default=10, help="gallery images per list (default 10)")
    p.add_argument("--num-queries", type=_positive_int, default=20, help="queries drawn at random (default 20)")
    p.add_argument("--seed", type=int, default=0, help="which queries are drawn")
    p.add_argument("--rerank", action="store_true", help="also the k-reciprocal re-ranked list, beside the plain one")
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("convert", help="rewrite a model file or checkpoint you trust as tensors and plain values "
                                       "only, which fastmmt loads without running code (docs/reliability.md)")
    p.add_argument("src", help="the file to convert (loaded with a full pickle load: it can run code)")
    p.add_argument("dst", help="where to write the converted file")
    p.add_argument("--trust-file", action="store_true",
                   help="required: you trust where SRC came from (loading it runs any code stored in it)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("demo", help="synthetic end-to-end demo: source-only vs MMT vs oracle")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-dbscan", action="store_true",
                   help="also run MMT with DBSCAN (a fourth training run; its time is in bench/RESULTS.md)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def _resume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (refused when the "
                                                          "options that define the run differ from the checkpoint's)")
    p.add_argument("--resume-changed", action="store_true",
                   help="with --resume: continue even though such options changed (the change is meant)")


def _one_line(err: BaseException) -> str:
    """The error's message on one line. An error re-raised from a DataLoader worker carries the
    worker's traceback in its message: keep its last line (the original error)."""
    text = str(err).strip() or type(err).__name__
    lines = [x.strip() for x in text.splitlines() if x.strip()]
    if "Original Traceback" in text:
        return lines[-1]
    return " ".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if rank is not None and os.environ.get("WORLD_SIZE", "1") != "1" else ""
    logging.basicConfig(level=level if _is_main() else max(level, logging.WARNING),
                        format=f"%(asctime)s {prefix}%(name)s %(levelname)s %(message)s", stream=sys.stderr)
    ok = False
    try:
        rc = args.func(args)
        ok = rc == 0
        return rc
    except ConfigError as e:
        print(f"fastmmt: {prefix}config error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, ValueError, RuntimeError, ArithmeticError) as e:
        if args.verbose:
            raise
        print(f"fastmmt {args.command}: {prefix}error: {_one_line(e)}", file=sys.stderr)
        return 1
    finally:
        from fastmmt.train.distributed import cleanup
        cleanup(wait_for_all=ok)  # every rank waits for rank 0's last writes, on success only

"""``fastmmt demo``: the synthetic end-to-end demo (source-only vs MMT vs oracle)."""
from __future__ import annotations

import argparse
from pathlib import Path


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="synthetic end-to-end demo: source-only vs MMT vs oracle")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--with-dbscan", action="store_true",
                   help="also run MMT with DBSCAN (a fourth training run; its time is in bench/RESULTS.md)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
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

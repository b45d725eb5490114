"""``fastmmt visualize``: rank lists of a model file drawn as PNG."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastmmt.cli.common import config_flags, dataset, is_main, options, positive_int
from fastmmt.cli.evaluate import MODEL_HELP


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visualize", help="draw rank lists (query, top-k gallery, green/red frames) as PNG")
    config_flags(p)  # --out: the folder of the pictures (default OUT/rank_lists)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--topk", type=positive_int, default=10, help="gallery images per list (default 10)")
    p.add_argument("--num-queries", type=positive_int, default=20, help="queries drawn at random (default 20)")
    p.add_argument("--seed", type=int, default=0, help="which queries are drawn")
    p.add_argument("--rerank", action="store_true", help="also the k-reciprocal re-ranked list, beside the plain one")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.train import visualize_model_file

    opts = options(args)
    target = dataset(opts, "target")
    out = Path(args.out or Path(opts.run.out_dir) / "rank_lists")
    paths = visualize_model_file(args.model, target, opts, out, topk=args.topk, num_queries=args.num_queries,
                                 seed=args.seed, rerank=args.rerank)
    if is_main():
        print(f"{len(paths)} rank lists of {args.model} on {opts.data.target} in {out}")
    return 0

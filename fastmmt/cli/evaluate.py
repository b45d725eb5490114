"""``fastmmt evaluate``: a model file's target test metrics (optionally re-ranked)."""
from __future__ import annotations

import argparse

from fastmmt.cli.common import config_flags, dataset, options, print_metrics
from fastmmt.evaluation.reranking import RERANK_K1, RERANK_K2, RERANK_LAMBDA

MODEL_HELP = "a model.pt written by pretrain or adapt, or an official MMT release file (*.pth.tar)"


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="evaluate a model file on the target test set")
    config_flags(p)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--rerank", action="store_true", help=f"k-reciprocal re-ranking (k1 {RERANK_K1}, k2 {RERANK_K2}, "
                                                         f"lambda {RERANK_LAMBDA})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.train import evaluate_model_file

    opts = options(args)
    target = dataset(opts, "target")
    metrics = evaluate_model_file(args.model, target, opts, rerank=args.rerank)
    print_metrics(f"{args.model} on {opts.data.target}" + (" (re-ranked)" if args.rerank else ""), metrics)
    return 0

"""``fastmmt synth``: generate the synthetic source/target domains (Market-1501 layout)."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("synth", help="generate the synthetic source/target domains (Market-1501 layout)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", default="demo", help="preset size (see docs/data.md)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.data import generate_domains

    src, tgt = generate_domains(args.out_dir, seed=args.seed, size=args.size)
    print(f"source domain: {src}\ntarget domain: {tgt}")
    return 0

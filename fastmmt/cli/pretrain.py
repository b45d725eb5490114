"""``fastmmt pretrain``: Stage I, source pre-training of one model per seed."""
from __future__ import annotations

import argparse
from pathlib import Path

from fastmmt.cli.common import config_flags, dataset, hold, is_main, options, print_metrics, resume_flags, save_config
from fastmmt.cli.config import check_pretrained


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="Stage I: source pre-training (both seeds unless --seed)")
    config_flags(p)
    p.add_argument("--seed", type=int, help="train only this seed")
    resume_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.train import pretrain

    opts = options(args)
    check_pretrained(opts)
    out = Path(opts.run.out_dir)
    seeds = [args.seed] if args.seed is not None else list(opts.pretrain.seeds)
    with hold([out / "pretrain" / f"seed{s}" for s in seeds]):
        save_config(opts, out)
        source = dataset(opts, "source")
        target = dataset(opts, "target") if opts.data.target else None
        for s in seeds:
            res = pretrain(source, target, opts, seed=s, out_dir=out / "pretrain" / f"seed{s}", resume=args.resume,
                           resume_changed=args.resume_changed)
            if is_main():
                print(f"seed {s}: model {res.model_path}")
            if res.metrics:
                print_metrics(f"source-only seed {s} on target", res.metrics)
    return 0

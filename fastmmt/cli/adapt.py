"""``fastmmt adapt``: Stage II (MMT with k-means or DBSCAN, the baseline, the oracle)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fastmmt.cli.common import config_flags, dataset, hold, is_main, options, print_metrics, resume_flags, save_config
from fastmmt.cli.config import CHOICES


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("adapt", help="Stage II: MMT (kmeans|dbscan), the single-model baseline, or the "
                                     "oracle (MMT on the target's true ids)")
    config_flags(p)
    p.add_argument("--method", choices=CHOICES[("adapt", "method")])
    p.add_argument("--init", nargs="+", help="pre-trained model files (default: OUT/pretrain/seed*/model.pt); "
                                             "official MMT release files (*.pth.tar) too")
    resume_flags(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.train import adapt

    opts = options(args)
    if args.method:
        opts.adapt.method = args.method
    out = Path(opts.run.out_dir)
    inits = args.init or [str(out / "pretrain" / f"seed{s}" / "model.pt") for s in opts.pretrain.seeds]
    if opts.adapt.method == "baseline":
        inits = inits[:1]
    run_dir = out / opts.adapt.method
    with hold([run_dir]):
        save_config(opts, run_dir)
        target = dataset(opts, "target")
        res = adapt(target, inits, opts, run_dir, resume=args.resume, resume_changed=args.resume_changed)
        print_metrics(f"{opts.adapt.method} on target", res.metrics)
        if is_main():
            (run_dir / "results.json").write_text(json.dumps({"metrics": res.metrics, "seconds": res.seconds},
                                                             indent=2))
    return 0

"""``fastmmt convert``: rewrite a trusted file as tensors and plain values (loadable without running code)."""
from __future__ import annotations

import argparse


def add(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="rewrite a model file or checkpoint you trust as tensors and plain values "
                                       "only, which fastmmt loads without running code (docs/reliability.md)")
    p.add_argument("src", help="the file to convert (loaded with a full pickle load: it can run code)")
    p.add_argument("dst", help="where to write the converted file")
    p.add_argument("--trust-file", action="store_true",
                   help="required: you trust where SRC came from (loading it runs any code stored in it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fastmmt.safe_load import convert_trusted_file

    if not args.trust_file:
        raise ValueError(f"convert loads {args.src} with a full pickle load, which runs any code stored in it: "
                         f"pass --trust-file to confirm that you trust where {args.src} came from")
    dropped = convert_trusted_file(args.src, args.dst)
    print(f"{args.dst}: tensors and plain values of {args.src}, loadable without running code"
          + (f"; left out: {', '.join(dropped)}" if dropped else ""))
    return 0

"""``fastmmt`` command line: a thin layer over the library (see ``fastmmt <command> --help``); one
module per command (``fastmmt/cli/<command>.py``), their shared flags in ``common.py``."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from fastmmt.cli import adapt, convert, demo, evaluate, pretrain, synth, visualize
from fastmmt.cli.common import is_main
from fastmmt.cli.config import ConfigError

# one module per command, each with add(subparsers) and run(args)
COMMANDS = (synth, pretrain, adapt, evaluate, visualize, convert, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmmt", description="Mutual Mean-Teaching for unsupervised domain-adaptive "
                                     "person re-ID (see fastmmt <command> --help)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add(sub)
    return parser


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
    logging.basicConfig(level=level if is_main() else max(level, logging.WARNING),
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

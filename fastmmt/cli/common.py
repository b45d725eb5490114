"""What the commands share: the config flags, the options they load, rank 0's writes and prints."""
from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import yaml

from fastmmt.cli.config import load_options, options_to_dict


def config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (see configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set adapt.k=700 (repeatable)")
    p.add_argument("--data-root", help="folder holding the dataset folders (sets data.root)")
    p.add_argument("--out", help="output folder (sets run.out_dir)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def options(args: argparse.Namespace):
    overrides = list(args.overrides)
    if args.data_root:
        overrides.append(f"data.root={args.data_root}")
    if args.out:
        overrides.append(f"run.out_dir={args.out}")
    if args.no_progress:
        overrides.append("run.progress=false")
    return load_options(args.config, overrides)


def resume_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint (refused when the "
                                                          "options that define the run differ from the checkpoint's)")
    p.add_argument("--resume-changed", action="store_true",
                   help="with --resume: continue even though such options changed (the change is meant)")


def is_main() -> bool:
    """Rank 0 under torchrun (or the only process): the one that writes and prints results."""
    from fastmmt.train.distributed import is_main_process
    return is_main_process()


def hold(folders: list[Path]):
    """Rank 0 takes the run folders before writing anything in them (the stage takes them again,
    re-entrantly, under torchrun too); a folder another run holds stops here, untouched."""
    from fastmmt.train.run_lock import hold_folders
    return hold_folders(folders) if is_main() else contextlib.nullcontext()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def save_config(opts, out_dir: Path) -> None:
    """Write ``out_dir/config.yaml``; a different earlier one is kept as ``config.N.yaml``."""
    if not is_main():
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


def dataset(opts, role: str):
    """The run's ``role`` dataset ("source" or "target"), read from its own folder or data.root."""
    from fastmmt.data import load_dataset

    d = opts.data
    return load_dataset(getattr(d, role), getattr(d, f"{role}_root") or d.root)


def print_metrics(name: str, metrics: dict) -> None:
    if not is_main():
        return
    print(f"{name}: mAP {100 * metrics['mAP']:.1f}  rank-1 {100 * metrics['rank1']:.1f}  "
          f"rank-5 {100 * metrics['rank5']:.1f}  rank-10 {100 * metrics['rank10']:.1f}")

"""Shared pieces of the reliability tests (docs/reliability.md): a finished tiny run to work on
(built once per session by the ``tiny_run`` fixture of conftest.py) and the CLI checks."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch

from fastmmt.cli import main as cli_main
from fastmmt.data import load_dataset
from fastmmt.train import adapt, pretrain
from synthetic_fixtures import tiny_domain_folders, tiny_options, write_config


class Payload:
    """Unpickling this runs ``exec``: it writes ``marker``. Stands for any code a file may carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('code ran')",)


def with_payload(obj: dict, marker: Path, path: Path) -> Path:
    """Save ``obj`` plus a :class:`Payload` entry to ``path``."""
    torch.save({**obj, "extra": Payload(marker)}, path)
    return path


def build_env(root: Path) -> dict:
    """Tiny domains, two pre-trained models, a finished one-epoch k-means run and its config."""
    src, tgt = tiny_domain_folders(root / "syn")
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    o = tiny_options(root)
    o.adapt.epochs, o.run.eval_every = 1, 0
    o.data.source_root, o.data.target_root = src, tgt
    inits = [pretrain(source, target, o, seed=s, out_dir=root / "out" / "pretrain" / f"seed{s}").model_path
             for s in (1, 2)]
    adapt(target, inits, o, root / "out" / "kmeans")
    cfg = root / "cfg.yaml"
    write_config(o, cfg)
    return {"root": root, "src": src, "tgt": tgt, "inits": inits, "cfg": cfg, "out": root / "out",
            "source": source, "target": target, "opts": o}


def digest(folder: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def kept(before: dict[str, str], after: dict[str, str]) -> bool:
    """Every file of ``before`` is in ``after`` with the same bytes (config.yaml aside: a new one
    is written and the old one kept as config.N.yaml)."""
    return all(after.get(k) == v for k, v in before.items() if "config" not in k)


def run_cli(capsys, args: list[str]) -> tuple[int, str]:
    """``fastmmt ARGS --no-progress``: exit code and stderr."""
    rc = cli_main([*args, "--no-progress"])
    return rc, capsys.readouterr().err.strip()


def one_line(rc: int, err: str, *expected: str, code: int = 1) -> None:
    """Exit ``code``, one line on stderr (no traceback) holding every ``expected`` text."""
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expected:
        assert e in err, err


def adapt_args(env: dict, out: Path, *sets: str, extra: tuple[str, ...] = ()) -> list[str]:
    """``fastmmt adapt`` on the tiny run's config and models, into ``out``."""
    return ["adapt", "--config", str(env["cfg"]), "--out", str(out), "--init", *env["inits"], *extra,
            *[x for s in sets for x in ("--set", s)]]


def copy_run(env: dict, tmp_path: Path) -> Path:
    """A copy of the finished k-means run (``OUT/kmeans``) to work on; returns OUT."""
    run = tmp_path / "out"
    shutil.copytree(env["out"] / "kmeans", run / "kmeans")
    return run

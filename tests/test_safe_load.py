"""A file from outside never runs code (docs/reliability.md).

Every path that reads a torch file (a model file behind ``--init`` / ``evaluate`` / ``visualize``,
a checkpoint behind ``--resume``, an official ``*.pth.tar`` release file, ImageNet weights) loads
a file holding a pickle that would write a marker file: it is refused with one line naming the
file, what it holds and the conversion to run if it is trusted, and the marker never appears.
Official release files (numpy scalars in them, pickled under numpy 1) still load, and
``fastmmt convert --trust-file`` is the one explicit place where a file's code may run.
"""
from __future__ import annotations

import argparse
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fastmmt.cli import main as cli_main
from fastmmt.models.official import read_official_checkpoint
from fastmmt.models.pretrained import read_state_dict
from fastmmt.safe_load import UnsafeFileError, safe_load
from fastmmt.train import load_model_file
from reliability_env import adapt_args, copy_run, digest, kept, one_line, run_cli, with_payload
from test_models_official import _official_file


@pytest.fixture
def env(tiny_run):
    return tiny_run


def test_the_payload_runs_under_a_plain_pickle_load(tmp_path):
    """The test's premise: a full pickle load of such a file writes the marker."""
    marker = tmp_path / "MARKER"
    path = with_payload({"w": torch.ones(2)}, marker, tmp_path / "f.pt")
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("path_kind", ["model_file", "init", "evaluate", "official", "official_cli", "imagenet",
                                       "resume"])
def test_no_load_path_runs_code_from_a_file(env, capsys, tmp_path, path_kind):
    marker = tmp_path / "MARKER"
    model = torch.load(env["inits"][0], weights_only=False)
    evil_model = with_payload(model, marker, tmp_path / "evil_model.pt")
    _, _, official_state = _official_file(tmp_path, "resnet18", 10)
    evil_official = with_payload({"state_dict": official_state, "epoch": 3, "best_mAP": np.float64(0.5)}, marker,
                                  tmp_path / "evil_model_best.pth.tar")
    o = env["opts"]
    if path_kind == "model_file":
        with pytest.raises(UnsafeFileError, match="builtins.exec"):
            load_model_file(evil_model, o, torch.device("cpu"))
    elif path_kind == "init":
        rc, err = run_cli(capsys, ["adapt", "--config", str(env["cfg"]), "--out", str(tmp_path / "o"), "--init",
                                str(evil_model), env["inits"][1]])
        one_line(rc, err, str(evil_model), "builtins.exec", "fastmmt convert --trust-file")
    elif path_kind == "evaluate":
        rc, err = run_cli(capsys, ["evaluate", "--config", str(env["cfg"]), "--model", str(evil_official)])
        one_line(rc, err, str(evil_official), "builtins.exec")
    elif path_kind == "official":
        with pytest.raises(UnsafeFileError, match="builtins.exec"):
            read_official_checkpoint(evil_official)
    elif path_kind == "official_cli":
        rc, err = run_cli(capsys, ["visualize", "--config", str(env["cfg"]), "--model", str(evil_official),
                                "--out", str(tmp_path / "pics")])
        one_line(rc, err, str(evil_official), "builtins.exec")
    elif path_kind == "imagenet":
        weights = with_payload(dict(model["model"]), marker, tmp_path / "imagenet.pth")
        with pytest.raises(UnsafeFileError, match="builtins.exec"):
            read_state_dict(weights)
        rc, err = run_cli(capsys, ["pretrain", "--config", str(env["cfg"]), "--out", str(tmp_path / "p"), "--seed",
                                "1", "--set", f"model.pretrained={weights}"])
        one_line(rc, err, str(weights), "builtins.exec")
    else:  # a planted checkpoint: refused, not fallen back from, and nothing written is lost
        run = copy_run(env, tmp_path)
        last = run / "kmeans" / "ckpt" / "last.pt"
        with_payload(torch.load(last, weights_only=False), marker, last)
        before = digest(run)
        rc, err = run_cli(capsys, adapt_args(env, run, extra=("--resume",)))
        one_line(rc, err, str(last), "builtins.exec")
        assert kept(before, digest(run))
    assert not marker.exists()


def _as_numpy1_pickle(path: Path) -> None:
    """Rewrite a torch file as numpy 1 pickled it: ``numpy.core.multiarray`` (the official release
    files are from 2020) instead of numpy 2's ``numpy._core.multiarray``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(item, data)
    path.write_bytes(buf.getvalue())


def test_official_file_with_numpy_scalars_still_loads(tmp_path):
    path, _, _ = _official_file(tmp_path, "resnet18", 10)
    _as_numpy1_pickle(path)
    ck = read_official_checkpoint(path)
    assert ck.best_mAP == pytest.approx(0.318) and ck.epoch == 79 and ck.arch == "resnet18"


def test_convert_is_the_explicit_opt_in(env, capsys, tmp_path):
    """A legacy file holding a non-tensor object (an argparse.Namespace, as many re-ID releases
    do) is refused; ``fastmmt convert`` needs --trust-file, and then writes a file that loads."""
    model = torch.load(env["inits"][0], weights_only=False)
    legacy = tmp_path / "legacy.pt"
    torch.save({**model, "args": argparse.Namespace(lr=0.1, arch="resnet18")}, legacy)
    with pytest.raises(UnsafeFileError, match="argparse.Namespace"):
        safe_load(legacy)
    out = tmp_path / "converted.pt"
    rc = cli_main(["convert", str(legacy), str(out)])
    err = capsys.readouterr().err.strip()
    one_line(rc, err, "--trust-file", "runs any code")
    assert not out.exists()
    assert cli_main(["convert", "--trust-file", str(legacy), str(out)]) == 0
    got = safe_load(out)
    assert got["args"] == {"lr": 0.1, "arch": "resnet18"}
    net = load_model_file(out, env["opts"], torch.device("cpu"))
    assert all(torch.equal(v, model["model"][k]) for k, v in net.state_dict().items())
    # the opt-in is what it says: it runs the file's code
    marker = tmp_path / "MARKER"
    with_payload(model, marker, tmp_path / "evil.pt")
    assert cli_main(["convert", "--trust-file", str(tmp_path / "evil.pt"), str(tmp_path / "e2.pt")]) == 0
    assert marker.exists()

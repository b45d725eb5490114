"""What ``--resume`` accepts (docs/reliability.md): changed defining options are refused with the
list of differences unless ``--resume-changed``; a checkpoint that does not fit the network, a
model file, another stage's checkpoint or a non-torch file in the checkpoint folder is one line
naming it.
"""
from __future__ import annotations


import pytest
import torch

from fastmmt.cli import main as cli_main
from fastmmt.train.checkpoint import CheckpointError, load_checkpoint
from reliability_env import adapt_args, copy_run, digest, kept, one_line, run_cli
from synthetic_fixtures import tiny_options, write_config


@pytest.fixture
def env(tiny_run):
    return tiny_run


def test_resume_with_changed_defining_options_lists_the_differences(env, capsys, tmp_path):
    run = copy_run(env, tmp_path)
    before = digest(run)
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", "adapt.k=7", "data.height=48",
                                       extra=("--resume",)))
    one_line(rc, err, "cannot resume from", "adapt.k: 6 -> 7", "data.height: 32 -> 48", "--resume-changed")
    assert kept(before, digest(run))
    # a change of what may change (the learning rate, the number of epochs) resumes
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", "adapt.lr=0.0001", extra=("--resume",)))
    assert rc == 0, err
    # the change is meant: --resume-changed
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=3", "adapt.k=7",
                                         extra=("--resume", "--resume-changed")))
    assert rc == 0, err
    ck = torch.load(run / "kmeans" / "ckpt" / "last.pt", weights_only=False)
    assert ck["epoch"] == 2 and ck["fastmmt"]["options"]["adapt.k"] == 7


def test_resume_with_another_network_is_one_line(env, capsys, tmp_path):
    o = tiny_options(tmp_path)
    o.data.source_root, o.data.target_root = env["src"], env["tgt"]
    o.run.eval_every = 0
    cfg = tmp_path / "cfg.yaml"
    write_config(o, cfg)
    out = tmp_path / "p"
    args = ["pretrain", "--config", str(cfg), "--out", str(out), "--seed", "1"]
    assert cli_main([*args, "--no-progress"]) == 0
    capsys.readouterr()
    rc, err = run_cli(capsys, [*args, "--resume", "--set", "model.base_width=16", "--set", "pretrain.epochs=2"])
    one_line(rc, err, "model.base_width: 8 -> 16")
    rc, err = run_cli(capsys, [*args, "--resume", "--resume-changed", "--set", "model.base_width=16",
                            "--set", "pretrain.epochs=2"])
    one_line(rc, err, "does not fit this run", "size mismatch")
    assert len(err) < 600


@pytest.mark.parametrize("planted", ["model_file", "other_stage", "not_torch"])
def test_a_file_that_is_not_a_checkpoint_is_one_line(env, capsys, tmp_path, planted):
    run = copy_run(env, tmp_path)
    ckpt = run / "kmeans" / "ckpt"
    if planted == "model_file":
        (ckpt / "prev.pt").unlink(missing_ok=True)
        (ckpt / "last.pt").write_bytes((run / "kmeans" / "model.pt").read_bytes())
        expected = ("is not a fastmmt checkpoint", str(ckpt / "last.pt"))
    elif planted == "other_stage":
        (ckpt / "last.pt").write_bytes((env["out"] / "pretrain" / "seed1" / "ckpt" / "last.pt").read_bytes())
        expected = ("it is a checkpoint of pretrain", str(ckpt / "last.pt"))
    else:
        (ckpt / "prev.pt").unlink(missing_ok=True)
        (ckpt / "last.pt").write_text("notes, not a checkpoint\n")
        expected = ("no readable checkpoint", "is not a readable torch file")
    rc, err = run_cli(capsys, adapt_args(env, run, "adapt.epochs=2", extra=("--resume",)))
    one_line(rc, err, *expected)


def test_load_checkpoint_names_a_non_checkpoint(tmp_path):
    torch.save({"model": {}, "num_classes": 3}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last\.pt is not a fastmmt checkpoint"):
        load_checkpoint(tmp_path)

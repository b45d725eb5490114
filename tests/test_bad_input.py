"""Bad input end to end: through ``fastmmt pretrain|adapt`` each failure is ONE line on stderr
naming the problem (exit code != 0, no traceback), and files written before stay intact.

Unit-level checks live elsewhere and are not repeated here: dataset layouts and name parsing
(tests/test_data_datasets.py: test_market_errors_name_the_path, test_msmt17_errors,
test_load_image), the sampler's own errors (tests/test_data_sampler.py::test_bad_input), loader
labels (tests/test_data_loaders.py::test_set_labels_excludes_and_validates), k-means/DBSCAN
argument errors (tests/test_cluster_kmeans.py::test_errors, test_cluster_dbscan.py,
test_cluster_clusterers.py::test_no_cluster_raises), config keys and types
(tests/test_train_units.py::test_config_errors_name_the_key), checkpoint fallback and ENOSPC at
the file level (tests/test_train_units.py).
"""
import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import fastmmt.train.mmt as mmt_mod
from fastmmt.cli import main as cli_main
from fastmmt.data import load_dataset
from fastmmt.data.image_io import load_image
from fastmmt.train import adapt, pretrain
from synthetic_fixtures import tiny_domain_folders, tiny_options, write_config


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny domains, two pre-trained models, a finished k-means run and its config file."""
    root = tmp_path_factory.mktemp("bad")
    src, tgt = tiny_domain_folders(root / "syn")
    source, target = load_dataset("synthetic", src), load_dataset("synthetic", tgt)
    o = tiny_options(root)
    o.adapt.epochs, o.run.eval_every = 1, 0
    o.data.source_root, o.data.target_root = src, tgt
    inits = [pretrain(source, target, o, seed=s, out_dir=root / f"seed{s}").model_path for s in (1, 2)]
    adapt(target, inits, o, root / "out" / "kmeans")
    cfg = root / "cfg.yaml"
    write_config(o, cfg)
    return {"root": root, "src": src, "tgt": tgt, "inits": inits, "cfg": cfg, "out": root / "out"}


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "curves.png"}


def _fails(env, capsys, args: list[str], expected: str, code: int = 1) -> str:
    """Run the CLI on the finished run's folder; one error line, exit ``code``, files intact."""
    before = _digest(env["out"])
    rc = cli_main([*args, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == code, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err
    after = _digest(env["out"])
    # nothing written before is lost: same files, same bytes (an earlier different config.yaml is
    # kept as config.N.yaml beside the new one)
    assert {k: v for k, v in after.items() if k in before and "config" not in k} == \
        {k: v for k, v in before.items() if "config" not in k}
    assert set(before.values()) <= set(after.values())
    return err


def _adapt(env, *sets: str) -> list[str]:
    return ["adapt", "--config", str(env["cfg"]), "--out", str(env["out"]), "--init", *env["inits"],
            *[x for s in sets for x in ("--set", s)]]


def _copy_target(env, tmp_path: Path) -> Path:
    dst = tmp_path / "target"
    shutil.copytree(env["tgt"], dst)
    return dst


def test_missing_and_empty_data_folders(env, capsys, tmp_path):
    _fails(env, capsys, _adapt(env, f"data.target_root={tmp_path / 'nope'}"), "is not a directory")
    empty = tmp_path / "empty"
    for sub in ("bounding_box_train", "query", "bounding_box_test"):
        (empty / sub).mkdir(parents=True)
    _fails(env, capsys, _adapt(env, f"data.target_root={empty}"), "no usable images found")


def test_unparsable_file_name(env, capsys, tmp_path):
    dst = _copy_target(env, tmp_path)
    Image.new("RGB", (32, 64)).save(dst / "bounding_box_train" / "holiday_photo.jpg")
    _fails(env, capsys, _adapt(env, f"data.target_root={dst}"), "cannot parse")


@pytest.mark.parametrize("kind,workers", [("truncated", 0), ("not-an-image", 1)])
def test_truncated_or_non_image_file(env, capsys, tmp_path, kind, workers):
    dst = _copy_target(env, tmp_path)
    victim = sorted((dst / "bounding_box_train").glob("*.jpg"))[3]
    if kind == "truncated":
        victim.write_bytes(victim.read_bytes()[:200])
    else:
        victim.write_text("this is not a JPEG\n")
    # workers=1: the error comes back from a DataLoader worker and is still one line
    err = _fails(env, capsys, _adapt(env, f"data.target_root={dst}", f"data.workers={workers}"),
                 f"cannot read image '{victim}'")
    assert "corrupt or truncated" in err or "not a recognised image" in err


def test_grayscale_rgba_and_16bit_images_work(env, tmp_path):
    dst = _copy_target(env, tmp_path)
    files = sorted((dst / "bounding_box_train").glob("*.jpg"))
    expected = {}
    for f, mode in zip(files[:6], ["L", "RGBA", "I;16"] * 2):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        gray = np.asarray(Image.open(f).convert("L"))
        if mode == "I;16":
            img = Image.fromarray(gray.astype(np.uint16) * 257)  # full 16-bit range
        else:
            img = Image.fromarray(rgb).convert(mode)
        expected[f.with_suffix(".png")] = rgb if mode == "RGBA" else np.repeat(gray[..., None], 3, 2)
        f.unlink()
        img.save(f.with_suffix(".png"))
    for path, want in expected.items():
        got = np.asarray(load_image(str(path)))
        assert got.shape == want.shape and got.dtype == np.uint8
        # the same picture in RGB (16-bit: the top 8 bits, not saturated at 255)
        assert np.abs(got.astype(int) - want).max() <= 1, path.name
    o = tiny_options(tmp_path)
    o.adapt.epochs, o.run.eval_every = 1, 1
    res = adapt(load_dataset("synthetic", str(dst)), env["inits"], o, tmp_path / "run")
    assert 0.0 <= res.metrics["mAP"] <= 1.0


def test_too_few_identities_for_a_batch(env, capsys):
    big = 4 * 1000
    _fails(env, capsys, ["pretrain", "--config", str(env["cfg"]), "--out", str(env["out"]), "--seed", "1",
                         "--set", f"data.batch_size={big}"],
           f"training identities but a batch of data.batch_size={big}")


def test_fewer_clusters_than_p_names_epoch_and_options(env, capsys):
    err = _fails(env, capsys, _adapt(env, "adapt.k=3"), "epoch 0: clustering gave 3 clusters")
    assert "needs at least 4" in err and "data.batch_size" in err and "adapt.k" in err


def test_k_larger_than_the_number_of_images(env, capsys):
    n = len(load_dataset("synthetic", env["tgt"]).train)
    err = _fails(env, capsys, _adapt(env, f"adapt.k={n + 1}"), f"k={n + 1}")
    assert "epoch 0" in err and "lower adapt.k" in err


def test_all_noise_dbscan(env, capsys):
    err = _fails(env, capsys, _adapt(env, "adapt.method=dbscan", "adapt.min_samples=100000"),
                 "DBSCAN found no cluster")
    assert "epoch 0" in err and "adapt.rho" in err


def test_config_unknown_key_and_wrong_type(env, capsys, tmp_path):
    _fails(env, capsys, _adapt(env, "run.on_nonfinit=skip"), "unknown key run.on_nonfinit", code=2)
    _fails(env, capsys, _adapt(env, "adapt.iters=lots"), "adapt.iters: expected an integer", code=2)
    # choices come from the library's own lists and are checked when the config loads (exit 2),
    # not when the stage first uses them
    _fails(env, capsys, _adapt(env, "run.on_nonfinite=ignore"),
           "run.on_nonfinite = 'ignore' is not allowed; choose one of ['stop', 'skip']", code=2)


def test_unknown_cluster_backend_fails_when_the_config_loads(env, capsys, monkeypatch):
    """``adapt.cluster_backend: torch`` used to pass the config check and fail only after epoch
    0's extraction; now the config load refuses it, before any network is built."""
    from fastmmt.cluster.kmeans import KMEANS_BACKENDS

    def no_extraction(*args, **kwargs):
        raise AssertionError("extraction ran before the option was checked")
    monkeypatch.setattr("fastmmt.evaluation.extract.extract_features_of", no_extraction)  # every extraction path
    bad = "torch" if "torch" not in KMEANS_BACKENDS else "no-such-backend"
    err = _fails(env, capsys, _adapt(env, f"adapt.cluster_backend={bad}"), "adapt.cluster_backend", code=2)
    assert str(list(KMEANS_BACKENDS)) in err


def _nan_at(step: int | set, real):
    calls = [0]
    steps = step if isinstance(step, set) else {step}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] - 1 in steps:
            return out._replace(total=out.total * float("nan"))
        return out
    return poisoned


def test_nonfinite_loss_stops_naming_the_batch(env, capsys, monkeypatch):
    monkeypatch.setattr(mmt_mod, "mmt_loss", _nan_at(1, mmt_mod.mmt_loss))
    _fails(env, capsys, _adapt(env), "non-finite loss (nan) at epoch 0 iteration 1 (global step 1)")


def test_nonfinite_loss_skip_policy(env, monkeypatch, tmp_path):
    monkeypatch.setattr(mmt_mod, "mmt_loss", _nan_at(1, mmt_mod.mmt_loss))
    o = tiny_options(tmp_path)
    o.adapt.epochs, o.adapt.iters, o.run.eval_every, o.run.on_nonfinite = 1, 3, 0, "skip"
    before = [{k: v.clone() for k, v in torch.load(p)["model"].items()} for p in env["inits"]]
    adapt(load_dataset("synthetic", env["tgt"]), env["inits"], o, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert rec["skipped_steps"] == 1 and rec["global_step"] == 2  # the refused step updated nothing
    assert np.isfinite(rec["loss"])
    ck = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for net in ck["nets"] for v in net.values() if v.is_floating_point())
    assert not torch.equal(ck["nets"][0]["backbone.conv1.weight"], before[0]["backbone.conv1.weight"])


def test_nonfinite_features_stop(env, capsys, monkeypatch):
    import fastmmt.evaluation.extract as extract_mod  # MMT extracts through FeatureExtractor

    real = extract_mod.extract_features_of

    def nan_rows(*args, **kwargs):
        f, p, c = real(*args, **kwargs)
        f[-1][2] = float("inf")  # the last model's (teacher 2's) features
        return f, p, c
    monkeypatch.setattr(extract_mod, "extract_features_of", nan_rows)
    _fails(env, capsys, _adapt(env), "extract ep0: 1 of")


def test_disk_full_while_writing_a_checkpoint(env, capsys, monkeypatch, tmp_path):
    o = tiny_options(tmp_path)
    o.adapt.epochs, o.run.eval_every = 2, 0
    o.data.target_root = env["tgt"]
    cfg = tmp_path / "cfg.yaml"
    write_config(o, cfg)
    real_save, saves = torch.save, []

    def full_after_first(obj, f, *a, **k):
        saves.append(1)
        if isinstance(obj, dict) and obj.get("epoch") == 1 and "nets" in obj:
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_after_first)
    out = tmp_path / "out"
    rc = cli_main(["adapt", "--config", str(cfg), "--out", str(out), "--init", *env["inits"], "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "No space left on device" in err and "ckpt/last.pt" in err
    monkeypatch.setattr(torch, "save", real_save)
    run = out / "kmeans"
    assert torch.load(run / "ckpt" / "last.pt", weights_only=False)["epoch"] == 0  # previous one intact
    assert [json.loads(x)["epoch"] for x in (run / "log.jsonl").read_text().splitlines()] == [0]
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("sync_each_step", [False, True])
def test_every_step_of_an_epoch_skipped(env, monkeypatch, tmp_path, sync_each_step):
    """All steps refused (skip): the epoch's record has no loss means (None) instead of a division
    by zero, counts every step as skipped, and nothing moved (the checkpoint holds the starting
    students, global step 0)."""
    monkeypatch.setattr(mmt_mod, "mmt_loss", _nan_at(set(range(100)), mmt_mod.mmt_loss))
    o = tiny_options(tmp_path)
    o.adapt.epochs, o.adapt.iters, o.run.eval_every, o.run.on_nonfinite = 1, 2, 0, "skip"
    o.run.sync_each_step = sync_each_step
    adapt(load_dataset("synthetic", env["tgt"]), env["inits"], o, tmp_path / "run")
    rec = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    assert rec["skipped_steps"] == 2 and rec["global_step"] == 0
    assert rec["loss"] is None and rec["loss_ce"] is None
    ck = torch.load(tmp_path / "run" / "ckpt" / "last.pt", weights_only=False)
    start = torch.load(env["inits"][0])["model"]
    assert torch.equal(ck["nets"][0]["backbone.conv1.weight"], start["backbone.conv1.weight"])

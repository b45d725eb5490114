"""Paper configs: ImageNet weights required for Stage I, `none` = from scratch on purpose."""
from pathlib import Path

import pytest

from fastmmt.cli import main
from fastmmt.cli.config import ConfigError, check_pretrained, load_options

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted(p for p in (ROOT / "configs").glob("*.yaml") if p.name not in ("demo.yaml",))


def test_every_paper_config_requires_weights():
    assert len(PAPER) == 17  # the shared base + 8 k-means + 8 DBSCAN task configs
    for path in PAPER:
        o = load_options(path)
        assert o.model.pretrained is None and o.model.require_pretrained, path.name
        with pytest.raises(ConfigError, match=r"model\.pretrained is not set.*model\.pretrained=PATH.*"
                                              r"torchvision or IBN-Net.*model\.pretrained=none"):
            check_pretrained(o)


def test_the_message_names_the_file_format_of_the_arch():
    with pytest.raises(ConfigError, match="IBN-Net format, e.g. resnet50_ibn_a.pth.tar"):
        check_pretrained(load_options(ROOT / "configs" / "market2duke_ibn50a.yaml"))
    with pytest.raises(ConfigError, match="torchvision format, e.g. resnet50-19c8e357.pth"):
        check_pretrained(load_options(ROOT / "configs" / "market2duke_resnet50_dbscan.yaml"))


def test_a_path_or_none_lets_it_start():
    cfg = ROOT / "configs" / "duke2market_resnet50.yaml"
    o = load_options(cfg, ["model.pretrained=/weights/resnet50-19c8e357.pth"])
    check_pretrained(o)
    assert o.model.pretrained == "/weights/resnet50-19c8e357.pth"
    for word in ("none", "None", "NONE"):
        o = load_options(cfg, [f"model.pretrained={word}"])
        check_pretrained(o)  # from scratch on purpose
        assert o.model.pretrained is None and not o.model.require_pretrained


def test_demo_and_defaults_do_not_require_weights():
    check_pretrained(load_options(ROOT / "configs" / "demo.yaml"))
    check_pretrained(load_options(None))


def test_cli_pretrain_refuses_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["pretrain", "--config", str(ROOT / "configs" / "duke2market_ibn50a.yaml"),
               "--data-root", str(tmp_path / "nodata"), "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "model.pretrained is not set" in err and "model.pretrained=none" in err
    assert not out.exists()

"""Dataset loaders on generated folder trees of each layout (tiny JPEGs written here)."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from fastmmt.data import DatasetError, ImageReadError, ImageRecord, load_dataset, load_image


def _jpeg(path: str, value: int = 100) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.full((8, 4, 3), value, np.uint8)).save(path)
    return path


def _market_tree(root: str, folder: str, cams: int) -> str:
    base = os.path.join(root, folder)
    for name in ["0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c%ds2_000100_01.jpg" % cams,
                 "0005_c1s1_001051_02.jpg"]:
        _jpeg(os.path.join(base, "bounding_box_train", name))
    for name in ["0003_c1s1_000001_01.jpg", "0004_c2s1_000002_01.jpg"]:
        _jpeg(os.path.join(base, "query", name))
    for name in ["0003_c3s1_000003_01.jpg", "0000_c1s1_000004_01.jpg", "-1_c1s1_000005_01.jpg",
                 "0004_c1s1_000006_01.jpg"]:
        _jpeg(os.path.join(base, "bounding_box_test", name))
    with open(os.path.join(base, "bounding_box_test", "Thumbs.db"), "w") as f:
        f.write("not an image")  # non-image files are ignored
    return base


@pytest.mark.parametrize("name,folder,cams", [("market1501", "Market-1501-v15.09.15", 6),
                                              ("dukemtmc", "DukeMTMC-reID", 8)])
def test_market_like_layout(tmp_path, name, folder, cams):
    base = _market_tree(str(tmp_path), folder, cams)
    for root in (str(tmp_path), base):  # the parent folder or the release folder itself
        ds = load_dataset(name, root)
        assert ds.name == name and ds.root == base
        # train pids 2, 5, 7 relabelled in order to 0, 1, 2; cameras 0-based
        got = sorted((os.path.basename(r.path), r.pid, r.camid) for r in ds.train)
        assert got == [("0002_c1s1_000451_03.jpg", 0, 0), ("0002_c2s1_000551_01.jpg", 0, 1),
                       ("0005_c1s1_001051_02.jpg", 1, 0), ("0007_c%ds2_000100_01.jpg" % cams, 2, cams - 1)]
        assert ds.num_train_pids == 3 and ds.num_train_cams == 3
        assert sorted((r.pid, r.camid) for r in ds.query) == [(3, 0), (4, 1)]
        # junk (-1) dropped, distractor (0) kept with its original pid
        assert sorted((r.pid, r.camid) for r in ds.gallery) == [(0, 0), (3, 2), (4, 0)]
        assert all(os.path.isfile(r.path) for r in ds.train + ds.query + ds.gallery)


def test_market_camera_out_of_range(tmp_path):
    base = _market_tree(str(tmp_path), "Market-1501-v15.09.15", 6)
    _jpeg(os.path.join(base, "query", "0009_c7s1_000001_01.jpg"))
    with pytest.raises(DatasetError, match="0009_c7s1_000001_01.jpg.*camera 1-6"):
        load_dataset("market1501", str(tmp_path))
    # the same file is valid for Duke (8 cameras)
    os.rename(base, os.path.join(str(tmp_path), "DukeMTMC-reID"))
    assert any(r.camid == 6 for r in load_dataset("dukemtmc", str(tmp_path)).query)


def test_market_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("market1501", str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match="Market-1501-v15.09.15.*bounding_box_train"):
        load_dataset("market1501", str(tmp_path))  # empty folder: wrong layout
    base = _market_tree(str(tmp_path), "Market-1501-v15.09.15", 6)
    bad = _jpeg(os.path.join(base, "bounding_box_train", "person.jpg"))
    with pytest.raises(DatasetError, match="cannot parse.*person.jpg"):
        load_dataset("market1501", str(tmp_path))
    os.remove(bad)
    for f in os.listdir(os.path.join(base, "query")):
        os.remove(os.path.join(base, "query", f))
    with pytest.raises(DatasetError, match=r"query.*no usable images"):
        load_dataset("market1501", str(tmp_path))
    with pytest.raises(DatasetError, match="unknown dataset 'viper'"):
        load_dataset("viper", str(tmp_path))


def _msmt_tree(root: str) -> str:
    base = os.path.join(root, "MSMT17_V1")
    lists = {
        "train": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0001/0001_002_15_0303noon_0001_1.jpg 1"],
        "val": ["0004/0004_010_03_0303afternoon_0100_0.jpg 4"],
        "query": ["0011/0011_001_07_0113morning_0001_0.jpg 11"],
        "gallery": ["0011/0011_002_02_0113noon_0002_0.jpg 11", "0012/0012_003_01_0113noon_0003_0.jpg 12"],
    }
    for split, lines in lists.items():
        sub = "train" if split in ("train", "val") else "test"
        for line in lines:
            _jpeg(os.path.join(base, sub, line.split()[0]))
        with open(os.path.join(base, f"list_{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return base


def test_msmt17_layout(tmp_path):
    base = _msmt_tree(str(tmp_path))
    ds = load_dataset("msmt17", str(tmp_path))
    assert ds.root == base
    # train = train + val lists, pids 0, 1, 4 -> 0, 1, 2; camera = group 3, 1-15 -> 0-14
    assert [(r.pid, r.camid) for r in ds.train] == [(0, 0), (1, 14), (2, 2)]
    assert ds.train[2].path == os.path.join(base, "train", "0004", "0004_010_03_0303afternoon_0100_0.jpg")
    assert [(r.pid, r.camid) for r in ds.query] == [(11, 6)]
    assert [(r.pid, r.camid) for r in ds.gallery] == [(11, 1), (12, 0)]
    assert ds.query[0].path.startswith(os.path.join(base, "test"))


def test_msmt17_errors(tmp_path):
    base = _msmt_tree(str(tmp_path))
    with open(os.path.join(base, "list_query.txt"), "a") as f:
        f.write("0011/badname.jpg 11\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:2: cannot parse"):
        load_dataset("msmt17", base)
    os.remove(os.path.join(base, "list_val.txt"))
    with pytest.raises(DatasetError, match="list_val.txt"):
        load_dataset("msmt17", str(tmp_path))


def test_list_dataset(tmp_path):
    root = str(tmp_path)
    a, b = _jpeg(os.path.join(root, "img", "a.jpg")), _jpeg(os.path.join(root, "img", "b.jpg"))
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("path,pid,camid\nimg/a.jpg,10,0\n# comment\nimg/b.jpg,30,2\nimg/b.jpg,-1,2\n")
    with open(os.path.join(root, "query.txt"), "w") as f:
        f.write(f"{a} 10 1\n")
    with open(os.path.join(root, "gallery.txt"), "w") as f:
        f.write("img/b.jpg 0 0\n")
    ds = load_dataset("list", root)
    assert ds.train == [ImageRecord(a, 0, 0), ImageRecord(b, 1, 2)]
    assert ds.query == [ImageRecord(a, 10, 1)] and ds.gallery == [ImageRecord(b, 0, 0)]
    with open(os.path.join(root, "gallery.txt"), "a") as f:
        f.write("img/b.jpg zero 0\n")
    with pytest.raises(DatasetError, match=r"gallery.txt:2: cannot parse"):
        load_dataset("list", root)
    os.remove(os.path.join(root, "query.txt"))
    with pytest.raises(DatasetError, match="missing query.csv or query.txt"):
        load_dataset("list", root)


def test_load_image(tmp_path):
    p = _jpeg(str(tmp_path / "ok.jpg"), value=7)
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (4, 8)
    gray = str(tmp_path / "g.png")
    Image.fromarray(np.full((5, 3), 200, np.uint8)).save(gray)
    assert np.all(np.asarray(load_image(gray)) == 200) and load_image(gray).mode == "RGB"
    with pytest.raises(ImageReadError, match="missing.jpg.*no such file"):
        load_image(str(tmp_path / "missing.jpg"))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(DatasetError, match="text.jpg"):  # ImageReadError is a DatasetError
        load_image(str(tmp_path / "text.jpg"))
    big = str(tmp_path / "big.jpg")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(big)
    data = open(big, "rb").read()
    with open(str(tmp_path / "cut.jpg"), "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.jpg.*truncated"):
        load_image(str(tmp_path / "cut.jpg"))

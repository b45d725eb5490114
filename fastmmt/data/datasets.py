"""Loaders for the re-ID folder layouts: Market-1501, DukeMTMC-reID, MSMT17, list files and the
synthetic domains (Market layout). See docs/data.md for the exact layouts."""
from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable

from fastmmt.data.records import DatasetError, ImageRecord, ReIDDataset

MARKET_FOLDER = "Market-1501-v15.09.15"  # Market-1501's release folder (the synthetic data copies its layout)

MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")
MSMT_PATTERN = re.compile(r"([-\d]+)_([-\d]+)_([-\d]+)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def _resolve_root(root: str, folder: str, required: Iterable[str]) -> str:
    """``root/folder`` when it exists, else ``root`` itself when it holds the ``required`` entries."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root!r} is not a directory")
    required = list(required)
    for cand in (os.path.join(root, folder), root):
        if os.path.isdir(cand) and all(os.path.exists(os.path.join(cand, r)) for r in required):
            return cand
    raise DatasetError(
        f"dataset root {root!r}: expected {folder}/ (or that folder itself) containing "
        f"{', '.join(required)}; found neither {os.path.join(root, folder)!r} nor the entries in {root!r}")


def relabel(records: list[ImageRecord]) -> list[ImageRecord]:
    """Map the pids of ``records`` to 0..N-1 in increasing order of the original pid."""
    mapping = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
    return [ImageRecord(r.path, mapping[r.pid], r.camid) for r in records]


def _check_nonempty(records: list[ImageRecord], where: str, what: str) -> list[ImageRecord]:
    if not records:
        raise DatasetError(f"{where}: no usable images found (expected {what})")
    return records


def _scan_market_folder(folder: str, num_cams: int) -> list[ImageRecord]:
    """Records of every image in ``folder`` named ``PPPP_cC...``; pid -1 (junk) dropped."""
    if not os.path.isdir(folder):
        raise DatasetError(f"missing image folder {folder!r}")
    records = []
    for name in sorted(os.listdir(folder)):
        if not name.lower().endswith(IMAGE_EXTENSIONS):
            continue
        m = MARKET_PATTERN.search(name)
        if m is None:
            raise DatasetError(f"cannot parse {os.path.join(folder, name)!r}: expected a name like "
                               f"'0002_c1s1_000451_03.jpg' (pid_cCAMERA...)")
        pid, cam = int(m.group(1)), int(m.group(2))
        if pid == -1:
            continue
        if pid < 0 or not 1 <= cam <= num_cams:
            raise DatasetError(f"{os.path.join(folder, name)!r}: pid {pid} / camera {cam} out of range "
                               f"(expected pid >= -1 and camera 1-{num_cams})")
        records.append(ImageRecord(os.path.join(folder, name), pid, cam - 1))
    return _check_nonempty(records, folder, f"*.jpg images named pid_cCAMERA..., cameras 1-{num_cams}")


def _market_like(name: str, root: str, folder: str, num_cams: int) -> ReIDDataset:
    base = _resolve_root(root, folder, MARKET_SPLITS.values())
    splits = {s: _scan_market_folder(os.path.join(base, sub), num_cams) for s, sub in MARKET_SPLITS.items()}
    return ReIDDataset(name, base, relabel(splits["train"]), splits["query"], splits["gallery"])


def load_market1501(root: str) -> ReIDDataset:
    """Market-1501-v15.09.15: 6 cameras."""
    return _market_like("market1501", root, MARKET_FOLDER, 6)


def load_dukemtmc(root: str) -> ReIDDataset:
    """DukeMTMC-reID: 8 cameras."""
    return _market_like("dukemtmc", root, "DukeMTMC-reID", 8)


def load_synthetic(root: str) -> ReIDDataset:
    """A domain written by :func:`fastmmt.data.generate_synthetic` (Market layout, cameras 1-9)."""
    return _market_like("synthetic", root, MARKET_FOLDER, 9)


def _read_msmt_list(list_file: str, image_dir: str) -> list[ImageRecord]:
    if not os.path.isfile(list_file):
        raise DatasetError(f"missing list file {list_file!r} (expected lines 'path label')")
    records = []
    with open(list_file) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            fields = line.split()
            m = MSMT_PATTERN.search(os.path.basename(fields[0]))
            if len(fields) != 2 or m is None:
                raise DatasetError(f"{list_file}:{lineno}: cannot parse {line.strip()!r}; expected "
                                   f"'path label' with a basename like '0000_000_01_0303morning_0015_0.jpg'")
            pid, cam = int(m.group(1)), int(m.group(3))
            if pid < 0 or not 1 <= cam <= 15:
                raise DatasetError(f"{list_file}:{lineno}: pid {pid} / camera {cam} out of range "
                                   f"(expected pid >= 0 and camera 1-15)")
            records.append(ImageRecord(os.path.join(image_dir, fields[0]), pid, cam - 1))
    return records


def load_msmt17(root: str) -> ReIDDataset:
    """MSMT17_V1: train = list_train + list_val (images under train/), query/gallery under test/."""
    lists = [f"list_{s}.txt" for s in ("train", "val", "query", "gallery")]
    base = _resolve_root(root, "MSMT17_V1", lists + ["train", "test"])

    def read(split: str, sub: str) -> list[ImageRecord]:
        return _read_msmt_list(os.path.join(base, f"list_{split}.txt"), os.path.join(base, sub))

    train = read("train", "train") + read("val", "train")
    what = "lines 'path label'"
    return ReIDDataset(
        "msmt17", base,
        relabel(_check_nonempty(train, os.path.join(base, "list_train.txt + list_val.txt"), what)),
        _check_nonempty(read("query", "test"), os.path.join(base, "list_query.txt"), what),
        _check_nonempty(read("gallery", "test"), os.path.join(base, "list_gallery.txt"), what))


def _find_list_file(root: str, split: str) -> str:
    for ext in (".csv", ".txt"):
        path = os.path.join(root, split + ext)
        if os.path.isfile(path):
            return path
    raise DatasetError(f"list dataset {root!r}: missing {split}.csv or {split}.txt (lines 'path,pid,camid')")


def _read_generic_list(path: str) -> list[ImageRecord]:
    """``path,pid,camid`` rows (comma or whitespace separated, camid 0-based); '#' comments and a
    ``path,pid,camid`` header are skipped; relative paths are relative to the list file."""
    base = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            fields = [x for cell in row for x in cell.split()]
            if not fields or fields[0].startswith("#") or (lineno == 1 and fields[0].lower() == "path"):
                continue
            try:
                if len(fields) != 3:
                    raise ValueError
                p, pid, cam = fields[0], int(fields[1]), int(fields[2])
            except ValueError:
                raise DatasetError(f"{path}:{lineno}: cannot parse {row!r}; expected 'path,pid,camid' "
                                   f"with integer pid and 0-based integer camid") from None
            if cam < 0:
                raise DatasetError(f"{path}:{lineno}: camid {cam} is negative (expected 0-based cameras)")
            if pid == -1:
                continue
            records.append(ImageRecord(p if os.path.isabs(p) else os.path.join(base, p), pid, cam))
    return _check_nonempty(records, path, "rows 'path,pid,camid'")


def load_list_dataset(root: str) -> ReIDDataset:
    """Generic dataset: ``root/{train,query,gallery}.{csv,txt}`` with ``path,pid,camid`` rows."""
    if not os.path.isdir(root):
        raise DatasetError(f"dataset root {root!r} is not a directory")
    splits = {s: _read_generic_list(_find_list_file(root, s)) for s in ("train", "query", "gallery")}
    return ReIDDataset("list", root, relabel(splits["train"]), splits["query"], splits["gallery"])


LOADERS: dict[str, Callable[[str], ReIDDataset]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "list": load_list_dataset,
    "synthetic": load_synthetic,
}


def load_dataset(name: str, root: str) -> ReIDDataset:
    """Load dataset ``name`` (one of :data:`LOADERS`) from ``root`` (the folder holding the
    release folder, or the release folder itself)."""
    try:
        loader = LOADERS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(LOADERS)}") from None
    return loader(os.fspath(root))

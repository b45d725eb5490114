"""Plain records every part of fastmmt exchanges: one image, one dataset, one error type."""
from __future__ import annotations

from dataclasses import dataclass, field


class DatasetError(ValueError):
    """A dataset folder, list file or image name is not what the loader expects.

    The message names the offending path and what was expected there.
    """


class ImageReadError(DatasetError):
    """An image file is missing, truncated or not a decodable image."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"cannot read image {path!r}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class ImageRecord:
    """One image: its path, its identity (``pid``) and its 0-based camera index."""

    path: str
    pid: int
    camid: int


@dataclass
class ReIDDataset:
    """A re-ID dataset: ``train`` pids relabelled to 0..N-1; ``query``/``gallery`` keep the
    original pids (0 = distractor, kept in the gallery)."""

    name: str
    root: str
    train: list[ImageRecord] = field(default_factory=list)
    query: list[ImageRecord] = field(default_factory=list)
    gallery: list[ImageRecord] = field(default_factory=list)

    @property
    def num_train_pids(self) -> int:
        """Number of distinct training identities."""
        return len({r.pid for r in self.train})

    @property
    def num_train_cams(self) -> int:
        """Number of distinct cameras among the training images."""
        return len({r.camid for r in self.train})

    def summary(self) -> str:
        """One line per split: images, identities, cameras."""
        lines = [f"{self.name} ({self.root})"]
        for split in ("train", "query", "gallery"):
            recs = getattr(self, split)
            lines.append(f"  {split:8s} {len(recs):7d} images {len({r.pid for r in recs}):6d} ids "
                         f"{len({r.camid for r in recs}):3d} cams")
        return "\n".join(lines)

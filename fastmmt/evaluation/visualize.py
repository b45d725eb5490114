"""Rank lists drawn as PNG pictures (in the manner of torchreid's ``visrank``), with Pillow.

One picture per query. Each row shows the query, then its top-k gallery images left to right,
each in a frame: green when the gallery image has the query's identity, red otherwise; the query's
frame is black. Gallery images of the query's identity seen by the query's camera are left out,
as in the evaluation protocol (:mod:`fastmmt.evaluation.metrics`); ties keep gallery order (a
stable sort), as there. With a second distance matrix (e.g. after k-reciprocal re-ranking) a
second row under the first shows its list for the same query.

Layout (pixels; ``h x w`` = ``size``; every tile is exactly ``h x w`` with the frame drawn inside
it, ``frame`` pixels wide, around the image resized to ``(h - 2 frame) x (w - 2 frame)``):

- row ``r`` (0 = first distance matrix) starts at ``y = r * (label_height + h + row_gap)``; a
  ``label_height`` band with the row's name sits above its tiles;
- the query tile at ``x = 0``; gallery rank ``j`` (0-based) at
  ``x = w + query_gap + j * (w + spacing)``;
- picture size: ``w + query_gap + k * w + (k - 1) * spacing`` wide, ``rows * (label_height + h)
  + (rows - 1) * row_gap`` high, white background.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from fastmmt.data.image_io import load_image

GREEN = (0, 200, 0)
RED = (220, 0, 0)
BLACK = (0, 0, 0)
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class RankList:
    """The top of one query's ranking: gallery indices (best first) and whether each is a match."""

    query: int
    gallery: np.ndarray
    correct: np.ndarray


@dataclass(frozen=True)
class RankLayout:
    """Tile size and spacings of a picture (see the module docstring)."""

    size: tuple[int, int] = (256, 128)
    frame: int = 4
    query_gap: int = 30
    spacing: int = 8
    row_gap: int = 12
    label_height: int = 16

    def picture_size(self, topk: int, rows: int) -> tuple[int, int]:
        """(width, height) of a picture with ``topk`` gallery tiles and ``rows`` rows."""
        h, w = self.size
        return (w + self.query_gap + topk * w + (topk - 1) * self.spacing,
                rows * (self.label_height + h) + (rows - 1) * self.row_gap)

    def tile_origin(self, row: int, rank: int | None) -> tuple[int, int]:
        """(x, y) of the top-left pixel of the query tile (``rank=None``) or of gallery ``rank``."""
        h, w = self.size
        y = row * (self.label_height + h + self.row_gap) + self.label_height
        x = 0 if rank is None else w + self.query_gap + rank * (w + self.spacing)
        return x, y


def _ints(x, name: str, n: int) -> np.ndarray:
    a = np.asarray(x.cpu() if isinstance(x, torch.Tensor) else x)
    if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be {n} integers, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)


def rank_lists(distmat: torch.Tensor | np.ndarray, q_pids, g_pids, q_camids, g_camids, *, topk: int = 10,
               queries: Sequence[int] | None = None) -> list[RankList]:
    """Top-``topk`` gallery entries of each query in ``queries`` (default: all), smaller distance
    first, ties in gallery order, without the gallery entries of the same identity AND camera."""
    dist = np.asarray(distmat.cpu() if isinstance(distmat, torch.Tensor) else distmat)
    if dist.ndim != 2 or not np.issubdtype(dist.dtype, np.floating):
        raise ValueError(f"distmat must be a 2-D floating (Q, G) matrix, got shape {dist.shape} {dist.dtype}")
    nq, ng = dist.shape
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    qp, gp = _ints(q_pids, "q_pids", nq), _ints(g_pids, "g_pids", ng)
    qc, gc = _ints(q_camids, "q_camids", nq), _ints(g_camids, "g_camids", ng)
    out = []
    for q in (range(nq) if queries is None else queries):
        if not 0 <= int(q) < nq:
            raise ValueError(f"query index {q} out of range for {nq} queries")
        order = np.argsort(dist[q], kind="stable")
        keep = order[~((gp[order] == qp[q]) & (gc[order] == qc[q]))][:topk]
        out.append(RankList(int(q), keep, gp[keep] == qp[q]))
    return out


def _tile(path: str, layout: RankLayout, colour: tuple[int, int, int]) -> Image.Image:
    h, w = layout.size
    f = layout.frame
    tile = Image.new("RGB", (w, h), colour)
    tile.paste(load_image(path).resize((w - 2 * f, h - 2 * f), Image.BILINEAR), (f, f))
    return tile


def draw_rank_lists(query_path: str, rows: Sequence[tuple[str, RankList]], gallery_paths: Sequence[str],
                    out_path: str | os.PathLike, topk: int, layout: RankLayout = RankLayout()) -> Path:
    """Draw one query's rows (name, :class:`RankList`) to ``out_path`` (PNG) and return it."""
    h, w = layout.size
    if min(h, w) <= 2 * layout.frame:
        raise ValueError(f"tile size {layout.size} leaves no room inside a {layout.frame}-pixel frame")
    pic = Image.new("RGB", layout.picture_size(topk, len(rows)), WHITE)
    draw = ImageDraw.Draw(pic)
    query = _tile(query_path, layout, BLACK)
    for r, (name, ranked) in enumerate(rows):
        x, y = layout.tile_origin(r, None)
        pic.paste(query, (x, y))
        draw.text((x + 2, y - layout.label_height + 2), "query", fill=BLACK)
        gx, _ = layout.tile_origin(r, 0)
        draw.text((gx + 2, y - layout.label_height + 2), name, fill=BLACK)
        for j, (g, ok) in enumerate(zip(ranked.gallery.tolist(), ranked.correct.tolist())):
            pic.paste(_tile(gallery_paths[g], layout, GREEN if ok else RED), layout.tile_origin(r, j))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    pic.save(out_path, format="PNG")
    return out_path


def visualize_ranked_results(distmat: torch.Tensor | np.ndarray, query: Sequence, gallery: Sequence,
                             out_dir: str | os.PathLike, *, topk: int = 10, queries: Sequence[int] | None = None,
                             reranked_distmat: torch.Tensor | np.ndarray | None = None,
                             layout: RankLayout = RankLayout()) -> list[Path]:
    """One PNG per query in ``out_dir``: ``NNNNN_<query file stem>.png`` (``NNNNN`` = query index).

    ``query`` / ``gallery`` are records with ``path``, ``pid`` and ``camid``
    (:class:`fastmmt.data.ImageRecord`); ``queries`` picks the query indices (default: all).
    With ``reranked_distmat`` (same shape) a second row shows its ranking. An unreadable image is
    an error naming its path; pictures already written stay.
    """
    q_pids, g_pids = [r.pid for r in query], [r.pid for r in gallery]
    q_cams, g_cams = [r.camid for r in query], [r.camid for r in gallery]
    plain = rank_lists(distmat, q_pids, g_pids, q_cams, g_cams, topk=topk, queries=queries)
    reranked = None
    if reranked_distmat is not None:
        if tuple(np.shape(reranked_distmat)) != tuple(np.shape(distmat)):
            raise ValueError(f"reranked_distmat has shape {tuple(np.shape(reranked_distmat))}, "
                             f"distmat {tuple(np.shape(distmat))}")
        reranked = rank_lists(reranked_distmat, q_pids, g_pids, q_cams, g_cams, topk=topk, queries=queries)
    paths = [r.path for r in gallery]
    out = []
    for i, ranked in enumerate(plain):
        rows = [("ranked", ranked)] if reranked is None else [("ranked", ranked), ("re-ranked", reranked[i])]
        qpath = query[ranked.query].path
        name = f"{ranked.query:05d}_{Path(qpath).stem}.png"
        out.append(draw_rank_lists(qpath, rows, paths, Path(out_dir) / name, topk, layout))
    return out

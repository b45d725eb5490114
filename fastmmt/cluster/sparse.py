"""Small CSR helpers on plain numpy arrays (no scipy needed at run time)."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np


class CSR(NamedTuple):
    """Row-compressed sparse matrix: row r holds ``indices/data[indptr[r]:indptr[r+1]]``."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]

    def transpose_with_positions(self) -> tuple["CSR", np.ndarray]:
        """The transpose, also CSR (i.e. this matrix by columns; row order kept within columns),
        and where each stored entry of this matrix lands in it."""
        rows = np.repeat(np.arange(self.shape[0], dtype=np.int64), np.diff(self.indptr))
        order = np.argsort(self.indices, kind="stable")
        positions = np.empty_like(order)
        positions[order] = np.arange(len(order))
        counts = np.bincount(self.indices, minlength=self.shape[1])
        indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return CSR(indptr, rows[order], self.data[order], (self.shape[1], self.shape[0])), positions


def ragged_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + l)`` for every (s, l) pair, without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.int64) - before, lengths) + np.arange(total, dtype=np.int64)


def gather_rows(m: CSR, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries of the given rows: (position in ``rows`` of each entry, column, value)."""
    starts = m.indptr[rows]
    lengths = m.indptr[rows + 1] - starts
    pos = ragged_positions(starts, lengths)
    owner = np.repeat(np.arange(len(rows), dtype=np.int64), lengths)
    return owner, m.indices[pos], m.data[pos]


def csr_from_blocks(blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], shape: tuple[int, int]) -> CSR:
    """Stack row blocks given as (row counts, column ids, values) into one CSR matrix."""
    counts = np.concatenate([b[0] for b in blocks]) if blocks else np.zeros(0, np.int64)
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    indices = np.concatenate([b[1] for b in blocks]).astype(np.int64) if blocks else np.zeros(0, np.int64)
    data = np.concatenate([b[2] for b in blocks]) if blocks else np.zeros(0)
    return CSR(indptr, indices, data, shape)

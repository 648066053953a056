"""The SID table: item id -> codes, one row per item, with the dedup digit that makes every SID unique.

Files in a table folder (``np.save``, read with ``allow_pickle=False``):
``sid_table.npy`` ``[N, D]`` int32 codes (D = levels, + 1 with the dedup digit), ``item_ids.npy`` ``[N]``
int64 (row i of the table is item ``item_ids[i]``), ``sid_table.json`` (levels, codebook sizes, dedup).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np


def dedup_digit(codes: np.ndarray) -> np.ndarray:
    """TIGER's extra digit (Rajput et al. 2023, Sec. 3.1): items whose codes collide get 0, 1, 2, ... in row
    order, so ``[codes, digit]`` is unique. ``codes [N, L] -> digit [N]`` int32."""
    n = len(codes)
    order = np.lexsort(codes.T[::-1])  # rows sorted by (c_1, ..., c_L), stable: row order within a group
    sorted_codes = codes[order]
    starts = np.ones(n, bool)
    starts[1:] = (sorted_codes[1:] != sorted_codes[:-1]).any(axis=1)
    group_start = np.maximum.accumulate(np.where(starts, np.arange(n), 0))
    digit = np.empty(n, np.int32)
    digit[order] = np.arange(n) - group_start
    return digit


def write_table(out: str | pathlib.Path, codes: np.ndarray, ids: np.ndarray, codebook_sizes: list[int],
                dedup: bool) -> np.ndarray:
    """Write the table (``codes [N, L]``, with the dedup digit appended when ``dedup``); returns what was written."""
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = np.concatenate([codes, dedup_digit(codes)[:, None]], axis=1) if dedup else codes
    table = np.ascontiguousarray(table, np.int32)
    np.save(out / "sid_table.npy", table)
    np.save(out / "item_ids.npy", np.asarray(ids, np.int64))
    sizes = list(map(int, codebook_sizes)) + ([int(table[:, -1].max()) + 1] if dedup else [])
    (out / "sid_table.json").write_text(json.dumps({"items": len(table), "levels": len(codebook_sizes),
                                                    "dedup": bool(dedup), "sizes": sizes}, indent=2))
    return table


def load_table(folder: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(table [N, D] int32, item_ids [N] int64, meta)`` from a folder written by ``write_table``."""
    folder = pathlib.Path(folder)
    return (np.load(folder / "sid_table.npy", allow_pickle=False), np.load(folder / "item_ids.npy", allow_pickle=False),
            json.loads((folder / "sid_table.json").read_text()))


def codes_of(item_ids: np.ndarray, table: np.ndarray, table_ids: np.ndarray) -> np.ndarray:
    """Each of ``item_ids [n]``'s SID from a table (``table [N, D]``, ``table_ids [N]``) -> ``[n, D]`` int32,
    rows of -1 for items the table does not hold."""
    order = np.argsort(table_ids, kind="stable")
    pos = np.clip(np.searchsorted(table_ids[order], item_ids), 0, len(order) - 1)
    found = table_ids[order][pos] == item_ids
    return np.where(found[:, None], table[order][pos], -1).astype(np.int32)

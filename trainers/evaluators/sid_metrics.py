"""Semantic-ID quality: collisions, codebook utilisation and code entropy of an assignment.

``codes [N, L]`` int (the semantic levels, without a dedup digit), ``sizes [L]`` the codebook sizes.
Entropies are in bits; a level's perplexity is ``2^H``, the number of equally used codes it is worth.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _group_sizes(codes: np.ndarray) -> np.ndarray:
    """For each distinct row of ``codes [N, m]``, how many rows share it."""
    _, counts = np.unique(codes, axis=0, return_counts=True)
    return counts


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy ``H = -sum_i p_i log2 p_i`` of the distribution ``p = counts / sum(counts)``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def sid_metrics(codes: np.ndarray, sizes: Sequence[int]) -> dict[str, float]:
    """Every SID metric of one assignment:

    * ``collision_rate``: items sharing their full SID with another item / N;
    * ``icr``: items with a unique SID / N (``1 - collision_rate``);
    * ``cur/level_l``: codes used at level l / K_l; ``cur/l1xl2``: distinct (c_1, c_2) / (K_1 K_2);
      ``cur/total``: distinct SIDs / prod K;
    * ``entropy/level_l`` and ``entropy/sid`` (of the full tuple), ``perplexity/level_l``;
    * ``dead_codes/level_l``: codes no item uses; ``largest_group``: most items sharing one SID.
    """
    codes = np.asarray(codes)
    n, levels = codes.shape
    groups = _group_sizes(codes)
    shared = int(groups[groups > 1].sum())
    out = {"collision_rate": shared / n, "icr": (n - shared) / n, "unique_sids": float(len(groups)),
           "cur/total": len(groups) / float(np.prod(np.asarray(sizes, np.float64))),
           "entropy/sid": entropy_bits(groups), "largest_group": float(groups.max())}
    for level in range(levels):
        counts = np.bincount(codes[:, level], minlength=sizes[level])
        h = entropy_bits(counts)
        out[f"cur/level_{level + 1}"] = float((counts > 0).sum()) / sizes[level]
        out[f"entropy/level_{level + 1}"] = h
        out[f"perplexity/level_{level + 1}"] = float(2.0 ** h)
        out[f"dead_codes/level_{level + 1}"] = float((counts == 0).sum())
    if levels >= 2:
        out["cur/l1xl2"] = len(_group_sizes(codes[:, :2])) / float(sizes[0] * sizes[1])
    return out

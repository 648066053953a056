"""A PNG per SID assignment: each level's code usage (counts sorted, dead codes visible) and the sizes of
the collision groups (items sharing one full SID), beside the numbers of ``sid_metrics``.

``codes [N, L]`` int (the SID levels, without a dedup digit), ``sizes [L]`` the codebook sizes.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

from trainers.evaluators.sid_metrics import _group_sizes, sid_metrics


def write_sid_png(codes: np.ndarray, sizes: Sequence[int], path: str | pathlib.Path) -> pathlib.Path:
    """One row of panels: per level, the codes' item counts sorted high to low (a step per code; dead codes
    are the zero-height run at the right end; dashed line: ``N / K``, a perfectly balanced level), then the
    histogram of collision-group sizes (how many SIDs are shared by 1, 2, 3, ... items; log counts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    codes = np.asarray(codes)
    n, levels = codes.shape
    if len(sizes) != levels:
        raise ValueError(f"codes have {levels} levels but sizes has {len(sizes)} entries: {list(sizes)}")
    fig, axes = plt.subplots(1, levels + 1, figsize=(3.2 * (levels + 1), 3.0), squeeze=False)
    for level, ax in enumerate(axes[0, :levels]):
        counts = np.sort(np.bincount(codes[:, level], minlength=sizes[level]))[::-1]
        dead = int((counts == 0).sum())
        ax.stairs(counts, fill=True, color="tab:blue")  # one filled step per code: fast at K = 1024
        ax.axhline(n / sizes[level], color="k", linestyle="--", linewidth=0.8)
        ax.set(title=f"level {level + 1}: K={sizes[level]}, {dead} dead", xlabel="code (by count)", ylabel="items")
    groups = _group_sizes(codes)
    values, freq = np.unique(groups, return_counts=True)
    ax = axes[0, levels]
    ax.bar(values, freq, width=0.8, color="tab:orange")
    ax.set_yscale("log")
    ax.set(title=f"collision groups: {len(groups)} SIDs, largest {int(groups.max())}", xlabel="items per SID",
           ylabel="SIDs")
    fig.tight_layout()
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sid_report(codes: np.ndarray, sizes: Sequence[int], workdir: str | pathlib.Path, step: int | None = None,
               name: str | None = None) -> dict[str, float]:
    """``sid_metrics(codes, sizes)``, and the PNG of the assignment written to ``workdir/sid_step{step}.png``
    (one per evaluation, so a run keeps its history; ``name`` overrides the file name, e.g.
    ``metrics.png``). Returns the metrics."""
    write_sid_png(codes, sizes, pathlib.Path(workdir) / (name or f"sid_step{step}.png"))
    return sid_metrics(codes, sizes)

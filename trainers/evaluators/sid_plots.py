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
    are the zero-height run at the right end, shaded red; dashed line: ``N / K``, a perfectly balanced level), then the
    histogram of collision-group sizes (how many SIDs are shared by 1, 2, 3, ... items; log counts)."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, Agg for .png

    codes = np.asarray(codes)
    n, levels = codes.shape
    if len(sizes) != levels:
        raise ValueError(f"codes have {levels} levels but sizes has {len(sizes)} entries: {list(sizes)}")
    fig = Figure(figsize=(3.2 * (levels + 1), 3.0))
    axes = fig.subplots(1, levels + 1, squeeze=False)
    for level, ax in enumerate(axes[0, :levels]):
        counts = np.sort(np.bincount(codes[:, level], minlength=sizes[level]))[::-1]
        dead = int((counts == 0).sum())
        ax.stairs(counts, fill=True, color="tab:blue")  # one filled step per code: fast at K = 1024
        ax.axhline(n / sizes[level], color="k", linestyle="--", linewidth=0.8)
        if dead:
            ax.axvspan(sizes[level] - dead, sizes[level], color="tab:red", alpha=0.25, linewidth=0)
        ax.set(title=f"level {level + 1}: K={sizes[level]}, {dead} dead", xlabel="code (by count)", ylabel="items")
    groups = _group_sizes(codes)
    values, freq = np.unique(groups, return_counts=True)
    ax = axes[0, levels]
    ax.bar(values, freq, width=0.8, color="tab:orange")
    ax.set_yscale("log")
    ax.set(title=f"collision groups\n{len(groups)} SIDs, largest {int(groups.max())}", xlabel="items per SID",
           ylabel="SIDs")
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.subplots_adjust(left=0.25 / (levels + 1), right=1 - 0.05 / (levels + 1), bottom=0.16, top=0.84,
                        wspace=0.35)  # fixed margins: tight_layout costs a second
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def sid_report(codes: np.ndarray, sizes: Sequence[int], workdir: str | pathlib.Path, step: int | None = None,
               name: str | None = None) -> dict[str, float]:
    """``sid_metrics(codes, sizes)``, and the PNG of the assignment written to ``workdir/sid_step{step}.png``
    (one per evaluation, so a run keeps its history; ``name`` overrides the file name, e.g.
    ``metrics.png``). Returns the metrics."""
    write_sid_png(codes, sizes, pathlib.Path(workdir) / (name or f"sid_step{step}.png"))
    return sid_metrics(codes, sizes)

"""The prefix trie of a SID table as static arrays, for a jitted constrained decoder.

Prefixes of depth ``l`` (the first ``l`` codes of some SID) are numbered ``0 .. n_l - 1`` in lexicographic
order (depth 0: the root alone). Level ``l`` maps a depth-``l`` prefix and a code to its child at depth
``l + 1``:

* a **dense** level (the first ``dense_levels``): ``next_l [n_l, K_l]`` int32, the child or -1;
* a **CSR** level (below, where ``n_l x K_l`` would be large): ``offsets_l [n_l + 1]`` and ``labels_l [nnz]``,
  the codes allowed after prefix ``p`` being ``labels_l[offsets_l[p] : offsets_l[p + 1]]`` (sorted); since
  children are numbered in the same order, the child of edge ``e`` is prefix ``e``. A decoder reads at most
  ``max_degree_l`` labels per prefix: static shapes.

Leaves (full SIDs) point to table rows: ``leaf_offsets [n_D + 1]``, ``leaf_rows [N]`` (several rows per leaf
only without the dedup digit). ``save_trie``/``load_trie`` round-trip it as ``trie.npz`` + ``trie.json``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Trie:
    arrays: dict[str, jax.Array | np.ndarray]  # next_l | offsets_l + labels_l per level, leaf_offsets, leaf_rows
    sizes: tuple[int, ...] = dataclasses.field(metadata={"static": True})  # K_l per level
    dense_levels: int = dataclasses.field(metadata={"static": True})
    max_degree: tuple[int, ...] = dataclasses.field(metadata={"static": True})

    @property
    def depth(self) -> int:
        return len(self.sizes)

    def dense(self, level: int) -> bool:
        return level < self.dense_levels


def build_trie(table: np.ndarray, sizes: list[int] | tuple[int, ...], dense_levels: int = 1) -> Trie:
    """``table [N, D]`` int codes (``table[:, l] < sizes[l]``) -> its trie."""
    table = np.asarray(table, np.int64)
    n, depth = table.shape
    if len(sizes) != depth:
        raise ValueError(f"trie: {depth} code columns but {len(sizes)} codebook sizes")
    for level, k in enumerate(sizes):
        bad = np.flatnonzero((table[:, level] < 0) | (table[:, level] >= k))
        if len(bad):
            raise ValueError(f"trie: row {bad[0]} has code {table[bad[0], level]} at level {level}, outside [0, {k})")
    order = np.lexsort(table.T[::-1])
    rows = table[order]
    arrays: dict[str, np.ndarray] = {}
    parent = np.zeros(n, np.int64)  # each sorted row's prefix id at the current depth
    max_degree = []
    for level in range(depth):
        change = np.ones(n, bool)
        change[1:] = (rows[1:, :level + 1] != rows[:-1, :level + 1]).any(axis=1)
        child = np.cumsum(change) - 1                     # prefix id at depth level + 1
        edges = np.flatnonzero(change)                    # one per child, in child order
        edge_parent, edge_label = parent[edges], rows[edges, level]
        n_parents = int(parent[-1]) + 1
        degree = np.bincount(edge_parent, minlength=n_parents)
        max_degree.append(int(degree.max()))
        if level < dense_levels:
            table_l = np.full((n_parents, sizes[level]), -1, np.int32)
            table_l[edge_parent, edge_label] = np.arange(len(edges), dtype=np.int32)
            arrays[f"next_{level}"] = table_l
        else:
            arrays[f"offsets_{level}"] = np.concatenate([[0], np.cumsum(degree)]).astype(np.int32)
            arrays[f"labels_{level}"] = edge_label.astype(np.int32)
        parent = child
    n_leaves = int(parent[-1]) + 1
    arrays["leaf_offsets"] = np.concatenate([[0], np.cumsum(np.bincount(parent, minlength=n_leaves))]).astype(np.int32)
    arrays["leaf_rows"] = order.astype(np.int32)
    return Trie(arrays, tuple(map(int, sizes)), int(dense_levels), tuple(max_degree))


_COMPARE_MAX = 4096  # max_degree x K up to which ``allowed`` compares labels with every code instead of scattering


def allowed(trie: Trie, level: int, prefix: jax.Array) -> jax.Array:
    """The codes a decoder may emit at ``level`` after each prefix: ``prefix [b]`` int (-1: a dead beam) ->
    ``[b, K_level]`` bool. ``level`` is static (decoders unroll over the few levels)."""
    k, a = trie.sizes[level], trie.arrays
    live = prefix >= 0
    p = jnp.maximum(prefix, 0)
    if trie.dense(level):
        return (a[f"next_{level}"][p] >= 0) & live[:, None]
    pos, valid = _row_positions(trie, level, p)
    labels = jnp.where(valid & live[:, None], a[f"labels_{level}"][pos], k)  # k: dropped by the scatter
    if trie.max_degree[level] * k <= _COMPARE_MAX:  # small rows (a dedup digit): compare, no serial scatter
        return (labels[:, :, None] == jnp.arange(k)[None, None]).any(axis=1)
    return jnp.zeros((prefix.shape[0], k), bool).at[jnp.arange(prefix.shape[0])[:, None], labels].set(True, mode="drop")


def advance(trie: Trie, level: int, prefix: jax.Array, code: jax.Array) -> jax.Array:
    """The depth-``level + 1`` prefix after emitting ``code [b]`` from ``prefix [b]``; -1 where not allowed."""
    a = trie.arrays
    live = (prefix >= 0) & (code >= 0) & (code < trie.sizes[level])
    p, c = jnp.maximum(prefix, 0), jnp.clip(code, 0, trie.sizes[level] - 1)
    if trie.dense(level):
        child = a[f"next_{level}"][p, c]
    else:
        pos, valid = _row_positions(trie, level, p)
        match = valid & (a[f"labels_{level}"][pos] == c[:, None])
        child = jnp.where(match.any(axis=1), pos[jnp.arange(p.shape[0]), jnp.argmax(match, axis=1)], -1)
    return jnp.where(live, child, -1)


def children(trie: Trie, level: int, prefix: jax.Array) -> jax.Array:
    """``allowed`` and ``advance`` in one lookup: ``prefix [b]`` (-1: dead) -> ``[b, K_level]`` int32, the child
    prefix of every code, -1 where the code is not allowed."""
    k, a = trie.sizes[level], trie.arrays
    live = prefix >= 0
    p = jnp.maximum(prefix, 0)
    if trie.dense(level):
        return jnp.where(live[:, None], a[f"next_{level}"][p], -1)
    pos, valid = _row_positions(trie, level, p)                     # edge e's child is prefix e
    labels = jnp.where(valid & live[:, None], a[f"labels_{level}"][pos], k)
    if trie.max_degree[level] * k <= _COMPARE_MAX:
        return jnp.where(labels[:, :, None] == jnp.arange(k)[None, None], pos[:, :, None], -1).max(axis=1)
    rows = jnp.arange(prefix.shape[0])[:, None]
    return jnp.full((prefix.shape[0], k), -1, jnp.int32).at[rows, labels].set(pos.astype(jnp.int32), mode="drop")


def _row_positions(trie: Trie, level: int, p: jax.Array) -> tuple[jax.Array, jax.Array]:
    offsets = trie.arrays[f"offsets_{level}"]
    pos = offsets[p][:, None] + jnp.arange(trie.max_degree[level])[None]
    return jnp.minimum(pos, trie.arrays[f"labels_{level}"].shape[0] - 1), pos < offsets[p + 1][:, None]


def accepts(trie: Trie, sids: jax.Array) -> jax.Array:
    """Whether each full SID is in the table: ``sids [b, D] -> [b]`` bool, by the decoder's own walk."""
    prefix = jnp.zeros(sids.shape[0], jnp.int32)
    for level in range(trie.depth):
        prefix = advance(trie, level, prefix, sids[:, level])
    return prefix >= 0


def leaf_rows(trie: Trie, leaf: int) -> np.ndarray:
    """The table rows (items) whose full SID is leaf ``leaf`` (a depth-D prefix id)."""
    a = trie.arrays
    return np.asarray(a["leaf_rows"])[int(a["leaf_offsets"][leaf]):int(a["leaf_offsets"][leaf + 1])]


def save_trie(trie: Trie, folder: str | pathlib.Path) -> None:
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "trie.npz", **{k: np.asarray(v) for k, v in trie.arrays.items()})
    (folder / "trie.json").write_text(json.dumps({"sizes": trie.sizes, "dense_levels": trie.dense_levels,
                                                  "max_degree": trie.max_degree}, indent=2))


def load_trie(folder: str | pathlib.Path) -> Trie:
    """The trie written by ``save_trie`` (host numpy arrays; ``jax.device_put`` it for a decoder)."""
    folder = pathlib.Path(folder)
    meta = json.loads((folder / "trie.json").read_text())
    with np.load(folder / "trie.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    return Trie(arrays, tuple(meta["sizes"]), int(meta["dense_levels"]), tuple(meta["max_degree"]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrieConstraint:
    """A ``Trie`` as the constraint of ``models.beam_search`` (a pytree: pass it into ``jax.jit``).

    ``allowed(level, prefix [N]) -> [N, K_level] bool``; ``advance(level, prefix [N], code [N]) -> [N]``; and
    ``children(level, prefix [N]) -> [N, K_level]`` int32 (both in one lookup, which the search prefers)."""

    trie: Trie

    def allowed(self, level: int, prefix: jax.Array) -> jax.Array:
        return allowed(self.trie, level, prefix)

    def advance(self, level: int, prefix: jax.Array, code: jax.Array) -> jax.Array:
        return advance(self.trie, level, prefix, code)

    def children(self, level: int, prefix: jax.Array) -> jax.Array:
        return children(self.trie, level, prefix)


def leaves_to_items(trie_leaf_offsets: np.ndarray, trie_leaf_rows: np.ndarray, item_ids: np.ndarray,
                    leaves: np.ndarray, k: int) -> np.ndarray:
    """Beam leaves -> item ids, on the host: ``leaves [B, W]`` (best first, -1: none) -> ``[B, k]`` (-1 padded).

    A leaf shared by several items (no dedup digit) gives all its table rows, in table order, at the rank
    of its beam; the list is then cut to ``k``. ``trie_leaf_offsets``/``trie_leaf_rows`` are the trie's
    ``leaf_offsets``/``leaf_rows``; ``item_ids [N]`` is the table's row -> item id."""
    offsets, rows, item_ids = (np.asarray(a) for a in (trie_leaf_offsets, trie_leaf_rows, item_ids))
    out = np.full((len(leaves), k), -1, np.int64 if item_ids.dtype.kind in "iu" else item_ids.dtype)
    for b, beam in enumerate(np.asarray(leaves)):
        found = [rows[offsets[leaf]:offsets[leaf + 1]] for leaf in beam if leaf >= 0]
        picked = np.concatenate(found)[:k] if found else np.zeros(0, np.int64)
        out[b, :len(picked)] = item_ids[picked]
    return out

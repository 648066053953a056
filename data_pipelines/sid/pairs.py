"""Co-engaged item pairs for a SID tokenizer's contrastive term (QuaSID) and its valid-pair mask.

Three pieces::

    pairs = session_pairs(read_rows(root, "recall"), max_per_session=50)   # int64 [P, 2] item ids
    rows = load_pairs("pairs.npy", item_ids)                              # int32 [P, 2] embedding rows
    offsets, partners = partner_table(rows, len(item_ids))                # CSR: row r's partners

**Session pairs** (``session_pairs``). A session is the set of recall rows sharing ``session_id`` within
one split (``(split, session_id)``: a repeated id in one split is one session, the union of its rows, as
``examples.recall_queries`` does); only the splits in ``splits`` are read (default ``("train",)``, so no
held-out interaction reaches the tokenizer). Its engaged items are ``clicked ∪ purchased`` (a purchase counts
as a click), optionally kept to the ids in ``items`` (a catalogue; the others are counted as dropped).
Its pairs are all unordered pairs ``(a, b)``, ``a < b``, of distinct engaged items; a session with more than
``max_per_session`` of them (0: no cap) keeps ``max_per_session`` drawn without replacement by
``np.random.default_rng([seed, session_id])`` (so a session's draw does not depend on the file order or the
other sessions). The pairs of all sessions are then deduplicated and sorted: ``[P, 2]`` int64, each row
``a < b``, rows in lexicographic order.

**Pair file** (``pairs.npy``): ``[P, 2]`` integer item ids (int64 as written; any integer dtype is read),
one unordered pair a row, ids from the embedding id map (``items.ids.npy``, or row numbers without one),
no pickle. ``load_pairs`` maps them to embedding rows and refuses a wrong shape or dtype, an unknown id
and a self-pair, naming the file and the row. Repeated pairs (either order) are allowed; the partner table
merges them.

**Partner table** (``partner_table``): the symmetric CSR adjacency of the pairs over ``n`` rows: row ``r``'s
partners are ``partners[offsets[r]:offsets[r + 1]]``, sorted and unique; ``(a, b)`` gives ``b`` to ``a`` and
``a`` to ``b``. A contrastive loss reads it to mask out in-batch "negatives" that are in fact co-engaged.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np


class PairError(ValueError):
    """An unusable pair file; the message names the file and the row."""


def _ids(x: Any) -> list[int]:
    return [int(i) for i in (x.tolist() if isinstance(x, np.ndarray) else x)]


def session_items(rows: Iterable[Mapping[str, Any]], splits: Sequence[str] | None = ("train",),
                  items: Iterable[int] | None = None) -> tuple[dict[tuple[str, int], list[int]], int]:
    """Recall rows -> ``({(split, session_id): sorted engaged item ids}, dropped)``: ``clicked ∪ purchased``
    per session of ``splits`` (None: every split); with ``items``, ids outside it are dropped and counted."""
    keep = None if items is None else {int(i) for i in items}
    wanted = None if splits is None else {str(s).lower() for s in splits}
    sessions: dict[tuple[str, int], set[int]] = {}
    dropped = 0
    for row in rows:
        split = str(row["split"]).lower()
        if wanted is not None and split not in wanted:
            continue
        engaged = set(_ids(row["clicked_item_ids"])) | set(_ids(row["purchased_item_ids"]))
        if keep is not None:
            dropped += len(engaged - keep)
            engaged &= keep
        sessions.setdefault((split, int(row["session_id"])), set()).update(engaged)
    return {k: sorted(v) for k, v in sessions.items()}, dropped


def pairs_of(items: Sequence[int], max_pairs: int = 0, seed: int = 0, session_id: int = 0) -> np.ndarray:
    """Sorted distinct item ids ``[m]`` -> their unordered pairs ``[min(m (m - 1) / 2, max_pairs), 2]`` int64
    (``a < b``), all of them or ``max_pairs`` drawn by ``default_rng([seed, session_id])`` (0: all)."""
    a = np.asarray(items, dtype=np.int64)
    i, j = np.triu_indices(len(a), k=1)
    out = np.stack([a[i], a[j]], axis=1)
    if max_pairs and len(out) > max_pairs:
        pick = np.random.default_rng([int(seed), int(session_id) & 0xFFFFFFFFFFFFFFFF])
        out = out[np.sort(pick.choice(len(out), size=max_pairs, replace=False))]
    return out


def session_pairs(rows: Iterable[Mapping[str, Any]], *, max_per_session: int = 50, seed: int = 0,
                  splits: Sequence[str] | None = ("train",), items: Iterable[int] | None = None) -> np.ndarray:
    """Recall rows -> ``[P, 2]`` int64 co-engaged item id pairs (the module docstring states the rule)."""
    sessions, _ = session_items(rows, splits, items)
    chunks = [pairs_of(ids, max_per_session, seed, sid) for (_, sid), ids in sessions.items() if len(ids) > 1]
    if not chunks:
        return np.zeros((0, 2), np.int64)
    return np.unique(np.concatenate(chunks), axis=0)


def save_pairs(path: str | pathlib.Path, pairs: np.ndarray) -> pathlib.Path:
    """Write ``[P, 2]`` item id pairs as int64 ``.npy`` (the pair file format)."""
    path = pathlib.Path(path)
    pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, pairs)
    return path


def load_pairs(path: str | pathlib.Path, item_ids: np.ndarray) -> np.ndarray:
    """A pair file ``[P, 2]`` of item ids -> ``[P, 2]`` int32 rows of ``item_ids`` (``[N]``, the embedding
    id map). Errors name the file and the first bad row."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise PairError(f"pairs {path}: no such file")
    try:
        pairs = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise PairError(f"pairs {path}: not a .npy array without pickles ({e})") from None
    if pairs.ndim != 2 or pairs.shape[1] != 2:
        raise PairError(f"pairs {path}: expected a [P, 2] array of item ids, got shape {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise PairError(f"pairs {path}: dtype {pairs.dtype}, expected integer item ids (int64)")
    same = np.flatnonzero(pairs[:, 0] == pairs[:, 1])
    if len(same):
        r = int(same[0])
        raise PairError(f"pairs {path}: row {r} pairs item {int(pairs[r, 0])} with itself")
    item_ids = np.asarray(item_ids, dtype=np.int64)
    order = np.argsort(item_ids, kind="stable")
    flat = pairs.astype(np.int64).ravel()
    pos = np.minimum(np.searchsorted(item_ids[order], flat), max(len(item_ids) - 1, 0))
    known = item_ids[order][pos] == flat if len(item_ids) else np.zeros(len(flat), bool)
    if not known.all():
        k = int(np.argmin(known))
        raise PairError(f"pairs {path}: row {k // 2} names item {int(flat[k])}, which is not in the embeddings' "
                        f"id map ({len(item_ids)} items)")
    return order[pos].reshape(-1, 2).astype(np.int32)


def partner_table(rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of rows ``[P, 2]`` over ``n`` items -> ``(offsets [n + 1] int64, partners [nnz] int32)``: the
    symmetric CSR adjacency, each row's partners sorted and unique (self-pairs are errors upstream)."""
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise ValueError(f"partner_table: pair rows must lie in [0, {n}), got [{rows.min()}, {rows.max()}]")
    edges = np.unique(np.concatenate([rows, rows[:, ::-1]]), axis=0) if len(rows) else np.zeros((0, 2), np.int64)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(edges[:, 0], minlength=n), out=offsets[1:])
    return offsets, edges[:, 1].astype(np.int32)

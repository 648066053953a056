"""Retrieval evaluation: exact and ScaNN top-k search over a gallery, scored against relevance.

Every retrieval task (TIGER-FG image->product, KuaiSearch recall, ...) reuses this module:

* ``ExactSearcher``: chunked matmul + ``argpartition`` top-k, memory bounded by chunking over
  both queries and gallery. It is the ground truth. ``backend="jax"`` (or "auto" for large
  searches) runs ``exact_search.JaxExactSearch`` instead: jitted chunked matmul + ``lax.top_k``,
  same ids and tie order.
* ``tune_scann`` / ``build_tuned_scann``: the rule below is a starting point; the search is
  widened (leaves-to-search, reorder) until ScaNN's recall@k against exact search on a query
  sample reaches ``target_recall`` (default 0.99), or a budget stops it, in which case its numbers
  are reported as rejected, not final. When the tuned search needs more than 10% of the leaves, the
  tree is rebuilt with half as many (up to 3 times) and the fastest index meeting the target kept.
* ``ScannSearcher``: ScaNN 1.4.2, configured from the corpus size by ``scann_params_for``
  (rule below), searched with ``search_batched_parallel``.
* ``evaluate_retrieval(query_emb, gallery_emb, gallery_ids, relevant, ks=..., ann=..., out_dir=...,
  target_recall=0.99)``
  searches exactly and with ScaNN, and reports Recall@K / HitRate@K / MRR for both, plus the ANN's
  recall against exact search. It can save the index, and ``load_index`` restores it.
* ``RetrievalEvaluator``: the tiny adapter a task calls with its two towers' embedding batches.

Scores are dot products. ``evaluate_retrieval`` L2-normalises both sides first (cosine
similarity), unless ``normalize=False``; all-zero rows stay zero.

ScaNN parameter rule (``scann_params_for(n, k)``), ``n`` gallery items, ``k`` neighbours wanted:

* ``n < 20_000`` (``BRUTE_FORCE_BELOW``): ScaNN float32 brute force (exact; a matmul is already
  fast at this size and a tree would only lose recall).
* otherwise a k-means tree + asymmetric hashing + exact reordering:
  ``num_leaves = round(sqrt(n))`` (clipped to ``[16, n // 8]``), so leaves hold ~sqrt(n) items;
  ``num_leaves_to_search = max(10, ceil(0.05 * num_leaves))`` (5% of the leaves, as in
  NOTES-api.md section 7, where 50 of 1000 leaves gave recall@10 0.997 on clustered data);
  ``training_sample_size = min(n, max(100_000, 64 * num_leaves))`` (k-means cost capped);
  AH with 2 dims per block and anisotropic threshold 0.2 (the value the ScaNN README uses for dot product);
  ``reorder = min(n, max(100, 10 * k))`` candidates rescored exactly.
* ``ann="scann"`` forces the tree even below 20k items (down to ``MIN_TREE_ITEMS`` = 1000), which
  is how tests exercise it on small corpora.

Measured on a 2-core x86 CPU (AMD EPYC, shared; 50k x 256 clustered, 1000 Gaussian centres,
L2-normalised, k=10): 224 leaves, 12 searched, reorder 100 -> build 4-16 s depending on load
(asymmetric-hashing training is about 3/4 of it; the tree alone builds in ~3 s), 1000 queries in
0.04-0.09 s with ``search_batched_parallel``, recall@10 vs exact 0.9993 (exact search of the same
1000 queries: ~2 s). See ``test_scann_recall_on_clustered_50k``.

Saved index layout (``out_dir/index/``; ``out_dir/results.json`` beside it holds the metrics)::

    index_params.json      kind ("scann_tree_ah" | "scann_brute_force" | "exact"), sizes,
                           normalize flag, ScaNN parameters (tuned), build time, id file name,
                           tuning (target, met, sampled recall, sample size, trials)
    gallery_ids.npy        integer ids (np.save, allow_pickle=False)   -- or --
    gallery_ids.json       string ids as a JSON list
    scann/                 ScaNN's own artifacts (searcher.serialize, relative paths)   -- or --
    gallery.npy            the (normalised) gallery, for kind "exact"

ScaNN builds are not bit-reproducible (its k-means training differs run to run, even with one
training thread), so two builds on the same data can differ slightly in recall; a saved index
searches identically after ``load_index``.

No pickle is written or read: ``load_index`` refuses a ScaNN folder holding ScaNN's docid pickle.
Gallery ids may repeat (several embeddings per product); an id then counts once, at its best rank.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from trainers.evaluators import metrics

log = logging.getLogger(__name__)

BRUTE_FORCE_BELOW = 20_000
MIN_TREE_ITEMS = 1_000
INDEX_FORMAT = "ecomax.retrieval_index/1"
_PARAMS_FILE = "index_params.json"

__all__ = [
    "BRUTE_FORCE_BELOW",
    "ExactSearcher",
    "RetrievalEvaluator",
    "RetrievalIndex",
    "ScannParams",
    "ScannSearcher",
    "ScannTuning",
    "bench_retrieval",
    "build_tuned_scann",
    "exact_backend_for",
    "collect_embeddings",
    "evaluate_retrieval",
    "exact_search",
    "l2_normalize",
    "load_index",
    "scann_params_for",
    "tune_scann",
]


# ----------------------------------------------------------------------------- helpers


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero). ``[n, d] -> [n, d]`` float32."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norm, np.finfo(np.float32).tiny)


def _as_embeddings(x: Any, name: str) -> np.ndarray:
    """Validated ``[n, d]`` float array with finite entries (float64 kept, others -> float32)."""
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [n, d], got shape {a.shape}")
    if a.dtype != np.float64:
        a = a.astype(np.float32)
    bad = ~np.isfinite(a).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise ValueError(f"{name} has non-finite values in {rows.size} rows, e.g. rows {rows[:5].tolist()}")
    return a


def _as_ids(ids: Any, n: int) -> np.ndarray:
    """``[n]`` int64 or str id array."""
    a = np.asarray(ids)
    if a.ndim != 1 or a.shape[0] != n:
        raise ValueError(f"gallery_ids must be [n={n}], got shape {a.shape}")
    kind = metrics.id_kind(a)
    if kind == "int":
        return a.astype(np.int64)
    return a.astype(str)


# ----------------------------------------------------------------------------- exact search


def _topk_unsorted(s: np.ndarray, k: int, block: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest entries per row, unordered. ``[r, c] -> (values [r, k'], columns [r, k'])``.

    ``argpartition`` over the full row is slow (~20 ns per entry), so when ``k`` is small
    compared to the row, rows are cut into blocks of ``block`` columns: each top-k entry lies in
    a block whose maximum is at least the k-th largest value, and at most k-1 blocks have a larger
    maximum, so the k blocks with the largest maxima hold a full top-k. Only those are partitioned.
    """
    r, c = s.shape
    if c <= k:
        return s, np.broadcast_to(np.arange(c), s.shape)
    if 4 * k * block > c:
        cols = np.argpartition(s, c - k, axis=1)[:, c - k:]
        return _lowest_index_ties(s, np.take_along_axis(s, cols, axis=1), cols)
    nfull = c // block * block
    bmax = s[:, :nfull].reshape(r, nfull // block, block).max(axis=2)  # [r, nb]
    if nfull < c:
        bmax = np.concatenate([bmax, s[:, nfull:].max(axis=1, keepdims=True)], axis=1)
    nb = bmax.shape[1]
    top_blocks = np.argpartition(bmax, nb - k, axis=1)[:, nb - k:]  # [r, k]
    cols = (top_blocks[:, :, None] * block + np.arange(block)).reshape(r, k * block)
    valid = cols < c
    cols = np.minimum(cols, c - 1)
    vals = np.where(valid, np.take_along_axis(s, cols, axis=1), -np.inf)
    sel = np.argpartition(vals, k * block - k, axis=1)[:, k * block - k:]
    return _lowest_index_ties(s, np.take_along_axis(vals, sel, axis=1), np.take_along_axis(cols, sel, axis=1))


def _lowest_index_ties(s: np.ndarray, vals: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Makes a top-k selection deterministic: among entries tied with the k-th value, keep the
    lowest columns (as a stable argsort would). ``s [r, c], vals/cols [r, k] -> vals/cols [r, k]``."""
    r, k = vals.shape
    t = vals.min(axis=1)  # k-th largest value per row
    eq = s == t[:, None]
    gt = vals > t[:, None]
    n_gt = gt.sum(axis=1)
    rows = np.flatnonzero(eq.sum(axis=1) > k - n_gt)  # rows with more boundary ties than kept
    if rows.size == 0:
        return vals, cols
    sub_r, eq_c = np.nonzero(eq[rows])  # row-major: ascending column within each row
    eq_r = rows[sub_r]
    rank = np.arange(sub_r.size) - np.searchsorted(sub_r, np.arange(rows.size))[sub_r]
    keep = rank < (k - n_gt)[eq_r]
    order = np.argsort(~gt, axis=1, kind="stable")  # entries above the tie first
    vals = np.take_along_axis(vals, order, axis=1)
    cols = np.array(np.take_along_axis(cols, order, axis=1))
    kr = eq_r[keep]
    pos = n_gt[kr] + rank[keep]
    cols[kr, pos] = eq_c[keep]
    vals[kr, pos] = t[kr]
    return vals, cols


def exact_search(queries: np.ndarray, gallery: np.ndarray, k: int, *,
                 max_block_elems: int = 1 << 25, gallery_chunk: int = 65_536,
                 progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product. ``[q, d], [n, d] -> (indices [q, k'] int64, scores [q, k'])``.

    ``k' = min(k, n)``; rows sorted by descending score, ties by ascending index. Computes in
    float64 when both inputs are float64, else float32. Memory: one ``[query_chunk,
    gallery_chunk]`` score block of at most ``max_block_elems`` entries (128 MiB in float32) plus
    the running top-k.
    """
    qs, gs = np.asarray(queries), np.asarray(gallery)
    dtype = np.float64 if (qs.dtype == np.float64 and gs.dtype == np.float64) else np.float32
    qs, gs = qs.astype(dtype, copy=False), gs.astype(dtype, copy=False)
    if qs.ndim != 2 or gs.ndim != 2 or qs.shape[1] != gs.shape[1]:
        raise ValueError(f"exact_search: queries {qs.shape} and gallery {gs.shape} must be [q, d] and [n, d]")
    n = gs.shape[0]
    k = min(int(k), n)
    q = qs.shape[0]
    out_idx = np.empty((q, k), dtype=np.int64)
    out_val = np.empty((q, k), dtype=dtype)
    if q == 0 or k == 0:
        return out_idx, out_val
    g_chunk = max(1, min(n, gallery_chunk))
    q_chunk = max(1, min(q, max_block_elems // g_chunk))
    starts = range(0, q, q_chunk)
    if progress:
        from tqdm import tqdm
        starts = tqdm(starts, desc="exact search", unit="chunk")
    for q0 in starts:
        qb = qs[q0:q0 + q_chunk]
        best_val = np.full((qb.shape[0], 0), -np.inf, dtype=dtype)
        best_idx = np.zeros((qb.shape[0], 0), dtype=np.int64)
        for g0 in range(0, n, g_chunk):
            s = qb @ gs[g0:g0 + g_chunk].T  # [qc, gc]
            s_top, part = _topk_unsorted(s, k)
            cand_val = np.concatenate([best_val, s_top], axis=1)  # [qc, <= 2k]
            cand_idx = np.concatenate([best_idx, part + g0], axis=1)
            order = np.lexsort((cand_idx, -cand_val), axis=-1)[:, :k]  # score desc, index asc
            best_val = np.take_along_axis(cand_val, order, axis=1)
            best_idx = np.take_along_axis(cand_idx, order, axis=1)
        out_idx[q0:q0 + qb.shape[0]] = best_idx
        out_val[q0:q0 + qb.shape[0]] = best_val
    return out_idx, out_val


JAX_EXACT_MIN_WORK = 1 << 26  # q * n score entries below which numpy wins (no compile, tiny matmul)


def _jax_exact_available(n: int, d: int) -> bool:
    try:
        from trainers.evaluators import exact_search as jx  # noqa: PLC0415 (imports jax)
    except ImportError:  # pragma: no cover - jax is a dependency
        return False
    return jx.gallery_fits(n, d)


def exact_backend_for(q: int, n: int, d: int, backend: str = "auto") -> str:
    """``"jax"`` or ``"numpy"``: ``auto`` takes JAX when the search is large (``q * n >=
    JAX_EXACT_MIN_WORK``) and the gallery fits in device memory (``exact_search.gallery_fits``)."""
    if backend not in ("auto", "jax", "numpy"):
        raise ValueError(f"exact backend must be 'auto', 'jax' or 'numpy', got {backend!r}")
    if backend == "auto":
        return "jax" if q * n >= JAX_EXACT_MIN_WORK and _jax_exact_available(n, d) else "numpy"
    return backend


class ExactSearcher:
    """Exact dot-product searcher over a fixed gallery ``[n, d]``.

    ``backend``: "numpy" (``exact_search``), "jax" (``exact_search.JaxExactSearch``: jitted
    chunked matmul + top-k, same ids and tie order), or "auto" (JAX for large searches when the
    gallery fits on the device, per query batch; see ``exact_backend_for``).
    """

    kind = "exact"

    def __init__(self, gallery: np.ndarray, backend: str = "numpy", **search_kwargs: Any):
        self.gallery = gallery
        self.backend = backend
        self.search_kwargs = search_kwargs
        self._jax: Any = None
        exact_backend_for(0, 0, 0, backend)  # validates the name

    @property
    def size(self) -> int:
        return int(self.gallery.shape[0])

    def backend_for(self, num_queries: int) -> str:
        return exact_backend_for(num_queries, self.size, int(self.gallery.shape[1]), self.backend)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[q, d] -> (indices [q, min(k, n)] int64, scores [q, min(k, n)])``, best first."""
        if self.backend_for(int(np.shape(queries)[0])) == "jax":
            if self._jax is None:
                from trainers.evaluators.exact_search import JaxExactSearch  # noqa: PLC0415

                jax_kw = {key: v for key, v in self.search_kwargs.items()  # numpy-only ones dropped
                          if key in ("gallery_chunk", "query_block", "devices")}
                self._jax = JaxExactSearch(self.gallery, **jax_kw)
            return self._jax.search(queries, k)
        return exact_search(queries, self.gallery, k, **self.search_kwargs)

    def params(self) -> dict[str, Any]:
        return {}

    def save(self, directory: pathlib.Path) -> None:
        np.save(directory / "gallery.npy", self.gallery, allow_pickle=False)

    @classmethod
    def load(cls, directory: pathlib.Path, params: dict[str, Any]) -> ExactSearcher:
        del params
        return cls(np.load(directory / "gallery.npy", allow_pickle=False))


# ----------------------------------------------------------------------------- ScaNN


@dataclasses.dataclass(frozen=True)
class ScannParams:
    """ScaNN build/search parameters; ``kind`` is ``"tree_ah"`` or ``"brute_force"``."""

    kind: str
    num_neighbors: int
    num_leaves: int = 0
    num_leaves_to_search: int = 0
    training_sample_size: int = 0
    dims_per_block: int = 2
    anisotropic_quantization_threshold: float = 0.2
    reorder: int = 0


def scann_params_for(n: int, k: int, *, force_tree: bool = False, num_leaves: int | None = None) -> ScannParams:
    """The parameter rule of the module docstring, for ``n`` gallery items and ``k`` neighbours
    (``num_leaves`` overrides the sqrt(n) leaf count; the rest of the rule follows from it)."""
    k = max(1, min(int(k), n))
    if n < MIN_TREE_ITEMS or (n < BRUTE_FORCE_BELOW and not force_tree):
        return ScannParams(kind="brute_force", num_neighbors=k)
    num_leaves = int(np.clip(round(math.sqrt(n)) if num_leaves is None else num_leaves, 16, max(16, n // 8)))
    return ScannParams(
        kind="tree_ah",
        num_neighbors=k,
        num_leaves=num_leaves,
        num_leaves_to_search=min(num_leaves, max(10, math.ceil(0.05 * num_leaves))),
        training_sample_size=min(n, max(100_000, 64 * num_leaves)),
        reorder=min(n, max(100, 10 * k)),
    )


def _import_scann() -> Any:
    try:
        import scann  # noqa: PLC0415  (heavy, optional at import time of this module)
    except ImportError as e:  # pragma: no cover - scann is a dependency, but wheels are per-platform
        raise ImportError(f"ScaNN is not importable ({e}); use ann='exact'") from e
    return scann


class ScannSearcher:
    """ScaNN dot-product searcher over ``[n, d]`` float32 (normalise first for cosine)."""

    def __init__(self, gallery: np.ndarray | None, params: ScannParams, *, _searcher: Any = None):
        self.params_ = params
        if _searcher is not None:
            self._searcher = _searcher
            return
        scann = _import_scann()
        db = np.ascontiguousarray(gallery, dtype=np.float32)
        b = scann.scann_ops_pybind.builder(db, params.num_neighbors, "dot_product")
        if params.kind == "brute_force":
            b = b.score_brute_force()
        elif params.kind == "tree_ah":
            b = (b.tree(num_leaves=params.num_leaves, num_leaves_to_search=params.num_leaves_to_search,
                        training_sample_size=params.training_sample_size)
                 .score_ah(params.dims_per_block,
                           anisotropic_quantization_threshold=params.anisotropic_quantization_threshold)
                 .reorder(params.reorder))
        else:
            raise ValueError(f"unknown ScaNN kind {params.kind!r}")
        b.set_n_training_threads(os.cpu_count() or 1)
        self._searcher = b.build()

    @property
    def kind(self) -> str:
        return f"scann_{self.params_.kind}"

    @property
    def size(self) -> int:
        return int(self._searcher.size())

    def params(self) -> dict[str, Any]:
        return dataclasses.asdict(self.params_)

    def with_search_params(self, num_leaves_to_search: int, reorder: int) -> ScannSearcher:
        """The same built index searched with other leaves-to-search / reorder (no rebuild)."""
        p = dataclasses.replace(self.params_, num_leaves_to_search=int(num_leaves_to_search), reorder=int(reorder))
        return ScannSearcher(None, p, _searcher=self._searcher)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[q, d] -> (indices [q, min(k, n)] int64, scores [q, min(k, n)] float32)``.

        Where ScaNN finds fewer than ``k`` candidates (it pads with NaN distances) the index is
        -1 and the score -inf.
        """
        k = min(int(k), self.size)
        qs = np.ascontiguousarray(queries, dtype=np.float32)
        if qs.shape[0] == 0 or k == 0:
            return np.zeros((qs.shape[0], k), np.int64), np.zeros((qs.shape[0], k), np.float32)
        p = self.params_
        kwargs: dict[str, Any] = {"final_num_neighbors": k}
        if p.kind == "tree_ah":
            kwargs.update(leaves_to_search=p.num_leaves_to_search,
                          pre_reorder_num_neighbors=max(p.reorder, k))
        idx, dist = self._searcher.search_batched_parallel(qs, **kwargs)
        idx = np.asarray(idx).astype(np.int64)
        dist = np.asarray(dist, dtype=np.float32)
        missing = np.isnan(dist)
        idx[missing] = -1
        dist = np.where(missing, -np.inf, dist).astype(np.float32)
        if idx.shape[1] < k:  # every query found fewer than k
            pad = k - idx.shape[1]
            idx = np.pad(idx, ((0, 0), (0, pad)), constant_values=-1)
            dist = np.pad(dist, ((0, 0), (0, pad)), constant_values=-np.inf)
        return idx, dist

    def save(self, directory: pathlib.Path) -> None:
        sdir = directory / "scann"
        sdir.mkdir(parents=True, exist_ok=True)
        self._searcher.serialize(str(sdir), relative_path=True)

    @classmethod
    def load(cls, directory: pathlib.Path, params: dict[str, Any]) -> ScannSearcher:
        scann = _import_scann()
        sdir = directory / "scann"
        pickles = sorted(p.name for p in sdir.glob("*.pkl"))
        if pickles:
            raise ValueError(f"{sdir} holds pickle files {pickles}; refusing to load (no pickle on load paths)")
        searcher = scann.scann_ops_pybind.load_searcher(str(sdir), assets_backcompat_shim=False)
        return cls(None, ScannParams(**params), _searcher=searcher)


Searcher = ExactSearcher | ScannSearcher


def _build_searcher(gallery: np.ndarray, k: int, ann: str) -> Searcher | None:
    """The ANN searcher for ``ann`` in {"auto", "scann", "exact"}; None when exact only."""
    if ann == "exact":
        return None
    if ann not in ("auto", "scann"):
        raise ValueError(f"ann must be 'auto', 'scann' or 'exact', got {ann!r}")
    try:
        _import_scann()
    except ImportError as e:
        if ann == "scann":
            raise
        log.warning("%s; evaluating with exact search only", e)
        return None
    params = scann_params_for(gallery.shape[0], k, force_tree=(ann == "scann"))
    return ScannSearcher(gallery, params)


# ----------------------------------------------------------------------------- tuning to a recall target

DEFAULT_TARGET_RECALL = 0.99
DEFAULT_TUNE_SAMPLE = 1000


@dataclasses.dataclass
class ScannTuning:
    """The outcome of ``tune_scann``: the parameters chosen and the evidence for them.

    ``recall`` is the mean |ANN top-k ∩ exact top-k| / k over ``sample_size`` queries at ``k``;
    ``trials`` lists every (leaves, reorder, recall, search seconds) tried, in order; ``met`` says
    whether ``recall >= target``; ``message`` says what happened in one sentence. ``num_leaves`` is
    the chosen index's leaf count and ``indexes`` one entry per index built and tuned (the rule's
    first, then each rebuild of ``build_tuned_scann``'s leaf search: leaves, build and tuning seconds,
    tuned parameters, sampled recall and QPS). ``tune_s`` is the tuning searches alone and ``rebuild_s``
    the builds of the rebuilt indexes, so the whole cost is the rule's build (``indexes[0]``) +
    ``rebuild_s`` + ``tune_s``. ``rule_searcher`` (not saved; only with
    ``build_tuned_scann(keep_rule=True)``) is the rule's own index, for side-by-side reports.
    """

    target: float
    k: int
    met: bool
    recall: float
    sample_size: int
    num_leaves_to_search: int
    reorder: int
    trials: list[dict[str, Any]]
    tune_s: float
    message: str
    num_leaves: int = 0
    indexes: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    rebuild_s: float = 0.0
    rule_searcher: Any = dataclasses.field(default=None, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON types (numpy scalars in budgets or trials become Python numbers)."""
        plain = lambda o: o.item() if isinstance(o, np.generic) else str(o)  # noqa: E731
        return {f.name: json.loads(json.dumps(getattr(self, f.name), default=plain))
                for f in dataclasses.fields(self) if f.name != "rule_searcher"}

    def report(self, prefix: str) -> dict[str, Any]:
        """The summary fields reports carry, under ``prefix`` (``ann_``, ``scann/``)."""
        return {f"{prefix}target_recall": self.target, f"{prefix}target_met": self.met,
                f"{prefix}tune_s": self.tune_s, f"{prefix}tuning": self.as_dict(), f"{prefix}status": self.message}


def tune_scann(searcher: ScannSearcher, sample_queries: np.ndarray, exact_idx: np.ndarray, k: int,
               target: float = DEFAULT_TARGET_RECALL, *, max_leaves_to_search: int | None = None,
               max_reorder: int | None = None, max_trials: int = 24, grow: float = 1.5
               ) -> tuple[ScannSearcher, ScannTuning]:
    """Widens a built ScaNN tree's search until its recall@k vs exact reaches ``target``.

    ``sample_queries [s, d]`` with their exact top-k rows ``exact_idx [s, >= k]``. Starting from
    the searcher's own (rule) parameters, each step tries leaves-to-search x ``grow`` and reorder
    x 2 (each capped by its budget) and keeps the one with the higher sampled recall (on a tie the
    faster), until the target is met, both budgets are spent, or ``max_trials`` searches ran.
    Budgets default to all leaves and ``min(n, max(1000, 100 k))`` reordered candidates. Widening
    needs no rebuild: both are search-time parameters of the same index.

    Returns the searcher with the chosen parameters (sharing the built index) and a
    ``ScannTuning`` record; when the target is not met the widest parameters tried are returned and
    ``met`` is False: the caller must not present its numbers as final.
    """
    t_start = time.perf_counter()
    p = searcher.params_
    n = searcher.size
    k = min(int(k), n)
    s = int(sample_queries.shape[0])
    trials: list[dict[str, Any]] = []

    def trial(leaves: int, reorder: int) -> float:
        cand = searcher.with_search_params(leaves, reorder) if p.kind == "tree_ah" else searcher
        t0 = time.perf_counter()
        idx, _ = cand.search(sample_queries, k)
        dt = time.perf_counter() - t0
        r = _overlap_at_k(idx, exact_idx, k, n)
        trials.append({"num_leaves_to_search": leaves, "reorder": reorder, "recall": r, "search_s": dt})
        return r

    if p.kind != "tree_ah":  # brute force: nothing to widen, only a check
        r = trial(0, 0)
        met = r >= target
        msg = (f"ScaNN brute force: recall@{k} {r:.4f} on {s} queries"
               + ("" if met else f", below the target {target}"))
        return searcher, ScannTuning(target, k, met, r, s, 0, 0, trials, time.perf_counter() - t_start, msg)

    max_l = min(p.num_leaves, max_leaves_to_search or p.num_leaves)
    max_r = min(n, max_reorder or max(1000, 100 * k))
    leaves, reorder = min(p.num_leaves_to_search, max_l), min(max(p.reorder, k), max(max_r, k))
    recall = trial(leaves, reorder)
    while recall < target and len(trials) < max_trials:
        options = []
        if leaves < max_l:
            options.append((min(max_l, max(leaves + 1, math.ceil(leaves * grow))), reorder))
        if reorder < max_r:
            options.append((leaves, min(max_r, 2 * reorder)))
        if not options:
            break
        scored = []
        for opt in options:
            if len(trials) >= max_trials:
                break
            scored.append((trial(*opt), -trials[-1]["search_s"], opt))
        best = max(scored)
        recall, (leaves, reorder) = best[0], best[2]
    met = recall >= target
    if met:
        msg = (f"ScaNN tuned: recall@{k} {recall:.4f} >= target {target} on {s} sample queries with "
               f"{leaves}/{p.num_leaves} leaves searched, reorder {reorder} ({len(trials)} trials)")
    else:
        why = ("budget spent" if (leaves >= max_l and reorder >= max_r) else f"{len(trials)} trials ran")
        msg = (f"ScaNN did NOT reach the target recall@{k} {target}: best {recall:.4f} on {s} sample "
               f"queries at {leaves}/{p.num_leaves} leaves, reorder {reorder} ({why}; budget "
               f"{max_l} leaves, reorder {max_r}); its numbers are not final")
    tuned = searcher.with_search_params(leaves, reorder)
    return tuned, ScannTuning(target, k, met, recall, s, leaves, reorder, trials,
                              time.perf_counter() - t_start, msg, num_leaves=p.num_leaves)


REBUILD_FRACTION = 0.1  # tuned to search more than this fraction of the leaves: try fewer, larger leaves
DEFAULT_MAX_REBUILDS = 3


def _tune_on_sample(searcher: ScannSearcher, queries: np.ndarray, exact_idx: np.ndarray, k: int,
                    target: float, rows: np.ndarray | None, budget: dict[str, Any]
                    ) -> tuple[ScannSearcher, ScannTuning]:
    """``tune_scann`` on the sample ``rows`` (None: all queries); if the tuned parameters then miss
    the target on all the queries, tuning resumes with all of them as the sample."""
    if rows is None:
        return tune_scann(searcher, queries, exact_idx, k, target, **budget)
    tuned, tuning = tune_scann(searcher, queries[rows], exact_idx[rows], k, target, **budget)
    if tuning.met:
        full_idx, _ = tuned.search(queries, k)
        if _overlap_at_k(full_idx, exact_idx, k, searcher.size) < target:
            log.info("tuned on %d queries but short on all %d: tuning on all of them", rows.size, queries.shape[0])
            first = tuning
            tuned, tuning = tune_scann(tuned, queries, exact_idx, k, target, **budget)
            tuning.trials = first.trials + tuning.trials
            tuning.tune_s += first.tune_s
    return tuned, tuning


def _sample_qps(searcher: ScannSearcher, queries: np.ndarray, k: int) -> float:
    """Queries/s of the best of two searches of ``queries`` (the tuning sample)."""
    best = math.inf
    for _ in range(2):
        t0 = time.perf_counter()
        searcher.search(queries, k)
        best = min(best, time.perf_counter() - t0)
    return queries.shape[0] / max(best, 1e-9)


def build_tuned_scann(gallery: np.ndarray, queries: np.ndarray, exact_idx: np.ndarray, k: int, *,
                      ann: str = "auto", target_recall: float | None = DEFAULT_TARGET_RECALL,
                      tune_sample: int = DEFAULT_TUNE_SAMPLE, tune_budget: dict[str, Any] | None = None,
                      seed: int = 0, keep_rule: bool = False
                      ) -> tuple[ScannSearcher | None, ScannTuning | None, float]:
    """Builds the ANN for ``ann`` and tunes it to ``target_recall`` (None: the rule, untuned).

    The sample is ``tune_sample`` queries drawn without replacement (all when fewer), scored
    against their rows of ``exact_idx`` (``_tune_on_sample``). Then the leaf count is searched: while
    the best index so far needs more than ``REBUILD_FRACTION`` of its leaves searched (or misses the
    target), the tree is rebuilt with half as many leaves and tuned the same way, at most
    ``tune_budget["max_rebuilds"]`` times (default 3), stopping at the first rebuild that is not
    faster. Indexes are ranked by (target met, sampled QPS at their tuned parameters; recall when
    none meets it). When a query's neighbours are spread over many leaves (wide clusters cut apart
    by sqrt(n) leaves), fewer, larger leaves reach the target at a smaller searched fraction. A
    ``max_leaves_to_search`` budget keeps its fraction of the items: it halves with the leaves. Only
    the best index so far and the candidate are alive at once (plus the rule's with ``keep_rule``).

    Returns ``(searcher or None, tuning or None, build seconds of the returned index)``; every
    build's seconds are in ``tuning.indexes`` and the rebuilds' sum in ``tuning.rebuild_s``. This is
    what ``evaluate_retrieval`` and ``ecomax retrieval bench`` both run.
    """
    t0 = time.perf_counter()
    searcher = _build_searcher(gallery, k, ann)
    build_s = time.perf_counter() - t0
    if searcher is None or target_recall is None:
        return searcher, None, build_s
    budget = dict(tune_budget or {})
    max_rebuilds = int(budget.pop("max_rebuilds", DEFAULT_MAX_REBUILDS))
    q = queries.shape[0]
    rows = np.sort(np.random.default_rng(seed).choice(q, tune_sample, replace=False)) if q > tune_sample else None
    sample = queries if rows is None else queries[rows]
    rule_leaves = searcher.params_.num_leaves

    def tuned_entry(index: ScannSearcher, b_s: float) -> tuple[Any, ...]:
        mine = dict(budget)
        if mine.get("max_leaves_to_search") and index.params_.num_leaves != rule_leaves:  # same share of items
            mine["max_leaves_to_search"] = max(1, round(mine["max_leaves_to_search"] * index.params_.num_leaves
                                                        / rule_leaves))
        tuned, tuning = _tune_on_sample(index, queries, exact_idx, k, target_recall, rows, mine)
        qps = _sample_qps(tuned, sample, k) if tuning.met else 0.0
        tuning.indexes = [{"num_leaves": index.params_.num_leaves, "build_s": b_s, "tune_s": tuning.tune_s,
                           "num_leaves_to_search": tuning.num_leaves_to_search, "reorder": tuning.reorder,
                           "recall": tuning.recall, "met": tuning.met, "sample_qps": qps}]
        return (tuning.met, qps if tuning.met else tuning.recall), tuned, tuning, b_s

    best = tuned_entry(searcher, build_s)
    rule = searcher if keep_rule else None
    is_tree = searcher.params_.kind == "tree_ah"
    del searcher  # the rule's index lives on in best[1] (shared) until a rebuild replaces it
    indexes, tune_s, rebuild_s = list(best[2].indexes), best[2].tune_s, 0.0
    while is_tree and len(indexes) - 1 < max_rebuilds:
        tuning = best[2]
        if tuning.met and tuning.num_leaves_to_search <= REBUILD_FRACTION * tuning.num_leaves:
            break
        leaves = tuning.num_leaves // 2
        if leaves < 16:
            break
        log.info("ScaNN searches %d/%d leaves for the target: rebuilding with %d leaves",
                 tuning.num_leaves_to_search, tuning.num_leaves, leaves)
        t0 = time.perf_counter()
        index = ScannSearcher(gallery, scann_params_for(gallery.shape[0], k, force_tree=True, num_leaves=leaves))
        b_s = time.perf_counter() - t0
        rebuild_s += b_s
        entry = tuned_entry(index, b_s)
        del index
        indexes += entry[2].indexes
        tune_s += entry[2].tune_s
        if entry[0] <= best[0]:
            break
        best = entry
    _, tuned, tuning, build_s = best
    tuning.indexes, tuning.rule_searcher, tuning.tune_s, tuning.rebuild_s = indexes, rule, tune_s, rebuild_s
    if len(indexes) > 1:
        tried = ", ".join(f"{e['num_leaves']}: {e['sample_qps']:,.0f}" if e["met"] else f"{e['num_leaves']}: missed"
                          for e in indexes)
        tuning.message += f"; leaf count searched ({len(indexes)} indexes, sampled QPS by leaves {tried})"
    (log.info if tuning.met else log.warning)("%s", tuning.message)
    return tuned, tuning, build_s


# ----------------------------------------------------------------------------- saved index


@dataclasses.dataclass
class RetrievalIndex:
    """A searcher plus its id map. ``search(queries [q, d], k) -> (ids [q, k'], scores [q, k'])``."""

    searcher: Searcher
    ids: np.ndarray
    normalize: bool
    info: dict[str, Any]

    def search_indices(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Gallery row indices (-1 where nothing was found) and scores, best first."""
        qs = _as_embeddings(queries, "queries")
        if self.normalize:
            qs = l2_normalize(qs)
        return self.searcher.search(qs, k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Gallery ids and scores, best first. Slots with nothing found hold ids[0] and score -inf."""
        idx, scores = self.search_indices(queries, k)
        return self.ids[np.maximum(idx, 0)], scores

    def save(self, directory: str | os.PathLike[str]) -> pathlib.Path:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.searcher.save(d)
        if self.ids.dtype.kind in "iu":
            np.save(d / "gallery_ids.npy", self.ids, allow_pickle=False)
            ids_file = "gallery_ids.npy"
        else:
            (d / "gallery_ids.json").write_text(json.dumps(self.ids.tolist(), ensure_ascii=False))
            ids_file = "gallery_ids.json"
        info = {"format": INDEX_FORMAT, "kind": self.searcher.kind, "num_items": int(self.ids.size),
                "normalize": self.normalize, "ids_file": ids_file, "params": self.searcher.params(),
                **self.info}
        (d / _PARAMS_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
        return d


def load_index(directory: str | os.PathLike[str]) -> RetrievalIndex:
    """Restores a saved ``RetrievalIndex`` from its folder (or from the ``out_dir`` above it)."""
    d = pathlib.Path(directory)
    if not (d / _PARAMS_FILE).is_file() and (d / "index" / _PARAMS_FILE).is_file():
        d = d / "index"
    pfile = d / _PARAMS_FILE
    if not pfile.is_file():
        raise FileNotFoundError(f"no {_PARAMS_FILE} in {directory}: not a saved retrieval index")
    info = json.loads(pfile.read_text())
    if info.get("format") != INDEX_FORMAT:
        raise ValueError(f"{pfile}: format {info.get('format')!r}, expected {INDEX_FORMAT!r}")
    if info["ids_file"] == "gallery_ids.npy":
        ids = np.load(d / "gallery_ids.npy", allow_pickle=False)
    elif info["ids_file"] == "gallery_ids.json":
        ids = np.array(json.loads((d / "gallery_ids.json").read_text()), dtype=str)
    else:
        raise ValueError(f"{pfile}: unknown ids_file {info['ids_file']!r}")
    kind = info["kind"]
    if kind == "exact":
        searcher: Searcher = ExactSearcher.load(d, info["params"])
    elif kind.startswith("scann_"):
        searcher = ScannSearcher.load(d, info["params"])
    else:
        raise ValueError(f"{pfile}: unknown index kind {kind!r}")
    if searcher.size != ids.size:
        raise ValueError(f"{d}: index holds {searcher.size} items but the id map has {ids.size}")
    extra = {key: v for key, v in info.items()
             if key not in ("format", "kind", "num_items", "normalize", "ids_file", "params")}
    return RetrievalIndex(searcher=searcher, ids=ids, normalize=bool(info["normalize"]), info=extra)


# ----------------------------------------------------------------------------- evaluation


def _relevance_codes(relevant: Any, num_queries: int, gallery_ids: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Relevance in gallery-id codes.

    Returns ``(item_code [n], rel_query [m'], rel_code [m'], num_relevant [q], num_unknown)``;
    ``item_code`` maps gallery rows to distinct-id codes; relevant ids absent from the gallery are
    left out of the pairs but still counted in ``num_relevant`` (they can never be retrieved).
    """
    uniq, item_code = np.unique(gallery_ids, return_inverse=True)
    rel_query, rel_id, num_relevant = metrics.flatten_relevant(relevant, num_queries)
    if rel_id.size == 0:
        return item_code.reshape(-1), rel_query, rel_id.astype(np.int64), num_relevant, 0
    g_kind, r_kind = metrics.id_kind(gallery_ids), metrics.id_kind(rel_id)
    if g_kind != r_kind:
        raise TypeError(f"gallery_ids are {g_kind}s but relevant ids are {r_kind}s")
    rel_id = rel_id.astype(uniq.dtype) if g_kind == "int" else rel_id.astype(str)
    pos = np.searchsorted(uniq, rel_id)
    known = pos < uniq.size
    known[known] = uniq[pos[known]] == rel_id[known]
    return item_code.reshape(-1), rel_query[known], pos[known], num_relevant, int((~known).sum())


def _overlap_at_k(a: np.ndarray, b: np.ndarray, k: int, n: int) -> float:
    """Mean over rows of |a[:, :k] ∩ b[:, :k]| / k (indices; -1 never matches)."""
    k = min(k, a.shape[1], b.shape[1])
    if k == 0 or a.shape[0] == 0:
        return float("nan")
    rows = np.arange(a.shape[0], dtype=np.int64)[:, None] * (n + 1)
    ka, kb = rows + a[:, :k], rows + b[:, :k]
    match = np.isin(ka, kb[b[:, :k] >= 0]) & (a[:, :k] >= 0)
    return float(match.sum() / (a.shape[0] * k))


def _score(idx: np.ndarray, item_code: np.ndarray, rel_query: np.ndarray, rel_code: np.ndarray,
           num_relevant: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    codes = np.where(idx >= 0, item_code[np.maximum(idx, 0)], -1)
    hits = metrics.hits_from_codes(codes, rel_query, rel_code)
    return metrics.metrics_from_hits(hits, num_relevant, ks)


def evaluate_retrieval(query_emb: Any, gallery_emb: Any, gallery_ids: Any, relevant: Any, *,
                       ks: Sequence[int] = (1, 5, 10), ann: str = "auto",
                       out_dir: str | os.PathLike[str] | None = None, normalize: bool = True,
                       exact_kwargs: dict[str, Any] | None = None,
                       target_recall: float | None = DEFAULT_TARGET_RECALL,
                       tune_sample: int = DEFAULT_TUNE_SAMPLE, tune_budget: dict[str, Any] | None = None,
                       exact: str = "auto") -> dict[str, Any]:
    """Exact and ANN retrieval metrics.

    ``query_emb [q, d]``, ``gallery_emb [n, d]``, ``gallery_ids [n]`` (int or str, may repeat),
    ``relevant``: ``[q]`` array of single positive ids or ``q`` collections of ids.
    ``ann``: "auto" (ScaNN by the size rule; exact only if ScaNN is not importable), "scann"
    (ScaNN tree forced from 1000 items), "exact" (no ANN). Search depth is ``max(ks)``; MRR is
    over that depth.

    Returns a flat dict: ``exact/recall@k``, ``exact/hit_rate@k``, ``exact/mrr``, the same under
    ``ann/`` and ``ann_recall_vs_exact@k`` (mean |ANN top-k ∩ exact top-k| / k) when an ANN ran,
    ``ann_recall_vs_exact`` (at the largest k), counts (``num_queries``, ``num_gallery``,
    ``num_queries_evaluated``, ``num_queries_no_relevant``, ``num_relevant_not_in_gallery``),
    timings in seconds, ``ann_kind`` (str). With ``out_dir``: the ANN index (or, for "exact", the
    gallery) is saved under ``out_dir/index`` (see ``load_index``), the metrics to
    ``out_dir/results.json``, and ``index_dir`` (str) is added.
    
    Recall target: with ``target_recall`` (default 0.99; None keeps the rule's parameters
    untuned) the ScaNN search is widened by ``tune_scann`` until its recall@max(ks) against exact
    search, measured on ``tune_sample`` queries, reaches the target, and rebuilt with fewer leaves
    while the search is wide (``build_tuned_scann``; ``tune_budget``: the ``max_leaves_to_search`` /
    ``max_reorder`` / ``max_trials`` / ``max_rebuilds`` caps). Added keys:
    ``ann_target_recall``, ``ann_target_met`` (bool), ``ann_tuning`` (dict: parameters chosen,
    sampled recall and sample size, every trial), ``ann_status`` (one sentence). When the target
    is not met, ScaNN's metrics are NOT reported under ``ann/`` but under ``ann_rejected/``; ``ann/``
    then holds the exact metrics (always computed), ``ann_metrics_source`` says "exact" (else
    "scann"), and a warning says so. The saved
    index records the tuning and searches with the tuned parameters after ``load_index``.

    ``exact``: the exact-search backend, "auto" (JAX for large searches when the gallery fits on
    the device, else numpy), "jax" or "numpy"; ``exact_backend`` in the result says which ran.
    """
    qs = _as_embeddings(query_emb, "query_emb").astype(np.float32)
    gs = _as_embeddings(gallery_emb, "gallery_emb").astype(np.float32)
    if qs.shape[0] == 0 or gs.shape[0] == 0:
        raise ValueError(f"need at least one query and one gallery item, got {qs.shape[0]} and {gs.shape[0]}")
    if qs.shape[1] != gs.shape[1]:
        raise ValueError(f"query_emb has dim {qs.shape[1]} but gallery_emb has dim {gs.shape[1]}")
    ids = _as_ids(gallery_ids, gs.shape[0])
    ks = sorted({metrics.check_k(k, "evaluate_retrieval") for k in ks})
    if not ks:
        raise ValueError("ks must hold at least one k")
    if normalize:
        qs, gs = l2_normalize(qs), l2_normalize(gs)
    n, depth = gs.shape[0], min(max(ks), gs.shape[0])
    item_code, rel_query, rel_code, num_relevant, n_unknown = _relevance_codes(relevant, qs.shape[0], ids)

    result: dict[str, Any] = {"num_queries": int(qs.shape[0]), "num_gallery": int(n),
                              "num_relevant_not_in_gallery": n_unknown, "depth": depth}
    exact_searcher = ExactSearcher(gs, backend=exact, **(exact_kwargs or {}))
    result["exact_backend"] = exact_searcher.backend_for(qs.shape[0])
    t0 = time.perf_counter()
    exact_idx, _ = exact_searcher.search(qs, depth)
    result["exact_search_s"] = time.perf_counter() - t0
    m = _score(exact_idx, item_code, rel_query, rel_code, num_relevant, ks)
    result["num_queries_evaluated"] = m.pop("num_queries_evaluated")
    result["num_queries_no_relevant"] = m.pop("num_queries_no_relevant")
    result.update({f"exact/{key}": v for key, v in m.items()})

    searcher, tuning, build_s = build_tuned_scann(gs, qs, exact_idx, depth, ann=ann, target_recall=target_recall,
                                                  tune_sample=tune_sample, tune_budget=tune_budget)
    if searcher is not None:
        final = tuning is None or tuning.met
        prefix = "ann/" if final else "ann_rejected/"
        t0 = time.perf_counter()
        ann_idx, _ = searcher.search(qs, depth)
        result["ann_build_s"], result["ann_search_s"] = build_s, time.perf_counter() - t0
        m = _score(ann_idx, item_code, rel_query, rel_code, num_relevant, ks)
        result.update({f"{prefix}{key}": v for key, v in m.items() if not key.startswith("num_")})
        result["ann_metrics_source"] = "scann" if final else "exact"
        if not final:  # the exact numbers stand in, so callers reading ann/ get the right ones
            result.update({f"ann/{key}": result[f"exact/{key}"] for key in m if not key.startswith("num_")})
        for k in ks:
            result[f"ann_recall_vs_exact@{k}"] = _overlap_at_k(ann_idx, exact_idx, k, n)
        result["ann_recall_vs_exact"] = result[f"ann_recall_vs_exact@{ks[-1]}"]
        if tuning is not None:
            result.update(tuning.report("ann_"))
        log.info("ANN %s: build %.2fs, search %.2fs, recall@%d vs exact %.4f", searcher.kind, build_s,
                 result["ann_search_s"], ks[-1], result["ann_recall_vs_exact"])
    result["ann_kind"] = searcher.kind if searcher is not None else "none"

    if out_dir is not None:
        out = pathlib.Path(out_dir)
        index = RetrievalIndex(searcher=searcher if searcher is not None else ExactSearcher(gs),
                               ids=ids, normalize=normalize,
                               info={"build_s": build_s if searcher is not None else 0.0, "dim": int(gs.shape[1]),
                                     **({"tuning": tuning.as_dict()} if tuning is not None else {})})
        result["index_dir"] = str(index.save(out / "index"))
        (out / "results.json").write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


# ----------------------------------------------------------------------------- task adapter


def _batches(source: Any) -> Iterable[Any]:
    if callable(source):
        source = source()
    if isinstance(source, np.ndarray) or hasattr(source, "__array__") and not isinstance(source, (list, tuple)):
        return [np.asarray(source)]
    return source


def collect_embeddings(source: Any, name: str = "embeddings", progress: bool = False
                       ) -> tuple[Any, np.ndarray]:
    """Concatenates embedding batches. Returns ``(keys or None, [n, d] float32)``.

    ``source``: an array ``[n, d]``, an iterable of batches, or a no-argument callable returning
    either. A batch is ``[b, d]`` embeddings or a ``(keys, [b, d])`` pair, where keys are gallery
    ids or per-query relevance (an array, or a list of collections). Arrays of any framework that
    ``np.asarray`` accepts (e.g. jax.Array) are fine.
    """
    embs: list[np.ndarray] = []
    key_parts: list[Any] = []
    it = _batches(source)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f"embed {name}", unit="batch")
    for i, batch in enumerate(it):
        keys = None
        if isinstance(batch, tuple):
            if len(batch) != 2:
                raise ValueError(f"{name} batch {i}: expected embeddings or (keys, embeddings), "
                                 f"got a {len(batch)}-tuple")
            keys, batch = batch
        e = np.asarray(batch, dtype=np.float32)
        if e.ndim != 2:
            raise ValueError(f"{name} batch {i}: embeddings must be [b, d], got shape {e.shape}")
        if (keys is None) != (not key_parts) and embs:
            raise ValueError(f"{name} batch {i}: some batches carry keys and some do not")
        if keys is not None:
            klen = len(keys)
            if klen != e.shape[0]:
                raise ValueError(f"{name} batch {i}: {klen} keys for {e.shape[0]} embeddings")
            key_parts.append(keys)
        embs.append(e)
    if not embs:
        raise ValueError(f"{name}: no batches")
    emb = np.concatenate(embs, axis=0)
    if not key_parts:
        return None, emb
    if all(isinstance(k, np.ndarray) or hasattr(k, "__array__") and not isinstance(k, (list, tuple))
           for k in key_parts):
        return np.concatenate([np.asarray(k).reshape(-1) for k in key_parts]), emb
    return [x for k in key_parts for x in (k.tolist() if isinstance(k, np.ndarray) else k)], emb


@dataclasses.dataclass(frozen=True)
class RetrievalEvaluator:
    """What a task calls with its towers' outputs.

    ``evaluator(queries, gallery, relevant=None, gallery_ids=None, out_dir=None) -> dict``, where
    ``queries``/``gallery`` are anything ``collect_embeddings`` takes, e.g.
    ``lambda: ((b["positive_id"], query_tower(b)) for b in query_loader)``. Relevance and ids come
    from the batch keys unless passed explicitly. Metric keys are prefixed with ``prefix``.
    """

    ks: Sequence[int] = (1, 5, 10)
    ann: str = "auto"
    normalize: bool = True
    prefix: str = ""
    progress: bool = False
    target_recall: float | None = DEFAULT_TARGET_RECALL

    def __call__(self, queries: Any | Callable[[], Any], gallery: Any | Callable[[], Any], *,
                 relevant: Any = None, gallery_ids: Any = None,
                 out_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        q_keys, q_emb = collect_embeddings(queries, "queries", self.progress)
        g_keys, g_emb = collect_embeddings(gallery, "gallery", self.progress)
        relevant = q_keys if relevant is None else relevant
        gallery_ids = g_keys if gallery_ids is None else gallery_ids
        if relevant is None:
            raise ValueError("no relevance: pass relevant= or yield (relevant, embeddings) query batches")
        if gallery_ids is None:
            gallery_ids = np.arange(g_emb.shape[0], dtype=np.int64)
        res = evaluate_retrieval(q_emb, g_emb, gallery_ids, relevant, ks=self.ks, ann=self.ann,
                                 out_dir=out_dir, normalize=self.normalize, target_recall=self.target_recall)
        return {f"{self.prefix}{k}": v for k, v in res.items()}


# ----------------------------------------------------------------------------- benchmark


def bench_retrieval(queries: Any, gallery: Any, k: int = 10, *, target_recall: float | None = DEFAULT_TARGET_RECALL,
                    ann: str = "auto", tune_sample: int = DEFAULT_TUNE_SAMPLE,
                    tune_budget: dict[str, Any] | None = None, normalize: bool = True, numpy_exact: bool = True,
                    repeats: int = 1) -> dict[str, Any]:
    """Build time, QPS and recall@k for ScaNN (rule and tuned) and exact search (JAX and numpy).

    The same pieces as ``evaluate_retrieval``: ``ExactSearcher``'s backends give the ground truth
    and ``build_tuned_scann`` builds and tunes. Exact searches run ``repeats`` times, JAX and numpy
    interleaved (with the JAX matmul floor: the same score tiles, top-k replaced by a row max), and
    the medians are reported; ``exact/jax_vs_numpy_qps`` is their ratio,
    ``exact/jax_search_vs_matmul_floor`` how far the top-k bookkeeping keeps the search from the
    bare matmul, ``exact/jax_fraction_of_peak`` its GFLOP/s over a 2048² f32 matmul measured in the
    same run (``flops.measure_cpu_matmul_peak``, one default device at default precision: the roofline
    of a CPU host, where the search runs on one device in f32; on accelerators, where the search spreads
    over all local devices at HIGHEST precision, read it against the device's own spec), and
    ``exact/ids_equal_fraction`` the fraction of (query, rank) slots where both give the same id.
    ``exact/jax_first_block_s`` is the first call, on one query block: compile + that block, kept out of QPS.
    """
    import statistics  # noqa: PLC0415

    from trainers.evaluators.exact_search import JaxExactSearch  # noqa: PLC0415 (imports jax)

    qs = _as_embeddings(queries, "queries").astype(np.float32)
    gs = _as_embeddings(gallery, "gallery").astype(np.float32)
    if normalize:
        qs, gs = l2_normalize(qs), l2_normalize(gs)
    q, n = qs.shape[0], gs.shape[0]
    k = min(int(k), n)
    out: dict[str, Any] = {"num_queries": q, "num_gallery": n, "dim": int(gs.shape[1]), "k": k}

    t0 = time.perf_counter()
    jx = JaxExactSearch(gs)
    out["exact/jax_setup_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    jx.search(qs[:jx.query_block], k)
    out["exact/jax_first_block_s"] = time.perf_counter() - t0
    jax_s, np_s, floor_s = [], [], []
    np_idx = np_val = None
    for _ in range(max(1, repeats)):
        floor_s.append(jx.matmul_floor_s(qs))
        t0 = time.perf_counter()
        jax_idx, jax_val = jx.search(qs, k)
        jax_s.append(time.perf_counter() - t0)
        if numpy_exact:
            t0 = time.perf_counter()
            np_idx, np_val = exact_search(qs, gs, k)
            np_s.append(time.perf_counter() - t0)
    out["exact/jax_search_s"] = statistics.median(jax_s)
    out["exact/jax_qps"] = q / out["exact/jax_search_s"]
    if numpy_exact:
        out["exact/numpy_search_s"] = statistics.median(np_s)
        out["exact/numpy_qps"] = q / out["exact/numpy_search_s"]
        out["exact/jax_vs_numpy_qps"] = out["exact/jax_qps"] / out["exact/numpy_qps"]
        out["exact/ids_equal_fraction"] = float(np.mean(jax_idx == np_idx))
        out["exact/max_score_diff"] = float(np.max(np.abs(jax_val - np_val)))
    out["exact/jax_gflops"] = 2.0 * q * n * gs.shape[1] / out["exact/jax_search_s"] / 1e9
    out["exact/jax_matmul_floor_s"] = statistics.median(floor_s)
    out["exact/jax_matmul_floor_gflops"] = 2.0 * q * n * gs.shape[1] / out["exact/jax_matmul_floor_s"] / 1e9
    out["exact/jax_search_vs_matmul_floor"] = out["exact/jax_search_s"] / out["exact/jax_matmul_floor_s"]
    from trainers.flops import measure_cpu_matmul_peak  # noqa: PLC0415 (imports jax)

    out["exact/matmul_peak_gflops"] = measure_cpu_matmul_peak() / 1e9  # this run, this device: the roofline
    out["exact/jax_fraction_of_peak"] = out["exact/jax_gflops"] / out["exact/matmul_peak_gflops"]

    searcher, tuning, build_s = build_tuned_scann(gs, qs, jax_idx, k, ann=ann, target_recall=target_recall,
                                                  tune_sample=tune_sample, tune_budget=tune_budget, keep_rule=True)
    if searcher is None:
        out["ann_kind"] = "none"
        return out
    out["ann_kind"] = searcher.kind
    out["scann/build_s"] = out["scann_tuned/build_s"] = build_s  # the returned index's build
    out["scann_rule/build_s"] = tuning.indexes[0]["build_s"] if tuning is not None else build_s
    runs = [("tuned", searcher)]
    if tuning is not None:
        out["scann/total_s"] = tuning.indexes[0]["build_s"] + tuning.rebuild_s + tuning.tune_s  # all it took
        if searcher.params_.kind == "tree_ah":
            runs.insert(0, ("rule", tuning.rule_searcher))  # the size rule's index, searched with the rule
    for name, s in runs:
        t0 = time.perf_counter()
        idx, _ = s.search(qs, k)
        dt = time.perf_counter() - t0
        out[f"scann_{name}/params"] = s.params()
        out[f"scann_{name}/search_s"] = dt
        out[f"scann_{name}/qps"] = q / dt
        out[f"scann_{name}/recall_vs_exact@{k}"] = _overlap_at_k(idx, jax_idx, k, n)
    if tuning is not None:
        out.update(tuning.report("scann/"))
    return out

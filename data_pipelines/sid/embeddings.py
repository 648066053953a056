"""Item embeddings for a SID tokenizer: a user's ``.npy`` (``[N, d]`` float32) read through a memory map,
checked row by row, served as padded global batches.

Ids are the row numbers unless an id map sits beside the file: for ``items.npy``, ``items.ids.npy``
(``[N]`` integers, unique). Bad input is an error naming the file and the row.
"""

from __future__ import annotations

import pathlib

import numpy as np

from data_pipelines.loader import InMemorySource

CHECK_ROWS = 65_536  # rows per chunk of the finiteness check: bounded memory on any N


class EmbeddingError(ValueError):
    """Unusable embeddings or id map; the message names the file and the row."""


def id_map_path(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path.with_name(path.stem + ".ids.npy")


def open_embeddings(path: str | pathlib.Path, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(vectors [N, d] float32 memory map, ids [N] int64)``, after checking shape, dtype, dimension against
    ``dim``, that every row is finite and that the ids are unique."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise EmbeddingError(f"embeddings {path}: no such file")
    try:
        vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise EmbeddingError(f"embeddings {path}: not a .npy array ({e})") from None
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise EmbeddingError(f"embeddings {path}: expected a [N, d] array with N > 0, got shape {vectors.shape}")
    if vectors.dtype != np.float32:
        raise EmbeddingError(f"embeddings {path}: dtype {vectors.dtype}, expected float32")
    if dim is not None and vectors.shape[1] != dim:
        raise EmbeddingError(f"embeddings {path}: dimension {vectors.shape[1]} differs from the config's "
                             f"model.dim {dim} (row 0 has {vectors.shape[1]} values)")
    for start in range(0, len(vectors), CHECK_ROWS):
        bad = ~np.isfinite(vectors[start:start + CHECK_ROWS]).all(axis=1)
        if bad.any():
            row = start + int(np.argmax(bad))
            raise EmbeddingError(f"embeddings {path}: row {row} is not finite (NaN or Inf)")
    return vectors, read_id_map(path, len(vectors))


def read_id_map(path: str | pathlib.Path, n: int) -> np.ndarray:
    """The ``[n]`` int64 ids of an embeddings file's rows: its id map (checked: shape, dtype, unique), or the
    row numbers when there is none."""
    path = pathlib.Path(path)
    ids_path = id_map_path(path)
    if not ids_path.is_file():
        return np.arange(n, dtype=np.int64)
    ids = np.load(ids_path, allow_pickle=False)
    if ids.shape != (n,) or not np.issubdtype(ids.dtype, np.integer):
        raise EmbeddingError(f"id map {ids_path}: expected [{n}] integers (one per row of {path.name}), "
                             f"got {ids.dtype} {ids.shape}")
    order = np.argsort(ids, kind="stable")
    same = np.flatnonzero(ids[order][1:] == ids[order][:-1])
    if len(same):
        first, second = sorted((int(order[same[0]]), int(order[same[0] + 1])))
        raise EmbeddingError(f"id map {ids_path}: id {int(ids[first])} appears at rows {first} and {second}")
    return ids.astype(np.int64)


class EmbeddingRows(InMemorySource):
    """``vectors [N, d]`` as a source of ``{"x": [d] float32, "w": [] float32}`` padded to ``padded_len`` rows
    (padding: the last row with weight 0), so a pass over the items is a whole number of global batches.
    Batches are gathered straight from the array (a memory map stays on disk)."""

    def __init__(self, vectors: np.ndarray, padded_len: int | None = None):  # noqa: super().__init__ copies
        self.vectors, self.n = vectors, len(vectors)
        self.padded_len = max(self.n, padded_len or self.n)

    def __len__(self) -> int:
        return self.padded_len

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {k: v[0] for k, v in self.gather(np.asarray([index])).items()}

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        return {"x": np.asarray(self.vectors[np.minimum(indices, self.n - 1)], np.float32),
                "w": (indices < self.n).astype(np.float32)}


def synthetic_catalogue(num_items: int, dim: int, clusters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(x [num_items, dim] float32, category [num_items] int64)``: item embeddings with two-level structure
    (``clusters`` categories, 4 products per category on average, near-duplicate items around each
    product), L2-normalised like a text encoder's: a stand-in for a catalogue."""
    rng = np.random.default_rng(seed)
    categories = rng.normal(size=(clusters, dim))
    product_category = rng.integers(clusters, size=4 * clusters)
    products = categories[product_category] + 0.5 * rng.normal(size=(4 * clusters, dim))
    product = rng.integers(len(products), size=num_items)
    x = products[product] + 0.2 * rng.normal(size=(num_items, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), product_category[product]


def synthetic_embeddings(num_items: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """The vectors of ``synthetic_catalogue``."""
    return synthetic_catalogue(num_items, dim, clusters, seed)[0]


def synthetic_pairs(category: np.ndarray, per_item: int, seed: int) -> np.ndarray:
    """Co-engaged pairs for the synthetic catalogue: each item with ``per_item`` random other items of its
    category (shoppers co-click within a category more than across). ``category [N]`` -> row indices
    ``[P, 2]`` int32, each unordered pair once."""
    rng = np.random.default_rng(seed)
    order = np.argsort(category, kind="stable")
    starts = np.searchsorted(category[order], category)
    sizes = np.bincount(category, minlength=category.max() + 1)[category]
    a = np.repeat(np.arange(len(category)), per_item)
    b = order[starts[a] + rng.integers(0, sizes[a])]
    pairs = np.unique(np.sort(np.stack([a, b], axis=1), axis=1), axis=0)
    return pairs[pairs[:, 0] != pairs[:, 1]].astype(np.int32)


class PairedEmbeddingRows(EmbeddingRows):
    """Items, each with one co-engaged partner, for the collision-regulated tokenizers (QuaSID, AdaSID):
    ``{"x", "x_pos": [d] float32, "item", "pos": [] int32 (rows), "has_pos", "w": [] float32}``.

    The source holds ``rounds`` copies of the ``N`` items; copy ``r`` pairs item ``i`` with its
    ``(r mod deg_i)``-th partner (``offsets, partners``: ``data_pipelines.sid.pairs.partner_table``), so a shuffled pass sees every
    item with up to ``rounds`` different partners, resumably (the pairing is a function of the index).
    An item with no partner is paired with itself, ``has_pos`` 0."""

    def __init__(self, vectors: np.ndarray, offsets: np.ndarray, partners: np.ndarray, rounds: int = 1):
        super().__init__(vectors)
        self.offsets, self.partners, self.rounds = offsets, partners, max(1, rounds)
        self.padded_len = self.n * self.rounds

    def gather(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        indices = np.asarray(indices)
        item, r = indices % self.n, indices // self.n
        start, degree = self.offsets[item], self.offsets[item + 1] - self.offsets[item]
        partners = self.partners if len(self.partners) else np.zeros(1, np.int32)  # no pairs at all: no partner
        pos = np.where(degree > 0, partners[np.minimum(start + r % np.maximum(degree, 1), len(partners) - 1)], item)
        return {"x": np.asarray(self.vectors[item], np.float32), "x_pos": np.asarray(self.vectors[pos], np.float32),
                "item": item.astype(np.int32), "pos": pos.astype(np.int32),
                "has_pos": (degree > 0).astype(np.float32), "w": np.ones(len(item), np.float32)}


def item_vectors(data, dim: int, seed: int) -> np.ndarray:
    """The ``[N, dim]`` item embeddings a SID config names: ``data.embeddings`` (a ``.npy``) or, with
    ``data.synthetic``, the clustered synthetic catalogue (``data.num_items``, ``data.clusters``)."""
    if data.embeddings:
        return open_embeddings(data.embeddings, dim)[0]
    if not data.synthetic:
        raise ValueError("this config reads item embeddings: set data.embeddings=ITEMS.npy "
                         "(or run ecomax sid build --embeddings ITEMS.npy)")
    return synthetic_embeddings(data.num_items, dim, data.clusters, seed)


LSA_MAX_CELLS = 64_000_000  # N x vocab at most for the exact LSA path (256 MB of float32)


def _tfidf_rows(ids: np.ndarray, keep: np.ndarray, idf: np.ndarray) -> np.ndarray:
    """Sublinear TF-IDF rows ``[n, vocab]``, L2-normalised."""
    rows = np.repeat(np.arange(len(ids)), ids.shape[1])[keep.ravel()]
    tf = np.zeros((len(ids), len(idf)), np.float32)
    np.add.at(tf, (rows, ids.ravel()[keep.ravel()]), 1.0)
    w = np.where(tf > 0, 1.0 + np.log(np.maximum(tf, 1.0)), 0.0).astype(np.float32) * idf[None]
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def text_vectors(ids: np.ndarray, mask: np.ndarray, vocab_size: int, dim: int, seed: int = 0,
                 chunk: int = 4096) -> np.ndarray:
    """Item text -> ``[N, dim]`` float32 unit vectors for a SID tokenizer, without a trained encoder.

    Sublinear TF-IDF over the token ids (``ids [N, S]``, ``mask [N, S]``; ids below 4 are the tokenizer's
    specials and left out), then to ``dim``: latent semantic analysis (the top ``dim`` right singular
    vectors of the TF-IDF matrix) when ``N x vocab`` fits in memory, else a seeded Gaussian random projection
    (Johnson-Lindenstrauss: cosines kept up to ``O(1/sqrt(dim))``) in chunks of ``chunk`` rows; normalised.
    Items that share words get nearby vectors, so their SIDs share prefixes: what a generative retriever
    needs from title embeddings. A row with no usable token is a zero vector (one more point to the fit)."""
    ids, keep = np.asarray(ids), np.asarray(mask, bool) & (np.asarray(ids) >= 4)
    doc, tok = np.repeat(np.arange(len(ids)), ids.shape[1])[keep.ravel()], ids.ravel()[keep.ravel()]
    pairs = np.unique(doc.astype(np.int64) * vocab_size + tok)
    df = np.bincount(pairs % vocab_size, minlength=vocab_size)
    idf = (np.log((1 + len(ids)) / (1 + df)) + 1.0).astype(np.float32)
    if len(ids) * vocab_size <= LSA_MAX_CELLS:
        w = _tfidf_rows(ids, keep, idf)
        u, sv, _ = np.linalg.svd(w, full_matrices=False)
        out = np.zeros((len(ids), dim), np.float32)
        r = min(dim, len(sv))
        out[:, :r] = u[:, :r] * sv[:r]
    else:
        projection = np.random.default_rng(seed).normal(size=(vocab_size, dim)).astype(np.float32) / np.sqrt(dim)
        out = np.concatenate([_tfidf_rows(ids[s:s + chunk], keep[s:s + chunk], idf) @ projection
                              for s in range(0, len(ids), chunk)])
    return (out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)).astype(np.float32)

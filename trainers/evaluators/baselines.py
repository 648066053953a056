"""Trivial baselines that evaluations report beside a trained model: BM25 and popularity.

Pure numpy / scipy on the host, like ``metrics``: ``bm25_search`` (``BM25Index`` when the corpus is searched
many times) ranks a corpus by Okapi BM25 over the same token ids the model
reads; ``popularity_ranking`` gives every query the most clicked items.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


class BM25Index:
    """Okapi BM25 (Robertson & Zaragoza 2009, Eq. 3.30 with the Lucene idf ``log(1 + (N - df + .5)/(df + .5))``)
    over token ids, the document side computed once. ``doc_ids, doc_mask [n, sd]`` (special ids < 4 are
    ignored); ``search(query_ids, query_mask [q, sq], k)`` -> top-``k`` doc rows ``[q, min(k, n)]`` best
    first (ties: lower row). Query ids at or above the vocabulary size match nothing."""

    def __init__(self, doc_ids: np.ndarray, doc_mask: np.ndarray, *, k1: float = 1.2, b: float = 0.75,
                 vocab_size: int | None = None):
        import scipy.sparse as sp  # noqa: PLC0415

        v = int(vocab_size or int(doc_ids.max(initial=0)) + 1)
        n = doc_ids.shape[0]
        keep = doc_mask.astype(bool) & (doc_ids >= 4)
        rows = np.repeat(np.arange(n), keep.sum(1))
        tf = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, doc_ids[keep])), shape=(n, v))
        tf.sum_duplicates()
        dl = np.asarray(tf.sum(1)).ravel()
        df = np.bincount(tf.indices, minlength=v)
        idf = np.log1p((n - df + 0.5) / (df + 0.5)).astype(np.float32)
        norm = k1 * (1 - b + b * dl / max(dl.mean() if n else 0.0, 1e-9))
        w = tf.copy()
        w.data = (w.data * (k1 + 1) / (w.data + np.repeat(norm, np.diff(w.indptr)))) * idf[w.indices]
        self.weights = w.T.tocsr()                                            # [v, n]
        self.num_docs, self.vocab_size = n, v

    def scores(self, query_ids: np.ndarray, query_mask: np.ndarray) -> np.ndarray:
        """``[q, sq]`` ids and mask -> ``[q, n]`` float32 BM25 scores (a query term counts once)."""
        import scipy.sparse as sp  # noqa: PLC0415

        qkeep = query_mask.astype(bool) & (query_ids >= 4) & (query_ids < self.vocab_size)
        qrows = np.repeat(np.arange(query_ids.shape[0]), qkeep.sum(1))
        qm = sp.csr_matrix((np.ones(qrows.size, np.float32), (qrows, query_ids[qkeep])),
                           shape=(query_ids.shape[0], self.vocab_size))
        qm.data[:] = 1.0
        return (qm @ self.weights).toarray()

    def search(self, query_ids: np.ndarray, query_mask: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``[q, sq]`` -> ``(doc rows [q, min(k, n)] int64, scores [q, min(k, n)])``, best first."""
        idx, val = [], []
        chunk = max(1, min(256, (1 << 26) // max(self.num_docs, 1)))  # score block of at most 64M floats
        for start in range(0, query_ids.shape[0], chunk):
            i, v = _topk_rows(self.scores(query_ids[start:start + chunk], query_mask[start:start + chunk]), k)
            idx.append(i)
            val.append(v)
        kk = min(k, self.num_docs)
        if not idx:
            return np.zeros((0, kk), np.int64), np.zeros((0, kk), np.float32)
        return np.concatenate(idx).astype(np.int64), np.concatenate(val)


def bm25_search(query_ids: np.ndarray, query_mask: np.ndarray, doc_ids: np.ndarray, doc_mask: np.ndarray,
                k: int, *, k1: float = 1.2, b: float = 0.75, vocab_size: int | None = None) -> np.ndarray:
    """``BM25Index(doc_ids, doc_mask).search(query_ids, query_mask, k)`` rows only: ``[q, min(k, n)]``."""
    v = int(vocab_size or max(int(doc_ids.max(initial=0)), int(query_ids.max(initial=0))) + 1)
    return BM25Index(doc_ids, doc_mask, k1=k1, b=b, vocab_size=v).search(query_ids, query_mask, k)[0]


def _topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``scores [q, n] -> (columns [q, min(k, n)], their scores)``, best first (ties: lower column)."""
    k = min(k, scores.shape[1])
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -vals), axis=-1)
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(vals, order, axis=1)


def popularity_ranking(item_ids: np.ndarray, counts: Mapping[int, int], k: int) -> np.ndarray:
    """The ``k`` ids of ``item_ids [n]`` with the most train clicks ``counts`` (ties: corpus order) ->
    ids ``[min(k, n)]``, the same ranking for every query."""
    c = np.array([counts.get(int(i), 0) for i in item_ids.tolist()], dtype=np.int64)
    order = np.argsort(-c, kind="stable")[:k]
    return item_ids[order]


def query_baselines(item_ids: np.ndarray, clicks: Mapping[int, int], relevant, ks, *, bm25: tuple | None = None
                    ) -> dict[str, float]:
    """The trivial rows a retrieval evaluation reports beside its model, on the same queries:
    ``popularity/<metric>`` (``popularity_ranking`` for every query) and, with ``bm25 = (query_ids, query_mask,
    item_token_ids, item_mask, vocab_size)``, ``bm25/<metric>``. ``item_ids [n]`` the corpus, ``clicks`` train
    click counts, ``relevant`` one id collection per query."""
    from trainers.evaluators import metrics  # noqa: PLC0415

    ks = tuple(int(k) for k in ks)
    top = popularity_ranking(item_ids, clicks, max(ks))
    rows = {"popularity": metrics.retrieval_metrics(np.broadcast_to(top, (len(relevant), top.size)), relevant, ks)}
    if bm25 is not None:
        q_ids, q_mask, i_ids, i_mask, vocab = bm25
        hits = bm25_search(q_ids, q_mask, i_ids, i_mask, max(ks), vocab_size=vocab)
        rows["bm25"] = metrics.retrieval_metrics(item_ids[hits], relevant, ks)
    return {f"{name}/{k}": v for name, row in rows.items() for k, v in row.items() if not k.startswith("num_")}

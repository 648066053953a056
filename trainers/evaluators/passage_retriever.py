"""The search agents' retriever tool: a passage corpus, an index over it, ``search(queries, k)``.

    build_passage_index("wiki.jsonl", "idx", encoder="path/to/all-MiniLM-L6-v2")   # or encoder="bm25"
    r = PassageRetriever("idx")
    r.search(["who founded Zorvik?"], k=3)   # [[{"id", "title", "text", "score"}, ...]]

Two encoders, chosen at build time (``ecomax agents corpus --encoder HF_DIR|bm25``):

* a Hugging Face BERT-family folder (e.g. all-MiniLM-L6-v2; e5 with ``query_prefix="query: "``,
  ``passage_prefix="passage: "``): passages (``prefix + "Title\\ntext"``, ``corpus.passage_text``) and queries
  embedded by ``models.sentence_encoder.SentenceEncoder`` (mean pooling, L2), searched by
  ``retrieval.RetrievalIndex``: exact (``ExactSearcher``) below ``retrieval.BRUTE_FORCE_BELOW`` passages,
  else a ScaNN tree (``ScannSearcher`` with ``scann_params_for``); ``ann`` forces one or the other.
* ``bm25``: Okapi BM25 (``baselines.BM25Index``) over the passages' words, normalised like answers
  (``metrics.normalize_answer``: lowercase, no punctuation, no articles). No weights needed: the fallback
  for tests and CPU runs. The term matrix is dense per passage (``[n, longest passage]`` int32), so it is
  for small corpora, not for the 21M passages of wiki-18.

Index folder::

    manifest.json     format, encoder (kind "hf" | "bm25", path, max_len, dim, prefixes), passages,
                      source file, index kind, build seconds, skipped source lines
    passages.jsonl    {"id", "title", "text"} per line; line i is index row i (corpus.read_passages reads it)
    index/            the dense RetrievalIndex (retrieval.RetrievalIndex.save)       -- or, for bm25 --
    bm25/terms.json   the vocabulary (term of id i + 4 at position i)  +  bm25/tokens.npy [n, L] int32 (0: pad)

No pickle is written or read.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from data_pipelines.agents.corpus import Passage, iter_passages, passage_text, read_passages, write_passages
from data_pipelines.agents.metrics import normalize_answer
from data_pipelines.agents.records import ReadStats
from trainers.evaluators import retrieval
from trainers.evaluators.baselines import BM25Index

FORMAT = "ecomax.passage_index/1"
BM25 = "bm25"
FIRST_TERM_ID = 4  # ids below are special in baselines.BM25Index
DEFAULT_MAX_TERMS = 512


class PassageIndexError(ValueError):
    """A passage index folder that cannot be used: the message names the file."""


# ----------------------------------------------------------------------------- BM25 terms


def bm25_terms(text: str) -> list[str]:
    """``"Who founded Zorvik?"`` -> ``["who", "founded", "zorvik"]`` (``normalize_answer`` words)."""
    return normalize_answer(text).split()


def _term_matrix(term_lists: Sequence[list[str]], vocab: dict[str, int], max_terms: int) -> np.ndarray:
    """Term lists -> ``[n, L]`` int32 ids (0 pads; terms outside ``vocab`` are dropped)."""
    rows = [[vocab[t] for t in terms if t in vocab][:max_terms] for terms in term_lists]
    out = np.zeros((len(rows), max(1, max((len(r) for r in rows), default=1))), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


class Bm25Encoder:
    """Queries -> term ids for a ``BM25Index`` over the passages' ``[n, L]`` term ids."""

    def __init__(self, terms: list[str], tokens: np.ndarray, max_terms: int = DEFAULT_MAX_TERMS):
        self.vocab = {t: i + FIRST_TERM_ID for i, t in enumerate(terms)}
        self.terms, self.tokens, self.max_terms = terms, tokens, max_terms
        self.index = BM25Index(tokens, tokens > 0, vocab_size=len(terms) + FIRST_TERM_ID)

    @classmethod
    def build(cls, texts: Sequence[str], *, max_terms: int = DEFAULT_MAX_TERMS, progress: bool = False
              ) -> Bm25Encoder:
        import tqdm  # noqa: PLC0415

        term_lists = [bm25_terms(t) for t in tqdm.tqdm(texts, desc="bm25 terms", unit="passage",
                                                       disable=not progress)]
        terms = sorted({t for ts in term_lists for t in ts})
        vocab = {t: i + FIRST_TERM_ID for i, t in enumerate(terms)}
        return cls(terms, _term_matrix(term_lists, vocab, max_terms), max_terms)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries ``[q]`` -> (passage rows ``[q, k']`` int64, BM25 scores ``[q, k']``), best first."""
        q = _term_matrix([bm25_terms(t) for t in queries], self.vocab, self.max_terms)
        return self.index.search(q, q > 0, k)

    def save(self, d: pathlib.Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        (d / "terms.json").write_text(json.dumps(self.terms, ensure_ascii=False))
        np.save(d / "tokens.npy", self.tokens, allow_pickle=False)

    @classmethod
    def load(cls, d: pathlib.Path, max_terms: int) -> Bm25Encoder:
        return cls(json.loads((d / "terms.json").read_text()), np.load(d / "tokens.npy", allow_pickle=False),
                   max_terms)


# ----------------------------------------------------------------------------- dense


def _dense_searcher(vectors: np.ndarray, ann: str) -> retrieval.Searcher:
    """``[n, d]`` unit rows -> exact below ``BRUTE_FORCE_BELOW`` rows (``ann="auto"``) or on request, else ScaNN."""
    n = vectors.shape[0]
    if ann not in ("auto", "exact", "scann"):
        raise ValueError(f"ann must be 'auto', 'exact' or 'scann', got {ann!r}")
    if ann == "exact" or (ann == "auto" and n < retrieval.BRUTE_FORCE_BELOW):
        return retrieval.ExactSearcher(vectors)
    return retrieval.ScannSearcher(vectors, retrieval.scann_params_for(n, 10, force_tree=(ann == "scann")))


def build_passage_index(passages: str | os.PathLike, out: str | os.PathLike, encoder: Any, *,
                        batch_size: int = 256, max_len: int = 256, ann: str = "auto", query_prefix: str = "",
                        passage_prefix: str = "", max_terms: int = DEFAULT_MAX_TERMS,
                        max_bad_fraction: float = 0.0, progress: bool = True) -> dict[str, Any]:
    """Reads a passage JSONL (``corpus.iter_passages``), indexes it with ``encoder`` (a Hugging Face folder, a
    loaded ``SentenceEncoder`` (then ``batch_size`` / ``max_len`` are its own) or ``"bm25"``) and writes the
    index folder ``out`` (module docstring). Returns the manifest."""
    t0 = time.time()
    stats = ReadStats()
    ps = list(iter_passages(passages, max_bad_fraction=max_bad_fraction, stats=stats))
    if not ps:
        raise PassageIndexError(f"{passages}: no passages")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    texts = [passage_prefix + passage_text(p) for p in ps]
    if encoder == BM25:
        Bm25Encoder.build(texts, max_terms=max_terms, progress=progress).save(out / "bm25")
        enc = {"kind": BM25, "max_terms": max_terms, "normalisation": "metrics.normalize_answer words"}
        index_kind = BM25
    else:
        from models.sentence_encoder import SentenceEncoder  # noqa: PLC0415

        model = (encoder if isinstance(encoder, SentenceEncoder)
                 else SentenceEncoder(encoder, max_len=max_len, batch_size=batch_size))
        vectors = model.encode(texts, progress=progress, desc="embed passages")
        idx = retrieval.RetrievalIndex(_dense_searcher(vectors, ann), np.arange(len(ps), dtype=np.int64),
                                       normalize=True, info={})
        idx.save(out / "index")
        enc = {"kind": "hf", "path": str(pathlib.Path(model.path).resolve()), "max_len": model.max_len,
               "dim": model.dim, "batch_size": model.batch_size, "pooling": "mean over real tokens, then L2"}
        index_kind = idx.searcher.kind
    enc.update(query_prefix=query_prefix, passage_prefix=passage_prefix)
    write_passages(out / "passages.jsonl", ps, wiki18=False)
    manifest = {"format": FORMAT, "encoder": enc, "passages": len(ps), "source": str(passages),
                "index": index_kind, "skipped_lines": stats.skipped, "build_s": round(time.time() - t0, 3)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


# ----------------------------------------------------------------------------- the tool


def read_manifest(index_dir: str | os.PathLike) -> dict[str, Any]:
    f = pathlib.Path(index_dir) / "manifest.json"
    if not f.is_file():
        raise PassageIndexError(f"no manifest.json in {index_dir}: not a passage index "
                                f"(build one with `ecomax agents corpus`)")
    m = json.loads(f.read_text())
    if m.get("format") != FORMAT:
        raise PassageIndexError(f"{f}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


class PassageRetriever:
    """``search(queries [q], k=3) -> q lists of k passage dicts {"id", "title", "text", "score"}``, best first.

    ``encoder`` overrides the Hugging Face folder the manifest names (an index moved to another machine), or is
    an already loaded ``SentenceEncoder`` (no second load)."""

    def __init__(self, index_dir: str | os.PathLike, *, encoder: Any = None):
        d = pathlib.Path(index_dir)
        self.manifest = m = read_manifest(d)
        self.passages: list[Passage] = read_passages(d / "passages.jsonl")
        if len(self.passages) != m["passages"]:
            raise PassageIndexError(f"{d}/passages.jsonl holds {len(self.passages)} passages, the manifest "
                                    f"{m['passages']}")
        enc = m["encoder"]
        self.query_prefix = enc.get("query_prefix", "")
        if enc["kind"] == BM25:
            self._bm25: Bm25Encoder | None = Bm25Encoder.load(d / "bm25", enc["max_terms"])
            self._index = self._encoder = None
        else:
            from models.sentence_encoder import SentenceEncoder  # noqa: PLC0415

            self._bm25 = None
            self._index = retrieval.load_index(d / "index")
            self._encoder = (encoder if isinstance(encoder, SentenceEncoder)
                             else SentenceEncoder(encoder or enc["path"], max_len=enc["max_len"],
                                                  batch_size=enc.get("batch_size", 256)))
            if self._encoder.dim != enc["dim"]:
                raise PassageIndexError(f"{d}: index vectors have dim {enc['dim']}, the encoder "
                                        f"{self._encoder.path} gives {self._encoder.dim}")

    def __len__(self) -> int:
        return len(self.passages)

    def search_rows(self, queries: Sequence[str], k: int = 3) -> tuple[np.ndarray, np.ndarray]:
        """queries ``[q]`` -> (passage rows ``[q, min(k, n)]`` int64, -1 where none; scores), best first."""
        queries = [self.query_prefix + q for q in queries]
        if not queries:
            return np.zeros((0, min(k, len(self))), np.int64), np.zeros((0, min(k, len(self))), np.float32)
        if self._bm25 is not None:
            return self._bm25.search(queries, k)
        return self._index.search_indices(self._encoder.encode(queries), k)

    def search(self, queries: Sequence[str], k: int = 3) -> list[list[dict[str, Any]]]:
        """The retriever tool: for each query its top-``k`` passages as dicts, best first."""
        rows, scores = self.search_rows(queries, k)
        return [[{**self.passages[r]._asdict(), "score": float(s)} for r, s in zip(rr, ss) if r >= 0]
                for rr, ss in zip(rows.tolist(), scores.tolist())]

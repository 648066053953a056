"""Per-example transforms of the KuaiSearch recall, generative-retrieval and relevance tasks: examples -> token-id arrays.

Each is ``transform(example, rng) -> {name: array}`` (no batch dimension), as the grain loader calls it;
the ids are ``<s> text </s>`` sentencepiece pieces (``examples.encode_texts`` / ``encode_pairs``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.kuaisearch import examples as ex


class RecallTransform:
    """``RecallPair -> {query_ids, query_mask, pos_ids, pos_mask, neg_ids, neg_mask}`` (one positive
    drawn from the pair's relevant items, one negative from the rest of the corpus)."""

    def __init__(self, tokenizer: Any, item_texts: Sequence[str], query_len: int, item_len: int):
        self.tokenizer, self.item_texts = tokenizer, item_texts
        self.query_len, self.item_len = query_len, item_len

    def __call__(self, pair: ex.RecallPair, rng: np.random.Generator) -> dict[str, np.ndarray]:
        pos = pair.positive_rows[int(rng.integers(len(pair.positive_rows)))]
        neg = ex.sample_negative(rng, len(self.item_texts), pair.positive_rows)
        q_ids, q_mask = ex.encode_texts(self.tokenizer, [pair.query], self.query_len)
        i_ids, i_mask = ex.encode_texts(self.tokenizer, [self.item_texts[pos], self.item_texts[neg]], self.item_len)
        return {"query_ids": q_ids[0], "query_mask": q_mask[0], "pos_ids": i_ids[0], "pos_mask": i_mask[0],
                "neg_ids": i_ids[1], "neg_mask": i_mask[1]}


class GenerativeTransform:
    """``RecallPair -> {input_ids, input_mask, codes}``: the query (or, for a DSI indexing example, the item's
    text) and the SID of one of its relevant items, drawn per example among those with a SID
    (``item_codes [n_items, D]``, -1 rows for items without one; a pair needs at least one). With
    ``max_relevant`` > 0 also ``relevant_codes [max_relevant, D]``: the SIDs of its first relevant items,
    -1 rows after them (a rank loss must not count another relevant item as a negative)."""

    def __init__(self, tokenizer: Any, item_codes: np.ndarray, query_len: int, max_relevant: int = 0):
        self.tokenizer, self.item_codes, self.query_len = tokenizer, item_codes, query_len
        self.max_relevant = max_relevant

    def __call__(self, pair: ex.RecallPair, rng: np.random.Generator) -> dict[str, np.ndarray]:
        rows = [r for r in pair.positive_rows if self.item_codes[r, 0] >= 0]
        q_ids, q_mask = ex.encode_texts(self.tokenizer, [pair.query], self.query_len)
        target = self.item_codes[rows[int(rng.integers(len(rows)))]]
        out = {"input_ids": q_ids[0], "input_mask": q_mask[0], "codes": target}
        if self.max_relevant:
            relevant = np.full((self.max_relevant, self.item_codes.shape[1]), -1, np.int32)
            relevant[:min(len(rows), self.max_relevant)] = self.item_codes[rows[:self.max_relevant]]
            out["relevant_codes"] = relevant
        return out


class HistoryTransform:
    """``NextItem -> {input_ids, input_mask, codes}``: the history's SIDs as code tokens (item after item,
    ``token_offsets [D]`` added to the codes of each level, right-padded with 0 to ``max_history x D``) and
    the next item's SID (TIGER's input and target)."""

    def __init__(self, item_codes: np.ndarray, token_offsets: Sequence[int], max_history: int):
        self.item_codes, self.max_history = item_codes, max_history
        self.offsets = np.asarray(token_offsets, np.int32)

    def __call__(self, e: ex.NextItem, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        depth = self.item_codes.shape[1]
        tokens = (self.item_codes[list(e.history)] + self.offsets).reshape(-1)
        ids = np.zeros(self.max_history * depth, np.int32)
        ids[:len(tokens)] = tokens
        return {"input_ids": ids, "input_mask": ids > 0, "codes": self.item_codes[e.target]}


class BehaviourTransform:
    """``Behaviours -> {click_tokens, click_mask, purchase_tokens, purchase_mask, query_ids, query_mask, codes}``
    (OneMall's input; ``input_ids``, ``input_mask`` too with ``query_len`` > 0, ``scenario`` with ``scenarios``): item events as their SIDs'
    code tokens ``[n, D]`` (``token_offsets`` added; items without a SID left out), past queries as pieces
    ``[n, piece_len]``; each sequence the last ``lengths[kind]`` events, right-aligned (the newest in the last
    slot, 0-padded on the left), and the SID of one relevant item drawn per example (the first without rng)."""

    def __init__(self, tokenizer: Any, item_codes: np.ndarray, token_offsets: Sequence[int],
                 lengths: Mapping[str, int], piece_len: int, query_len: int = 0, scenarios: Sequence[str] = ()):
        self.tokenizer, self.item_codes = tokenizer, item_codes
        self.offsets = np.asarray(token_offsets, np.int32)
        self.lengths, self.piece_len, self.query_len = dict(lengths), piece_len, query_len
        self.scenarios = tuple(scenarios)

    def _items(self, rows: Sequence[int], n: int) -> tuple[np.ndarray, np.ndarray]:
        rows = [r for r in rows if self.item_codes[r, 0] >= 0][-n:] if n else []
        tokens = np.zeros((n, self.item_codes.shape[1]), np.int32)
        if rows:
            tokens[n - len(rows):] = self.item_codes[rows] + self.offsets
        return tokens, np.arange(n) >= n - len(rows)

    def __call__(self, e: ex.Behaviours, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        out = {}
        for kind, rows in (("click", e.clicks), ("purchase", e.purchases)):
            if kind in self.lengths:
                out[f"{kind}_tokens"], out[f"{kind}_mask"] = self._items(rows, self.lengths[kind])
        if "query" in self.lengths:
            n = self.lengths["query"]
            ids = np.zeros((n, self.piece_len), np.int32)
            mask = np.zeros((n, self.piece_len), bool)
            texts = list(e.queries[-n:]) if n else []
            if texts:
                ids[n - len(texts):], mask[n - len(texts):] = ex.encode_texts(self.tokenizer, texts, self.piece_len)
            out["query_ids"], out["query_mask"] = ids, mask
        if self.query_len:
            q_ids, q_mask = ex.encode_texts(self.tokenizer, [e.query], self.query_len)
            out["input_ids"], out["input_mask"] = q_ids[0], q_mask[0]
        if self.scenarios:   # 1 + its index in ``scenarios``; 0 for any other (unknown)
            out["scenario"] = np.int32(self.scenarios.index(e.scenario) + 1 if e.scenario in self.scenarios else 0)
        rows = [r for r in e.relevant if self.item_codes[r, 0] >= 0] or list(e.relevant)
        out["codes"] = self.item_codes[rows[int(rng.integers(len(rows))) if rng is not None else 0]]
        return out


class CrossTransform:
    """``RelevanceExample -> {ids, mask, token_type_ids, label}`` (one ``<s> q </s> text </s>`` row)."""

    def __init__(self, tokenizer: Any, max_len: int):
        self.tokenizer, self.max_len = tokenizer, max_len

    def __call__(self, e: ex.RelevanceExample, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        ids, mask, types = ex.encode_pairs(self.tokenizer, [e.query], [e.text], self.max_len)
        return {"ids": ids[0], "mask": mask[0], "token_type_ids": types[0], "label": np.float32(e.label)}


class BiTransform:
    """``RelevanceExample -> {query_ids, query_mask, item_ids, item_mask, label}``."""

    def __init__(self, tokenizer: Any, query_len: int, item_len: int):
        self.tokenizer, self.query_len, self.item_len = tokenizer, query_len, item_len

    def __call__(self, e: ex.RelevanceExample, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        q_ids, q_mask = ex.encode_texts(self.tokenizer, [e.query], self.query_len)
        i_ids, i_mask = ex.encode_texts(self.tokenizer, [e.text], self.item_len)
        return {"query_ids": q_ids[0], "query_mask": q_mask[0], "item_ids": i_ids[0], "item_mask": i_mask[0],
                "label": np.float32(e.label)}


def stack(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Transformed examples -> one batch: ``[{k: [...]}] * n -> {k: [n, ...]}``."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class Indexed:
    """A source of ``(index, example)`` pairs through ``transform``, the index kept as ``example`` (int32): a
    host function after the step (a reward model) finds the record a row came from."""

    def __init__(self, transform: Any):
        self.transform = transform

    def __call__(self, pair: tuple[int, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        index, example = pair
        return {**self.transform(example, rng), "example": np.int32(index)}

"""OneSearch-V2's examples on KuaiSearch: search sessions with who searched, the query's keyword reasoning, and
what was clicked and ordered; the teacher / student inputs of reasoning-internalised self-distillation.

Keywords file (``data.keywords``; default ``ROOT/keywords.jsonl``, which the synthetic world writes): one JSON
object per line, ``{"query": "<query text>", "keywords": ["<keyword>", ...]}``, one line per distinct query
(a repeated query is an error naming the line). OneSearch-V2 writes them offline with a 32B LLM prompted for
the query's product words, attributes and category; any generator will do, as long as the file has this
shape. A query without a line gets an empty keyword span (its teacher input equals its student input);
those are counted and reported.

Inputs (``ReasoningTransform``), as sentencepiece pieces:

    student  <s> query </s> profile </s>
    teacher  <s> query </s> profile </s> keywords </s>

(``profile`` = the user's gender and age bucket, OneSearch-V2's personalisation fields; ``</s>`` separates
the segments.) The teacher input is the student input with the keyword span ``keywords </s>`` inserted
before the padding, nothing else differs. A DSI indexing example (item text -> its SID) has no profile and
no keywords.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.kuaisearch import examples as ex


@dataclasses.dataclass(frozen=True)
class SearchSession:
    """One search session: the user, the query, and the corpus rows it clicked and ordered."""

    session_id: int
    user_id: int
    query: str
    clicked: tuple[int, ...]   # corpus rows clicked or ordered, sorted
    ordered: tuple[int, ...]   # corpus rows ordered (purchased), sorted


def search_sessions(rows: Iterable[Mapping[str, Any]], corpus: ex.ItemCorpus) -> dict[str, list[SearchSession]]:
    """Recall rows -> ``{split: [SearchSession]}``: sessions with a non-empty query and a clicked or purchased
    corpus item (the recall rules of ``examples.recall_queries``: a repeated session id keeps the last query
    and the union of its items)."""
    by_split: dict[str, dict[int, list]] = {}
    for row in rows:
        query = str(row["query"]).strip()
        clicked = set(corpus.rows(ex.relevant_items(row)))
        if not query or not clicked:
            continue
        ordered = set(corpus.rows(set(int(i) for i in row["purchased_item_ids"])))
        split = by_split.setdefault(str(row["split"]).lower(), {})
        old = split.get(int(row["session_id"]))
        if old is not None:
            clicked, ordered = clicked | old[2], ordered | old[3]
        split[int(row["session_id"])] = [int(row["user_id"]), query, clicked, ordered]
    return {s: [SearchSession(sid, u, q, tuple(sorted(c)), tuple(sorted(o))) for sid, (u, q, c, o) in d.items()]
            for s, d in by_split.items()}


def read_keywords(path: str | pathlib.Path) -> dict[str, tuple[str, ...]]:
    """The keywords file (see the module docstring) -> ``{query: keywords}``; a malformed line is an error
    naming the file and the line."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"keywords file {path} not found: a JSONL of {{\"query\": ..., \"keywords\": [...]}} "
                                f"per query (set data.keywords; the synthetic world writes ROOT/keywords.jsonl)")
    out: dict[str, tuple[str, ...]] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                query, words = str(row["query"]).strip(), row["keywords"]
                if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
                    raise ValueError("'keywords' must be a list of strings")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: bad keywords record ({e}): {line.strip()[:120]}") from None
            if query in out:
                raise ValueError(f"{path}:{line_no}: query {query!r} already has keywords (one line per query)")
            out[query] = tuple(w.strip() for w in words if w.strip())
    return out


def user_profiles(rows: Iterable[Mapping[str, Any]]) -> dict[int, str]:
    """Users rows -> ``{user_id: "gender age_bucket"}`` (OneSearch-V2's user-profile fields)."""
    return {int(r["user_id"]): f"{r['gender']} {r['age_bucket']}" for r in rows}


@dataclasses.dataclass(frozen=True)
class ReasoningExample:
    """A training example: the text (a query, or an item's text for DSI indexing), the user profile and the
    keywords (both empty for indexing), and the corpus rows of its target items (one drawn per pass)."""

    text: str
    profile: str
    keywords: tuple[str, ...]
    rows: tuple[int, ...]


class ReasoningTransform:
    """``ReasoningExample -> {input_ids, input_mask [Q], teacher_ids, teacher_mask [Q + K], keyword_ids,
    keyword_mask [K], codes [D]}``: the student input (``Q = query_len`` pieces: the text truncated to leave room
    for the profile), the teacher input (the student's pieces with the keyword span, at most ``K = keyword_len``
    pieces, inserted before the padding), the keyword span as a decoding target (the CoT task
    query -> keywords) and the SID of one of the target items, drawn per example among those with a SID."""

    def __init__(self, tokenizer: Any, item_codes: np.ndarray, query_len: int, keyword_len: int):
        self.tokenizer, self.item_codes = tokenizer, item_codes
        self.query_len, self.keyword_len = query_len, keyword_len
        self.bos, self.eos = tokenizer.encode("", add_bos=True)[0], tokenizer.encode("", add_eos=True)[-1]

    def pieces(self, example: ReasoningExample) -> tuple[list[int], list[int]]:
        """(student pieces, keyword span); the teacher's pieces are ``student + span``."""
        tok = self.tokenizer
        profile = tok.encode(example.profile) + [self.eos] if example.profile else []
        room = max(self.query_len - 2 - len(profile), 1)
        student = ([self.bos] + tok.encode(example.text)[:room] + [self.eos] + profile)[:self.query_len]
        span = tok.encode("，".join(example.keywords))[:self.keyword_len - 1] + [self.eos] if example.keywords else []
        return student, span

    def __call__(self, example: ReasoningExample, rng: np.random.Generator) -> dict[str, np.ndarray]:
        student, span = self.pieces(example)
        rows = [r for r in example.rows if self.item_codes[r, 0] >= 0]
        q, k = self.query_len, self.keyword_len
        return {**padded("input", student, q), **padded("teacher", student + span, q + k),
                **padded("keyword", span, k), "codes": self.item_codes[rows[int(rng.integers(len(rows)))]]}


def padded(name: str, pieces: Sequence[int], length: int) -> dict[str, np.ndarray]:
    """``pieces`` right-padded with 0 to ``length``: ``{NAME_ids [length] int32, NAME_mask [length] bool}``."""
    ids = np.zeros(length, np.int32)
    ids[:len(pieces)] = pieces
    return {f"{name}_ids": ids, f"{name}_mask": np.arange(length) < len(pieces)}

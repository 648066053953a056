"""KuaiSearch rows -> training and evaluation examples for the recall and relevance stages.

Pure data code (numpy, no JAX), shared by ``trainers/tasks/kuaisearch_recall.py`` and
``trainers/tasks/kuaisearch_relevance.py``. The rules follow the paper's official preprocessing
(github.com/benchen4395/KuaiSearch, ``recall/data/process.py``, ``recall/data/build_dpr.py`` and
``relevance/data/process.py``)::

    rows = read_rows(root, "recall")                  # prepared ArrayRecord or raw JSONL, file order
    queries = recall_queries(rows)                    # {"train": [RecallQuery], "test": [...]}
    corpus = ItemCorpus.from_rows(read_rows(root, "items"))
    splits = relevance_splits(read_rows(root, "relevance"))   # {"train", "validation", "test"}

Recall (``recall_queries``): one query per ``session_id``; its relevant items are
``clicked ∪ purchased``; the row's own ``split`` field says train or test; sessions with no click and
no purchase are dropped. When a session id repeats within a split, the official code keeps the last
query text and the union of the relevant items; so does this.

Item text for the dual encoder (``item_text``): title, brand and the three category names joined
by spaces, leaving out the placeholders ``无品牌`` ("no brand") and ``UNKNOWN`` (a missing level-3
category). (The official DPR passage is the title alone; the ecomax brief adds brand and categories.)

Relevance (``relevance_splits``): label = 1 iff ``score == 3`` (the official script reads a ``label``
field that the released rows do not have, so the rule is applied here explicitly); text =
``item_title, brand, seller_name, attr_value`` joined by spaces, ``brand`` left out when it is
``无品牌``; rows with an empty query or an empty text are skipped before counting; then record ``i``
(0-based, among the kept rows) is test when ``i % 10 == 0``, and the rest is shuffled with Python's
``random.Random(42)`` and its first ``int(0.01 * n)`` records are validation, the others train
(exactly the official ``random.seed(42); random.shuffle(train)`` order).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.kuaisearch import records, schema

NO_BRAND = "无品牌"
UNKNOWN_CATEGORY = "UNKNOWN"

RELEVANCE_TEST_EVERY = 10
RELEVANCE_VALIDATION_FRACTION = 0.01
RELEVANCE_SPLIT_SEED = 42
RELEVANCE_TEXT_FIELDS = ("item_title", "brand", "seller_name", "attr_value")


# ----------------------------------------------------------------------------- reading


def is_prepared(root: str | os.PathLike, kind: str) -> bool:
    """Whether ``root`` holds a prepared (``ecomax data prepare kuaisearch``) dataset of ``kind``."""
    return (pathlib.Path(root) / records.dataset_name(kind) / records.VERSION / "dataset_info.json").is_file()


def read_rows(root: str | os.PathLike, kind: str) -> list[dict]:
    """Every row of ``kind`` under ``root``, validated, in source-file order.

    ``root`` is a folder written by ``ecomax data prepare kuaisearch`` (read with ``open_split``, all
    splits) or a raw folder in the released or demo layout (JSONL read with ``schema.parse_line``;
    a bad line raises ``KuaiSearchFormatError`` naming the file and line). Id lists come back as
    lists or int arrays; callers convert.
    """
    root = pathlib.Path(root)
    if is_prepared(root, kind):
        from data_pipelines.kuaisearch.reader import open_split  # noqa: PLC0415  (imports TFDS)

        src = open_split(root, kind, split=None)
        out: list[dict] = []
        for start in range(0, len(src), 4096):
            out.extend(src.__getitems__(range(start, min(start + 4096, len(src)))))
        return out
    rows = []
    for path in schema.find_source_files(root, kind):
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, 1):
                if raw.strip():
                    rows.append(schema.parse_line(kind, raw, source=str(path), line=line_no))
    return rows


def _ids(x: Any) -> list[int]:
    return [int(i) for i in (x.tolist() if isinstance(x, np.ndarray) else x)]


# ----------------------------------------------------------------------------- recall


@dataclasses.dataclass(frozen=True)
class RecallQuery:
    """One search session as a retrieval query: its text and the items it interacted with."""

    session_id: int
    query: str
    relevant: tuple[int, ...]   # clicked ∪ purchased item ids, sorted


def relevant_items(row: Mapping[str, Any]) -> set[int]:
    """``clicked_item_ids ∪ purchased_item_ids`` of a recall row."""
    return set(_ids(row["clicked_item_ids"])) | set(_ids(row["purchased_item_ids"]))


def recall_queries(rows: Iterable[Mapping[str, Any]]) -> dict[str, list[RecallQuery]]:
    """Recall rows -> ``{split: [RecallQuery]}`` (see the module docstring for the rules).

    Sessions without any click or purchase, and rows with an empty query, are dropped. Queries keep
    the order in which their session first appeared.
    """
    texts: dict[str, dict[int, str]] = collections.defaultdict(dict)
    rels: dict[str, dict[int, set[int]]] = collections.defaultdict(dict)
    for row in rows:
        items = relevant_items(row)
        query = str(row["query"]).strip()
        if not items or not query:
            continue
        split = str(row["split"]).lower()
        sid = int(row["session_id"])
        texts[split][sid] = query           # last occurrence wins (dict keeps first position)
        rels[split].setdefault(sid, set()).update(items)
    return {split: [RecallQuery(sid, q, tuple(sorted(rels[split][sid]))) for sid, q in by_sid.items()]
            for split, by_sid in texts.items()}


def item_text(row: Mapping[str, Any]) -> str:
    """Title + brand + category names of an item row, placeholders left out, joined by spaces."""
    parts = [row["item_title"], row["brand_name"], row["category_level1_name"],
             row["category_level2_name"], row["category_level3_name"]]
    out = []
    for p in parts:
        p = str(p).strip()
        if p and p not in (NO_BRAND, UNKNOWN_CATEGORY) and p not in out:
            out.append(p)
    return " ".join(out)


@dataclasses.dataclass
class ItemCorpus:
    """The item corpus: ids ``[n]`` int64 (unique, file order of first appearance) and their texts."""

    ids: np.ndarray
    texts: list[str]

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        if self.ids.shape != (len(self.texts),):
            raise ValueError(f"ItemCorpus: {self.ids.shape} ids for {len(self.texts)} texts")
        self._row = {int(i): r for r, i in enumerate(self.ids.tolist())}
        if len(self._row) != len(self.texts):
            raise ValueError("ItemCorpus: item ids must be unique")

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]]) -> ItemCorpus:
        """Item rows -> corpus; a repeated ``item_id`` keeps its first row."""
        ids, texts, seen = [], [], set()
        for row in rows:
            i = int(row["item_id"])
            if i in seen:
                continue
            seen.add(i)
            ids.append(i)
            texts.append(item_text(row))
        return cls(np.asarray(ids, dtype=np.int64), texts)

    def __len__(self) -> int:
        return len(self.texts)

    def __contains__(self, item_id: int) -> bool:
        return int(item_id) in self._row

    def row(self, item_id: int) -> int:
        """Row of ``item_id`` in the corpus (KeyError if absent)."""
        return self._row[int(item_id)]

    def rows(self, item_ids: Iterable[int]) -> list[int]:
        """Rows of the ids that are in the corpus (absent ones are left out)."""
        return [self._row[i] for i in (int(x) for x in item_ids) if i in self._row]


def click_sequences(rows: Iterable[Mapping[str, Any]], corpus: ItemCorpus) -> dict[int, list[int]]:
    """``user_id -> corpus rows`` of the items the user clicked, in time order (``time_index``, then the rows'
    file order, then each row's click order), every split: the histories of TIGER-style sequential
    recommendation. Clicks on items outside the corpus are left out."""
    events: dict[int, list[tuple[int, int, int, int]]] = collections.defaultdict(list)
    for n, row in enumerate(rows):
        for j, item in enumerate(_ids(row["clicked_item_ids"])):
            if item in corpus:
                events[int(row["user_id"])].append((int(row["time_index"]), n, j, corpus.row(item)))
    return {user: [e[-1] for e in sorted(evs)] for user, evs in events.items()}


@dataclasses.dataclass(frozen=True)
class NextItem:
    """A sequential-recommendation example: the user's last ``history`` items (corpus rows, oldest first)
    and the item that came next."""

    user_id: int
    history: tuple[int, ...]
    target: int


def next_item_examples(sequences: Mapping[int, Sequence[int]], max_history: int
                       ) -> dict[str, list[NextItem]]:
    """TIGER's leave-one-out split (Rajput et al. 2023, Sec. 4.1): per user with at least 3 items, the last
    item is ``test``, the one before it ``valid``, and every earlier item (from the second on) a ``train``
    target; histories are the preceding items, the last ``max_history`` of them."""
    out: dict[str, list[NextItem]] = {"train": [], "valid": [], "test": []}
    for user, seq in sorted(sequences.items()):
        if len(seq) < 3:
            continue
        for t in range(1, len(seq)):
            split = "test" if t == len(seq) - 1 else "valid" if t == len(seq) - 2 else "train"
            out[split].append(NextItem(user, tuple(seq[max(0, t - max_history):t]), seq[t]))
    return out


@dataclasses.dataclass(frozen=True)
class Behaviours:
    """One search session of a user with the behaviour sequences that came before it (OneMall's input):
    corpus rows of earlier clicks and purchases and earlier query texts, oldest first, each the last
    ``max_events`` of its kind; the session's own query and its relevant items (clicked ∪ purchased rows)."""

    user_id: int
    session_id: int
    query: str
    clicks: tuple[int, ...]
    purchases: tuple[int, ...]
    queries: tuple[str, ...]
    relevant: tuple[int, ...]
    scenario: str = ""          # where the session happened (``with_scenarios``); "" unknown


def behaviour_examples(rows: Iterable[Mapping[str, Any]], corpus: ItemCorpus, max_events: int,
                       max_queries: int) -> dict[str, list[Behaviours]]:
    """Recall rows -> ``{split: [Behaviours]}``: per user, sessions in ``time_index`` order (then file
    order); a session's history is every session of the user with a smaller ``time_index`` (sessions at
    the same time do not see each other), of every split. Sessions with no relevant corpus item are not
    examples (they still enter later histories); items outside the corpus are left out."""
    per_user: dict[int, list[tuple[int, int, Mapping[str, Any]]]] = collections.defaultdict(list)
    for n, row in enumerate(rows):
        per_user[int(row["user_id"])].append((int(row["time_index"]), n, row))
    out: dict[str, list[Behaviours]] = collections.defaultdict(list)
    for user in sorted(per_user):
        clicks: list[int] = []
        purchases: list[int] = []
        queries: list[str] = []
        sessions = sorted(per_user[user], key=lambda e: e[:2])
        seen = 0                                  # sessions[:seen] are in the history
        for i, (time, _, row) in enumerate(sessions):
            while sessions[seen][0] < time:
                _, _, past = sessions[seen]
                clicks += corpus.rows(_ids(past["clicked_item_ids"]))
                purchases += corpus.rows(_ids(past["purchased_item_ids"]))
                if str(past["query"]).strip():
                    queries.append(str(past["query"]).strip())
                seen += 1
            relevant = tuple(sorted(corpus.rows(relevant_items(row))))
            if relevant:
                out[str(row["split"]).lower()].append(Behaviours(
                    user, int(row["session_id"]), str(row["query"]).strip(), tuple(clicks[-max_events:]),
                    tuple(purchases[-max_events:]), tuple(queries[-max_queries:]), relevant))
    return dict(out)


def with_scenarios(examples: dict[str, list[Behaviours]], scenario_of: Mapping[int, str]) -> dict[str, list[Behaviours]]:
    """The examples with each session's scenario, ``scenario_of[session_id]`` ("" when it has none)."""
    return {split: [dataclasses.replace(e, scenario=str(scenario_of.get(e.session_id, ""))) for e in rows]
            for split, rows in examples.items()}


@dataclasses.dataclass(frozen=True)
class RecallPair:
    """A training example: a query and the corpus rows of its relevant items (at least one)."""

    query: str
    positive_rows: tuple[int, ...]


def recall_training_pairs(queries: Sequence[RecallQuery], corpus: ItemCorpus) -> list[RecallPair]:
    """Training queries whose relevant items are (partly) in the corpus -> ``RecallPair`` (one each;
    the positive is drawn per step, as the official DPR collate draws ``random.choice(positives)``)."""
    out = []
    for q in queries:
        rows = corpus.rows(q.relevant)
        if rows:
            out.append(RecallPair(q.query, tuple(rows)))
    return out


def sample_negative(rng: np.random.Generator, num_items: int, exclude: Sequence[int],
                    max_trials: int = 20) -> int:
    """A uniformly random corpus row not in ``exclude``: rejection sampling (as the official
    ``build_dpr.py``), then, after ``max_trials`` misses, a draw from the explicit complement. Only
    when every row is excluded is an excluded row returned (a corpus of positives has no negative)."""
    excluded = set(exclude)
    for _ in range(max_trials):
        row = int(rng.integers(num_items))
        if row not in excluded:
            return row
    rest = np.setdiff1d(np.arange(num_items), np.fromiter(excluded, np.int64, len(excluded)))
    return int(rng.choice(rest)) if rest.size else row


def click_counts(rows: Iterable[Mapping[str, Any]], split: str = "train") -> collections.Counter:
    """``{item_id: number of clicks}`` over the recall rows of ``split`` (the popularity baseline)."""
    counts: collections.Counter = collections.Counter()
    for row in rows:
        if str(row["split"]).lower() == split:
            counts.update(_ids(row["clicked_item_ids"]))
    return counts


# ----------------------------------------------------------------------------- relevance


@dataclasses.dataclass(frozen=True)
class RelevanceExample:
    query: str
    text: str
    label: int    # 1 iff score == 3
    score: int    # the 0-3 grade


def relevance_label(score: int) -> int:
    """Binary relevance label of a 0-3 grade: 1 iff ``score == 3``."""
    return int(int(score) == 3)


def relevance_text(row: Mapping[str, Any]) -> str:
    """``item_title brand seller_name attr_value`` (non-empty parts; brand left out if ``无品牌``)."""
    parts = []
    for key in RELEVANCE_TEXT_FIELDS:
        v = row.get(key, "")
        v = "" if v is None else str(v).strip()
        if not v or (key == "brand" and v == NO_BRAND):
            continue
        parts.append(v)
    return " ".join(parts)


def relevance_splits(rows: Iterable[Mapping[str, Any]], *, test_every: int = RELEVANCE_TEST_EVERY,
                     validation_fraction: float = RELEVANCE_VALIDATION_FRACTION,
                     seed: int = RELEVANCE_SPLIT_SEED) -> dict[str, list[RelevanceExample]]:
    """Relevance rows (file order) -> ``{"train", "validation", "test"}`` (module docstring rules)."""
    test, rest = [], []
    kept = 0
    for row in rows:
        query = str(row["query"]).strip()
        text = relevance_text(row)
        if not query or not text:
            continue
        ex = RelevanceExample(query, text, relevance_label(row["score"]), int(row["score"]))
        (test if kept % test_every == 0 else rest).append(ex)
        kept += 1
    random.Random(seed).shuffle(rest)
    n_valid = int(len(rest) * validation_fraction)
    return {"train": rest[n_valid:], "validation": rest[:n_valid], "test": test}


def majority_class(labels: Sequence[int]) -> int:
    """The most frequent label (ties: the smaller label)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    return int(np.argmax(counts))


# ----------------------------------------------------------------------------- token ids


def encode_texts(tokenizer: Any, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``[n]`` texts -> ``(ids int32 [n, max_len], mask bool [n, max_len])`` as
    ``<s> text </s>`` (``<s>`` plays BERT's [CLS], ``</s>`` its [SEP]), right-truncated."""
    return tokenizer.encode_batch(list(texts), max_len, add_bos=True, add_eos=True)


def _pair_lengths(n_a: int, n_b: int, room: int) -> tuple[int, int]:
    """Token budget of a pair under longest-first truncation (HF ``truncation=True``: drop one token at a
    time from the longer side, from the second on a tie)."""
    a = min(n_a, max(room - n_b, (room + 1) // 2))
    return a, min(n_b, room - a)


def encode_pairs(tokenizer: Any, queries: Sequence[str], texts: Sequence[str], max_len: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``[n]`` (query, text) pairs -> ``ids, mask, token_type_ids [n, max_len]`` (int32, bool, int32)
    as ``<s> query </s> text </s>``, segment 0 up to the first ``</s>``, 1 after; longest-first
    truncation, right padding with 0."""
    from data_pipelines.tokenizer import BOS_ID, EOS_ID  # noqa: PLC0415

    if max_len < 5:
        raise ValueError(f"max_len must be >= 5 for a pair, got {max_len}")
    if len(queries) != len(texts):
        raise ValueError(f"{len(queries)} queries but {len(texts)} texts")
    n = len(queries)
    ids = np.zeros((n, max_len), np.int32)
    types = np.zeros((n, max_len), np.int32)
    mask = np.zeros((n, max_len), bool)
    for r, (q, t) in enumerate(zip(queries, texts)):
        qa, tb = tokenizer.encode(q), tokenizer.encode(t)
        na, nb = _pair_lengths(len(qa), len(tb), max_len - 3)
        row = [BOS_ID, *qa[:na], EOS_ID, *tb[:nb], EOS_ID]
        ids[r, :len(row)] = row
        mask[r, :len(row)] = True
        types[r, na + 2:len(row)] = 1
    return ids, mask, types


# ----------------------------------------------------------------------------- worlds and tokenizers

SYNTHETIC_VERSION = 2  # bump when the synthetic build below changes (it is part of the cache key)


def world_texts(root: str | os.PathLike) -> Iterable[str]:
    """The query and item texts a tokenizer should cover: recall queries, item texts, relevance
    queries and relevance texts (kinds absent under ``root`` are skipped)."""
    for kind, fn in (("recall", lambda r: [r["query"]]), ("items", lambda r: [item_text(r)]),
                     ("relevance", lambda r: [r["query"], relevance_text(r)])):
        try:
            rows = read_rows(root, kind)
        except FileNotFoundError:
            continue
        for row in rows:
            yield from (t for t in fn(row) if t)


def synthetic_world(params: Mapping[str, Any]) -> pathlib.Path:
    """A cached synthetic KuaiSearch folder (demo layout) with a tokenizer ``spm.model`` trained on
    its texts. ``params``: ``num_users, num_items, num_sessions, num_relevance, seed, vocab_size`` and
    optionally ``model_type`` (sentencepiece's, default "unigram"; "char" splits Chinese into
    characters as bert-base-chinese does). Built once per distinct ``params`` by
    ``data_pipelines.cache.cached_dataset``."""
    from data_pipelines.cache import cached_dataset  # noqa: PLC0415
    from data_pipelines.kuaisearch.synthetic import synthesize  # noqa: PLC0415
    from data_pipelines.tokenizer import train_sentencepiece  # noqa: PLC0415

    p = dict(params)

    def build(folder: pathlib.Path) -> None:
        synthesize(folder, num_users=p["num_users"], num_items=p["num_items"], num_sessions=p["num_sessions"],
                   num_relevance=p["num_relevance"], seed=p["seed"])
        train_sentencepiece(world_texts(folder), folder / "spm.model", vocab_size=p["vocab_size"],
                            model_type=p.get("model_type", "unigram"), seed=p["seed"])

    return cached_dataset("kuaisearch_synth", {**p, "version": SYNTHETIC_VERSION}, build)


def tokenizer_path(root: str | os.PathLike, explicit: str = "", vocab_size: int = 21128,
                   model_type: str = "char") -> pathlib.Path:
    """The sentencepiece model for ``root``: ``explicit`` when given, else ``root/spm.model`` when it
    exists, else one trained once on ``world_texts(root)`` and cached (keyed by root, vocabulary size
    and model type; "char" splits Chinese into characters, as bert-base-chinese does)."""
    if explicit:
        path = pathlib.Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        return path
    own = pathlib.Path(root) / "spm.model"
    if own.is_file():
        return own
    from data_pipelines.cache import cached_dataset  # noqa: PLC0415
    from data_pipelines.tokenizer import train_sentencepiece  # noqa: PLC0415

    key = {"root": str(pathlib.Path(root).resolve()), "vocab_size": vocab_size, "model_type": model_type}
    folder = cached_dataset("kuaisearch_spm", key,
                            lambda d: train_sentencepiece(world_texts(root), d / "spm.model", vocab_size=vocab_size,
                                                          model_type=model_type))
    return folder / "spm.model"

"""KuaiSearch ranking rows -> fixed-shape feature dicts (the paper's ranking features), and the split rule.

Pure data code (numpy, no JAX)::

    users = UserTable.from_rows(iter_jsonl(root, "users"))           # or UserTable.load(dir)
    items = ItemTable.from_rows(iter_jsonl(root, "items"), keep_ids=None)
    featurize = RankFeaturizer(FeatureConfig(...), users, items)
    example = featurize(rank_row)          # {name: np.ndarray}, shapes = featurize.config.spec()
    featurize.stats.as_dict()              # rows, users_missing, items_missing, history_items_missing

**Label**: ``is_clicked or is_purchased``.

**Features** (``FeatureConfig.spec()`` gives every name, shape and dtype):

| name | shape | what |
|---|---|---|
| ``user_id`` | ``()`` | hashed user id |
| ``user_gender``, ``user_age`` | ``()`` | from ``users`` joined by ``user_id`` (0 = user not found) |
| ``entrance`` | ``()`` | ``search_entrance`` (categorical) |
| ``item_id`` | ``()`` | hashed ``target_item_id`` |
| ``item_cats`` | ``(3,)`` | hashed category ids, levels 1-3, from ``items`` (0 = item not found) |
| ``hist_ids``, ``hist_cats`` | ``(H,)``, ``(H, 3)`` | the ``H`` = 20 recently clicked items (behaviour history) |
| ``hist_mask`` | ``(H,)`` bool | True on real history slots (lists shorter than ``H`` are right-padded) |
| ``query_tokens`` | ``(Lq,)`` | hashed tokens of the query (0 = padding) |
| ``title_tokens`` | ``(Lt,)`` | hashed tokens of the target item's title (empty when the item is not found) |
| ``dense`` | ``(10,)`` float32 | ``log1p`` of fan / follow counts, the 4 user and 3 item 30-day statistics, price |
| ``label`` | ``()`` float32 | ``is_clicked or is_purchased`` |

**Ids**: every id is hashed into its feature's bucket count ``B`` as ``1 + id mod (B - 1)`` (dense id
ranges are collision-free when ``B - 1`` exceeds the largest id); bucket 0 is the explicit *unknown*
bucket: a user or item that the ``users``/``items`` tables do not hold gets 0 for every joined field
(gender, age, categories) and an empty title, and is **counted** in ``RankFeaturizer.stats``. The id
itself comes from the rank row and is always hashed.

**Text**: character n-gram hashing (``text="char_ngram"``, n in ``ngrams``, interleaved by position so
truncation drops the end of a text, not its bigrams) or the ids of a SentencePiece model
(``data_pipelines/tokenizer.py``), both folded into ``text_buckets``; the model mean-pools their embeddings.

**Tables**: ``UserTable`` and ``ItemTable`` are sorted id arrays plus parallel column arrays (int8 /
int32 codes, titles as one UTF-8 byte buffer with offsets): ~30 bytes + the title per item, so the
6.6M items of KuaiSearch-Lite take ~0.5 GB, not a dict of dicts. ``keep_ids`` bounds a table to the
ids a split needs. ``save(dir)`` / ``load(dir)`` write plain ``.npy`` files (``allow_pickle=False``,
memory-mapped on load); a featurizer whose tables were loaded pickles by folder, so grain worker
processes map the same files instead of copying them.

**Split rule** (``assign_split``; the paper does not document its split): when the rows' ``split``
field separates them (both ``train`` and ``test`` occur), it is used. Otherwise the last
``test_fraction`` (10%) of rows by ``time_index`` is the test split: test = rows with
``time_index >= c``, ``c`` being the distinct time index whose cut puts the share of rows at or after
it closest to ``test_fraction``. Rows sharing a time index (one search session) never straddle the
split, so the share is only approximately 10% (exact on large data, coarse on the 200-row demo,
where one session holds most rows).
"""

from __future__ import annotations

import array
import dataclasses
import json
import os
import pathlib
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from data_pipelines.kuaisearch import schema

HISTORY_LEN = 20
UNKNOWN = 0  # the bucket of a missing user / item field

# Known category values; anything else maps to the "other" code (len(vocab) + 1); 0 stays unknown.
GENDERS = ("F", "M")
AGE_BUCKETS = ("0-11", "12-17", "18-23", "24-30", "31-40", "41-49", "50+")
ENTRANCES = ("mall", "homepage")

DENSE_FEATURES = (
    "user_fan_number",
    "user_follow_number",
    *schema.USER_STAT_KEYS,
    *schema.ITEM_STAT_KEYS,
    "target_item_price",
)
NUM_DENSE = len(DENSE_FEATURES)

# Model inputs, in the order evaluators pass them positionally (``label`` is not a model input).
MODEL_INPUTS = ("user_id", "user_gender", "user_age", "entrance", "item_id", "item_cats", "hist_ids",
                "hist_cats", "hist_mask", "query_tokens", "title_tokens", "dense")


def _code(value: str, vocab: Sequence[str]) -> int:
    """1-based code of ``value`` in ``vocab``; ``len(vocab) + 1`` for any other value."""
    try:
        return vocab.index(value) + 1
    except ValueError:
        return len(vocab) + 1


def vocab_size(vocab: Sequence[str]) -> int:
    """Codes of a small categorical: unknown (0), the vocabulary, other."""
    return len(vocab) + 2


def hash_ids(ids: Any, buckets: int) -> np.ndarray:
    """``1 + id mod (buckets - 1)`` as int32 (bucket 0 is reserved for unknown). ``[...] -> [...]``."""
    if buckets < 2:
        raise ValueError(f"need at least 2 buckets, got {buckets}")
    return (1 + np.mod(np.asarray(ids, np.int64), buckets - 1)).astype(np.int32)


# ----------------------------------------------------------------------------- text

_CHAR_BASE = 1 << 21  # above the largest Unicode code point: an n-gram (n <= 2) is an exact int64 key
_MIX = 0x2545F4914F6CDD1D  # < 2**63: int64 array products wrap, as a multiplicative hash wants


def char_ngram_ids(text: str, length: int, buckets: int, ngrams: Sequence[int] = (1, 2)) -> np.ndarray:
    """Hashed character n-grams of ``text``: ``int32 [length]``, values in ``[1, buckets)``, 0 = padding.

    Deterministic across processes (no Python ``hash``): the n-gram's exact key (code points in base
    2^21, n <= 2; longer n-grams wrap) is mixed multiplicatively. The n-grams are interleaved by
    start position (unigram 0, bigram 0, unigram 1, ...), so a text longer than ``length`` loses its end.
    """
    out = np.zeros(length, np.int32)
    if not text:
        return out
    cps = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64) + 1
    n_chars, width = len(cps), len(ngrams)
    keys = np.zeros((n_chars, width), np.int64)
    valid = np.zeros((n_chars, width), bool)
    for j, n in enumerate(ngrams):
        m = n_chars - n + 1
        if m <= 0:
            continue
        key = cps[:m] + n  # the n salt keeps a unigram apart from a bigram ending in a pad
        for k in range(1, n):
            key = key * _CHAR_BASE + cps[k:k + m]
        keys[:m, j] = key
        valid[:m, j] = True
    flat = keys[valid][:length] * _MIX
    flat ^= flat >> 31
    out[:len(flat)] = 1 + np.mod(flat, buckets - 1)
    return out


# ----------------------------------------------------------------------------- tables


def iter_jsonl(src_dir: str | os.PathLike, kind: str) -> Iterator[dict]:
    """Validated rows of ``kind`` from the JSONL files under ``src_dir`` (released, demo or synthetic
    layout). A bad line raises ``KuaiSearchFormatError`` naming the file and the line."""
    from data_pipelines.jsonl_convert import iter_file_lines  # noqa: PLC0415

    for path in schema.find_source_files(src_dir, kind):
        for line_no, line in iter_file_lines(path):
            yield schema.parse_line(kind, line, source=str(path), line=line_no)


def _progress(it: Iterable, desc: str, total: int | None = None) -> Iterable:
    try:
        import tqdm  # noqa: PLC0415
    except ImportError:  # pragma: no cover
        return it
    return tqdm.tqdm(it, desc=desc, total=total, unit="rows", mininterval=2.0, leave=False)


def _save(folder: pathlib.Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in arrays.items():
        np.save(folder / f"{name}.npy", a, allow_pickle=False)
    (folder / "meta.json").write_text(json.dumps(dict(meta), indent=2))


def _load(folder: pathlib.Path, names: Sequence[str]) -> tuple[dict[str, np.ndarray], dict]:
    folder = pathlib.Path(folder)
    if not (folder / "meta.json").is_file():
        raise FileNotFoundError(f"no feature table at {folder} (meta.json missing)")
    # plain ndarray views of the memory maps (np.memmap indexing is several times slower)
    arrays = {n: np.asarray(np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False)) for n in names}
    return arrays, json.loads((folder / "meta.json").read_text())


def _sorted_unique(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """(sorted unique ids, index of each one's first row, number of duplicate rows dropped)."""
    uniq, first = np.unique(ids, return_index=True)
    return uniq, first, len(ids) - len(uniq)


def _lookup(sorted_ids: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Row of each query id in ``sorted_ids``, -1 where absent. ``[...] -> [...] int64``."""
    q = np.asarray(query, np.int64)
    if len(sorted_ids) == 0:
        return np.full(q.shape, -1, np.int64)
    pos = np.searchsorted(sorted_ids, q)
    pos_c = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos_c] == q, pos_c, -1)


class UserTable:
    """Users as sorted ids + int8 gender / age codes (see ``GENDERS``, ``AGE_BUCKETS``)."""

    COLUMNS = ("ids", "gender", "age")

    def __init__(self, ids: np.ndarray, gender: np.ndarray, age: np.ndarray, *, duplicates: int = 0,
                 folder: pathlib.Path | None = None):
        self.ids, self.gender, self.age = ids, gender, age
        self.duplicates = duplicates
        self.folder = folder

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], keep_ids: np.ndarray | None = None,
                  progress: bool = False) -> UserTable:
        ids, gender, age = array.array("q"), array.array("b"), array.array("b")
        for r in (_progress(rows, "users") if progress else rows):
            ids.append(int(r["user_id"]))
            gender.append(_code(r["gender"], GENDERS))
            age.append(_code(r["age_bucket"], AGE_BUCKETS))
        ids_np = np.frombuffer(ids, np.int64) if len(ids) else np.zeros(0, np.int64)
        g, a = np.frombuffer(gender, np.int8), np.frombuffer(age, np.int8)
        if keep_ids is not None:
            keep = np.isin(ids_np, np.asarray(keep_ids, np.int64))
            ids_np, g, a = ids_np[keep], g[keep], a[keep]
        uniq, first, dup = _sorted_unique(ids_np)
        return cls(uniq, g[first].copy(), a[first].copy(), duplicates=dup)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, user_ids: Any) -> np.ndarray:
        return _lookup(self.ids, user_ids)

    def save(self, folder: str | os.PathLike) -> None:
        _save(pathlib.Path(folder), {"ids": self.ids, "gender": self.gender, "age": self.age},
              {"kind": "users", "rows": len(self), "duplicates": self.duplicates})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> UserTable:
        arrays, meta = _load(pathlib.Path(folder), cls.COLUMNS)
        return cls(arrays["ids"], arrays["gender"], arrays["age"], duplicates=meta.get("duplicates", 0),
                   folder=pathlib.Path(folder))


class ItemTable:
    """Items as sorted ids + int32 category ids ``[n, 3]`` + titles (UTF-8 buffer and offsets)."""

    COLUMNS = ("ids", "cats", "title_offsets", "title_bytes")
    CATEGORY_FIELDS = ("category_level1_id", "category_level2_id", "category_level3_id")

    def __init__(self, ids: np.ndarray, cats: np.ndarray, title_offsets: np.ndarray, title_bytes: np.ndarray,
                 *, duplicates: int = 0, folder: pathlib.Path | None = None):
        self.ids, self.cats = ids, cats
        self.title_offsets, self.title_bytes = title_offsets, title_bytes
        self.duplicates = duplicates
        self.folder = folder

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], keep_ids: np.ndarray | None = None,
                  progress: bool = False) -> ItemTable:
        keep = None if keep_ids is None else set(np.asarray(keep_ids, np.int64).tolist())
        ids, cats = array.array("q"), array.array("q")
        ends = array.array("q")
        buf = bytearray()
        for r in (_progress(rows, "items") if progress else rows):
            item_id = int(r["item_id"])
            if keep is not None and item_id not in keep:
                continue
            ids.append(item_id)
            cats.extend(int(r[f]) for f in cls.CATEGORY_FIELDS)
            buf += r["item_title"].encode("utf-8")
            ends.append(len(buf))
        ids_np = np.frombuffer(ids, np.int64) if len(ids) else np.zeros(0, np.int64)
        cats_np = (np.frombuffer(cats, np.int64) if len(cats) else np.zeros(0, np.int64)).reshape(-1, 3)
        ends_np = np.frombuffer(ends, np.int64) if len(ends) else np.zeros(0, np.int64)
        starts_np = np.concatenate([[0], ends_np[:-1]]).astype(np.int64)
        uniq, first, dup = _sorted_unique(ids_np)
        # re-pack titles in sorted-id order
        lengths = (ends_np - starts_np)[first]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        src = np.frombuffer(buf, np.uint8)
        # byte j of the output comes from src[j + (start of its title in src - start in the output)]
        gather = np.arange(int(offsets[-1]), dtype=np.int64) + np.repeat(starts_np[first] - offsets[:-1], lengths)
        title_bytes = src[gather] if len(gather) else np.zeros(0, np.uint8)
        return cls(uniq, cats_np[first].astype(np.int32), offsets, title_bytes, duplicates=dup)

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, item_ids: Any) -> np.ndarray:
        return _lookup(self.ids, item_ids)

    def title(self, row: int) -> str:
        """Title of table row ``row`` (from ``lookup``)."""
        s, e = int(self.title_offsets[row]), int(self.title_offsets[row + 1])
        return bytes(self.title_bytes[s:e]).decode("utf-8")

    def save(self, folder: str | os.PathLike) -> None:
        _save(pathlib.Path(folder), {"ids": self.ids, "cats": self.cats, "title_offsets": self.title_offsets,
                                     "title_bytes": self.title_bytes},
              {"kind": "items", "rows": len(self), "duplicates": self.duplicates})

    @classmethod
    def load(cls, folder: str | os.PathLike) -> ItemTable:
        arrays, meta = _load(pathlib.Path(folder), cls.COLUMNS)
        return cls(arrays["ids"], arrays["cats"], arrays["title_offsets"], arrays["title_bytes"],
                   duplicates=meta.get("duplicates", 0), folder=pathlib.Path(folder))


# ----------------------------------------------------------------------------- features


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    """Bucket counts and lengths of the ranking features (``configs/kuaisearch_rank.py``'s ``model.id_buckets``
    and ``data`` fields)."""

    user_buckets: int = 1024
    item_buckets: int = 8192
    category_buckets: tuple[int, int, int] = (64, 256, 1024)
    text_buckets: int = 8192
    query_len: int = 24
    title_len: int = 64
    history_len: int = HISTORY_LEN
    text: str = "char_ngram"  # char_ngram | sentencepiece
    ngrams: tuple[int, ...] = (1, 2)
    tokenizer: str = ""  # a SentencePiece .model when text == "sentencepiece"

    def __post_init__(self):
        if self.text not in ("char_ngram", "sentencepiece"):
            raise ValueError(f"text must be 'char_ngram' or 'sentencepiece', got {self.text!r}")
        if self.text == "sentencepiece" and not self.tokenizer:
            raise ValueError("text='sentencepiece' needs a tokenizer .model path")
        if len(self.category_buckets) != 3:
            raise ValueError(f"category_buckets needs 3 counts (levels 1-3), got {self.category_buckets}")

    def spec(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """``{feature: (per-example shape, dtype)}`` of one example (no batch dimension)."""
        h = self.history_len
        i32, f32 = np.dtype(np.int32), np.dtype(np.float32)
        return {
            "user_id": ((), i32), "user_gender": ((), i32), "user_age": ((), i32), "entrance": ((), i32),
            "item_id": ((), i32), "item_cats": ((3,), i32),
            "hist_ids": ((h,), i32), "hist_cats": ((h, 3), i32), "hist_mask": ((h,), np.dtype(bool)),
            "query_tokens": ((self.query_len,), i32), "title_tokens": ((self.title_len,), i32),
            "dense": ((NUM_DENSE,), f32), "label": ((), f32),
        }


@dataclasses.dataclass
class JoinStats:
    """Rows featurized and joins that missed (counted, never silent)."""

    rows: int = 0
    users_missing: int = 0
    items_missing: int = 0
    history_items_missing: int = 0
    history_slots: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def label_of(row: Mapping[str, Any]) -> float:
    """The paper's label: clicked or purchased."""
    return float(bool(row["is_clicked"]) or bool(row["is_purchased"]))


def dense_of(row: Mapping[str, Any]) -> np.ndarray:
    """``log1p`` of the 10 numeric fields (negatives clipped to 0), in ``DENSE_FEATURES`` order."""
    us, it = row["user_statistical_features"], row["target_item_statistical_features"]
    values = [row["user_fan_number"], row["user_follow_number"], *(us[k] for k in schema.USER_STAT_KEYS),
              *(it[k] for k in schema.ITEM_STAT_KEYS), row["target_item_price"]]
    return np.log1p(np.maximum(np.asarray(values, np.float64), 0.0)).astype(np.float32)


class RankFeaturizer:
    """``rank row -> {feature: np.ndarray}`` with the joins to ``users`` and ``items``.

    Callable as a grain transform (``featurize(row, rng)``); ``stats`` counts rows and missed joins.
    """

    def __init__(self, config: FeatureConfig, users: UserTable, items: ItemTable):
        self.config = config
        self.users = users
        self.items = items
        self.stats = JoinStats()
        self._lock = threading.Lock()
        self._cat_mod = np.asarray(config.category_buckets, np.int64) - 1
        self._tokenizer = None
        if config.text == "sentencepiece":
            from data_pipelines.tokenizer import Tokenizer  # noqa: PLC0415

            self._tokenizer = Tokenizer.load(config.tokenizer)

    # pickling: tables loaded from a folder travel as the folder (workers memory-map the same files)
    def __getstate__(self):
        state = {"config": self.config}
        for name in ("users", "items"):
            table = getattr(self, name)
            state[name] = ("folder", str(table.folder)) if table.folder is not None else ("table", table)
        return state

    def __setstate__(self, state):
        tables = {}
        for name, cls in (("users", UserTable), ("items", ItemTable)):
            how, value = state[name]
            tables[name] = cls.load(value) if how == "folder" else value
        self.__init__(state["config"], tables["users"], tables["items"])

    def text_ids(self, text: str, length: int) -> np.ndarray:
        c = self.config
        if self._tokenizer is None:
            return char_ngram_ids(text, length, c.text_buckets, c.ngrams)
        out = np.zeros(length, np.int32)
        ids = np.asarray(self._tokenizer.encode(text)[:length], np.int64)
        out[:len(ids)] = 1 + ids % (c.text_buckets - 1)
        return out

    def _item_codes(self, item_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``[n]`` item ids -> (hashed ids ``[n]``, hashed categories ``[n, 3]`` (0 = unknown), table rows
        ``[n]`` (-1 = missing))."""
        rows = self.items.lookup(item_ids)
        found = rows >= 0
        hashed = (1 + np.mod(item_ids, self.config.item_buckets - 1)).astype(np.int32)
        if not len(self.items):
            return hashed, np.zeros((len(item_ids), 3), np.int32), rows
        raw = np.asarray(self.items.cats[np.where(found, rows, 0)], np.int64)
        cats = 1 + np.mod(raw, self._cat_mod)
        return hashed, np.where(found[:, None], cats, UNKNOWN).astype(np.int32), rows

    def __call__(self, row: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
        c = self.config
        h = c.history_len
        hist = np.asarray(row["recently_clicked_item_ids"], np.int64)[:h]
        n_hist = len(hist)
        ids = np.concatenate([np.asarray([row["target_item_id"]], np.int64), hist])
        hashed, cats, rows = self._item_codes(ids)
        hist_ids = np.zeros(h, np.int32)
        hist_ids[:n_hist] = hashed[1:]
        hist_cats = np.zeros((h, 3), np.int32)
        hist_cats[:n_hist] = cats[1:]
        hist_mask = np.zeros(h, bool)
        hist_mask[:n_hist] = True
        item_row = int(rows[0])
        user_id = int(row["user_id"])
        user_row = int(self.users.lookup(np.asarray([user_id]))[0])
        if user_row >= 0:
            gender, age = int(self.users.gender[user_row]), int(self.users.age[user_row])
        else:
            gender = age = UNKNOWN
        title = self.items.title(item_row) if item_row >= 0 else ""
        hist_missing = int(np.count_nonzero(rows[1:] < 0))
        with self._lock:
            s = self.stats
            s.rows += 1
            s.users_missing += user_row < 0
            s.items_missing += item_row < 0
            s.history_items_missing += hist_missing
            s.history_slots += n_hist
        return {
            "user_id": np.int32(1 + user_id % (c.user_buckets - 1)),
            "user_gender": np.int32(gender),
            "user_age": np.int32(age),
            "entrance": np.int32(_code(row["search_entrance"], ENTRANCES)),
            "item_id": hashed[0],
            "item_cats": cats[0],
            "hist_ids": hist_ids,
            "hist_cats": hist_cats,
            "hist_mask": hist_mask,
            "query_tokens": self.text_ids(row["query"], c.query_len),
            "title_tokens": self.text_ids(title, c.title_len),
            "dense": dense_of(row),
            "label": np.float32(label_of(row)),
        }


# ----------------------------------------------------------------------------- candidates


_TARGET_FIELDS = ("target_item_id", "target_item_price", "target_item_statistical_features",
                  "is_clicked", "is_purchased")


@dataclasses.dataclass
class CandidateStats:
    rows: int = 0              # candidate rows made
    contexts_missing: int = 0  # their session had no rank row: user / query context built from the caller's
    items_unseen: int = 0      # their item is in no rank row: price and 30-day item statistics are 0


class CandidateRows:
    """Rank rows for items a generator proposes, so that a ranking model can score them.

    The rule: the row of ``(session, item)`` is the session's first rank row (user, entrance, query, the
    click / purchase histories, the user statistics) with its target fields replaced by the item's own price
    and 30-day statistics from the item's newest rank row (largest ``time_index``) and no label. A session
    without rank rows gets the ``fallback`` context its caller passes (user id, query, recent clicks; entrance
    unknown, statistics 0), an item in no rank row gets price and statistics 0; both are counted in ``stats``.
    ``keep_sessions`` bounds what is held to the sessions that will be asked for.
    """

    def __init__(self, contexts: dict[int, dict], items: dict[int, tuple[int, dict]]):
        self.contexts, self.items = contexts, items   # session -> context; item -> (time_index, fields)
        self.stats = CandidateStats()

    @classmethod
    def from_rows(cls, rows: Iterable[Mapping[str, Any]], keep_sessions: Iterable[int] | None = None) -> CandidateRows:
        keep = None if keep_sessions is None else set(int(s) for s in keep_sessions)
        contexts: dict[int, dict] = {}
        items: dict[int, tuple[int, dict]] = {}
        for row in rows:
            session, item, time = int(row["session_id"]), int(row["target_item_id"]), int(row["time_index"])
            if (keep is None or session in keep) and session not in contexts:
                contexts[session] = {k: v for k, v in row.items() if k not in _TARGET_FIELDS}
            if item not in items or items[item][0] <= time:
                items[item] = (time, {"target_item_price": row["target_item_price"],
                                      "target_item_statistical_features": row["target_item_statistical_features"]})
        return cls(contexts, items)

    def save(self, folder: str | os.PathLike) -> None:
        """``candidates.json`` in ``folder`` (plain JSON; id lists as lists)."""
        plain = lambda v: v.tolist() if isinstance(v, np.ndarray) else v  # noqa: E731
        contexts = {s: {k: plain(v) for k, v in c.items()} for s, c in self.contexts.items()}
        (pathlib.Path(folder) / "candidates.json").write_text(json.dumps(
            {"contexts": contexts, "items": self.items}, ensure_ascii=False))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CandidateRows:
        data = json.loads((pathlib.Path(folder) / "candidates.json").read_text())
        return cls({int(s): c for s, c in data["contexts"].items()},
                   {int(i): (int(t), f) for i, (t, f) in data["items"].items()})

    def row(self, session_id: int, item_id: int, fallback: Mapping[str, Any] | None = None) -> dict:
        """The rank row of ``item_id`` proposed in session ``session_id`` (``fallback``: the context keys
        ``user_id``, ``query``, ``recently_clicked_item_ids``, used when the session has no rank row)."""
        context = self.contexts.get(int(session_id))
        self.stats.rows += 1
        if context is None:
            if fallback is None:
                raise KeyError(f"session {session_id} has no rank row and no fallback context was given")
            self.stats.contexts_missing += 1
            context = {"session_id": int(session_id), "user_fan_number": 0, "user_follow_number": 0,
                       "search_entrance": "", "recently_purchased_item_ids": [],
                       "user_statistical_features": dict.fromkeys(schema.USER_STAT_KEYS, 0.0), **fallback}
        item = self.items.get(int(item_id))
        if item is None:
            self.stats.items_unseen += 1
            fields = {"target_item_price": 0.0,
                      "target_item_statistical_features": dict.fromkeys(schema.ITEM_STAT_KEYS, 0.0)}
        else:
            fields = item[1]
        return {**context, **fields, "target_item_id": int(item_id), "is_clicked": 0, "is_purchased": 0}


# ----------------------------------------------------------------------------- split


@dataclasses.dataclass(frozen=True)
class Split:
    """Row indices of train and test, and the rule that produced them ("split_field" | "time_index")."""

    train: np.ndarray
    test: np.ndarray
    rule: str


def time_split(time_index: Any, test_fraction: float = 0.1) -> Split:
    """The latest rows by ``time_index``, about ``test_fraction`` of them, are test; rows sharing a time
    index stay on one side (see the module docstring). ``[n] -> Split`` of sorted row indices."""
    t = np.asarray(time_index, np.int64)
    n = len(t)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    values, counts = np.unique(t, return_counts=True)
    if len(values) < 2:
        raise ValueError(f"{n} row(s) with {len(values)} distinct time_index: no time-based train/test split")
    # test = rows with t >= values[j] for j in 1..len-1: share of rows at or after each candidate cut
    share = np.cumsum(counts[::-1])[::-1][1:] / n
    j = 1 + int(np.argmin(np.abs(share - test_fraction)))  # first of ties: the smallest test set
    test = t >= values[j]
    return Split(np.flatnonzero(~test), np.flatnonzero(test), "time_index")


def assign_split(split_names: Sequence[str], time_index: Any, test_fraction: float = 0.1) -> Split:
    """The split rule: the ``split`` field when it separates rows (both ``train`` and ``test``
    occur; rows of other splits are in neither), else ``time_split``."""
    names = np.asarray(split_names)
    if (names == "train").any() and (names == "test").any():
        return Split(np.flatnonzero(names == "train"), np.flatnonzero(names == "test"), "split_field")
    return time_split(time_index, test_fraction)


class IndexedSource:
    """``source`` restricted to ``indices`` (random access, picklable when ``source`` is)."""

    def __init__(self, source: Any, indices: np.ndarray):
        self.source = source
        self.indices = np.asarray(indices, np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[int(self.indices[i])]

    def __getitems__(self, idx: Sequence[int]) -> list:
        real = [int(self.indices[i]) for i in idx]
        if hasattr(self.source, "__getitems__"):
            return self.source.__getitems__(real)
        return [self.source[i] for i in real]


class FeaturizedSource:
    """``source`` featurized once into stacked numpy arrays (for small splits: a row is then a view).

    ``source[i]`` -> ``{feature: array}``; ``batches(size)`` slices consecutive rows without Python per row.
    """

    def __init__(self, source: Any, featurize: Any, chunk: int = 2048, progress: bool = False):
        n = len(source)
        if n == 0:
            raise ValueError("cannot featurize an empty source")
        self.arrays: dict[str, np.ndarray] = {}
        starts = range(0, n, chunk)
        for s in (_progress(starts, "featurize", total=len(starts)) if progress else starts):
            idx = list(range(s, min(n, s + chunk)))
            rows = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
            for j, row in enumerate(rows):
                ex = featurize(row)
                if not self.arrays:
                    self.arrays = {k: np.empty((n, *np.shape(v)), np.asarray(v).dtype) for k, v in ex.items()}
                for k, v in ex.items():
                    self.arrays[k][s + j] = v

    def __len__(self) -> int:
        return len(next(iter(self.arrays.values())))

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {k: v[i] for k, v in self.arrays.items()}

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, len(self), size):
            yield {k: v[s:s + size] for k, v in self.arrays.items()}


def scan_fields(source: Any, fields: Sequence[str], chunk: int = 4096, progress: bool = True) -> dict[str, list]:
    """One pass over ``source`` collecting ``fields`` of every row (batched reads when available)."""
    out: dict[str, list] = {f: [] for f in fields}
    n = len(source)
    starts = range(0, n, chunk)
    for s in (_progress(starts, "scan rank", total=len(starts)) if progress and n > 50 * chunk else starts):
        idx = list(range(s, min(n, s + chunk)))
        rows = source.__getitems__(idx) if hasattr(source, "__getitems__") else [source[i] for i in idx]
        for r in rows:
            for f in fields:
                out[f].append(r[f])
    return out

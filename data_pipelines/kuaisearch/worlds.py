"""KuaiSearch worlds: everything a recall, relevance or ranking task reads, prepared, cached and joined once.

    world = RecallWorld.load(config.data, max_vocab=config.model.vocab_size)
    world = RelevanceWorld.load(config.data, max_vocab=config.model.vocab_size)
    world = GenerativeWorld.load(config.data, max_vocab=...)   # recall + a SID table and its trie
    world = RankWorld.load(config.data, progress=True)

``data`` is a task config's ``data`` group (attribute access): ``root`` empty means the cached synthetic
world of ``data.synthetic``. The recall and relevance worlds read rows with ``examples.read_rows`` (raw
JSONL or prepared ArrayRecord) and share one sentencepiece tokenizer (``examples.tokenizer_path``). The
rank world reads rank rows from the prepared ArrayRecord dataset (prepared once into
``data.prepared_dir`` or the cache), the users / items tables (``rank_features.UserTable`` / ``ItemTable``)
built once from the JSONL files and cached as ``.npy``, and the train / test split of
``rank_features.assign_split`` (the ``split`` field when it separates rows, else the last
``data.test_fraction`` by ``time_index``, computed once and cached).

Pure data code: no JAX, nothing of ``trainers/`` or ``models/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import pathlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from data_pipelines.cache import cached_dataset
from data_pipelines.kuaisearch import examples as ex
from data_pipelines.kuaisearch import rank_features as rf
from data_pipelines.kuaisearch import records, schema

TABLES_VERSION = 1
log = logging.getLogger(__name__)


def batched(n: int, size: int) -> Iterator[slice]:
    """Slices ``[0, size), [size, 2 size), ...`` covering ``range(n)``, the last one short."""
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ----------------------------------------------------------------------------- recall and relevance


def data_root(data: Any) -> pathlib.Path:
    """``data.root`` when set, else the cached synthetic world of ``data.synthetic``."""
    if data.root:
        root = pathlib.Path(data.root)
        if not root.is_dir():
            raise FileNotFoundError(f"data.root {root} is not a folder (a KuaiSearch JSONL folder or the "
                                    f"output of `ecomax data prepare kuaisearch`)")
        return root
    return ex.synthetic_world(data.synthetic.to_dict())


def load_tokenizer(data: Any, root: pathlib.Path, max_vocab: int = 0):
    """The sentencepiece tokenizer of ``data`` (``tokenizer``, else ``root/spm.model``, else trained once);
    ``max_vocab`` > 0 is the model's vocabulary, which the tokenizer must fit."""
    from data_pipelines.tokenizer import Tokenizer  # noqa: PLC0415

    tok = Tokenizer.load(ex.tokenizer_path(root, data.tokenizer, data.tokenizer_vocab_size, data.tokenizer_model_type))
    if max_vocab and tok.vocab_size > max_vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but model.vocab_size is "
                         f"{max_vocab}; raise model.vocab_size or use a smaller tokenizer")
    return tok


@dataclasses.dataclass
class RecallWorld:
    """Everything the recall task reads, loaded once."""

    root: pathlib.Path
    tokenizer: Any
    corpus: ex.ItemCorpus
    queries: dict[str, list[ex.RecallQuery]]
    clicks: dict[int, int]                       # train click count per item id

    @classmethod
    def load(cls, data: Any, max_vocab: int = 0) -> RecallWorld:
        root = data_root(data)
        rows = ex.read_rows(root, "recall")
        corpus = ex.ItemCorpus.from_rows(ex.read_rows(root, "items"))
        if len(corpus) < 2:
            raise ValueError(f"{root}: the item corpus has {len(corpus)} items; recall needs at least 2")
        return cls(root, load_tokenizer(data, root, max_vocab), corpus, ex.recall_queries(rows),
                   dict(ex.click_counts(rows)))

    def training_pairs(self) -> list[ex.RecallPair]:
        """One pair per train session with a relevant item in the corpus; raises when there is none."""
        pairs = ex.recall_training_pairs(self.queries.get("train", []), self.corpus)
        if not pairs:
            raise ValueError(f"{self.root}: no training session has a clicked or purchased item in the item corpus")
        return pairs

    def eval_queries(self, split: str, max_examples: int = 0) -> list[ex.RecallQuery]:
        """The sessions of ``split`` with interactions, the first ``max_examples`` of them (0: all)."""
        queries = self.queries.get(split, [])
        if not queries:
            raise ValueError(f"{self.root}: no {split!r} session with interactions")
        return queries[:max_examples] if max_examples else queries


@dataclasses.dataclass
class GenerativeWorld:
    """The recall world joined with a SID table (``data.sid_table``: a folder of ``ecomax gr sids`` or
    ``ecomax sid build``): every corpus item's SID, the SID trie, and the DSI training examples."""

    recall: RecallWorld
    item_codes: np.ndarray          # [n_corpus, D] int32, -1 rows for corpus items the table lacks
    sizes: tuple[int, ...]          # codes per level (the dedup digit included)
    trie: Any                       # data_pipelines.sid.trie.Trie over the table's rows
    table_ids: np.ndarray           # [N] item id of each table row (the trie's leaves point at rows)

    @classmethod
    def load(cls, data: Any, max_vocab: int = 0) -> GenerativeWorld:
        from data_pipelines.sid.table import codes_of, load_table  # noqa: PLC0415
        from data_pipelines.sid.trie import load_trie  # noqa: PLC0415

        if not data.sid_table:
            raise ValueError("generative retrieval needs a SID table: run `ecomax gr sids --config CONFIG --out DIR` "
                             "(or `ecomax sid build`) and set data.sid_table=DIR")
        folder = pathlib.Path(data.sid_table)
        if not (folder / "sid_table.npy").is_file() or not (folder / "trie" / "trie.json").is_file():
            raise FileNotFoundError(f"data.sid_table {folder}: expected sid_table.npy, item_ids.npy and trie/ "
                                    f"(written by `ecomax gr sids` or `ecomax sid build`)")
        recall = RecallWorld.load(data, max_vocab)
        table, table_ids, meta = load_table(folder)
        codes = codes_of(recall.corpus.ids, table, table_ids)
        covered = int((codes[:, 0] >= 0).sum())
        if covered == 0:
            raise ValueError(f"data.sid_table {folder}: none of the {len(codes)} corpus items of {recall.root} "
                             f"has a SID (the table holds {len(table)} other item ids)")
        if covered < len(codes):
            log.warning(
                "data.sid_table %s: %d of %d corpus items have no SID; they cannot be generated (counted as "
                "misses) and their DSI examples are left out", folder, len(codes) - covered, len(codes))
        return cls(recall, codes, tuple(int(k) for k in meta["sizes"]), load_trie(folder / "trie"), table_ids)

    def training_pairs(self, index_repeats: int = 1) -> list[ex.RecallPair]:
        """DSI's mixed examples: each train query with a relevant item that has a SID, then every item's text
        -> its own SID, ``index_repeats`` times (the indexing task)."""
        has = self.item_codes[:, 0] >= 0
        pairs = [p for p in self.recall.training_pairs() if any(has[r] for r in p.positive_rows)]
        if not pairs:
            raise ValueError(f"{self.recall.root}: no training session has a relevant item with a SID")
        texts = self.recall.corpus.texts
        return pairs + [ex.RecallPair(texts[r], (r,)) for r in np.flatnonzero(has).tolist()] * int(index_repeats)


def candidate_rows(root: pathlib.Path, sessions: Iterable[int]) -> rf.CandidateRows:
    """``rank_features.CandidateRows`` of ``root``'s rank rows for ``sessions``: read once (the rank file is the
    largest of the five), then loaded from ecomax's cache, keyed by the files and the sessions."""
    keep = np.unique(np.asarray(list(sessions), np.int64))
    key = {"root": str(pathlib.Path(root).resolve()), "files": _fingerprint(root, ("rank",)),
           "sessions": hashlib.sha256(keep.tobytes()).hexdigest()}
    folder = cached_dataset("kuaisearch_candidates", key,
                            lambda out: rf.CandidateRows.from_rows(ex.read_rows(root, "rank"), keep.tolist()).save(out))
    return rf.CandidateRows.load(folder)


@dataclasses.dataclass
class RelevanceWorld:
    """The relevance records by split (``examples.relevance_splits``) and the tokenizer."""

    root: pathlib.Path
    tokenizer: Any
    splits: dict[str, list[ex.RelevanceExample]]

    @classmethod
    def load(cls, data: Any, max_vocab: int = 0) -> RelevanceWorld:
        root = data_root(data)
        return cls(root, load_tokenizer(data, root, max_vocab), ex.relevance_splits(ex.read_rows(root, "relevance")))

    def records(self, split: str, max_examples: int = 0) -> list[ex.RelevanceExample]:
        """The first ``max_examples`` records of ``split`` (0: all); raises when there is none."""
        records = self.splits[split]
        records = records[:max_examples] if max_examples else records
        if not records:
            raise ValueError(f"{self.root}: no relevance training records" if split == "train"
                             else f"{self.root}: the relevance {split!r} split is empty")
        return records


# ----------------------------------------------------------------------------- ranking


def _is_prepared(root: pathlib.Path, kind: str) -> bool:
    return (root / records.dataset_name(kind) / records.VERSION / "dataset_info.json").is_file()


def _fingerprint(root: pathlib.Path, kinds: tuple[str, ...]) -> list:
    """Names, sizes and mtimes of the source files (a cache key that changes when the data does)."""
    out = []
    for kind in kinds:
        if _is_prepared(root, kind):
            info = root / records.dataset_name(kind) / records.VERSION / "dataset_info.json"
            out.append([kind, str(info), info.stat().st_size, info.stat().st_mtime_ns])
            continue
        for p in schema.find_source_files(root, kind):
            st = p.stat()
            out.append([kind, str(p), st.st_size, st.st_mtime_ns])
    return out


def _table_rows(root: pathlib.Path, prepared: pathlib.Path, kind: str) -> Iterable[Mapping[str, Any]]:
    """Validated rows of users / items: the JSONL files when present, else the prepared dataset."""
    try:
        schema.find_source_files(root, kind)
    except FileNotFoundError:
        from data_pipelines.kuaisearch.reader import open_split  # noqa: PLC0415

        yield from iter(open_split(prepared, kind, None))
        return
    yield from rf.iter_jsonl(root, kind)


def _build_tables(root: pathlib.Path, prepared: pathlib.Path, out: pathlib.Path, progress: bool) -> None:
    rf.UserTable.from_rows(_table_rows(root, prepared, "users"), progress=progress).save(out / "users")
    rf.ItemTable.from_rows(_table_rows(root, prepared, "items"), progress=progress).save(out / "items")


def _prepare_rank(root: pathlib.Path, out: pathlib.Path, workers: int, progress: bool) -> None:
    from data_pipelines.kuaisearch.prepare import prepare  # noqa: PLC0415

    prepare(root, out, kinds=["rank"], workers=workers, progress=progress, verbose=False)


def _evenly_spaced(n: int, cap: int) -> np.ndarray:
    """Every index of ``range(n)`` when ``cap`` is 0 or at least ``n``, else ``cap`` evenly spaced ones."""
    return np.arange(n) if not cap or n <= cap else np.linspace(0, n - 1, cap).astype(np.int64)


@dataclasses.dataclass
class RankWorld:
    """Everything the rank task reads: the train / test sources, the tables, the split rule."""

    root: pathlib.Path
    prepared: pathlib.Path
    tables: pathlib.Path
    train: Any
    test: Any
    rule: str
    _featurized: dict = dataclasses.field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, data: Any, progress: bool = False) -> RankWorld:
        """The world of ``data.root`` (a KuaiSearch folder, raw or prepared), else the synthetic one."""
        if not data.root:
            return cls._synthetic(data, progress)
        root = pathlib.Path(data.root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"data.root={str(root)!r} is not a folder: point it at the KuaiSearch "
                                    "release (rank_lite/ users_lite/ items_lite/ ...) or a prepared folder")
        workers = data.prepare_workers or os.cpu_count() or 1
        if _is_prepared(root, "rank"):
            prepared = root
        elif data.prepared_dir:
            prepared = pathlib.Path(data.prepared_dir).expanduser()
            if not _is_prepared(prepared, "rank"):
                _prepare_rank(root, prepared, workers, progress)
        else:
            prepared = cached_dataset("kuaisearch_rank_prepared",
                                      {"root": str(root.resolve()), "files": _fingerprint(root, ("rank",))},
                                      lambda out: _prepare_rank(root, out, workers, progress))
        tables = cached_dataset("kuaisearch_rank_tables",
                                {"version": TABLES_VERSION, "root": str(root.resolve()),
                                 "files": _fingerprint(root, ("users", "items"))},
                                lambda out: _build_tables(root, prepared, out, progress))
        return cls._split(root, prepared, tables, data.test_fraction, progress)

    @classmethod
    def _synthetic(cls, data: Any, progress: bool) -> RankWorld:
        s = data.synthetic
        params = {"num_users": s.num_users, "num_items": s.num_items, "num_sessions": s.num_sessions,
                  "seed": s.seed, "test_fraction": s.test_fraction, "tables": TABLES_VERSION}

        def build(out: pathlib.Path) -> None:
            from data_pipelines.kuaisearch.synthetic import synthesize  # noqa: PLC0415

            synthesize(out / "raw", num_users=s.num_users, num_items=s.num_items, num_sessions=s.num_sessions,
                       seed=s.seed, test_fraction=s.test_fraction)
            _prepare_rank(out / "raw", out / "prepared", 1, False)
            _build_tables(out / "raw", out / "prepared", out / "tables", False)

        folder = cached_dataset("kuaisearch_rank_synth", params, build)
        return cls._split(folder / "raw", folder / "prepared", folder / "tables", data.test_fraction, progress)

    @classmethod
    def _split(cls, root: pathlib.Path, prepared: pathlib.Path, tables: pathlib.Path, fraction: float,
               progress: bool) -> RankWorld:
        from data_pipelines.kuaisearch.reader import available_splits, open_split  # noqa: PLC0415

        splits = available_splits(prepared, "rank")
        if splits.get("train", 0) > 0 and splits.get("test", 0) > 0:
            return cls(root, prepared, tables, open_split(prepared, "rank", "train"),
                       open_split(prepared, "rank", "test"), "split_field")
        every = open_split(prepared, "rank", None)

        def build(out: pathlib.Path) -> None:
            cols = rf.scan_fields(every, ("split", "time_index"), progress=progress)
            split = rf.assign_split(cols["split"], cols["time_index"], fraction)
            np.save(out / "train.npy", split.train, allow_pickle=False)
            np.save(out / "test.npy", split.test, allow_pickle=False)
            (out / "rule.txt").write_text(split.rule)

        folder = cached_dataset("kuaisearch_rank_split", {"prepared": str(prepared.resolve()), "rows": len(every),
                                                          "splits": splits, "test_fraction": fraction}, build)
        train, test = (np.load(folder / f"{s}.npy", allow_pickle=False) for s in ("train", "test"))
        return cls(root, prepared, tables, rf.IndexedSource(every, train), rf.IndexedSource(every, test),
                   (folder / "rule.txt").read_text())

    def featurizer(self, cfg: rf.FeatureConfig) -> rf.RankFeaturizer:
        return rf.RankFeaturizer(cfg, rf.UserTable.load(self.tables / "users"),
                                 rf.ItemTable.load(self.tables / "items"))

    def test_examples(self, max_examples: int = 0) -> tuple[Any, np.ndarray]:
        """The test rows (``max_examples`` evenly spaced ones; 0: all) and their indices in the test split."""
        idx = _evenly_spaced(len(self.test), max_examples)
        return rf.IndexedSource(self.test, idx), idx

    def featurized(self, split: str, cfg: rf.FeatureConfig, max_examples: int = 0,
                   progress: bool = False) -> tuple[rf.FeaturizedSource, rf.JoinStats]:
        """A split ("train" | "test", capped at ``max_examples``) featurized once into stacked arrays, and
        the join misses counted while doing it."""
        if split not in self._featurized:
            source = self.train if split == "train" else self.test_examples(max_examples)[0]
            featurize = self.featurizer(cfg)
            self._featurized[split] = rf.FeaturizedSource(source, featurize, progress=progress), featurize.stats
        return self._featurized[split]

    def train_positive_rate(self, max_rows: int = 0) -> tuple[float, int]:
        """(positive rate of the train split, rows it was counted on): every row up to ``max_rows``
        (0: no cap), else that many evenly spaced rows."""
        idx = _evenly_spaced(len(self.train), max_rows)
        labels = []
        for s in range(0, len(idx), 4096):
            labels += [rf.label_of(r) for r in self.train.__getitems__(idx[s:s + 4096].tolist())]
        return float(np.mean(labels)), len(labels)

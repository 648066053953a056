"""TFDS ``GeneratorBasedBuilder``s for the five KuaiSearch kinds (names ``kuaisearch_<kind>``).

They declare the same features, version and split routing as ``prepare.prepare``, so both routes
produce interchangeable datasets (``prepare`` keeps file order; the TFDS writer shuffles records by
key hash). Use them when TFDS should own the build, e.g. on Apache Beam for the full dataset::

    import data_pipelines.kuaisearch.builders  # registers the names
    b = tfds.builder("kuaisearch_items", data_dir=OUT, file_format="array_record", use_beam=True)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=SRC, beam_options=beam.options.pipeline_options.PipelineOptions([...])))

``manual_dir`` holds the source files in either layout (``items_lite/train.jsonl`` or
``items.jsonl``). Without ``use_beam`` the rows are generated in this process (fine for small
data; ``prepare`` is the fast single-machine path). With ``use_beam`` the files are cut into byte
ranges at line boundaries and each range is read by a Beam worker. Lines are read and located by
the shared reader of ``data_pipelines.jsonl_convert``: a bad line raises ``KuaiSearchFormatError``
naming the file and line in both modes; with ``max_bad_fraction > 0`` bad lines are skipped and
the cap is applied per byte range (``jsonl_convert.iter_range_records``).
``prepare(..., runner="beam")`` drives these builders.

Kinds with a ``split`` field (recall, rank) declare the splits given by ``splits=``; by default
the files are scanned once (a byte regex, no JSON parsing) for the split values they hold, since
TFDS refuses an empty split. A row whose split is not declared is an error. The other kinds have
``train`` only.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re
from collections.abc import Iterator, Sequence

import tensorflow_datasets as tfds
from etils import epath

from data_pipelines import jsonl_convert
from data_pipelines.kuaisearch import records, schema

_BEAM_RANGE_BYTES = 64 << 20
_SPLIT_VALUE_RE = re.compile(rb'"split"\s*:\s*"([A-Za-z0-9_]+)"')


def scan_splits(files: Sequence[str], chunk_bytes: int = 64 << 20) -> list[str]:
    """The distinct ``"split": "..."`` values in JSONL files, sorted (reads bytes, parses nothing)."""
    found: dict[bytes, None] = {}
    for p in files:
        with open(p, "rb") as f:
            tail = b""
            while True:
                chunk = f.read(chunk_bytes)
                if not chunk:
                    break
                buf = tail + chunk
                for m in _SPLIT_VALUE_RE.findall(buf):
                    found[m] = None
                tail = buf[-64:]
    return sorted(v.decode("ascii") for v in found)


def iter_rows(kind: str, path: str, start: int = 0, end: int | None = None, *,
              max_bad_fraction: float = 0.0) -> Iterator[tuple[int, dict]]:
    """Yields ``(byte_offset, row)`` for the validated rows of ``path[start:end]``.

    ``start`` must be a line start. Blank lines are skipped; a bad line raises
    ``KuaiSearchFormatError`` with the file and 1-based line number (or, with
    ``max_bad_fraction > 0``, is skipped under that cap for the range).
    """
    end = os.path.getsize(path) if end is None else end
    yield from jsonl_convert.iter_range_records(
        (path, start, end), functools.partial(schema.parse_line, kind),
        (schema.KuaiSearchFormatError,), schema.KuaiSearchFormatError.located,
        max_bad_fraction=max_bad_fraction, log_name=f"kuaisearch_{kind}")


class _KuaiSearchBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared implementation; concrete subclasses set ``KIND``."""

    KIND: str = ""
    VERSION = tfds.core.Version(records.VERSION)
    RELEASE_NOTES = {records.VERSION: "ArrayRecord build of the KuaiSearch JSONL release."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the KuaiSearch files in manual_dir, in the released layout (users_lite/train.jsonl, "
        "items_lite/train.jsonl, recall_lite/train.jsonl, rank_lite/train.jsonl, "
        "relevance/train.jsonl) or flat (users.jsonl, items.jsonl, ...).")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS's own lookup imports `importlib_resources` (not installed on Python >= 3.9) for
        # modules inside packages; the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, use_beam: bool = False, splits: Sequence[str] | None = None,
                 max_bad_fraction: float = 0.0, **kwargs):
        self._use_beam = use_beam
        self._declared_splits = tuple(splits) if splits else None
        self._max_bad_fraction = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
        super().__init__(**kwargs)
        self._original_state.update(use_beam=use_beam, splits=splits, max_bad_fraction=max_bad_fraction)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=records.DESCRIPTIONS[self.KIND],
            features=records.features(self.KIND),
        )

    def _split_generators(self, dl_manager):
        files = [str(p) for p in schema.find_source_files(dl_manager.manual_dir, self.KIND)]
        if self.KIND in schema.SPLIT_FIELD_KINDS:
            if self._declared_splits is None:
                self._declared_splits = tuple(scan_splits(files)) or (schema.DEFAULT_SPLIT,)
            return {s: self._generate_examples(files, s) for s in self._declared_splits}
        by_split: dict[str, list[str]] = {}
        for p in files:
            by_split.setdefault(schema.default_split_for(pathlib.Path(p)), []).append(p)
        return {s: self._generate_examples(ps, s) for s, ps in by_split.items()}

    def _generate_examples(self, files: Sequence[str], split: str):
        kw = dict(kind=self.KIND, split=split, declared=self._declared_splits,
                  max_bad_fraction=self._max_bad_fraction)
        if self._use_beam:
            beam = tfds.core.lazy_imports.apache_beam
            return (beam.Create(jsonl_convert.beam_range_tasks(files, _BEAM_RANGE_BYTES))
                    | beam.Reshuffle()
                    | beam.FlatMap(_range_examples, **kw))
        return (ex for p in files for ex in _range_examples((p, 0, os.path.getsize(p)), **kw))


def _check_split(kind: str, row: dict, path: str, offset: int, declared: Sequence[str]) -> str:
    s = schema.row_split(kind, row)
    if kind in schema.SPLIT_FIELD_KINDS and s not in declared:
        raise schema.KuaiSearchFormatError(
            f"split {s!r} is not one of the declared splits {list(declared)} (pass splits=...)",
            source=f"{path} (byte {offset})", kind=kind)
    return s


def _range_examples(task, *, kind, split, declared, max_bad_fraction=0.0):
    path, start, end = task
    for offset, row in iter_rows(kind, path, start, end, max_bad_fraction=max_bad_fraction):
        if kind in schema.SPLIT_FIELD_KINDS and _check_split(kind, row, path, offset, declared) != split:
            continue
        yield f"{os.path.basename(path)}:{offset}", row


class KuaisearchUsers(_KuaiSearchBuilder):
    """KuaiSearch users (``kuaisearch_users``)."""

    KIND = "users"


class KuaisearchItems(_KuaiSearchBuilder):
    """KuaiSearch items (``kuaisearch_items``)."""

    KIND = "items"


class KuaisearchRecall(_KuaiSearchBuilder):
    """KuaiSearch recall sessions (``kuaisearch_recall``)."""

    KIND = "recall"


class KuaisearchRank(_KuaiSearchBuilder):
    """KuaiSearch ranking rows (``kuaisearch_rank``)."""

    KIND = "rank"


class KuaisearchRelevance(_KuaiSearchBuilder):
    """KuaiSearch relevance pairs (``kuaisearch_relevance``)."""

    KIND = "relevance"


BUILDERS = {
    "users": KuaisearchUsers,
    "items": KuaisearchItems,
    "recall": KuaisearchRecall,
    "rank": KuaisearchRank,
    "relevance": KuaisearchRelevance,
}

"""KuaiSearch JSONL -> TFDS ArrayRecord datasets, in parallel, streaming, with bounded memory.

``prepare(src_dir, out_dir)`` writes one TFDS dataset per kind under ``out_dir`` (a TFDS
``data_dir``)::

    out_dir/kuaisearch_rank/1.0.0/
        kuaisearch_rank-train.array_record-00000-of-00022
        ...
        kuaisearch_rank-test.array_record-00000-of-00003
        dataset_info.json  features.json  ecomax_prepare.json

How: the shared converter ``data_pipelines.jsonl_convert`` (byte ranges at line boundaries, a
worker pool, the JSONL reader, the bad-line policy, progress, TFDS metadata) does the work; this
module plugs in what is KuaiSearch's own, ``KindEncoder``: ``schema.parse_line`` (UTF-8, JSON,
``schema.validate``), ``records.RecordEncoder`` (the TFDS tf.Example layout) and the split routing:
rows of ``recall``/``rank`` go to the split named by their ``split`` field, the other kinds to the
split their file names (``default_split_for``, ``train`` mostly). Shards keep file order, so record
``i`` of a split is its ``i``-th row in the source; ``tfds.data_source``,
``tfds.builder_from_directory`` and ``reader.open_split`` read them back. All five kinds share one
pool and one progress bar; each kind is built in a hidden ``.<version>.incomplete-*`` folder and
renamed into place only when every kind succeeded.

Bad lines (the converter's rule, ``0 <= max_bad_fraction < 1``): with 0 (the default) the first bad
line stops the build with a ``KuaiSearchFormatError`` naming the file and the 1-based line. With a
cap > 0 bad lines are skipped and counted (all of them in ``<dataset>/skipped.jsonl``), and the
build fails with ``TooManyBadLinesError`` (count and first reasons) when, for some kind,
skipped / (written + skipped) exceeds the cap. Blank lines are not rows: they are counted in the
summary. Unknown keys are dropped and counted per field name.

Past one machine, ``runner="beam"`` builds the same datasets with the TFDS Beam route of
``builders`` (see ``prepare_beam``).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

from data_pipelines import jsonl_convert
from data_pipelines.jsonl_convert import TooManyBadLinesError, count_newlines, plan_ranges  # noqa: F401
from data_pipelines.kuaisearch import records, schema

DEFAULT_SHARD_BYTES = jsonl_convert.DEFAULT_SHARD_BYTES  # source bytes per shard (per range)
MAX_REASONS = 5  # first bad-line reasons kept per kind
RUNNERS = ("local", "beam")


class KindEncoder:
    """The KuaiSearch part of the conversion: one line -> (split, tf.Example bytes) for one kind."""

    bad_line_errors = (schema.KuaiSearchFormatError,)

    def __init__(self, kind: str, path: str):
        self.kind = kind
        self._encoder = records.RecordEncoder(kind)
        self._has_split = kind in schema.SPLIT_FIELD_KINDS
        self._default_split = schema.default_split_for(pathlib.Path(path))
        self.unknown: collections.Counter = collections.Counter()

    def encode(self, line: bytes) -> tuple[str, bytes]:
        row = schema.parse_line(self.kind, line, unknown=self.unknown)
        try:
            rec = self._encoder.encode(row)
        except (ValueError, TypeError, OverflowError) as e:  # e.g. an int beyond int64
            raise schema.KuaiSearchFormatError(f"cannot encode row: {e}", kind=self.kind) from None
        return (row["split"] if self._has_split else self._default_split), rec

    @staticmethod
    def locate(error: schema.KuaiSearchFormatError, path: str, line: int) -> schema.KuaiSearchFormatError:
        return error.located(path, line)

    def finish(self) -> dict[str, int]:
        return dict(self.unknown)


@dataclasses.dataclass
class KindSummary:
    """What ``prepare`` did for one kind."""

    kind: str
    files: list[str]
    path: str = ""
    rows: dict[str, int] = dataclasses.field(default_factory=dict)  # per split
    shards: dict[str, int] = dataclasses.field(default_factory=dict)
    num_bytes: int = 0
    skipped: int = 0
    blank_lines: int = 0
    bad_examples: list[str] = dataclasses.field(default_factory=list)
    unknown_fields: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())

    @classmethod
    def from_result(cls, kind: str, res: jsonl_convert.DatasetResult) -> KindSummary:
        unknown: collections.Counter = collections.Counter()
        for r in res.ranges:
            unknown.update(r.extra or {})
        return cls(kind=kind, files=res.files, path=res.path, rows=dict(res.rows), shards=dict(res.shards),
                   num_bytes=sum(res.num_bytes.values()), skipped=res.skipped, blank_lines=res.blank_lines,
                   bad_examples=[b.message for b in res.bad_lines[:MAX_REASONS]], unknown_fields=dict(unknown))


@dataclasses.dataclass
class PrepareSummary:
    """Returned by ``prepare``; ``str(summary)`` is the closing report."""

    src_dir: str
    out_dir: str
    workers: int
    seconds: float
    max_bad_fraction: float
    kinds: dict[str, KindSummary]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, ks in self.kinds.items():
            d["kinds"][k]["total_rows"] = ks.total_rows
        return d

    def __str__(self) -> str:
        lines = [f"KuaiSearch prepare: {self.src_dir} -> {self.out_dir} "
                 f"({self.workers} worker(s), {self.seconds:.1f}s)"]
        lines.append(f"  {'kind':<10} {'rows':>12} {'skipped':>8}  splits")
        for k, ks in self.kinds.items():
            splits = ", ".join(f"{s}={n} ({ks.shards.get(s, 0)} shards)" for s, n in ks.rows.items())
            lines.append(f"  {k:<10} {ks.total_rows:>12,} {ks.skipped:>8,}  {splits}")
            if ks.blank_lines:
                lines.append(f"      blank lines ignored: {ks.blank_lines}")
            if ks.unknown_fields:
                lines.append(f"      unknown fields dropped: {ks.unknown_fields}")
            for r in ks.bad_examples:
                lines.append(f"      skipped: {r}")
        return "\n".join(lines)


def _write_kind_summary(kind: str, summaries: dict[str, KindSummary], res: jsonl_convert.DatasetResult,
                        tmp_dir: pathlib.Path) -> None:
    summaries[kind] = KindSummary.from_result(kind, res)
    with open(tmp_dir / "ecomax_prepare.json", "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(summaries[kind]), f, ensure_ascii=False, indent=1)


def _check_kinds(kinds: Sequence[str] | None) -> tuple[str, ...]:
    kinds = tuple(kinds) if kinds is not None else schema.KINDS
    for k in kinds:
        if k not in schema.SCHEMAS:
            raise ValueError(f"unknown KuaiSearch kind {k!r}; expected one of {schema.KINDS}")
    return kinds


def prepare(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    max_bad_fraction: float = 0.0,
    kinds: Sequence[str] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    progress: bool = True,
    mp_start_method: str = "spawn",
    verbose: bool = True,
    runner: str = "local",
    beam_options: Sequence[str] | None = None,
) -> PrepareSummary:
    """Validates the KuaiSearch JSONL files under ``src_dir`` and writes TFDS ArrayRecord datasets.

    Args:
      src_dir: folder with the released layout (``items_lite/train.jsonl``, ...) or the demo layout
        (``items.jsonl``, ...).
      out_dir: TFDS data_dir to write ``kuaisearch_<kind>/1.0.0/`` into (existing versions of the
        kinds built are replaced once their new build succeeded).
      workers: worker processes (default: CPU count; 1 runs in this process).
      max_bad_fraction: in ``[0, 1)``. 0 -> the first bad line raises ``KuaiSearchFormatError``;
        > 0 -> bad lines are skipped and counted, and ``TooManyBadLinesError`` is raised if a kind's
        skipped / (written + skipped) exceeds it. Nothing is written for any kind in that case.
      kinds: subset of ``schema.KINDS`` to build (default: all five; each must be present).
      shard_bytes: source bytes per ArrayRecord shard (one worker task each).
      progress: show a tqdm bar (bytes, rate, ETA, rows).
      mp_start_method: multiprocessing start method for the pool ("spawn" is safe after JAX import).
      verbose: print the closing summary.
      runner: "local" (this machine's worker pool) or "beam" (``prepare_beam``: the TFDS Beam route,
        DirectRunner by default, Dataflow / Flink / Spark through ``beam_options``).
      beam_options: Beam pipeline options (``["--runner=DataflowRunner", "--project=...", ...]``).

    Returns:
      PrepareSummary: rows per kind and split, skipped lines with the first reasons, shard counts.
    """
    t0 = time.time()
    max_bad_fraction = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    kinds = _check_kinds(kinds)
    if runner == "beam":
        return prepare_beam(src_dir, out_dir, kinds=kinds, max_bad_fraction=max_bad_fraction,
                            beam_options=beam_options, verbose=verbose)
    workers = jsonl_convert.resolve_workers(workers)
    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    files = {k: schema.find_source_files(src, k) for k in kinds}
    summaries: dict[str, KindSummary] = {}
    datasets = [jsonl_convert.Dataset(
        name=records.dataset_name(k), version=records.VERSION, files=[str(p) for p in files[k]],
        encoder_factory=functools.partial(KindEncoder, k), features=records.features(k),
        description=records.DESCRIPTIONS[k], on_written=functools.partial(_write_kind_summary, k, summaries))
        for k in kinds]
    out.mkdir(parents=True, exist_ok=True)
    jsonl_convert.convert(datasets, out, workers=workers, max_bad_fraction=max_bad_fraction,
                          shard_bytes=shard_bytes, progress=progress, desc="kuaisearch prepare",
                          title="KuaiSearch prepare", mp_start_method=mp_start_method)
    summary = PrepareSummary(src_dir=str(src), out_dir=str(out), workers=workers,
                             seconds=time.time() - t0, max_bad_fraction=max_bad_fraction,
                             kinds={k: summaries[k] for k in kinds})
    return _save_summary(summary, out, verbose)


def _save_summary(summary: PrepareSummary, out: pathlib.Path, verbose: bool) -> PrepareSummary:
    with open(out / "kuaisearch_prepare_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary.as_dict(), f, ensure_ascii=False, indent=1)
    if verbose:
        print(summary, file=sys.stderr)
    return summary


def prepare_beam(
    src_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    kinds: Sequence[str] | None = None,
    max_bad_fraction: float = 0.0,
    beam_options: Sequence[str] | None = None,
    verbose: bool = True,
) -> PrepareSummary:
    """The same datasets as ``prepare``, built by the TFDS Beam route of ``builders`` (one Beam
    pipeline per kind; the files are read as line-aligned byte ranges, one Beam element each).

    ``beam_options`` are Beam pipeline options (default: the DirectRunner in this process). The
    source files must be readable by the Beam workers (a shared or cloud path). Record order in a
    split is TFDS's (hashed keys), not file order; the records are the same. With
    ``max_bad_fraction > 0`` the cap is applied to each byte range (stricter than ``prepare``'s
    global cap). Requires ``apache-beam``.
    """
    import apache_beam as beam  # noqa: PLC0415  (a clear ImportError when it is missing)
    import tensorflow_datasets as tfds  # noqa: PLC0415

    from data_pipelines.kuaisearch import builders  # noqa: PLC0415

    t0 = time.time()
    max_bad_fraction = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
    kinds = _check_kinds(kinds)
    src, out = pathlib.Path(src_dir), pathlib.Path(out_dir)
    for k in kinds:
        schema.find_source_files(src, k)  # a missing kind fails before any pipeline runs
    options = beam.options.pipeline_options.PipelineOptions(list(beam_options or ()))
    summaries = {}
    for k in kinds:
        b = builders.BUILDERS[k](data_dir=str(out), file_format="array_record", use_beam=True,
                                 max_bad_fraction=max_bad_fraction)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=str(src), beam_options=options))
        splits = {s: v.num_examples for s, v in b.info.splits.items()}
        summaries[k] = KindSummary(
            kind=k, files=[str(p) for p in schema.find_source_files(src, k)], path=str(b.data_path),
            rows=splits, shards={s: v.num_shards for s, v in b.info.splits.items()},
            num_bytes=sum(v.num_bytes for v in b.info.splits.values()))
    summary = PrepareSummary(src_dir=str(src), out_dir=str(out), workers=0, seconds=time.time() - t0,
                             max_bad_fraction=max_bad_fraction, kinds=summaries)
    return _save_summary(summary, out, verbose)

"""KuaiSearch JSONL -> TFDS ArrayRecord datasets, in parallel, streaming, with bounded memory.

``prepare(src_dir, out_dir)`` writes one TFDS dataset per kind under ``out_dir`` (a TFDS
``data_dir``)::

    out_dir/kuaisearch_rank/1.0.0/
        kuaisearch_rank-train.array_record-00000-of-00022
        ...
        kuaisearch_rank-test.array_record-00000-of-00003
        dataset_info.json  features.json  ecomax_prepare.json

How: every source file is cut into byte ranges at line boundaries (about ``shard_bytes`` each, and
at least one per worker when the file is big enough). A pool of worker processes streams one range
each, line by line: UTF-8 decode, JSON parse, ``schema.validate``, ``records.RecordEncoder`` (the
TFDS tf.Example layout), then appends to one ArrayRecord shard per (range, split). Rows of
``recall``/``rank`` go to the split named by their ``split`` field; the other kinds go to ``train``.
Shards keep file order, so record ``i`` of a split is its ``i``-th row in the source. When all ranges
are done the parent names the shards the TFDS way and calls
``tfds.folder_dataset.write_metadata(..., check_data=False)`` with explicit split infos, so that
``tfds.data_source``, ``tfds.builder_from_directory`` and ``reader.open_split`` read them back. Each
kind is built in ``<version>.incomplete-*`` and renamed into place only when it succeeded.

Bad lines: with ``max_bad_fraction=0`` (the default) the first bad line stops the build with a
``KuaiSearchFormatError`` naming the file and the 1-based line. With a cap > 0 bad lines are skipped
and counted, and the build fails with ``TooManyBadLinesError`` (count and first reasons) when, for
some kind, skipped / (written + skipped) exceeds the cap. Blank lines are not rows: they are counted
in the summary. Unknown keys are dropped and counted per field name.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import json
import math
import multiprocessing
import os
import pathlib
import queue as queue_lib
import shutil
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from data_pipelines.kuaisearch import records, schema

DEFAULT_SHARD_BYTES = 128 << 20  # source bytes per shard (per range)
MIN_PARALLEL_RANGE_BYTES = 4 << 20  # do not cut a file finer than this just to feed workers
MAX_REASONS = 5  # first bad-line reasons kept per kind
_PROGRESS_EVERY_LINES = 2000
_ARRAY_RECORD_OPTIONS = "group_size:1"  # what TFDS's ArrayRecordFileAdapter writes
_BOM = b"\xef\xbb\xbf"


class TooManyBadLinesError(ValueError):
    """More bad lines than ``max_bad_fraction`` allows (for at least one kind)."""

    def __init__(self, failures: Sequence[tuple[str, int, int, float, Sequence[str]]]):
        self.failures = list(failures)
        parts = []
        for kind, skipped, total, cap, reasons in self.failures:
            head = (f"{kind}: {skipped} bad line(s) of {total} "
                    f"({skipped / max(total, 1):.4%}) exceed max_bad_fraction={cap:g}")
            parts.append(head + "".join(f"\n    {r}" for r in reasons))
        super().__init__("KuaiSearch prepare failed:\n  " + "\n  ".join(parts))


@dataclasses.dataclass(frozen=True)
class _Task:
    kind: str
    path: str
    start: int
    end: int
    range_index: int
    tmp_dir: str
    default_split: str
    skip_bad: bool


@dataclasses.dataclass
class _RangeResult:
    kind: str
    range_index: int
    rows: dict[str, int]
    nbytes: dict[str, int]
    files: dict[str, str]
    skipped: int = 0
    blank: int = 0
    reasons: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (line, message)
    unknown: dict[str, int] = dataclasses.field(default_factory=dict)
    fatal: schema.KuaiSearchFormatError | None = None
    stopped: bool = False


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


# ----------------------------------------------------------------------------- planning


def plan_ranges(path: str | os.PathLike, num_ranges: int) -> list[tuple[int, int]]:
    """Cuts a file into up to ``num_ranges`` byte ranges ``[start, end)`` that start at line starts."""
    size = os.path.getsize(path)
    if size == 0:
        return []
    bounds = [0]
    with open(path, "rb") as f:
        for i in range(1, max(1, num_ranges)):
            target = size * i // num_ranges
            if target <= bounds[-1]:
                continue
            f.seek(target - 1)
            f.readline()  # to the end of the line holding byte target-1
            b = f.tell()
            if b >= size:
                break
            if b > bounds[-1]:
                bounds.append(b)
    bounds.append(size)
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _num_ranges(size: int, shard_bytes: int, workers: int) -> int:
    n = max(1, math.ceil(size / shard_bytes))
    if workers > 1:
        n = max(n, min(workers, size // MIN_PARALLEL_RANGE_BYTES))
    return n


def count_newlines(path: str, end: int) -> int:
    """Number of newlines in ``path[:end]`` (turns a range-local line number into a file one)."""
    n = 0
    with open(path, "rb") as f:
        left = end
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


# ----------------------------------------------------------------------------- worker side

_PROGRESS: Any = None  # a multiprocessing queue in pool workers, a callable in-process
_STOP: Any = None  # a multiprocessing event


def _init_worker(progress_queue, stop_event) -> None:
    global _PROGRESS, _STOP
    _PROGRESS = progress_queue
    _STOP = stop_event
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _report(nbytes: int, nrows: int) -> None:
    p = _PROGRESS
    if p is None:
        return
    if callable(p):
        p(nbytes, nrows)
    else:
        p.put((nbytes, nrows))


def _shard_tmp_name(split: str, range_index: int) -> str:
    return f"range{range_index:05d}.{split}.array_record"


def _run_range(task: _Task) -> _RangeResult:
    """Streams one byte range of one file into ArrayRecord shards (one per split met)."""
    from array_record.python.array_record_module import ArrayRecordWriter  # noqa: PLC0415

    kind = task.kind
    encoder = records.RecordEncoder(kind)
    res = _RangeResult(kind=kind, range_index=task.range_index, rows={}, nbytes={}, files={})
    writers: dict[str, Any] = {}
    unknown: collections.Counter = collections.Counter()
    line_base: int | None = None  # newlines before task.start, computed at the first bad line
    pending_bytes = pending_rows = 0
    parse_line = schema.parse_line
    has_split = kind in schema.SPLIT_FIELD_KINDS
    try:
        with open(task.path, "rb", buffering=1 << 20) as f:
            f.seek(task.start)
            pos = task.start
            local = 0  # 1-based line number inside the range
            while pos < task.end:
                raw = f.readline()
                if not raw:
                    break
                pos += len(raw)
                local += 1
                pending_bytes += len(raw)
                if local % _PROGRESS_EVERY_LINES == 0:
                    _report(pending_bytes, pending_rows)
                    pending_bytes = pending_rows = 0
                    if _STOP is not None and _STOP.is_set():
                        res.stopped = True
                        break
                line = raw.rstrip(b"\r\n")
                if local == 1 and task.start == 0 and line.startswith(_BOM):
                    line = line[len(_BOM):]
                if not line.strip():
                    res.blank += 1
                    continue
                try:
                    row = parse_line(kind, line, unknown=unknown)
                    try:
                        rec = encoder.encode(row)
                    except (ValueError, TypeError, OverflowError) as e:  # e.g. an int beyond int64
                        raise schema.KuaiSearchFormatError(f"cannot encode row: {e}", kind=kind) from None
                except schema.KuaiSearchFormatError as e:
                    if line_base is None:
                        line_base = count_newlines(task.path, task.start)
                    err = e.located(task.path, line_base + local)
                    if not task.skip_bad:
                        res.fatal = err
                        if _STOP is not None:
                            _STOP.set()
                        break
                    res.skipped += 1
                    if len(res.reasons) < MAX_REASONS:
                        res.reasons.append((line_base + local, str(err)))
                    continue
                split = row["split"] if has_split else task.default_split
                w = writers.get(split)
                if w is None:
                    fname = os.path.join(task.tmp_dir, _shard_tmp_name(split, task.range_index))
                    w = writers[split] = ArrayRecordWriter(fname, _ARRAY_RECORD_OPTIONS)
                    res.files[split] = fname
                    res.rows[split] = 0
                    res.nbytes[split] = 0
                w.write(rec)
                res.rows[split] += 1
                res.nbytes[split] += len(rec)
                pending_rows += 1
    finally:
        for w in writers.values():
            w.close()
        _report(pending_bytes, pending_rows)
    res.unknown = dict(unknown)
    return res


# ----------------------------------------------------------------------------- parent side


def _shard_filename(kind: str, split: str, index: int, total: int) -> str:
    # TFDS naming.DEFAULT_FILENAME_TEMPLATE: {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}
    return f"{records.dataset_name(kind)}-{split}.array_record-{index:05d}-of-{total:05d}"


def _finalize_kind(kind: str, results: list[_RangeResult], tmp_dir: pathlib.Path,
                   final_dir: pathlib.Path, summary: KindSummary) -> None:
    """Renames shards the TFDS way, writes TFDS metadata, moves the dataset into place."""
    import tensorflow_datasets as tfds  # noqa: PLC0415

    results = sorted(results, key=lambda r: r.range_index)
    per_split: dict[str, list[tuple[str, int, int]]] = collections.defaultdict(list)
    for r in results:
        for split, fname in r.files.items():
            if r.rows[split] > 0:
                per_split[split].append((fname, r.rows[split], r.nbytes[split]))
            else:
                os.remove(fname)
    if not per_split:
        raise ValueError(f"KuaiSearch {kind}: no valid rows in {', '.join(summary.files)}")
    split_infos = []
    for split in sorted(per_split):
        shards = per_split[split]
        for i, (fname, _, _) in enumerate(shards):
            os.rename(fname, tmp_dir / _shard_filename(kind, split, i, len(shards)))
        split_infos.append(tfds.core.SplitInfo(
            name=split,
            shard_lengths=[n for _, n, _ in shards],
            num_bytes=sum(b for _, _, b in shards),
            filename_template=None,
        ))
        summary.rows[split] = sum(n for _, n, _ in shards)
        summary.shards[split] = len(shards)
        summary.num_bytes += split_infos[-1].num_bytes
    tfds.folder_dataset.write_metadata(
        data_dir=tmp_dir,
        features=records.features(kind),
        split_infos=split_infos,
        version=records.VERSION,
        check_data=False,
        description=records.DESCRIPTIONS[kind],
    )
    summary.path = str(final_dir)
    with open(tmp_dir / "ecomax_prepare.json", "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(summary), f, ensure_ascii=False, indent=1)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.rename(tmp_dir, final_dir)


def _resolve_workers(workers: int | None) -> int:
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return max(1, workers)


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
) -> PrepareSummary:
    """Validates the KuaiSearch JSONL files under ``src_dir`` and writes TFDS ArrayRecord datasets.

    Args:
      src_dir: folder with the released layout (``items_lite/train.jsonl``, ...) or the demo layout
        (``items.jsonl``, ...).
      out_dir: TFDS data_dir to write ``kuaisearch_<kind>/1.0.0/`` into (existing versions of the
        kinds built are replaced once their new build succeeded).
      workers: worker processes (default: CPU count; 1 runs in this process).
      max_bad_fraction: 0 -> the first bad line raises ``KuaiSearchFormatError``; > 0 -> bad lines
        are skipped and counted, and ``TooManyBadLinesError`` is raised if a kind's
        skipped / (written + skipped) exceeds it. Nothing is written for any kind in that case.
      kinds: subset of ``schema.KINDS`` to build (default: all five; each must be present).
      shard_bytes: source bytes per ArrayRecord shard (one worker task each).
      progress: show a tqdm bar (bytes, rate, ETA, rows).
      mp_start_method: multiprocessing start method for the pool ("spawn" is safe after JAX import).
      verbose: print the closing summary.

    Returns:
      PrepareSummary: rows per kind and split, skipped lines with the first reasons, shard counts.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    t0 = time.time()
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
    kinds = tuple(kinds) if kinds is not None else schema.KINDS
    for k in kinds:
        if k not in schema.SCHEMAS:
            raise ValueError(f"unknown KuaiSearch kind {k!r}; expected one of {schema.KINDS}")
    workers = _resolve_workers(workers)
    src = pathlib.Path(src_dir)
    out = pathlib.Path(out_dir)
    skip_bad = max_bad_fraction > 0

    files = {k: schema.find_source_files(src, k) for k in kinds}
    out.mkdir(parents=True, exist_ok=True)
    tasks: list[_Task] = []
    tmp_dirs: dict[str, pathlib.Path] = {}
    summaries: dict[str, KindSummary] = {}
    total_bytes = 0
    for k in kinds:
        ds_dir = out / records.dataset_name(k)
        ds_dir.mkdir(parents=True, exist_ok=True)
        tmp = ds_dir / f"{records.VERSION}.incomplete-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        tmp_dirs[k] = tmp
        summaries[k] = KindSummary(kind=k, files=[str(p) for p in files[k]])
        idx = 0
        for p in files[k]:
            size = p.stat().st_size
            total_bytes += size
            for start, end in plan_ranges(p, _num_ranges(size, shard_bytes, workers)):
                tasks.append(_Task(kind=k, path=str(p), start=start, end=end, range_index=idx,
                                   tmp_dir=str(tmp), default_split=schema.default_split_for(p),
                                   skip_bad=skip_bad))
                idx += 1
    # Biggest ranges first keeps the pool busy to the end.
    order = sorted(range(len(tasks)), key=lambda i: -(tasks[i].end - tasks[i].start))

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="kuaisearch prepare", disable=not progress, file=sys.stderr)
    rows_done = [0]

    def on_progress(nbytes: int, nrows: int) -> None:
        rows_done[0] += nrows
        bar.update(nbytes)
        bar.set_postfix(rows=f"{rows_done[0]:,}", refresh=False)

    results: list[_RangeResult] = []
    try:
        if workers == 1 or len(tasks) <= 1:
            results = _run_inline([tasks[i] for i in order], on_progress)
        else:
            results = _run_pool([tasks[i] for i in order], workers, mp_start_method, on_progress)
        bar.close()

        fatal = [r.fatal for r in results if r.fatal is not None]
        if fatal:
            kind_rank = {k: i for i, k in enumerate(kinds)}
            fatal.sort(key=lambda e: (kind_rank.get(e.kind, 0), e.source or "", e.line or 0))
            raise fatal[0]

        by_kind: dict[str, list[_RangeResult]] = collections.defaultdict(list)
        for r in results:
            by_kind[r.kind].append(r)
        failures = []
        for k in kinds:
            ks = summaries[k]
            rs = by_kind.get(k, [])
            ks.skipped = sum(r.skipped for r in rs)
            ks.blank_lines = sum(r.blank for r in rs)
            reasons = [m for r in sorted(rs, key=lambda r: r.range_index) for _, m in r.reasons]
            ks.bad_examples = reasons[:MAX_REASONS]
            unk: collections.Counter = collections.Counter()
            for r in rs:
                unk.update(r.unknown)
            ks.unknown_fields = dict(unk)
            written = sum(sum(r.rows.values()) for r in rs)
            total = written + ks.skipped
            if ks.skipped and ks.skipped > max_bad_fraction * total:
                failures.append((k, ks.skipped, total, max_bad_fraction, ks.bad_examples))
        if failures:
            raise TooManyBadLinesError(failures)
        for k in kinds:
            _finalize_kind(k, by_kind.get(k, []), tmp_dirs[k],
                           out / records.dataset_name(k) / records.VERSION, summaries[k])
    finally:
        bar.close()
        for tmp in tmp_dirs.values():
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.parent.rmdir()  # only when the kind's folder is empty (a failed first build)
            except OSError:
                pass

    summary = PrepareSummary(src_dir=str(src), out_dir=str(out), workers=workers,
                             seconds=time.time() - t0, max_bad_fraction=max_bad_fraction,
                             kinds=summaries)
    with open(out / "kuaisearch_prepare_summary.json", "w", encoding="utf-8") as f:
        json.dump(summary.as_dict(), f, ensure_ascii=False, indent=1)
    if verbose:
        print(summary, file=sys.stderr)
    return summary


def _run_inline(tasks: Iterable[_Task], on_progress) -> list[_RangeResult]:
    global _PROGRESS, _STOP
    saved = (_PROGRESS, _STOP)
    _PROGRESS, _STOP = on_progress, None
    results = []
    try:
        for t in tasks:
            r = _run_range(t)
            results.append(r)
            if r.fatal is not None:
                break
    finally:
        _PROGRESS, _STOP = saved
    return results


def _run_pool(tasks: Sequence[_Task], workers: int, start_method: str, on_progress) -> list[_RangeResult]:
    ctx = multiprocessing.get_context(start_method)
    progress_q = ctx.Queue()
    stop = ctx.Event()
    results: list[_RangeResult] = []

    def drain(timeout: float) -> None:
        try:
            item = progress_q.get(timeout=timeout)
        except queue_lib.Empty:
            return
        while True:
            on_progress(*item)
            try:
                item = progress_q.get_nowait()
            except queue_lib.Empty:
                return

    with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                initializer=_init_worker, initargs=(progress_q, stop)) as pool:
        pending = {pool.submit(_run_range, t) for t in tasks}
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                drain(0.0)
                for fut in done:
                    if fut.cancelled():
                        continue
                    r = fut.result()
                    results.append(r)
                    if r.fatal is not None and not stop.is_set():
                        stop.set()
                if stop.is_set():
                    for fut in pending:
                        fut.cancel()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
    drain(0.0)
    while True:  # late progress messages
        try:
            on_progress(*progress_q.get_nowait())
        except queue_lib.Empty:
            break
    return results

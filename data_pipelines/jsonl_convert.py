"""The one JSONL -> TFDS ArrayRecord converter (ECom-RF-IMMR ``build`` and KuaiSearch ``prepare``).

A dataset plugs in only what is its own: a picklable ``encoder_factory(path) -> Encoder`` whose
``encode(line) -> (split, serialized record)`` validates one line, encodes it and routes it to a
split, raising one of ``Encoder.bad_line_errors`` for a bad line. Everything else lives here:

* ``iter_lines``: THE JSONL reader. Byte ranges that start at line starts, a UTF-8 BOM dropped at
  byte 0 of a file, ``\\r\\n`` / ``\\n`` / no final newline, blank lines marked, 1-based line numbers
  (counted lazily: only a bad line pays for counting the newlines before its range).
* ``plan_ranges``: byte ranges cut at line boundaries (one worker task each).
* ``convert(datasets, ...)``: a pool of worker processes (or this process with ``workers <= 1``)
  streams the ranges into one ArrayRecord shard per (range, split); a tqdm bar over the source bytes
  (rate, ETA, rows); the bad-line policy (``check_max_bad_fraction``); the shards renamed the TFDS
  way, ``tfds.folder_dataset.write_metadata(..., check_data=False)`` with explicit split infos, the
  skipped lines in ``skipped.jsonl``, and the dataset folder moved into place only when the whole
  conversion succeeded (nothing half-written otherwise).

Bad lines (``max_bad_fraction``, the same rule for every dataset): ``0 <= f < 1``. With ``f == 0``
(the default) the first bad line is an error that names the file and the 1-based line. With
``0 < f < 1`` bad lines are skipped and counted, and the conversion fails with
``TooManyBadLinesError`` when, for some dataset, skipped / (written + skipped) exceeds ``f``. Blank
lines are not records and count for neither. ``f >= 1`` is refused: a cap of 1 is no cap, it would
turn a file of nothing but bad lines into a success.
"""

from __future__ import annotations

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
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

BOM = b"\xef\xbb\xbf"
DEFAULT_SHARD_BYTES = 128 << 20  # source bytes per range (= per shard and split, at most)
MIN_PARALLEL_RANGE_BYTES = 4 << 20  # do not cut a file finer than this just to feed workers
MAX_LISTED_BAD_LINES = 1000  # bad lines kept in memory per dataset (all of them go to skipped.jsonl)
SHARD_SUFFIX = "array_record"
_ARRAY_RECORD_OPTIONS = "group_size:1"  # what TFDS's ArrayRecordFileAdapter writes
_PROGRESS_EVERY_LINES = 2000


# ----------------------------------------------------------------------------- the rule, the errors


def json_object(line: bytes | str, where: str, error: type[ValueError]) -> dict[str, Any]:
    """A JSONL line -> its JSON object, else ``error("where: ...")`` (``where`` is ``file:line``)."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return obj


def check_max_bad_fraction(value: float) -> float:
    """Returns ``value`` as a float if it is a valid cap (``0 <= f < 1``), else raises ValueError."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"max_bad_fraction must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= f < 1.0:  # also refuses NaN
        raise ValueError(f"max_bad_fraction must be in [0, 1) (0: the first bad line is an error; "
                         f"0 < f < 1: skip and count bad lines up to that fraction), got {value!r}")
    return f


class TooManyBadLinesError(ValueError):
    """More bad lines than ``max_bad_fraction`` allows, for at least one dataset.

    ``failures``: ``(name, skipped, total, cap, messages)`` per failing dataset.
    """

    def __init__(self, failures: Sequence[tuple[str, int, int, float, Sequence[str]]], title: str = "conversion"):
        self.failures = [tuple(f) for f in failures]
        self.title = title
        parts = []
        for name, skipped, total, cap, messages in self.failures:
            head = (f"{name}: {skipped} bad line(s) of {total} "
                    f"({skipped / max(total, 1):.4%}) exceed max_bad_fraction={cap:g}")
            parts.append(head + "".join(f"\n    {m}" for m in messages))
        super().__init__(f"{title} failed:\n  " + "\n  ".join(parts))

    def __reduce__(self):
        return (TooManyBadLinesError, (self.failures, self.title))


class NoRecordsError(ValueError):
    """A dataset got no valid record at all."""


@dataclasses.dataclass(frozen=True)
class BadLine:
    path: str
    line: int  # 1-based
    reason: str  # the encoder's message, without the location
    message: str  # the located error's message (``<path>:<line>: ...``)


# ----------------------------------------------------------------------------- the reader


def count_newlines(path: str | os.PathLike, end: int, start: int = 0) -> int:
    """Number of newlines in ``path[start:end]``."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        left = end - start
        while left > 0:
            chunk = f.read(min(left, 16 << 20))
            if not chunk:
                break
            n += chunk.count(b"\n")
            left -= len(chunk)
    return n


class LineNumbers:
    """Turns a range-local line index into the 1-based line of the file, counting only when asked."""

    def __init__(self, path: str, start: int, first_line: int | None = None):
        self._path, self._start = path, start
        self._base = None if first_line is None else first_line - 1
        if start == 0:
            self._base = 0

    def __call__(self, local: int) -> int:
        if self._base is None:
            self._base = count_newlines(self._path, self._start)
        return self._base + local


def iter_lines(path: str | os.PathLike, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, bytes]]:
    """``(local, nbytes, line)`` for each line of ``path[start:end]`` (``start`` a line start).

    ``local`` is the 1-based line index inside the range (``LineNumbers`` makes it a file line),
    ``nbytes`` the raw length (newline included), ``line`` the content without ``\\r\\n`` / ``\\n``
    and without the UTF-8 BOM at byte 0 of the file. A blank line comes as ``b""`` after ``strip``:
    callers test ``line.strip()``.
    """
    path = os.fspath(path)
    end = os.path.getsize(path) if end is None else end
    with open(path, "rb", buffering=1 << 20) as f:
        f.seek(start)
        pos, local = start, 0
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            local += 1
            line = raw.rstrip(b"\r\n")
            if pos == 0 and line.startswith(BOM):
                line = line[len(BOM):]
            pos += len(raw)
            yield local, len(raw), line


def iter_file_lines(path: str | os.PathLike) -> Iterator[tuple[int, bytes]]:
    """``(1-based line, line)`` for the non-blank lines of a whole JSONL file (the same reader)."""
    for line_no, _, line in iter_lines(path):
        if line.strip():
            yield line_no, line


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
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def num_ranges_for(size: int, shard_bytes: int, workers: int) -> int:
    """Ranges for a file of ``size`` bytes: ~``shard_bytes`` each, at least one per worker when big."""
    n = max(1, math.ceil(size / shard_bytes))
    if workers > 1:
        n = max(n, min(workers, size // MIN_PARALLEL_RANGE_BYTES))
    return n


# ----------------------------------------------------------------------------- the dataset plug-in


class Encoder(Protocol):
    """Per-dataset line encoder, built in the worker by ``Dataset.encoder_factory(path)``."""

    bad_line_errors: tuple[type[BaseException], ...]

    def encode(self, line: bytes) -> tuple[str, bytes]:
        """Validates and encodes one non-blank line: ``(split, serialized record)``."""

    def locate(self, error: BaseException, path: str, line: int) -> BaseException:
        """The error to raise or list for a bad line, naming ``path`` and the 1-based ``line``."""

    def finish(self) -> Any:
        """Picklable per-range extras (e.g. counters, per-record side data), or None."""


@dataclasses.dataclass
class Dataset:
    """One TFDS dataset to write (``out_dir/<name>/<version>/``) from one or more JSONL files."""

    name: str
    version: str
    files: Sequence[str]
    encoder_factory: Callable[[str], Encoder]  # picklable (module-level class / functools.partial)
    features: Any  # tfds.features.FeaturesDict
    description: str = ""
    split_order: Sequence[str] | None = None  # default: sorted
    num_ranges: int | None = None  # per file; default from shard_bytes
    # Called with (result, tmp_dir) once metadata is written, before the folder moves into place:
    # the dataset adds its own files there.
    on_written: Callable[[DatasetResult, pathlib.Path], None] | None = None


@dataclasses.dataclass(frozen=True)
class _Task:
    dataset: int
    range_index: int
    path: str
    start: int
    end: int
    tmp_dir: str
    encoder_factory: Callable[[str], Encoder]
    skip_bad: bool


@dataclasses.dataclass
class RangeResult:
    """What one range produced (in the worker); ``extra`` is ``Encoder.finish()``."""

    dataset: int
    range_index: int
    path: str
    rows: dict[str, int]
    nbytes: dict[str, int]
    files: dict[str, str]
    lines: int = 0
    blank: int = 0
    skipped: int = 0
    bad: list[BadLine] = dataclasses.field(default_factory=list)
    skip_log: str | None = None
    extra: Any = None
    fatal: BaseException | None = None
    stopped: bool = False


@dataclasses.dataclass
class DatasetResult:
    """What ``convert`` wrote for one dataset."""

    name: str
    path: str  # the final dataset folder
    files: list[str]
    rows: dict[str, int]  # per split, in split order
    shards: dict[str, int]
    num_bytes: dict[str, int]
    lines: int  # non-blank lines read (= written + skipped)
    blank_lines: int
    skipped: int
    bad_lines: list[BadLine]  # the first MAX_LISTED_BAD_LINES
    skipped_log: str | None  # <path>/skipped.jsonl when lines were skipped
    ranges: list[RangeResult]  # in file order (for the extras)

    @property
    def total_rows(self) -> int:
        return sum(self.rows.values())


# ----------------------------------------------------------------------------- worker side

_PROGRESS: Any = None  # a multiprocessing queue in pool workers, a callable in-process
_STOP: Any = None  # a multiprocessing event


def _init_worker(progress_queue, stop_event) -> None:
    global _PROGRESS, _STOP
    _PROGRESS, _STOP = progress_queue, stop_event
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _report(nbytes: int, nrows: int) -> None:
    p = _PROGRESS
    if p is None or (nbytes == 0 and nrows == 0):
        return
    if callable(p):
        p(nbytes, nrows)
    else:
        p.put((nbytes, nrows))


def _run_range(task: _Task) -> RangeResult:
    """Streams one byte range of one file into ArrayRecord shards (one per split met)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    encoder = task.encoder_factory(task.path)
    bad_errors = tuple(encoder.bad_line_errors)
    res = RangeResult(dataset=task.dataset, range_index=task.range_index, path=task.path,
                      rows={}, nbytes={}, files={})
    writers: dict[str, Any] = {}
    numbers = LineNumbers(task.path, task.start)
    log = None
    pending_bytes = pending_rows = 0
    stem = os.path.join(task.tmp_dir, f"range{task.range_index:05d}")
    try:
        for local, nbytes, line in iter_lines(task.path, task.start, task.end):
            pending_bytes += nbytes
            if local % _PROGRESS_EVERY_LINES == 0:
                _report(pending_bytes, pending_rows)
                pending_bytes = pending_rows = 0
                if _STOP is not None and _STOP.is_set():
                    res.stopped = True
                    break
            if not line.strip():
                res.blank += 1
                continue
            res.lines += 1
            try:
                split, data = encoder.encode(line)
            except bad_errors as e:
                line_no = numbers(local)
                err = encoder.locate(e, task.path, line_no)
                if not task.skip_bad:
                    res.fatal = err
                    if _STOP is not None:
                        _STOP.set()
                    break
                res.skipped += 1
                bad = BadLine(task.path, line_no, str(e), str(err))
                if len(res.bad) < MAX_LISTED_BAD_LINES:
                    res.bad.append(bad)
                if log is None:
                    res.skip_log = stem + ".skipped.jsonl"
                    log = open(res.skip_log, "w", encoding="utf-8")
                log.write(json.dumps({"file": bad.path, "line": bad.line, "reason": bad.reason},
                                     ensure_ascii=False) + "\n")
                continue
            w = writers.get(split)
            if w is None:
                fname = f"{stem}.{split}.{SHARD_SUFFIX}"
                w = writers[split] = ArrayRecordWriter(fname, _ARRAY_RECORD_OPTIONS)
                res.files[split], res.rows[split], res.nbytes[split] = fname, 0, 0
            w.write(data)
            res.rows[split] += 1
            res.nbytes[split] += len(data)
            pending_rows += 1
    finally:
        for w in writers.values():
            w.close()
        if log is not None:
            log.close()
        _report(pending_bytes, pending_rows)
    res.extra = encoder.finish()
    return res


# ----------------------------------------------------------------------------- parent side


def filename_template(data_dir: str | os.PathLike, name: str):
    """TFDS's default shard naming (``{DATASET}-{SPLIT}.array_record-{SHARD_X_OF_Y}``) in ``data_dir``."""
    import tensorflow_datasets as tfds

    return tfds.core.ShardedFileTemplate(data_dir=pathlib.Path(data_dir),
                                         template=tfds.core.naming.DEFAULT_FILENAME_TEMPLATE,
                                         dataset_name=name, filetype_suffix=SHARD_SUFFIX)


def _finalize(ds: Dataset, results: list[RangeResult], tmp_dir: pathlib.Path, final_dir: pathlib.Path,
              ) -> DatasetResult:
    """Renames shards the TFDS way and writes TFDS metadata and ``skipped.jsonl`` in ``tmp_dir``."""
    import tensorflow_datasets as tfds

    results = sorted(results, key=lambda r: r.range_index)
    per_split: dict[str, list[tuple[str, int, int]]] = {}
    for r in results:
        for split, fname in r.files.items():
            if r.rows[split] > 0:
                per_split.setdefault(split, []).append((fname, r.rows[split], r.nbytes[split]))
            else:
                os.remove(fname)
    lines = sum(r.lines for r in results)
    skipped = sum(r.skipped for r in results)
    if not per_split:
        raise NoRecordsError(f"{ds.name}: no valid records in {', '.join(map(str, ds.files))} "
                             f"(read {lines} line(s), skipped {skipped})")
    order = list(ds.split_order or ())
    splits = [s for s in order if s in per_split] + sorted(s for s in per_split if s not in order)
    template = filename_template(tmp_dir, ds.name)
    split_infos, rows, shards, num_bytes = [], {}, {}, {}
    for split in splits:
        parts = per_split[split]
        for i, (fname, _, _) in enumerate(parts):
            os.replace(fname, template.replace(split=split).sharded_filepath(shard_index=i, num_shards=len(parts)))
        rows[split], shards[split] = sum(n for _, n, _ in parts), len(parts)
        num_bytes[split] = sum(b for _, _, b in parts)
        split_infos.append(tfds.core.SplitInfo(name=split, shard_lengths=[n for _, n, _ in parts],
                                               num_bytes=num_bytes[split],
                                               filename_template=template.replace(split=split)))
    tfds.folder_dataset.write_metadata(data_dir=tmp_dir, features=ds.features, split_infos=split_infos,
                                       version=ds.version, filename_template=template, check_data=False,
                                       description=ds.description)
    skipped_log = None
    logs = [r.skip_log for r in results if r.skip_log]
    if logs:
        skipped_log = str(final_dir / "skipped.jsonl")
        with open(tmp_dir / "skipped.jsonl", "wb") as out:
            for p in logs:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out)
                os.remove(p)
    return DatasetResult(
        name=ds.name, path=str(final_dir), files=[str(p) for p in ds.files], rows=rows, shards=shards,
        num_bytes=num_bytes, lines=lines, blank_lines=sum(r.blank for r in results), skipped=skipped,
        bad_lines=[b for r in results for b in r.bad][:MAX_LISTED_BAD_LINES], skipped_log=skipped_log,
        ranges=results)


def resolve_workers(workers: int | None) -> int:
    """``None`` -> all CPUs; ``0`` or ``1`` -> this process; negative is an error."""
    if workers is None:
        return max(1, os.cpu_count() or 1)
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    return max(1, int(workers))


def convert(
    datasets: Sequence[Dataset],
    out_dir: str | os.PathLike,
    *,
    workers: int | None = None,
    max_bad_fraction: float = 0.0,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    overwrite: bool = True,
    progress: bool = True,
    desc: str = "convert",
    title: str | None = None,
    mp_start_method: str = "spawn",
) -> list[DatasetResult]:
    """Converts the JSONL files of each dataset to ``out_dir/<name>/<version>/`` (see module doc).

    Args:
      datasets: what to write; all their ranges share one worker pool and one progress bar.
      out_dir: the TFDS data_dir.
      workers: worker processes (``None``: all CPUs; ``<= 1``: this process).
      max_bad_fraction: the bad-line cap, ``0 <= f < 1`` (``check_max_bad_fraction``).
      shard_bytes: source bytes per range for datasets without ``num_ranges``.
      overwrite: replace an existing ``<version>`` folder once the new one is complete; with False
        an existing one is an error (``FileExistsError``) before anything is read.
      progress: a tqdm bar on stderr over the source bytes (rate, ETA, rows written).
      title: the ``TooManyBadLinesError`` heading (default ``desc``).
      mp_start_method: the pool's start method ("spawn" is safe after JAX/TFDS threads start).

    Raises:
      the first bad line's located error (``max_bad_fraction == 0``), ``TooManyBadLinesError``,
      ``NoRecordsError``; nothing is left behind for any dataset then.
    """
    from tqdm.auto import tqdm

    max_bad_fraction = check_max_bad_fraction(max_bad_fraction)
    if shard_bytes <= 0:
        raise ValueError(f"shard_bytes must be > 0, got {shard_bytes}")
    workers = resolve_workers(workers)
    out = pathlib.Path(out_dir)
    finals = [out / ds.name / ds.version for ds in datasets]
    if not overwrite:
        for final in finals:
            if final.exists():
                raise FileExistsError(f"{final} already exists (pass overwrite=True to replace it)")
    skip_bad = max_bad_fraction > 0
    tasks: list[_Task] = []
    tmp_dirs: list[pathlib.Path] = []
    total_bytes = 0
    try:
        for d, ds in enumerate(datasets):
            tmp = out / ds.name / f".{ds.version}.incomplete-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            tmp_dirs.append(tmp)
            idx = 0
            for p in ds.files:
                size = os.path.getsize(p)
                total_bytes += size
                n = ds.num_ranges or num_ranges_for(size, shard_bytes, workers)
                for start, end in plan_ranges(p, n):
                    tasks.append(_Task(d, idx, os.fspath(p), start, end, str(tmp), ds.encoder_factory, skip_bad))
                    idx += 1
        tasks.sort(key=lambda t: t.start - t.end)  # biggest ranges first keeps the pool busy to the end

        bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                   disable=not progress, file=sys.stderr, dynamic_ncols=True)
        rows_done = [0]

        def on_progress(nbytes: int, nrows: int) -> None:
            rows_done[0] += nrows
            bar.update(nbytes)
            bar.set_postfix(rows=f"{rows_done[0]:,}", refresh=False)

        with bar:
            if workers == 1 or len(tasks) <= 1:
                results = _run_inline(tasks, on_progress)
            else:
                results = _run_pool(tasks, workers, mp_start_method, on_progress)

        fatal = [r for r in results if r.fatal is not None]
        if fatal:
            first = min(fatal, key=lambda r: (r.dataset, r.range_index))  # the earliest in file order
            raise first.fatal

        by_ds: list[list[RangeResult]] = [[] for _ in datasets]
        for r in results:
            by_ds[r.dataset].append(r)
        failures = []
        for ds, rs in zip(datasets, by_ds):
            skipped = sum(r.skipped for r in rs)
            total = sum(r.lines for r in rs)
            if skipped and skipped > max_bad_fraction * total:
                msgs = [b.message for r in sorted(rs, key=lambda r: r.range_index) for b in r.bad][:5]
                failures.append((ds.name, skipped, total, max_bad_fraction, msgs))
        if failures:
            raise TooManyBadLinesError(failures, title or desc)

        written = []
        for ds, rs, tmp, final in zip(datasets, by_ds, tmp_dirs, finals):
            res = _finalize(ds, rs, tmp, final)
            if ds.on_written is not None:
                ds.on_written(res, tmp)
            written.append(res)
        for tmp, final in zip(tmp_dirs, finals):
            if final.exists():
                if not overwrite:
                    raise FileExistsError(f"{final} appeared during the conversion")
                shutil.rmtree(final)
            os.replace(tmp, final)
        return written
    finally:
        for tmp in tmp_dirs:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def _run_inline(tasks: Sequence[_Task], on_progress) -> list[RangeResult]:
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


def _run_pool(tasks: Sequence[_Task], workers: int, start_method: str, on_progress) -> list[RangeResult]:
    ctx = multiprocessing.get_context(start_method)
    progress_q = ctx.Queue()
    stop = ctx.Event()
    results: list[RangeResult] = []

    def drain() -> None:
        while True:
            try:
                on_progress(*progress_q.get_nowait())
            except queue_lib.Empty:
                return

    with cf.ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=ctx,
                                initializer=_init_worker, initargs=(progress_q, stop)) as pool:
        pending = {pool.submit(_run_range, t) for t in tasks}
        try:
            while pending:
                done, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                drain()
                for fut in done:
                    if fut.cancelled():
                        continue
                    r = fut.result()  # re-raises a worker's unexpected error here
                    results.append(r)
                    if r.fatal is not None:
                        stop.set()
                if stop.is_set():
                    for fut in pending:
                        fut.cancel()
        except BaseException:
            stop.set()
            for fut in pending:
                fut.cancel()
            raise
    drain()  # late progress messages
    return results


# ----------------------------------------------------------------------------- the Beam route


def beam_range_tasks(files: Sequence[str], range_bytes: int) -> list[tuple[str, int, int]]:
    """``(path, start, end)`` ranges of ~``range_bytes`` over ``files`` (one Beam element each)."""
    tasks = []
    for p in files:
        n = max(1, -(-os.path.getsize(p) // range_bytes))
        tasks.extend((os.fspath(p), a, b) for a, b in plan_ranges(p, n))
    return tasks


def iter_range_records(task: tuple[str, int, int], parse: Callable[[bytes], Any],
                       bad_line_errors: tuple[type[BaseException], ...],
                       locate: Callable[[BaseException, str, int], BaseException],
                       max_bad_fraction: float = 0.0, log_name: str = "convert") -> Iterator[tuple[int, Any]]:
    """``(byte offset, parse(line))`` for the good lines of one ``(path, start, end)`` range.

    The per-range half of the bad-line policy, for routes where ranges run apart (Beam): ``f == 0``
    raises the located error of the first bad line; otherwise bad lines are skipped (and logged
    to stderr) and the range fails with ``TooManyBadLinesError`` when its own bad fraction exceeds
    ``f``. A range cap is stricter than the global one (a build whose every range is under the cap
    is under it as a whole).
    """
    path, start, end = task
    f = check_max_bad_fraction(max_bad_fraction)
    numbers = LineNumbers(path, start)
    lines, bad, offset = 0, [], start
    for local, nbytes, line in iter_lines(path, start, end):
        offset += nbytes
        if not line.strip():
            continue
        lines += 1
        try:
            value = parse(line)
        except bad_line_errors as e:
            err = locate(e, path, numbers(local))
            if f == 0:
                raise err from None
            bad.append(str(err))
            print(f"{log_name}: skipping {err}", file=sys.stderr)
            continue
        yield offset - nbytes, value
    if bad and len(bad) > f * lines:
        raise TooManyBadLinesError([(f"{path} bytes {start}..{end}", len(bad), lines, f, bad[:5])], log_name)

"""One JSONL reader for the agents' files: parsed records, bad lines named ``file:line`` or counted.

``read_jsonl(path, parse, what=..., max_bad_fraction=0.0)``: ``parse(obj, where) -> record`` gets each
non-blank line's JSON object (``where`` is ``"path:line"``) and raises ``error`` (a ``ValueError``
subclass) for a bad one. The bad-line rule is the house one (``jsonl_convert.check_max_bad_fraction``):
with ``max_bad_fraction == 0`` the first bad line raises, naming ``file:line``; with ``0 < f < 1`` bad lines
are skipped and counted, and ``TooManyBadLinesError`` is raised at the end when skipped / (kept + skipped)
exceeds ``f``. Blank lines are not records. Lines are read by ``jsonl_convert.iter_file_lines`` (UTF-8 BOM,
``\\r\\n``, no final newline).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from data_pipelines import jsonl_convert

log = logging.getLogger(__name__)
MAX_LISTED = 20  # bad-line messages kept for the error / the summary


@dataclasses.dataclass
class ReadStats:
    """What one read kept and skipped; ``bad`` holds the first ``MAX_LISTED`` messages (``file:line: ...``)."""

    kept: int = 0
    skipped: int = 0
    bad: list[str] = dataclasses.field(default_factory=list)


def parse_object(line: bytes, where: str, error: type[ValueError]) -> dict[str, Any]:
    """A line -> its JSON object, else ``error("where: ...")``."""
    return jsonl_convert.json_object(line, where, error)


def iter_jsonl(path: str | os.PathLike, parse: Callable[[dict, str], Any], *, error: type[ValueError],
               what: str = "records", max_bad_fraction: float = 0.0, stats: ReadStats | None = None,
               key: Callable[[Any], str] | None = None, key_name: str = "id") -> Iterator[Any]:
    """Yields ``parse(obj, "path:line")`` for each good line of ``path`` (see the module docstring); with
    ``key``, a record whose ``key(record)`` repeats an earlier one's is a bad line."""
    cap = jsonl_convert.check_max_bad_fraction(max_bad_fraction)
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {what} file at {path}")
    st = stats if stats is not None else ReadStats()
    seen: dict[str, str] = {}
    for line_no, line in jsonl_convert.iter_file_lines(path):
        where = f"{path}:{line_no}"
        try:
            record = parse(parse_object(line, where, error), where)
            if key is not None:
                k = key(record)
                if k in seen:
                    raise error(f"{where}: {key_name} {k!r} repeats the one at {seen[k]}")
                seen[k] = where
        except error as e:
            if cap == 0.0:
                raise
            st.skipped += 1
            if len(st.bad) < MAX_LISTED:
                st.bad.append(str(e))
            continue
        st.kept += 1
        yield record
    total = st.kept + st.skipped
    if st.skipped and st.skipped / total > cap:
        raise jsonl_convert.TooManyBadLinesError([(path, st.skipped, total, cap, st.bad)], title=f"reading {what}")
    if st.skipped:
        log.warning("%s: skipped %d bad line(s) of %d (max_bad_fraction=%g); first: %s",
                    path, st.skipped, total, cap, st.bad[0])


def string_field(obj: dict, key: str, where: str, error: type[ValueError], *, required: bool = True,
                 allow_empty: bool = False, allow_int: bool = False) -> str | None:
    """``obj[key]`` as a str (an int too with ``allow_int``, for ids), else ``error`` naming ``where`` and the
    field."""
    if key not in obj or obj[key] is None:
        if required:
            raise error(f"{where}: missing field {key!r} (fields: {sorted(obj)})")
        return None
    v = obj[key]
    if isinstance(v, bool) or not isinstance(v, (str, int) if allow_int else str):
        raise error(f"{where}: field {key!r} must be a string{' or an integer' if allow_int else ''}, "
                    f"got {type(v).__name__}")
    v = str(v)
    if not allow_empty and not v.strip():
        raise error(f"{where}: field {key!r} is empty")
    return v

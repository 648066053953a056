"""KuaiSearch row schemas and line validation (no TFDS import here: this module is cheap).

Five file kinds, each a JSON Lines file of one flat-ish object per line:

| kind        | released path              | demo path         | one row is                       |
|-------------|----------------------------|-------------------|----------------------------------|
| users       | ``users_lite/train.jsonl`` | ``users.jsonl``   | a user profile                   |
| items       | ``items_lite/train.jsonl`` | ``items.jsonl``   | an item (title, brand, category) |
| recall      | ``recall_lite/train.jsonl``| ``recall.jsonl``  | a search session                 |
| rank        | ``rank_lite/train.jsonl``  | ``rank.jsonl``    | one impressed item of a session  |
| relevance   | ``relevance/train.jsonl``  | ``relevance.jsonl``| a graded (query, item) pair     |

``validate(kind, obj)`` checks one parsed row against ``SCHEMAS[kind]`` and returns it normalised:
fields in schema order, unknown keys dropped, ints as ``int`` (integral floats such as ``3.0`` are
accepted), floats as ``float``, id lists as ``list[int]``. ``parse_line`` does the same from raw bytes
(UTF-8 decoding and JSON parsing included). Every failure is a :class:`KuaiSearchFormatError` whose
message names the file, the 1-based line and the field::

    items.jsonl:17: field 'brand_id': expected int, got str ('12')
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

KINDS: tuple[str, ...] = ("users", "items", "recall", "rank", "relevance")

# Released layout: one folder per kind holding train.jsonl; the demo keeps flat files in one folder.
RELEASE_FOLDERS: Mapping[str, str] = {
    "users": "users_lite",
    "items": "items_lite",
    "recall": "recall_lite",
    "rank": "rank_lite",
    "relevance": "relevance",
}

DEFAULT_SPLIT = "train"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")

# Field types.
INT = "int"
FLOAT = "float"
STR = "str"
INT_LIST = "int_list"
STRUCT = "struct"  # a dict of float fields with fixed names


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a row: name, type, and for ``struct`` the float sub-fields.

    ``choices`` restricts an int field to a set of values (labels, scores).
    """

    name: str
    type: str
    subfields: tuple[str, ...] = ()
    choices: tuple[int, ...] | None = None


USER_STAT_KEYS = (
    "user_show_cnt_30d_hist",
    "user_click_cnt_30d_hist",
    "user_order_cnt_30d_hist",
    "user_gmv_30d_hist",
)
ITEM_STAT_KEYS = (
    "item_show_cnt_30d_hist",
    "item_click_cnt_30d_hist",
    "item_order_cnt_30d_hist",
)

SCHEMAS: Mapping[str, tuple[Field, ...]] = {
    "users": (
        Field("user_id", INT),
        Field("gender", STR),
        Field("age_bucket", STR),
        Field("fre_country", STR),
        Field("fre_province", STR),
        Field("fre_city", STR),
    ),
    "items": (
        Field("item_id", INT),
        Field("item_title", STR),
        Field("brand_id", INT),
        Field("brand_name", STR),
        Field("seller_id", INT),
        Field("seller_name", STR),
        Field("category_level1_id", INT),
        Field("category_level1_name", STR),
        Field("category_level2_id", INT),
        Field("category_level2_name", STR),
        Field("category_level3_id", INT),
        Field("category_level3_name", STR),
    ),
    "recall": (
        Field("user_id", INT),
        Field("session_id", INT),
        Field("impressed_item_ids", INT_LIST),
        Field("clicked_item_ids", INT_LIST),
        Field("purchased_item_ids", INT_LIST),
        Field("time_index", INT),
        Field("query", STR),
        Field("split", STR),
    ),
    "rank": (
        Field("user_id", INT),
        Field("session_id", INT),
        Field("user_fan_number", INT),
        Field("user_follow_number", INT),
        Field("time_index", INT),
        Field("search_entrance", STR),
        Field("recently_clicked_item_ids", INT_LIST),
        Field("recently_purchased_item_ids", INT_LIST),
        Field("query", STR),
        Field("target_item_id", INT),
        Field("target_item_price", FLOAT),
        Field("is_clicked", INT, choices=(0, 1)),
        Field("is_purchased", INT, choices=(0, 1)),
        Field("user_statistical_features", STRUCT, subfields=USER_STAT_KEYS),
        Field("target_item_statistical_features", STRUCT, subfields=ITEM_STAT_KEYS),
        Field("split", STR),
    ),
    "relevance": (
        Field("query", STR),
        Field("item_title", STR),
        Field("brand", STR),
        Field("seller_name", STR),
        Field("attr_value", STR),
        Field("score", INT, choices=(0, 1, 2, 3)),
    ),
}

# Kinds whose rows carry their own split ("train"/"test"); the others go to DEFAULT_SPLIT.
SPLIT_FIELD_KINDS = frozenset(k for k, fs in SCHEMAS.items() if any(f.name == "split" for f in fs))
FIELD_NAMES: Mapping[str, tuple[str, ...]] = {k: tuple(f.name for f in fs) for k, fs in SCHEMAS.items()}


class KuaiSearchFormatError(ValueError):
    """A malformed row. ``source``/``line`` locate it (1-based line); ``reason`` says what is wrong."""

    def __init__(self, reason: str, *, source: str | None = None, line: int | None = None,
                 kind: str | None = None):
        self.reason = reason
        self.source = source
        self.line = line
        self.kind = kind
        super().__init__(self._format())

    def _format(self) -> str:
        where = ""
        if self.source is not None and self.line is not None:
            where = f"{self.source}:{self.line}: "
        elif self.source is not None:
            where = f"{self.source}: "
        elif self.line is not None:
            where = f"line {self.line}: "
        kind = f"[{self.kind}] " if self.kind else ""
        return f"{where}{kind}{self.reason}"

    def located(self, source: str, line: int) -> KuaiSearchFormatError:
        """A copy of this error that names ``source`` and ``line``."""
        return KuaiSearchFormatError(self.reason, source=source, line=line, kind=self.kind)

    def __reduce__(self):  # picklable across worker processes
        return (_rebuild_error, (self.reason, self.source, self.line, self.kind))


def _rebuild_error(reason, source, line, kind):
    return KuaiSearchFormatError(reason, source=source, line=line, kind=kind)


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    name = {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "object"}.get(
        type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{name} ({text})"


def _as_int(value: Any, what: str) -> int:
    t = type(value)
    if t is int:
        return value
    if t is float and value.is_integer():
        return int(value)
    raise KuaiSearchFormatError(f"{what}: expected int, got {_describe(value)}")


def _as_float(value: Any, what: str) -> float:
    t = type(value)
    if t is float:
        if not math.isfinite(value):
            raise KuaiSearchFormatError(f"{what}: expected a finite number, got {value!r}")
        return value
    if t is int:
        return float(value)
    raise KuaiSearchFormatError(f"{what}: expected float, got {_describe(value)}")


def _as_str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise KuaiSearchFormatError(f"{what}: expected str, got {_describe(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogate from a "\ud800" escape
            raise KuaiSearchFormatError(
                f"{what}: string is not valid Unicode ({e.reason} at char {e.start})") from None
    return value


def _as_int_list(value: Any, what: str) -> list[int]:
    if type(value) is not list:
        raise KuaiSearchFormatError(f"{what}: expected a list of int, got {_describe(value)}")
    for x in value:
        if type(x) is not int:
            break
    else:
        return value
    out = []
    for i, x in enumerate(value):
        out.append(_as_int(x, f"{what}[{i}]"))
    return out


def validate(kind: str, obj: Any, *, source: str | None = None, line: int | None = None,
             unknown: collections.Counter | None = None) -> dict:
    """Checks one parsed row of ``kind`` and returns it normalised (see the module docstring).

    Raises KuaiSearchFormatError naming ``source``:``line`` (when given) and the field at fault.
    Keys the schema does not know are dropped; when ``unknown`` is given they are counted in it.
    """
    try:
        fields = SCHEMAS[kind]
    except KeyError:
        raise ValueError(f"unknown KuaiSearch kind {kind!r}; expected one of {KINDS}") from None
    try:
        out = _validate(kind, fields, obj)
    except KuaiSearchFormatError as e:
        raise KuaiSearchFormatError(e.reason, source=source, line=line, kind=kind) from None
    if unknown is not None and len(obj) != len(out):
        unknown.update(unknown_fields(kind, obj))
    return out


def _validate(kind: str, fields: Sequence[Field], obj: Any) -> dict:
    if type(obj) is not dict:
        raise KuaiSearchFormatError(f"expected a JSON object, got {_describe(obj)}")
    out = {}
    for f in fields:
        name = f.name
        try:
            value = obj[name]
        except KeyError:
            raise KuaiSearchFormatError(f"missing field {name!r}") from None
        what = f"field {name!r}"
        t = f.type
        if t == INT:
            if f.choices is not None and type(value) is bool:
                value = int(value)  # JSON true/false for a 0/1 label
            v = _as_int(value, what)
            if f.choices is not None and v not in f.choices:
                raise KuaiSearchFormatError(f"{what}: value {v} not in {list(f.choices)}")
        elif t == STR:
            v = _as_str(value, what)
            if name == "split" and not _SPLIT_RE.match(v):
                raise KuaiSearchFormatError(
                    f"{what}: split name {v!r} must be letters, digits or '_' (e.g. 'train', 'test')")
        elif t == INT_LIST:
            v = _as_int_list(value, what)
        elif t == FLOAT:
            v = _as_float(value, what)
        elif t == STRUCT:
            if type(value) is not dict:
                raise KuaiSearchFormatError(f"{what}: expected an object, got {_describe(value)}")
            v = {}
            for sub in f.subfields:
                try:
                    sv = value[sub]
                except KeyError:
                    raise KuaiSearchFormatError(f"{what}: missing key {sub!r}") from None
                v[sub] = _as_float(sv, f"field '{name}.{sub}'")
        else:  # pragma: no cover - schema bug
            raise AssertionError(t)
        out[name] = v
    return out


def unknown_fields(kind: str, obj: Mapping[str, Any]) -> list[str]:
    """Keys of ``obj`` that the schema of ``kind`` does not know (dropped by ``validate``)."""
    known = FIELD_NAMES[kind]
    if len(obj) == len(known):
        return []
    return [k for k in obj if k not in known]


def parse_line(kind: str, raw: bytes, *, source: str | None = None, line: int | None = None,
               unknown: collections.Counter | None = None) -> dict:
    """UTF-8-decodes, JSON-parses and validates one line (bytes, with or without its newline)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1]
        raise KuaiSearchFormatError(
            f"invalid UTF-8 at byte {e.start} (0x{bad.hex()}): {e.reason}",
            source=source, line=line, kind=kind) from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise KuaiSearchFormatError(
            f"invalid JSON: {e.msg} (column {e.colno})", source=source, line=line, kind=kind) from None
    except RecursionError:
        raise KuaiSearchFormatError("invalid JSON: nested too deeply",
                                    source=source, line=line, kind=kind) from None
    return validate(kind, obj, source=source, line=line, unknown=unknown)


def row_split(kind: str, row: Mapping[str, Any], default: str = DEFAULT_SPLIT) -> str:
    """The TFDS split a validated row goes to: its ``split`` field, else ``default``."""
    if kind in SPLIT_FIELD_KINDS:
        return row["split"]
    return default


def find_source_files(src_dir: str | pathlib.Path, kind: str) -> list[pathlib.Path]:
    """The JSONL files of ``kind`` under ``src_dir``, in either layout.

    Looks, in order, for ``<release folder>/*.jsonl`` (e.g. ``items_lite/train.jsonl``),
    ``<kind>/*.jsonl``, ``<kind>.jsonl`` (the demo layout) and ``<release folder>.jsonl``.
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown KuaiSearch kind {kind!r}; expected one of {KINDS}")
    src = pathlib.Path(src_dir)
    tried = []
    for folder in dict.fromkeys((RELEASE_FOLDERS[kind], kind)):
        d = src / folder
        tried.append(f"{d}/*.jsonl")
        if d.is_dir():
            files = sorted(p for p in d.glob("*.jsonl") if p.is_file())
            if files:
                return files
    for name in dict.fromkeys((f"{kind}.jsonl", f"{RELEASE_FOLDERS[kind]}.jsonl")):
        p = src / name
        tried.append(str(p))
        if p.is_file():
            return [p]
    raise FileNotFoundError(f"no KuaiSearch {kind!r} file under {src}; looked for: {', '.join(tried)}")


def default_split_for(path: pathlib.Path) -> str:
    """Split for rows without a ``split`` field: the file stem when it names a split inside a kind
    folder (``users_lite/test.jsonl`` -> ``test``), else ``train``."""
    stem = path.stem
    if stem in ("train", "test", "validation", "valid", "dev"):
        return stem
    return DEFAULT_SPLIT

"""QA JSONL: the seven Search-R1 benchmarks (NQ, TriviaQA, PopQA, HotpotQA, 2Wiki, MuSiQue, Bamboogle) and
the synthetic world's questions.

One JSON object a line, as FlashRAG and Search-R1 ship them::

    {"id": "test_0", "question": "who got the first nobel prize in physics?",
     "golden_answers": ["Wilhelm Conrad Röntgen"], "metadata": {...}}

Fields:

* ``question`` (string, required, non-empty).
* ``golden_answers``: a list of non-empty strings (at least one). Aliases, tried in this order when
  ``golden_answers`` is absent: ``answers`` (NQ-open, TriviaQA dumps: a list, or one string) and ``answer``
  (raw HotpotQA / 2Wiki / MuSiQue: one string, or a list). A single string becomes a one-answer list;
  duplicates are dropped, order kept.
* ``id`` (string or int); alias ``_id`` (raw HotpotQA / 2Wiki). Without either, the id is the 1-based line
  number as a string. Ids must be unique within a file.
* Optional, written by the synthetic world: ``hops`` (int >= 1) and ``supporting_passages`` (the passage
  ids of the reasoning chain, one per hop, in order).
* Every other field is kept as-is in ``QARecord.metadata`` (FlashRAG's ``metadata`` object is kept whole
  under that key).

A line that is not a JSON object, lacks the question or any golden answer, has a field of the wrong type
or repeats an id is a ``QAFormatError`` naming ``file:line`` (or a counted skip under
``max_bad_fraction``: ``records.iter_jsonl``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

from data_pipelines.agents import records

ANSWER_FIELDS = ("golden_answers", "answers", "answer")
ID_FIELDS = ("id", "_id")
_KNOWN = frozenset(ANSWER_FIELDS + ID_FIELDS + ("question", "hops", "supporting_passages"))


class QAFormatError(ValueError):
    """A bad QA line; the message names the file and the line."""


@dataclasses.dataclass(frozen=True)
class QARecord:
    """One question: ``golden_answers`` non-empty; ``hops`` / ``supporting_passages`` where known."""

    id: str
    question: str
    golden_answers: tuple[str, ...]
    hops: int | None = None
    supporting_passages: tuple[str, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The QA JSONL object of this record (the format ``read_qa`` reads)."""
        out: dict[str, Any] = {"id": self.id, "question": self.question, "golden_answers": list(self.golden_answers)}
        if self.hops is not None:
            out["hops"] = self.hops
        if self.supporting_passages:
            out["supporting_passages"] = list(self.supporting_passages)
        out.update(self.metadata)
        return out


def _answers(obj: dict, where: str) -> tuple[str, ...]:
    key = next((k for k in ANSWER_FIELDS if obj.get(k) is not None), None)
    if key is None:
        raise QAFormatError(f"{where}: no golden answers (one of the fields {list(ANSWER_FIELDS)})")
    v = obj[key]
    values = [v] if isinstance(v, str) else v
    if not isinstance(values, list) or not all(isinstance(a, str) for a in values):
        raise QAFormatError(f"{where}: field {key!r} must be a string or a list of strings, got {v!r:.80}")
    out = tuple(dict.fromkeys(a for a in values if a.strip()))
    if not out:
        raise QAFormatError(f"{where}: field {key!r} holds no non-empty answer")
    return out


def _hops(obj: dict, where: str) -> tuple[int | None, tuple[str, ...]]:
    hops, sup = obj.get("hops"), obj.get("supporting_passages", [])
    if hops is not None and (isinstance(hops, bool) or not isinstance(hops, int) or hops < 1):
        raise QAFormatError(f"{where}: field 'hops' must be an integer >= 1, got {hops!r}")
    if not isinstance(sup, list) or not all(isinstance(s, (str, int)) and not isinstance(s, bool) for s in sup):
        raise QAFormatError(f"{where}: field 'supporting_passages' must be a list of passage ids, got {sup!r:.80}")
    return hops, tuple(str(s) for s in sup)


def parse_qa(obj: dict, where: str) -> QARecord:
    """One QA JSON object -> ``QARecord`` (without an id field the id is ``where``'s line number)."""
    question = records.string_field(obj, "question", where, QAFormatError)
    id_key = next((k for k in ID_FIELDS if obj.get(k) is not None), None)
    qid = (records.string_field(obj, id_key, where, QAFormatError, allow_int=True) if id_key
           else where.rsplit(":", 1)[-1])
    hops, sup = _hops(obj, where)
    meta = {k: v for k, v in obj.items() if k not in _KNOWN}
    return QARecord(qid, question, _answers(obj, where), hops, sup, meta)


def iter_qa(path: str | os.PathLike, *, max_bad_fraction: float = 0.0,
            stats: records.ReadStats | None = None) -> Iterator[QARecord]:
    """The records of a QA JSONL file, in file order (a repeated id is a bad line)."""
    yield from records.iter_jsonl(path, parse_qa, error=QAFormatError, what="QA", max_bad_fraction=max_bad_fraction,
                                  stats=stats, key=lambda r: r.id)


def read_qa(path: str | os.PathLike, *, max_bad_fraction: float = 0.0,
            stats: records.ReadStats | None = None) -> list[QARecord]:
    """``list(iter_qa(path))``; ``stats`` (if given) receives the kept / skipped counts."""
    return list(iter_qa(path, max_bad_fraction=max_bad_fraction, stats=stats))


def write_qa(path: str | os.PathLike, qa: list[QARecord]) -> None:
    """Writes records as QA JSONL (UTF-8, one object a line)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in qa:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")

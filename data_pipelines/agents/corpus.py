"""The wiki-18 passage corpus format (Search-R1's ``wiki-18.jsonl``, FlashRAG's corpora).

One JSON object a line::

    {"id": "0", "contents": "\\"Aaron\\"\\nAaron is a prophet, high priest, and the brother of Moses ..."}

``contents`` is the title in double quotes, a newline, then the text (Search-R1 splits it the same way:
title = the first line, text = the rest). A ``contents`` without a newline is all text with an empty
title; quotes around the title are dropped only when they enclose it. The other accepted shape is
``{"id": ..., "title": ..., "text": ...}`` (DPR / BEIR style; ``title`` may be missing or empty), which is
also what ``ecomax agents corpus`` writes beside an index. ``id`` (string or int) is required and unique.
A bad line is a ``CorpusFormatError`` naming ``file:line`` (or a counted skip under ``max_bad_fraction``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from data_pipelines.agents import records


class CorpusFormatError(ValueError):
    """A bad passage line; the message names the file and the line."""


class Passage(NamedTuple):
    id: str
    title: str
    text: str


def split_contents(contents: str) -> tuple[str, str]:
    """``'"Title"\\ntext'`` -> ``("Title", "text")``; no newline -> ``("", contents)``."""
    head, sep, rest = contents.partition("\n")
    if not sep:
        return "", contents.strip()
    head = head.strip()
    if len(head) >= 2 and head[0] == head[-1] == '"':
        head = head[1:-1]
    return head.strip(), rest.strip()


def join_contents(title: str, text: str) -> str:
    """The wiki-18 ``contents`` of a passage: ``'"Title"\\ntext'``."""
    return f'"{title}"\n{text}'


def passage_text(p: Passage) -> str:
    """What an encoder reads for a passage: ``"Title\\ntext"`` (or the text alone without a title)."""
    return f"{p.title}\n{p.text}" if p.title else p.text


def parse_passage(obj: dict, where: str) -> Passage:
    """One passage JSON object -> ``Passage``."""
    pid = records.string_field(obj, "id", where, CorpusFormatError, allow_int=True)
    if "contents" in obj:
        contents = records.string_field(obj, "contents", where, CorpusFormatError)
        title, text = split_contents(contents)
    elif "text" in obj:
        text = records.string_field(obj, "text", where, CorpusFormatError).strip()
        title = (records.string_field(obj, "title", where, CorpusFormatError, required=False, allow_empty=True)
                 or "").strip()
    else:
        raise CorpusFormatError(f"{where}: a passage needs 'contents' (wiki-18) or 'text' (+ 'title'); "
                                f"fields: {sorted(obj)}")
    if not text:
        raise CorpusFormatError(f"{where}: passage {pid!r} has no text")
    return Passage(pid, title, text)


def iter_passages(path: str | os.PathLike, *, max_bad_fraction: float = 0.0,
                  stats: records.ReadStats | None = None) -> Iterator[Passage]:
    """``Passage(id, title, text)`` for each line of a passage JSONL, in file order (a repeated id is bad)."""
    yield from records.iter_jsonl(path, parse_passage, error=CorpusFormatError, what="passages",
                                  max_bad_fraction=max_bad_fraction, stats=stats, key=lambda p: p.id,
                                  key_name="passage id")


def read_passages(path: str | os.PathLike, *, max_bad_fraction: float = 0.0,
                  stats: records.ReadStats | None = None) -> list[Passage]:
    """``list(iter_passages(path))``."""
    return list(iter_passages(path, max_bad_fraction=max_bad_fraction, stats=stats))


def write_passages(path: str | os.PathLike, passages: Iterable[Passage], *, wiki18: bool = True) -> int:
    """Writes passages as JSONL: wiki-18 ``{"id", "contents"}`` or, with ``wiki18=False``,
    ``{"id", "title", "text"}``. Returns the count."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for p in passages:
            obj = ({"id": p.id, "contents": join_contents(p.title, p.text)} if wiki18
                   else {"id": p.id, "title": p.title, "text": p.text})
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    return n

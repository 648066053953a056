"""The search-agent rollout format (Search-R1; IG-Search's ``<refine>``; SD-Search's hindsight block).

A rollout is the policy's text interleaved with what the environment inserts::

    <think> ... </think> <search> query </search> <documents> ...retrieved... </documents>
    <refine> ... </refine> ... <answer> final answer </answer>

The policy writes every segment but ``<documents>``, which the retriever fills (and which is never
trained on); at most ``max_turns`` searches. ``segments`` parses a rollout, ``format_reward`` checks it,
``search_queries`` / ``final_answer`` read it, ``hindsight_block`` summarises a group for SD-Search.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

TAGS = ("think", "search", "documents", "refine", "answer")
INSERTED = ("documents",)  # segments the environment writes: masked out of the policy loss
_SEGMENT = re.compile(r"<(think|search|documents|refine|answer)>(.*?)</\1>", re.S)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One tagged span of a rollout: ``kind`` (a tag, or ``"text"`` for untagged text), its inner text and
    its character span ``[start, end)`` in the rollout (tags included)."""

    kind: str
    text: str
    start: int
    end: int


def segments(rollout: str) -> list[Segment]:
    """The rollout's tagged spans in order, with the untagged text between them as ``"text"`` segments."""
    out, pos = [], 0
    for m in _SEGMENT.finditer(rollout):
        if rollout[pos:m.start()].strip():
            out.append(Segment("text", rollout[pos:m.start()], pos, m.start()))
        out.append(Segment(m.group(1), m.group(2).strip(), m.start(), m.end()))
        pos = m.end()
    if rollout[pos:].strip():
        out.append(Segment("text", rollout[pos:], pos, len(rollout)))
    return out


def search_queries(rollout: str) -> list[str]:
    """The rollout's search queries, in order."""
    return [s.text for s in segments(rollout) if s.kind == "search"]


def final_answer(rollout: str) -> str | None:
    """The text of the last ``<answer>`` segment, or None when the rollout gave none."""
    answers = [s.text for s in segments(rollout) if s.kind == "answer"]
    return answers[-1] if answers else None


def format_reward(rollout: str, max_turns: int) -> float:
    """1.0 when the rollout is well formed, else 0.0: only known tags, none left open, every ``<search>``
    answered by ``<documents>`` right after it (the last one may be cut at ``max_turns``), at most
    ``max_turns`` searches, exactly one ``<answer>`` and nothing but whitespace after it."""
    segs = segments(rollout)
    opened = re.findall(r"<(/?)([a-z_]+)>", rollout)
    if any(tag not in TAGS for _, tag in opened) or len(opened) != 2 * len([s for s in segs if s.kind != "text"]):
        return 0.0
    kinds = [s.kind for s in segs if s.kind != "text"]
    if kinds.count("answer") != 1 or kinds[-1] != "answer" or kinds.count("search") > max_turns:
        return 0.0
    for i, kind in enumerate(kinds[:-1]):
        if kind == "search" and kinds[i + 1] != "documents":
            return 0.0
        if kind == "documents" and (i == 0 or kinds[i - 1] != "search"):
            return 0.0
    return 1.0


def trainable_chars(rollout: str) -> list[tuple[int, int]]:
    """The character spans the policy wrote: everything but the ``INSERTED`` segments, tags included (the
    environment appends ``<documents> ... </documents>`` whole after a ``</search>``, as Search-R1 does);
    what a token mask over the rollout keeps. -> sorted ``[(start, end)]``."""
    spans, pos = [], 0
    for s in segments(rollout):
        if s.kind in INSERTED:
            spans.append((pos, s.start))
            pos = s.end
    spans.append((pos, len(rollout)))
    return [(a, b) for a, b in spans if b > a]


def hindsight_block(rollouts: Sequence[str], correct: Sequence[bool]) -> str:
    """SD-Search's hindsight block for one question: each rollout of the group reduced to its search
    queries and labelled CORRECT or INCORRECT (from its answer's F1), its thinking, documents, refinements
    and answer masked out (the future the student cannot see must not leak through the teacher).
    ``rollouts [G]`` texts, ``correct [G]`` -> the block the teacher reads after the question."""
    lines = ["<hindsight>"]
    for i, (rollout, ok) in enumerate(zip(rollouts, correct, strict=True)):
        queries = " ".join(f"<search> {q} </search>" for q in search_queries(rollout)) or "(no search)"
        lines.append(f"Attempt {i + 1} [{'CORRECT' if ok else 'INCORRECT'}]: {queries}")
    lines.append("</hindsight>")
    return "\n".join(lines)

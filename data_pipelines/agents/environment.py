"""The search agent's environment on the host, in token space: between two generation turns it reads what
each rollout wrote, runs its ``<search>`` through the retriever and appends the ``<documents>`` block; at the
end it lays every rollout out for the update.

    env = SearchEnvironment(tokenizer, retriever.search, k=3, max_turns=4, context=512)
    episodes = env.start(prompt_ids)                       # [B] token lists (left padding removed)
    env.absorb(episodes, generated, logp, last=False)      # [B, G] each turn: append, search, insert documents
    context, valid, active = env.contexts(episodes)        # [B, C] left-padded: the next turn's input
    batch = env.layout(episodes, length)                    # [B, T] right-padded tokens, mask, old log-probs

A rollout stops when it writes ``</answer>``, when it runs out of tokens in a turn without closing a
search, after ``max_turns`` searches, or when its context would outgrow ``context`` tokens (``overflow``,
counted). Documents are Search-R1's ``Doc i(Title: t) text`` lines, each cut to ``doc_tokens`` tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from data_pipelines.agents.tokenizer import DOCUMENT, AgentTokenizer

Search = Callable[[list[str]], list[list[dict]]]   # queries -> per query, passages {"title", "text", ...}


@dataclasses.dataclass
class Episode:
    """One rollout: its tokens, which the policy wrote (``trainable``), their sampling log-probs, and the
    step of each search-query token (-1 elsewhere: IG-Search's ``query_step``, SD-Search's positions)."""

    prompt: int                      # tokens of the prompt (the first ``prompt`` of ``tokens``)
    tokens: list[int]
    trainable: list[bool]
    logp: list[float]
    query_step: list[int]
    queries: list[str] = dataclasses.field(default_factory=list)
    documents: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # token span of each search's
    done: bool = False
    overflow: bool = False

    def policy_text(self, tok: AgentTokenizer) -> str:
        """Everything after the prompt (the policy's text and the inserted documents), decoded."""
        return tok.decode(self.tokens[self.prompt:])


class SearchEnvironment:
    def __init__(self, tok: AgentTokenizer, search: Search, *, k: int, max_turns: int, context: int,
                 doc_tokens: int = 64):
        self.tok, self.search, self.k, self.max_turns, self.context = tok, search, k, max_turns, context
        self.doc_tokens = doc_tokens
        self._open, self._close = tok.encode("<search>"), tok.encode("</search>")
        self._answer = tok.encode("</answer>")

    def start(self, prompts: Sequence[Sequence[int]]) -> list[Episode]:
        return [Episode(len(p), list(map(int, p)), [False] * len(p), [0.0] * len(p), [-1] * len(p)) for p in prompts]

    def documents(self, passages: list[dict]) -> list[int]:
        """The ``<documents>`` block of one search, as tokens."""
        ids = self.tok.encode(" <documents> ")
        for i, p in enumerate(passages[:self.k]):
            ids += self.tok.encode(DOCUMENT.format(i=i + 1, title=p["title"], text=p["text"]))[:self.doc_tokens]
        return ids + self.tok.encode(" </documents> ")

    @property
    def documents_tokens(self) -> int:
        """The longest ``documents`` block: the tags and ``k`` passages of ``doc_tokens``."""
        return len(self.tok.encode(" <documents> ")) + self.k * self.doc_tokens + len(self.tok.encode(" </documents> "))

    def absorb(self, episodes: list[Episode], generated: np.ndarray, logp: np.ndarray, *, last: bool) -> None:
        """Append each live rollout's new tokens (``generated, logp [B, G]``, cut after its stop token), then
        answer every closed ``<search>`` (unless ``last``) with its documents."""
        asks: list[tuple[Episode, str]] = []
        for e, row, lp in zip(episodes, np.asarray(generated), np.asarray(logp), strict=True):
            if e.done:
                continue
            new = [int(t) for t in row]
            stop = self._stop(new)
            new = new[:stop] if stop is not None else [t for t in new if t != self.tok.pad_id]
            e.tokens += new
            e.trainable += [True] * len(new)
            e.logp += [float(x) for x in lp[:len(new)]]
            e.query_step += self._query_steps(new, len(e.queries))
            if stop is None or new[-len(self._close):] != self._close:
                e.done = True
                continue
            query = self._last_query(e)
            if last or len(e.queries) >= self.max_turns or query is None:
                e.done = True
                continue
            e.queries.append(query)
            asks.append((e, query))
        if not asks:
            return
        for (e, _), passages in zip(asks, self.search([q for _, q in asks]), strict=True):
            docs = self.documents(passages)
            if len(e.tokens) + len(docs) > self.context:
                e.done = e.overflow = True
                continue
            e.documents.append((len(e.tokens), len(e.tokens) + len(docs)))
            e.tokens += docs
            e.trainable += [False] * len(docs)
            e.logp += [0.0] * len(docs)
            e.query_step += [-1] * len(docs)

    def _stop(self, new: list[int]) -> int | None:
        """The end of the first ``</search>`` or ``</answer>`` in ``new`` (exclusive), or None."""
        for i in range(1, len(new) + 1):   # O(len(new) x tag length): a turn may be 500 tokens
            if any(new[max(0, i - len(tag)):i] == tag for tag in (self._close, self._answer)):
                return i
        return None

    def _query_steps(self, new: list[int], step: int) -> list[int]:
        """-1, or ``step`` for each token strictly between ``<search>`` and ``</search>`` in ``new``."""
        out, inside, i = [], False, 0
        while i < len(new):
            if new[i:i + len(self._open)] == self._open:
                out += [-1] * len(self._open)
                i, inside = i + len(self._open), True
            elif new[i:i + len(self._close)] == self._close:
                out += [-1] * len(self._close)
                i, inside = i + len(self._close), False
            else:
                out.append(step if inside else -1)
                i += 1
        return out

    def _last_query(self, e: Episode) -> str | None:
        ids = e.tokens[e.prompt:]
        starts = [i for i in range(len(ids)) if ids[i:i + len(self._open)] == self._open]
        if not starts:
            return None
        text = self.tok.decode(ids[starts[-1] + len(self._open):len(ids) - len(self._close)]).strip()
        return text or None

    def contexts(self, episodes: list[Episode]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The next turn's input: ``context, valid [B, C]`` left-padded, ``active [B]``."""
        B, C = len(episodes), self.context
        context, valid = np.full((B, C), self.tok.pad_id, np.int32), np.zeros((B, C), bool)
        for i, e in enumerate(episodes):
            ids = e.tokens[-C:]
            context[i, C - len(ids):], valid[i, C - len(ids):] = ids, True
        return context, valid, np.array([not e.done for e in episodes])

    def layout(self, episodes: list[Episode], length: int) -> dict[str, np.ndarray]:
        """The update's arrays, right-padded to ``length``: ``tokens, valid, mask`` (the policy's tokens),
        ``old_logp`` (their sampling log-probs), ``query_step`` ([B, length]; -1 off search queries)."""
        B = len(episodes)
        out = {"tokens": np.full((B, length), self.tok.pad_id, np.int32), "valid": np.zeros((B, length), bool),
               "mask": np.zeros((B, length), np.float32), "old_logp": np.zeros((B, length), np.float32),
               "query_step": np.full((B, length), -1, np.int32)}
        for i, e in enumerate(episodes):
            if len(e.tokens) > length:
                raise ValueError(f"rollout {i} has {len(e.tokens)} tokens, the layout {length}")
            n = len(e.tokens)
            out["tokens"][i, :n], out["valid"][i, :n] = e.tokens, True
            out["mask"][i, :n], out["old_logp"][i, :n], out["query_step"][i, :n] = e.trainable, e.logp, e.query_step
        return out

"""The extra inputs SD-Search and IG-Search score a batch of rollouts with, built on the host in token space
from the environment's ``Episode``s (``environment.py``); the update runs the policy on them.

* ``hindsight_inputs``: SD-Search's teacher sequences, each rollout with its group's hindsight block after
  the prompt, and the aligned student / teacher positions of every search-query token.
* ``counterfactual_inputs``: IG-Search's answer-scoring sequences, each search step's real documents and
  documents swapped in from other rollouts of the batch, followed by the gold answer.

Shapes: ``B`` rollouts, ``L`` tokens, ``Q`` query positions, ``M`` scoring sequences per rollout.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from data_pipelines.agents.environment import Episode
from data_pipelines.agents.rollout import hindsight_block
from data_pipelines.agents.tokenizer import AgentTokenizer


def hindsight_inputs(episodes: list[Episode], texts: Sequence[str], correct: np.ndarray, tok: AgentTokenizer, *,
                     group: int, length: int, max_positions: int, hindsight_tokens: int) -> dict[str, np.ndarray]:
    """SD-Search's teacher input: each rollout (``length`` tokens at most) with its group's hindsight block
    (``rollout.hindsight_block``: the ``group`` rollouts' queries, CORRECT / INCORRECT from ``correct [B]``;
    cut to ``hindsight_tokens``) after its prompt -> ``teacher_tokens, teacher_valid [B, length + H]``; for
    each of the student's first ``max_positions`` search-query tokens, the position that predicts it in the
    student (``sd_student_pos [B, Q]``) and in the teacher (``sd_teacher_pos``), ``sd_positions [B, Q]``."""
    B, Q, H = len(episodes), max_positions, hindsight_tokens
    out = {"teacher_tokens": np.full((B, length + H), tok.pad_id, np.int32),
           "teacher_valid": np.zeros((B, length + H), bool), "sd_student_pos": np.zeros((B, Q), np.int32),
           "sd_teacher_pos": np.zeros((B, Q), np.int32), "sd_positions": np.zeros((B, Q), bool)}
    for i, e in enumerate(episodes):
        start = i - i % group
        block = tok.encode(hindsight_block(texts[start:start + group], correct[start:start + group]) + "\n")[:H]
        ids = e.tokens[:e.prompt] + block + e.tokens[e.prompt:]
        out["teacher_tokens"][i, :len(ids)], out["teacher_valid"][i, :len(ids)] = ids, True
        query = [t for t, s in enumerate(e.query_step) if s >= 0][:Q]   # tokens after the prompt: predicted at t - 1
        out["sd_student_pos"][i, :len(query)] = [t - 1 for t in query]
        out["sd_teacher_pos"][i, :len(query)] = [t - 1 + len(block) for t in query]
        out["sd_positions"][i, :len(query)] = True
    return out


def counterfactual_inputs(episodes: list[Episode], golds: Sequence[Sequence[str]], tok: AgentTokenizer,
                          rng: np.random.Generator, *, steps: int, counterfactuals: int, max_golds: int,
                          answer_tokens: int, length: int, documents_tokens: int = 0) -> dict[str, np.ndarray]:
    """IG-Search's scoring inputs, per rollout: for each search step t (at most ``steps``), the rollout up to
    t's documents (the real context) and ``counterfactuals`` copies with them swapped for documents drawn from
    other rollouts of the batch, each followed by ``"\\n<answer> "`` and a gold answer (the first
    ``max_golds`` of ``golds [B]``, cut to ``answer_tokens``), truncated from the left to ``length``; a step
    whose documents hold under 10 characters is skipped. -> ``ig_tokens, ig_valid, ig_answer [B, M, length]``
    (``ig_answer``: the answer's tokens) and ``ig_index [B, M, 3]``: (step, variant (0 real), gold), -1 unused.

    ``documents_tokens`` > 0 (the longest documents block) lays the sequences out for prefix sharing
    (``policy.continuation_logprobs``) instead: each holds only what follows the rollout's own tokens before step
    t's documents (documents, lead, answer; no truncation) -> ``ig_tokens, ig_valid, ig_answer [B, M, S]``, S =
    ``documents_tokens`` + lead + ``answer_tokens``, the documents left-padded to end at column
    ``documents_tokens`` (so the lead and answer, the only columns given logits, start there in every sequence), and
    ``ig_start [B, M]``, the prefix's length."""
    B, M = len(episodes), steps * (1 + counterfactuals) * max_golds
    lead = tok.encode("\n<answer> ")
    suffix = documents_tokens and documents_tokens + len(lead) + answer_tokens
    width = suffix or length
    text = lambda ids: tok.decode(ids).replace("<documents>", "").replace("</documents>", "").strip()  # noqa: E731
    blocks = [[e.tokens[a:b] if len(text(e.tokens[a:b])) >= 10 else None for a, b in e.documents[:steps]]
              for e in episodes]
    out = {"ig_tokens": np.full((B, M, width), tok.pad_id, np.int32), "ig_valid": np.zeros((B, M, width), bool),
           "ig_answer": np.zeros((B, M, width), np.float32), "ig_index": np.full((B, M, 3), -1, np.int32)}
    if suffix:
        out["ig_start"] = np.zeros((B, M), np.int32)
    for i, e in enumerate(episodes):
        others = [block for j, row in enumerate(blocks) if j != i for block in row if block is not None]
        m = 0
        for t, ((a, _), own) in enumerate(zip(e.documents, blocks[i])):
            if own is None or not others:
                continue
            draws = rng.choice(len(others), counterfactuals, replace=len(others) < counterfactuals)
            for v, docs in enumerate([own, *(others[k] for k in draws)]):
                for g, gold in enumerate(golds[i][:max_golds]):
                    answer = tok.encode(" " + gold)[:answer_tokens]
                    if suffix:
                        if len(docs) > documents_tokens:
                            raise ValueError(f"rollout {i}, step {t}: its documents are {len(docs)} tokens, "
                                             f"documents_tokens {documents_tokens}")
                        ids, begin = docs + lead + answer, documents_tokens - len(docs)   # docs end at one column
                        out["ig_start"][i, m] = a
                    else:
                        ids, begin = (e.tokens[:a] + docs + lead)[-(length - len(answer)):] + answer, 0
                    end = begin + len(ids)
                    out["ig_tokens"][i, m, begin:end], out["ig_valid"][i, m, begin:end] = ids, True
                    out["ig_answer"][i, m, end - len(answer):end] = 1.0
                    out["ig_index"][i, m] = t, v, g
                    m += 1
    return out

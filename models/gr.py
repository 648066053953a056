"""A sequence model as a generative retriever: the vocabulary of text pieces plus one block of code tokens
per SID level, teacher-forced code logits, and the decoding step in code space for ``beam_search``.

Token layout (``SIDVocab``): ids ``[0, text)`` are the tokenizer's pieces, ``text`` is the decoder's start
token, then level ``l``'s ``K_l`` codes at ``offset(l) + code``. The decoder emits exactly one code per
level; its output at position ``l`` is read only over level ``l``'s block (a text piece or another level's
code is never a valid output there), so training and constrained decoding normalise the same way.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from models import beam_search


@dataclasses.dataclass(frozen=True)
class SIDVocab:
    text: int                  # text pieces: ids [0, text)
    sizes: tuple[int, ...]     # K_l, codes per SID level (the dedup digit is one more level)

    @property
    def start(self) -> int:
        return self.text

    @property
    def size(self) -> int:
        return self.text + 1 + sum(self.sizes)

    @property
    def depth(self) -> int:
        return len(self.sizes)

    def offset(self, level: int) -> int:
        return self.text + 1 + sum(self.sizes[:level])

    @property
    def offsets(self) -> tuple[int, ...]:
        """The first token id of each level's code block."""
        return tuple(self.offset(level) for level in range(self.depth))

    def tokens(self, codes: jax.Array) -> jax.Array:
        """``codes [..., D]`` -> vocabulary ids ``[..., D]``."""
        return codes + jnp.asarray(self.offsets, codes.dtype)

    def decoder_inputs(self, codes: jax.Array) -> jax.Array:
        """Teacher forcing: ``codes [B, D]`` -> ``[B, D]`` = start, then the first ``D - 1`` code tokens."""
        start = jnp.full(codes.shape[:-1] + (1,), self.start, codes.dtype)
        return jnp.concatenate([start, self.tokens(codes)[..., :-1]], axis=-1)

    def level_logits(self, logits: jax.Array, level: int) -> jax.Array:
        """``logits [..., V]`` -> level ``level``'s block ``[..., K_level]``."""
        start = self.offset(level)
        return logits[..., start:start + self.sizes[level]]


def code_log_probs(vocab: SIDVocab, logits: jax.Array) -> list[jax.Array]:
    """Teacher-forced ``logits [B, D, V]`` -> per level ``[B, K_l]`` float32 log-probabilities."""
    return [jax.nn.log_softmax(vocab.level_logits(logits[:, level], level).astype(jnp.float32), axis=-1)
            for level in range(vocab.depth)]


def sequence_log_prob(vocab: SIDVocab, logits: jax.Array, codes: jax.Array) -> jax.Array:
    """``log p(codes | query)`` under teacher forcing: ``logits [B, D, V]``, ``codes [B, D]`` -> ``[B]``."""
    per_level = [jnp.take_along_axis(lp, codes[:, level, None], axis=1)[:, 0]
                 for level, lp in enumerate(code_log_probs(vocab, logits))]
    return sum(per_level)


def path_log_probs(vocab: SIDVocab, logits: jax.Array, codes: jax.Array, constraint=None,
                   temperature: float = 1.0) -> jax.Array:
    """Each code's teacher-forced log-probability under the policy that ``beam_search.sample`` draws from:
    ``logits [B, D, V]``, ``codes [B, D]`` (valid SIDs) -> ``[B, D]`` float32, level ``l``'s block at
    ``temperature``, renormalised over the trie's children of the path's prefix when ``constraint`` is given
    (it needs the fused ``children(level, prefix)`` lookup, as ``TrieConstraint`` has)."""
    out, prefix = [], jnp.zeros(codes.shape[0], jnp.int32)
    for level in range(vocab.depth):
        lp = vocab.level_logits(logits[:, level], level).astype(jnp.float32) / temperature
        code = codes[:, level]
        if constraint is not None:
            child = constraint.children(level, prefix)
            lp = jnp.where(child >= 0, lp, -jnp.inf)
            prefix = jnp.take_along_axis(child, code[:, None], axis=1)[:, 0]
        out.append(jnp.take_along_axis(jax.nn.log_softmax(lp, axis=-1), code[:, None], axis=1)[:, 0])
    return jnp.stack(out, axis=1)


def code_step(model, vocab: SIDVocab):
    """The model's KV-cached decoding step (``model.step``) in code space: the ``step`` protocol of
    ``models.beam_search.beam_search``."""
    return beam_search.code_step(model.step, offsets=vocab.offsets,
                                 sizes=vocab.sizes, start_token=vocab.start)

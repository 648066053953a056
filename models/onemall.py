"""OneMall's generator: multi-behaviour sequences compressed by Query-Formers, fused by the SID decoder's
cross-attention, decoded with sparse-MoE feed-forward layers.

    clicks, purchases [b, n, D] code tokens; past queries [b, n, L] pieces; (the session's query [b, s])
        -> per behaviour: event embeddings [b, n, embed] -> Query-Former -> [b, K, embed]
        -> memory [b, (s +) 3K, embed] -> T5 decoder (cross-attention = the fusion; MoE every n-th layer)
        -> SID logits [b, D, vocab]

An item event is the sum of its SID's code-token embeddings (the generator's own embedding table, so history
and output share the code space), a past query the mean of its piece embeddings; each event adds a
behaviour-kind embedding and a recency embedding (``recency[j]`` for the j-th most recent event: inputs are
right-aligned, the newest last). ``compress = "last"`` is the truncation baseline: the last K events go
through the same blocks in place of the learned queries (equal generator compute: K memory tokens per
behaviour either way). ``generator.encoder_layers > 0`` also encodes the session's query (personalised
search); 0 is recommendation from behaviour alone.

One model serves several scenarios (OneMall: product cards, short videos, live streams) with a learned
scenario token at the front of the memory (``scenarios > 0``; id 0 = unknown).

Parameter layout::

    generator/...           models/seq2seq.py (embedding, decoder, lm_head; encoder when it reads a query)
    recency  [max_events, embed]   (None, "embed")
    kind     [behaviours, embed]   (None, "embed")
    compress/{behaviour}/...       models/query_former.py
    scenario [scenarios, embed]    (None, "embed")   (when scenarios > 0)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from models.query_former import QueryFormer
from models.seq2seq import Seq2Seq, Seq2SeqConfig, _normal
from models.transformer import param

Array = jax.Array
BEHAVIOURS = ("click", "purchase", "query")


@dataclasses.dataclass(frozen=True)
class OneMallConfig:
    generator: Seq2SeqConfig
    behaviours: tuple[str, ...] = BEHAVIOURS
    num_queries: int = 8           # K: memory tokens per behaviour
    qformer_layers: int = 2
    compress: str = "qformer"      # "qformer" | "last" (truncation to the last K events)
    max_events: int = 256          # recency table rows: the longest sequence
    scenarios: int = 0             # scenario ids (0 = unknown, then one per scenario); 0: no scenario token

    def __post_init__(self):
        if self.compress not in ("qformer", "last"):
            raise ValueError(f"compress {self.compress!r}: expected 'qformer' or 'last'")
        unknown = set(self.behaviours) - set(BEHAVIOURS)
        if unknown or not self.behaviours:
            raise ValueError(f"behaviours {self.behaviours}: each one of {BEHAVIOURS}")


def inputs_of(behaviour: str) -> tuple[str, str]:
    """The batch keys of a behaviour: (events, mask). Items: ``{b}_tokens [n, D]``, ``{b}_mask [n]``; queries:
    ``query_ids [n, L]``, ``query_mask [n, L]`` (pieces)."""
    return (f"{behaviour}_ids", f"{behaviour}_mask") if behaviour == "query" else (f"{behaviour}_tokens",
                                                                                  f"{behaviour}_mask")


class OneMall(nnx.Module):
    def __init__(self, cfg: OneMallConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg, self.dtype = cfg, dtype
        g = cfg.generator
        self.generator = Seq2Seq(g, dtype=dtype, rngs=rngs)
        self.recency = param(rngs, _normal(0.02), (cfg.max_events, g.d_model), (None, "embed"))
        self.kind = param(rngs, _normal(0.02), (len(cfg.behaviours), g.d_model), (None, "embed"))
        self.compress = nnx.Dict({b: QueryFormer(g, cfg.num_queries, cfg.qformer_layers, dtype=dtype, rngs=rngs)
                                  for b in cfg.behaviours})
        self.scenario = (param(rngs, _normal(1.0), (cfg.scenarios, g.d_model), (None, "embed"))
                         if cfg.scenarios else None)

    def events(self, behaviour: str, batch: dict) -> tuple[Array, Array]:
        """-> event embeddings [b, n, embed] and their mask [b, n] (right-aligned: the newest event last)."""
        ids_key, mask_key = inputs_of(behaviour)
        ids, mask = batch[ids_key], batch[mask_key].astype(bool)
        emb = self.generator.embed(ids.reshape(ids.shape[0], -1)).reshape(*ids.shape, -1)  # [b, n, D|L, embed]
        if behaviour == "query":
            w = mask.astype(emb.dtype)[..., None]
            x = jnp.sum(emb * w, axis=2) / jnp.maximum(jnp.sum(w, axis=2), 1.0)
            mask = mask.any(axis=-1)
        else:
            x = jnp.sum(emb, axis=2) * ids.shape[-1] ** -0.5
        n = x.shape[1]
        if n > self.cfg.max_events:
            raise ValueError(f"{behaviour}: {n} events per row, the recency table holds {self.cfg.max_events}")
        recency = self.recency[...][:n][::-1].astype(self.dtype)              # slot n-1 (the newest) -> row 0
        x = x + recency[None] + self.kind[...][self.cfg.behaviours.index(behaviour)].astype(self.dtype)
        return x, mask

    def memory(self, batch: dict) -> tuple[Array, Array]:
        """-> the decoder's memory [b, M, embed] and mask [b, M]: the scenario token (``batch["scenario"] [b]``,
        when the model has scenarios), the encoded query (if read), then K tokens per behaviour."""
        parts, masks = [], []
        if self.scenario is not None:
            parts.append(self.scenario[...][batch["scenario"]][:, None].astype(self.dtype))
            masks.append(jnp.ones((batch["scenario"].shape[0], 1), bool))
        if self.generator.encoder is not None:
            parts.append(self.generator.encode(batch["input_ids"], batch["input_mask"]))
            masks.append(batch["input_mask"].astype(bool))
        k = self.cfg.num_queries
        for b in self.cfg.behaviours:
            x, mask = self.events(b, batch)
            if self.cfg.compress == "last":  # padding slots (fewer than K events) are masked out of the memory
                x, mask = x[:, -k:], mask[:, -k:]
                parts.append(self.compress[b](x, mask, queries=x))
                masks.append(mask)
            else:
                parts.append(self.compress[b](x, mask))
                masks.append(jnp.ones(parts[-1].shape[:2], bool))
        return jnp.concatenate(parts, axis=1), jnp.concatenate(masks, axis=1)

    def __call__(self, batch: dict, decoder_inputs: Array) -> Array:
        """Teacher forcing: decoder_inputs [b * n, t] -> logits [b * n, t, vocab] float32."""
        return self.generator.decode(*self.memory(batch), decoder_inputs)

    def start(self, batch: dict, max_len: int) -> tuple[dict, dict]:
        """Decoding: -> (context, cache) for ``step`` (``Seq2Seq.step``)."""
        return self.generator.start_decoding(*self.memory(batch), max_len)

    def step(self, context: dict, cache: dict, token: Array, position) -> tuple[Array, dict]:
        return self.generator.step(context, cache, token, position)

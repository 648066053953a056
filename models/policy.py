"""Decoder-only LLM policies for the search agents: google-tunix's Qwen2 (the ``agents`` extra), with a
KV-cached sampler that runs inside ecomax's jitted rollout and the per-token log-probs GRPO trains on.

Qwen2.5 checkpoints load as they are. Llama-architecture checkpoints (SmolLM2, Llama 3 without rope
scaling) load as a Qwen2 whose q/k/v biases are zero (``write_zero_qkv_bias``): the two architectures are
otherwise the same (RMSNorm, SwiGLU, grouped-query attention, half-split rotary). tunix 0.1.7's own Llama3
module is not used: its attention calls ``apply_rope`` without the config's ``rope_theta`` (always 1e6), so a
SmolLM2 checkpoint (theta 1e5) gives logits off by up to 4.2 from transformers', 9e-5 once theta is passed.

Parameters carry ecomax's logical axis names (``vocab``, ``embed``, ``heads``, ``kv``, ``mlp``), so the
config's sharding rules place them like every other model. Shapes: ``B`` rows, ``C`` context, ``G`` new tokens,
``M`` continuations of a row, ``S`` their tokens.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import partitioning

NEG = -1e9


def sharding_config():
    """tunix's per-parameter sharding names, as ecomax logical axes (activation constraints left off: the
    rules place the parameters and ``batch``)."""
    from tunix.models.qwen2.model import ShardingConfig

    act = (None, None, None)
    return ShardingConfig(emb_vd=("vocab", "embed"), emb_dv=("embed", "vocab"), q_weight_dnh=("embed", "heads", None),
                          kv_weight_dnh=("embed", "kv", None), o_weight_nhd=("heads", None, "embed"),
                          ffw_weight_df=("embed", "mlp"), ffw_weight_fd=("mlp", "embed"), rms_norm_weight=(None,),
                          act_btd=act, act_btf=act, act_btnh=(None,) * 4, exp_weight_cdf=act, exp_weight_cfd=act,
                          qkv_bias=(None,))


def qwen2_config(m: Any, hf: dict | None = None, dtype: str = "float32"):
    """tunix ``ModelConfig`` from ``config.model`` (``layers, vocab, embed, mlp, heads, kv_heads, head_dim,
    rope_theta, norm_eps, tied``), or from a Hugging Face ``config.json`` dict when ``hf`` is given;
    ``dtype``: activations and KV cache (parameters stay float32)."""
    from tunix.models.qwen2.model import ModelConfig

    if hf is not None:
        m = {"layers": hf["num_hidden_layers"], "vocab": hf["vocab_size"], "embed": hf["hidden_size"],
             "mlp": hf["intermediate_size"], "heads": hf["num_attention_heads"],
             "kv_heads": hf.get("num_key_value_heads", hf["num_attention_heads"]),
             "head_dim": hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
             "rope_theta": hf.get("rope_theta", 10_000.0), "norm_eps": hf["rms_norm_eps"],
             "tied": hf.get("tie_word_embeddings", False)}
    get = (lambda k: m[k]) if isinstance(m, dict) else (lambda k: getattr(m, k))
    return ModelConfig(num_layers=get("layers"), vocab_size=get("vocab"), embed_dim=get("embed"),
                       hidden_dim=get("mlp"), num_heads=get("heads"), head_dim=get("head_dim"),
                       num_kv_heads=get("kv_heads"), rope_theta=int(get("rope_theta")), norm_eps=float(get("norm_eps")),
                       use_tied_embedding=bool(get("tied")), shd_config=sharding_config(), dtype=jnp.dtype(dtype),
                       param_dtype=jnp.float32)


def build(cfg, rngs: nnx.Rngs) -> nnx.Module:
    """tunix's Qwen2 with initial values a policy trained from scratch can learn from: tunix initialises for
    loading checkpoints, with all-zero MLP kernels (gate, up and down zero: every MLP gradient is zero, so
    the MLPs never train) and N(0, 1) embeddings (tied logits of std sqrt(embed)). Here: LeCun-normal MLP
    kernels and N(0, 1/embed) embeddings (logits of std ~1 at the start); attention keeps tunix's Glorot."""
    from tunix.models.qwen2.model import Qwen2

    model = Qwen2(cfg, rngs=rngs)
    emb = model.embedder.input_embedding
    emb[...] = jax.random.normal(rngs.params(), emb.shape, emb.dtype) * cfg.embed_dim ** -0.5
    lecun = nnx.initializers.lecun_normal()
    for layer in model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            proj.kernel[...] = lecun(rngs.params(), proj.kernel.shape, proj.kernel.dtype)
    return model


def hf_model_config(folder: str | pathlib.Path) -> dict:
    return json.loads((pathlib.Path(folder) / "config.json").read_text())


def write_zero_qkv_bias(folder: str | pathlib.Path) -> pathlib.Path:
    """Add ``qkv_bias.safetensors`` (zeros) to a Llama-architecture checkpoint folder so that tunix's Qwen2
    loader reads it; transformers reads only ``model.safetensors`` and is unaffected."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    hf = hf_model_config(folder)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    q, kv = hf["num_attention_heads"] * head_dim, hf.get("num_key_value_heads", hf["num_attention_heads"]) * head_dim
    zeros = {}
    for i in range(hf["num_hidden_layers"]):
        for name, n in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            zeros[f"model.layers.{i}.self_attn.{name}.bias"] = np.zeros(n, np.float32)
    save_file(zeros, str(folder / "qkv_bias.safetensors"))
    return folder


def load_params(folder: str | pathlib.Path, cfg) -> Any:
    """A Hugging Face Qwen2 / Llama folder's weights as an ``nnx.Param`` state tree of tunix's Qwen2."""
    from tunix.models.qwen2 import params

    folder = pathlib.Path(folder)
    if hf_model_config(folder).get("model_type") == "llama" and not (folder / "qkv_bias.safetensors").exists():
        write_zero_qkv_bias(folder)
    return nnx.state(params.create_model_from_safe_tensors(str(folder), cfg), nnx.Param)


def positions_of(valid: jax.Array) -> jax.Array:
    """``valid [B, L]`` (left-padded rows) -> rotary positions ``[B, L]``: 0 at each row's first token."""
    return jnp.maximum(jnp.cumsum(valid, axis=-1) - 1, 0)


def causal_mask(valid: jax.Array, size: int | None = None) -> jax.Array:
    """``valid [B, L]`` -> ``[B, L, size]`` attention mask: causal, padding never attended."""
    L = valid.shape[1]
    mask = valid[:, None, :].astype(bool) & jnp.tril(jnp.ones((L, L), bool))[None]
    return jnp.pad(mask, ((0, 0), (0, 0), (0, (size or L) - L)))


def logits_of(model: nnx.Module, tokens: jax.Array, valid: jax.Array) -> jax.Array:
    """Teacher-forced next-token logits: ``tokens, valid [B, T]`` -> ``[B, T, V]`` (position t predicts t + 1)."""
    return model(tokens, positions_of(valid), None, causal_mask(valid))[0]


def picked_logprobs(logits: jax.Array, tokens: jax.Array, valid: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``logits [B, T, V]``, ``tokens, valid [B, T]`` -> ``[B, T]``: log p(tokens[t] | tokens[<t]) under
    ``softmax(logits / temperature)`` (0 at t = 0 and at padding)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0))) * valid


def token_logprobs(model: nnx.Module, tokens: jax.Array, valid: jax.Array, temperature: float = 1.0) -> jax.Array:
    """``picked_logprobs`` of one teacher-forced pass of ``model``."""
    return picked_logprobs(logits_of(model, tokens, valid), tokens, valid, temperature)


def continuation_logprobs(model: nnx.Module, cfg, tokens: jax.Array, valid: jax.Array, start: jax.Array,
                          suffix: jax.Array, suffix_valid: jax.Array, scored_from: int = 0) -> jax.Array:
    """Score ``M`` continuations of each row's prefix from one prefill: continuation m of row b is
    ``tokens[b, :start[b, m]]`` (its valid tokens) followed by ``suffix[b, m]``'s valid tokens (one contiguous
    run); -> ``[B, M, S]``, log p of each suffix token after column ``scored_from`` given everything before it,
    as ``token_logprobs`` of the concatenation gives it (0 at padding and up to that column; the columns before
    it get no logits, so a run must start before it: IG-Search reads only the answer's log-probs).
    ``tokens, valid [B, L]``, ``start [B, M]``, ``suffix, suffix_valid [B, M, S]``.

    The prefix's keys and values come from one cached pass over each whole row (a causal model's key at
    position j reads only tokens up to j), so a row costs one pass of L tokens plus ``M`` passes of ``S``
    instead of ``M`` of ``L + S``: IG-Search's counterfactual contexts share everything before a step's
    documents. Rows run one from each batch shard at a time (a ``lax.map`` over the rows a device holds, never
    across devices: no cache leaves its device, and a device holds one row's prefill and caches at a time)."""
    B, L = tokens.shape
    M, S = suffix.shape[1:]
    size, D = L + S, scored_from
    own = jnp.tril(jnp.ones((S, S), bool))
    R = partitioning.shards("batch")
    if B % R or not 0 <= scored_from < S:
        raise ValueError(f"continuation_logprobs: {B} rows over {R} batch shards, scored_from {scored_from} of {S}")

    def block(args):   # R rows, one from each batch shard
        row_tokens, row_valid, row_start, suf, suf_valid = args
        _, cache = model(row_tokens, positions_of(row_valid), _cache(cfg, R, size), causal_mask(row_valid, size))
        prefix = row_valid[:, None, :] & (jnp.arange(L) < row_start[..., None])               # [R, M, L]
        mask = jnp.concatenate([jnp.broadcast_to(prefix[:, :, None, :], (R, M, S, L)),
                                suf_valid[:, :, None, :] & own], axis=-1)                      # [R, M, S, L + S]
        pos = jnp.maximum(jnp.sum(prefix, -1, keepdims=True) + jnp.cumsum(suf_valid, -1) - 1, 0)
        flat = lambda x: x.reshape(R * M, *x.shape[2:])                                           # noqa: E731
        tile = lambda x: flat(jnp.broadcast_to(x[:, None], (R, M, *x.shape[1:])))                # noqa: E731
        tiled = {name: {"k": tile(c["k"]), "v": tile(c["v"]), "end_index": jnp.full((R * M,), L, jnp.int32)}
                 for name, c in cache.items()}
        if D:   # the unscored columns only extend the cache (their logits are dropped unused)
            _, tiled = model(flat(suf[..., :D]), flat(pos[..., :D]), tiled, flat(mask[..., :D, :]))
        logits, _ = model(flat(suf[..., D:]), flat(pos[..., D:]), tiled, flat(mask[..., D:, :]))
        scored = picked_logprobs(logits, flat(suf[..., D:]), flat(suf_valid[..., D:]))
        return jnp.pad(scored.reshape(R, M, S - D), ((0, 0), (0, 0), (D, 0)))

    blocks = lambda x: jnp.swapaxes(x.reshape(R, B // R, *x.shape[1:]), 0, 1)                   # noqa: E731
    out = jax.lax.map(block, jax.tree.map(blocks, (tokens, valid, start, suffix, suffix_valid)))  # [B/R, R, M, S]
    return jnp.swapaxes(out, 0, 1).reshape(B, M, S)


def _cache(cfg, batch: int, size: int) -> dict:
    shape, dtype = (batch, size, cfg.num_kv_heads, cfg.head_dim), jnp.asarray(0.0, cfg.dtype).dtype
    return {f"layer_{i}": {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                           "end_index": jnp.zeros((batch,), jnp.int32)} for i in range(cfg.num_layers)}


def sample(model: nnx.Module, cfg, context: jax.Array, valid: jax.Array, rng: jax.Array, *, steps: int,
           temperature: float, stop_ids: tuple[int, ...], pad_id: int, active: jax.Array | None = None
           ) -> tuple[jax.Array, jax.Array]:
    """Continue each left-padded ``context [B, C]`` (``valid [B, C]``) by up to ``steps`` tokens with a KV
    cache: prefill all but the last token, then one token per step from it (``temperature`` 0: greedy). A row
    stops after emitting a ``stop_ids`` token (rows not ``active [B]`` emit nothing); later slots are ``pad_id``
    with log-prob 0.
    -> ``tokens [B, G], logp [B, G]``
    (log-probs under ``softmax(logits / temperature)``, 0 when greedy)."""
    B, C = context.shape
    size = C + steps
    cache = _cache(cfg, B, size)
    pos, mask = positions_of(valid), causal_mask(valid, size)
    if C > 1:   # the prefill's logits are never used (XLA drops them): [B, C, V] f32 is 100 GB at Qwen2.5's vocab
        _, cache = model(context[:, :-1], pos[:, :-1], cache, mask[:, :-1])
    logits, cache = model(context[:, -1:], pos[:, -1:], cache, mask[:, -1:])
    stops = jnp.asarray(stop_ids, jnp.int32)
    seen = jnp.pad(valid.astype(bool), ((0, 0), (0, steps)))                     # [B, size] attendable slots

    def pick(logits, key):
        logits = logits.astype(jnp.float32)
        if temperature == 0:
            return jnp.argmax(logits, -1), jnp.zeros(logits.shape[0])
        logp = jax.nn.log_softmax(logits / temperature)
        token = jax.random.categorical(key, logp)
        return token, jnp.take_along_axis(logp, token[:, None], -1)[:, 0]

    def body(carry, i):
        logits, cache, seen, alive, last = carry
        token, logp = pick(logits, jax.random.fold_in(rng, i))
        token = jnp.where(alive, token, pad_id).astype(jnp.int32)
        logp = jnp.where(alive, logp, 0.0)
        seen = seen.at[:, C + i].set(True)
        out, cache = model(token[:, None], (last + 1)[:, None], cache, seen[:, None, :])
        return (out[:, -1], cache, seen, alive & ~jnp.isin(token, stops), last + 1), (token, logp)

    alive = jnp.ones((B,), bool) if active is None else active.astype(bool)
    init = (logits[:, -1], cache, seen, alive, pos[:, -1])
    _, (tokens, logps) = jax.lax.scan(body, init, jnp.arange(steps))
    return tokens.T, logps.T

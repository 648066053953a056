"""Analytic model FLOPs per train step, per model family, and the peak table that MFU divides by.

Counting rule (the usual MFU convention, PaLM appendix B): only matrix multiplications count, a
``[m, k] @ [k, n]`` product is ``2 m k n`` FLOPs, and a train step (forward + backward) is **3x** the
forward count: the backward pass computes two products per forward one (gradients of the
activations and of the weights). Element-wise work (LayerNorm, GELU, softmax, the optimizer update)
and embedding look-ups (gathers) are not counted, and neither is rematerialisation, so MFU is the
fraction of the chip's dense peak spent on the model's own matmuls. XLA's
``compiled.cost_analysis()["flops"]`` counts everything and agrees within a few percent on the tiny
configs (``tests/test_bench.py``).

Families (each ``fn(config, batch) -> {part: forward FLOPs}``):

* ``two_tower_forward`` — ``models/two_tower.py`` (patch embedding, mixer blocks, projections, and
  the two ``[b, b]`` logit matrices of the symmetric InfoNCE loss),
* ``vit_forward`` — ``models/vit.py`` (patch conv, QKV / attention / output / MLP per block,
  pooling head), per image,
* ``text_encoder_forward`` — ``models/text_encoder.py`` (BERT family; the embedding sum is a gather),
* ``onemall_forward`` — ``models/onemall.py`` (Query-Formers, the T5 decoder; sparse MoE layers count their
  *active* FLOPs: the router and top-k experts per token, not all experts).

``PEAK_FLOPS``: dense (no 2:4 sparsity) bf16 peak per chip, from the vendors' spec sheets: TPU v4 275e12,
v5e 197e12, v5p 459e12, v6e (Trillium) 918e12 (cloud.google.com/tpu/docs/<version>); A100 312e12,
H100 SXM 989e12, H200 989e12, B200 2250e12 (NVIDIA data sheets quote twice these "with sparsity").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from models.seq2seq import moe_layers

# --- peak table -------------------------------------------------------------------------------------

# (substring of jax.Device.device_kind, lower-cased; label; dense bf16 FLOP/s per device). First match wins,
# so more specific names come first ("v5 lite" before "v5", "h100 pcie" before "h100").
PEAK_FLOPS: tuple[tuple[str, str, float], ...] = (
    ("v6 lite", "TPU v6e", 918e12),
    ("v6e", "TPU v6e", 918e12),
    ("v5 lite", "TPU v5e", 197e12),
    ("v5e", "TPU v5e", 197e12),
    ("v5p", "TPU v5p", 459e12),
    ("v5", "TPU v5p", 459e12),
    ("v4", "TPU v4", 275e12),
    ("a100", "NVIDIA A100", 312e12),
    ("h100 pcie", "NVIDIA H100 PCIe", 756e12),
    ("h100", "NVIDIA H100 SXM", 989e12),
    ("gh200", "NVIDIA GH200", 989e12),
    ("h200", "NVIDIA H200", 989e12),
    ("b200", "NVIDIA B200", 2250e12),
)


def peak_flops(device_kind: str) -> tuple[float, str] | None:
    """``(dense bf16 FLOP/s per device, label)`` for a ``jax.Device.device_kind``, or None if unknown."""
    kind = device_kind.lower()
    for needle, label, peak in PEAK_FLOPS:
        if needle in kind:
            return peak, f"{label} dense bf16 peak"
    return None


def measure_cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` jitted ``[n, n] @ [n, n]`` float32 matmuls on the default device.

    The "measured CPU matmul peak" that MFU divides by on CPU, where there is no spec-sheet number
    (and where fake devices share the host's cores, so the peak is the host's, not per device).
    """
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


# --- per-family forward counts ----------------------------------------------------------------------


def matmul(m: float, k: float, n: float) -> float:
    """FLOPs of ``[m, k] @ [k, n]``."""
    return 2.0 * m * k * n


def encoder_block_forward(tokens: float, hidden: int, heads: int, mlp_dim: int, seq: int) -> dict[str, float]:
    """One transformer block (``models/transformer.py``) over ``tokens = batch * seq`` positions."""
    head_dim = hidden // heads
    batch_heads = tokens / seq * heads
    return {
        "qkv": matmul(tokens, hidden, 3 * hidden),
        "attention": matmul(batch_heads * seq, head_dim, seq) + matmul(batch_heads * seq, seq, head_dim),
        "attn_out": matmul(tokens, hidden, hidden),
        "mlp": matmul(tokens, hidden, mlp_dim) + matmul(tokens, mlp_dim, hidden),
    }


def accumulate(total: dict[str, float], part: Mapping[str, float], times: float = 1.0, prefix: str = "") -> None:
    for k, v in part.items():
        total[prefix + k] = total.get(prefix + k, 0.0) + times * v


def two_tower_forward(cfg: Any, batch: int) -> dict[str, float]:
    """``models/two_tower.TwoTower`` + ``symmetric_info_nce`` for a batch of ``batch`` image–text pairs."""
    w, m, e = cfg.width, cfg.width * cfg.mlp_ratio, cfg.embed_dim
    patches = (cfg.image_size // cfg.patch_size) ** 2
    out: dict[str, float] = {"image/embed": matmul(batch * patches, cfg.patch_size**2 * cfg.channels, w)}
    for tower, n in (("image", patches), ("text", cfg.max_words)):
        block = {"mix": matmul(batch, w, w), "mlp": matmul(batch * n, w, m) + matmul(batch * n, m, w)}
        accumulate(out, block, cfg.depth, f"{tower}/blocks/")
        out[f"{tower}/proj"] = matmul(batch, w, e)
    out["loss/logits"] = 2 * matmul(batch, e, batch)  # a->b and b->a InfoNCE each build [b, b] logits
    return out


def vit_forward(cfg: Any, batch: int) -> dict[str, float]:
    """``models/vit.ViT`` then ``pool`` (``ViTConfig``), ``batch`` images."""
    h, s = cfg.hidden, cfg.num_tokens
    out = {"patch_embed": matmul(batch * cfg.num_patches, cfg.patch_size**2 * cfg.channels, h)}
    accumulate(out, encoder_block_forward(batch * s, h, cfg.heads, cfg.mlp_dim, s), cfg.depth, "blocks/")
    if cfg.pool == "map":  # SigLIP attention pooling: one probe query per image (its q projection is batch-free)
        out["head/kv"] = matmul(batch * s, h, 2 * h)
        out["head/attention"] = 2 * matmul(batch * cfg.heads, h // cfg.heads, s)
        out["head/out"] = matmul(batch, h, h)
        out["head/mlp"] = matmul(batch, h, cfg.mlp_dim) + matmul(batch, cfg.mlp_dim, h)
    if cfg.pooler_dense:
        out["pooler"] = matmul(batch, h, h)
    return out


def text_encoder_forward(cfg: Any, batch: int, seq_len: int, pooler: bool = False) -> dict[str, float]:
    """``models/text_encoder.TextEncoder`` over ``[batch, seq_len]`` ids (+ the BERT pooler if ``pooler``)."""
    h = cfg.hidden
    out: dict[str, float] = {}
    accumulate(out, encoder_block_forward(batch * seq_len, h, cfg.heads, cfg.mlp_dim, seq_len), cfg.depth, "blocks/")
    if pooler and cfg.pooler:
        out["pooler"] = matmul(batch, h, h)
    return out


def train_flops(forward: Mapping[str, float] | float) -> float:
    """Forward matmul FLOPs x 3: forward + backward of one train step; parts named ``frozen/...`` (a frozen
    teacher under stop_gradient: no backward) count once."""
    if not isinstance(forward, Mapping):
        return 3.0 * float(forward)
    return sum(v * (1.0 if k.startswith("frozen/") else 3.0) for k, v in forward.items())



def t5_block_forward(tokens: float, d: int, inner: int, width: float, seq: int, memory: int = 0,
                     gated: bool = True) -> dict[str, float]:
    """One T5 block (``models/seq2seq.Block``) over ``tokens = rows * seq`` positions: self-attention over
    ``seq``, cross-attention to ``memory`` positions per row (0: none; the memory's K/V projections are the
    caller's), a feed-forward ``width`` wide (a sparse layer: its active width, top_k x an expert's)."""
    out = {"self_attn": matmul(tokens, d, 4 * inner) + 2 * matmul(tokens, inner, seq),
           "mlp": matmul(tokens, d, (2 if gated else 1) * width) + matmul(tokens, width, d)}
    if memory:
        out["cross_attn"] = matmul(tokens, d, 2 * inner) + 2 * matmul(tokens, inner, memory)
    return out


def onemall_forward(cfg: Any, batch: int, lengths: Mapping[str, int], depth: int, query_len: int = 0
                    ) -> dict[str, float]:
    """``models/onemall.OneMall`` teacher-forced on ``batch`` rows (``OneMallConfig``; ``lengths``: events per
    behaviour; ``depth``: SID length; ``query_len``: the session's query when the generator encodes one).
    Sparse MoE layers count their *active* FLOPs: the router and ``top_k`` experts per token."""
    g = cfg.generator
    d, inner, k = g.d_model, g.num_heads * g.head_dim, cfg.num_queries
    gated = g.feed_forward.startswith("gated")
    out: dict[str, float] = {}
    for b, n in lengths.items():  # Query-Formers: K queries (or the last K events) over n events + the null one
        events = (k if cfg.compress == "last" else n) + 1
        out[f"{b}/qformer/memory_kv"] = cfg.qformer_layers * matmul(batch * events, d, 2 * inner)
        accumulate(out, t5_block_forward(batch * k, d, inner, g.d_ff, k, events, gated), cfg.qformer_layers,
                   f"{b}/qformer/")
    memory = k * len(lengths) + (query_len if g.encoder_layers else 0)
    if g.encoder_layers:
        accumulate(out, t5_block_forward(batch * query_len, d, inner, g.d_ff, query_len, 0, gated), g.encoder_layers,
                   "encoder/")
    sparse = set(moe_layers(g))
    for i in range(g.decoder_layers):
        moe = i in sparse  # experts are gated
        width = g.moe.d_ff * g.moe.top_k if moe else g.d_ff
        accumulate(out, t5_block_forward(batch * depth, d, inner, width, depth, memory, moe or gated), prefix="decoder/")
        accumulate(out, {"memory_kv": matmul(batch * memory, d, 2 * inner)}, prefix="decoder/")
        if i in sparse:
            accumulate(out, {"router": matmul(batch * depth, d, g.moe.num_experts)}, prefix="decoder/")
    out["head"] = matmul(batch * depth, d, g.vocab_size)
    return out

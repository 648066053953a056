"""ecomax's ViT-B/16 query-tower train step against a PyTorch reference, side by side in one process.

    .venv/bin/python benchmarks/vit_vs_torch.py [--steps 4] [--warmup 1] [--xla-flags "..."]
        [--allocator auto|system|mimalloc|jemalloc|tcmalloc]

Both sides: ViT-B/16 (224 px, patch 16, 12 x 768, exact GELU, CLS token, final LayerNorm), a 256-d
linear projection of the CLS token, in-batch InfoNCE against a fixed batch of 256-d keys
(temperature 0.07), gradients clipped at global norm ``--clip`` (1.0, ecomax's default), AdamW (lr 1e-4,
weight decay 0.05), float32, batch 8. JAX: ``models/vit.ViT`` with ``ViTConfig()`` (85,798,656
parameters), a jitted step with donated state that, as ``trainers/step.py`` does, finishes every gradient
before the update (``--no-barrier --clip 0`` shows what fusing the update into the backward costs). PyTorch:
transformers' ``ViTModel`` (no pooler; its default attention, ``sdpa``), eager, ``torch.set_num_threads``
= the CPU count.

Rounds are interleaved (a JAX step, then a torch step, each timed to completion) so that load from
other processes hits both alike; ``--warmup`` rounds (compilation, first-touch of memory) are not timed.
Prints each side's examples/s (batch / median step time) and the ratio JAX / torch.

Allocator: on this CPU glibc malloc costs JAX ~20-25% (pages handed back and faulted in every step, see
the README's "Benchmarking"). The script starts under the allocator ``ecomax`` itself would use
(launch/allocator.py: ``--allocator``, default ``$ECOMAX_ALLOCATOR`` or ``auto`` = the ``cmeel-mimalloc``
wheel with ``MIMALLOC_PURGE_DELAY=-1``, else jemalloc / tcmalloc when installed), re-executing itself
once; torch runs under the same allocator, so the comparison stays fair. ``--no-jemalloc`` is the old
spelling of ``--allocator system``.

``--xla-flags`` appends to ``XLA_FLAGS`` before JAX starts (e.g. the oneDNN / YNN fusion flags).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from launch import allocator as alloc  # noqa: E402


def reexec_under_allocator(choice: str) -> None:
    """Re-execute this script once under ``choice`` (launch/allocator.py; never loops)."""
    os.environ[alloc.ENV_SWITCH] = choice
    warning = alloc.ensure()  # does not return when it re-executes
    if warning:
        print(f"allocator: {warning}", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4, help="timed rounds (one JAX + one torch step each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch intra-op threads")
    p.add_argument("--clip", type=float, default=1.0, help="global-norm gradient clipping, both sides (0: none)")
    p.add_argument("--no-barrier", dest="barrier", action="store_false",
                   help="JAX: let XLA fuse the optimizer update into the backward pass")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before JAX starts")
    p.add_argument("--allocator", choices=alloc.CHOICES, default=alloc.requested(os.environ),
                   help="malloc for both sides (default: $ECOMAX_ALLOCATOR or auto, as ecomax itself)")
    p.add_argument("--no-jemalloc", dest="allocator", action="store_const", const="system",
                   help="the old spelling of --allocator system")
    p.add_argument("--only", choices=("jax", "torch"), default=None,
                   help="time one side alone (no interleaving: the other framework's memory is not in the process)")
    p.add_argument("--json", default=None, help="write the timings here")
    return p.parse_args(argv)


# --- JAX / ecomax ------------------------------------------------------------------------------------


def jax_side(batch: int, images_nhwc, keys, clip: float, barrier: bool):
    """``(step(), n_params)``: ``step()`` runs one train step and blocks on its result."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    sys.path.insert(0, str(REPO))
    from models.vit import ViT, ViTConfig

    cfg = ViTConfig()

    class QueryTower(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.vit = ViT(cfg, rngs=rngs)
            self.proj = nnx.Linear(cfg.hidden, 256, rngs=rngs)

    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(QueryTower(nnx.Rngs(0)))
    tx = optax.adamw(1e-4, weight_decay=0.05)
    if clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip), tx)
    opt_state = tx.init(params)

    def loss_fn(p, images, k):
        model = nnx.merge(graphdef, p)
        q = model.proj(model.vit.pooled(images))
        q = q / jnp.linalg.norm(q, axis=-1, keepdims=True)
        logits = q @ k.T / 0.07
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.diagonal(logits))

    def train_step(p, o, images, k):
        loss, grads = jax.value_and_grad(loss_fn)(p, images, k)
        if barrier:
            grads = jax.lax.optimization_barrier(grads)
        updates, o = tx.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    train_step = jax.jit(train_step, donate_argnums=(0, 1))
    x, k = jnp.asarray(images_nhwc), jnp.asarray(keys)
    state = {"p": params, "o": opt_state}

    def step() -> float:
        state["p"], state["o"], loss = train_step(state["p"], state["o"], x, k)
        return float(loss)  # blocks

    n_params = sum(int(v.size) for v in jax.tree.leaves(params))
    return step, n_params


# --- PyTorch reference ------------------------------------------------------------------------------


def torch_side(batch: int, images_nchw, keys, threads: int, clip: float):
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072, image_size=224, patch_size=16, hidden_act="gelu",
                                    layer_norm_eps=1e-6, qkv_bias=True)
    vit = transformers.ViTModel(config, add_pooling_layer=False)
    proj = torch.nn.Linear(768, 256)
    model = torch.nn.ModuleDict({"vit": vit, "proj": proj}).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    x, k = torch.from_numpy(images_nchw), torch.from_numpy(keys)
    labels = torch.arange(batch)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        q = model["proj"](model["vit"](pixel_values=x).last_hidden_state[:, 0])
        q = torch.nn.functional.normalize(q, dim=-1)
        loss = torch.nn.functional.cross_entropy(q @ k.T / 0.07, labels)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        return loss.item()

    n_params = sum(p.numel() for p in model.parameters())
    return step, n_params, getattr(vit.config, "_attn_implementation", "?")


# --- main -------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    reexec_under_allocator(args.allocator)
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {args.xla_flags}".strip()
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.normal(size=(args.batch, 224, 224, 3)).astype(np.float32)
    keys = rng.normal(size=(args.batch, 256)).astype(np.float32)
    keys /= np.linalg.norm(keys, axis=-1, keepdims=True)

    t0 = time.perf_counter()
    sides, attn = {}, "-"
    if args.only != "torch":
        sides["jax"], n = jax_side(args.batch, images, keys, args.clip, args.barrier)
        print(f"ecomax ViT-B/16 + proj {n:,} params", flush=True)
    if args.only != "jax":
        sides["torch"], n, attn = torch_side(args.batch, np.ascontiguousarray(images.transpose(0, 3, 1, 2)), keys,
                                             args.threads, args.clip)
        print(f"transformers ViTModel + proj {n:,} params (attention: {attn})", flush=True)
    print(f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    allocator = alloc.current()
    print(f"clip {args.clip}; JAX update after every gradient: {args.barrier}", flush=True)
    print(f"{alloc.describe(allocator)}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; torch threads {args.threads}; "
          f"load average before: {os.getloadavg()[0]:.2f}", flush=True)

    times = {name: [] for name in sides}
    for r in range(args.warmup + args.steps):
        for name, step in sides.items():
            t = time.perf_counter()
            loss = step()
            dt = time.perf_counter() - t
            timed = r >= args.warmup
            if timed:
                times[name].append(dt)
            print(f"round {r} {'timed' if timed else 'warm-up'} {name:5s} {dt:7.3f} s  loss {loss:.4f}", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    eps = {k: args.batch / v for k, v in med.items()}
    ratio = eps["jax"] / eps["torch"] if len(eps) == 2 else None
    print(f"\nexamples/s (batch {args.batch} / median of {args.steps} steps): "
          + "   ".join(f"{k} {v:.3f}" for k, v in eps.items())
          + (f"   ratio JAX/torch {ratio:.3f}" if ratio else ""))
    print(f"load average after: {os.getloadavg()[0]:.2f} (this machine is shared: differences under ~5% are noise)")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "allocator": allocator, "clip": args.clip, "barrier": args.barrier,
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "batch": args.batch,
            "times_s": times, "median_s": med, "examples_per_s": eps, "ratio": ratio,
            "torch_attention": attn, "load_average_end": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

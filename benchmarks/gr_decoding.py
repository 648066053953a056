"""Generative-retrieval decoding, side by side in one run: trie-constrained beam search (models/beam_search.py)
against the unconstrained floor, a host-side Python trie and a brute-force check against every SID.

    python benchmarks/gr_decoding.py            # 1M SIDs (3 levels x 256 + a dedup digit), beam 50, batch 8 and 64
    python benchmarks/gr_decoding.py --quick    # seconds: a smoke test with small sizes

The table is random but clustered like a real RQ table: the first code is Zipf-distributed (popular
clusters), each cluster has its own Zipf over its children, so some prefixes hold thousands of items and
the dedup digit reaches a few tens (capped by ``--max-dup``: the rows above it re-draw their last code, then
the last two, ...).

Methods (all the same stand-in decoder and the same ``select``/``reorder`` of ``models.beam_search``):

* ``constrained``: ``beam_search(..., constraint=TrieConstraint(trie))``, one jit, nothing on the host;
* ``unconstrained``: the same without a constraint (the floor);
* ``host-trie``: a Python dict ``prefix tuple -> allowed codes`` consulted per level: the step's log-probs
  come back to the host, the mask is built in numpy beam by beam, the masked log-probs go back to the
  device for the jitted top-k and cache reorder;
* ``brute-force``: one jit as well, the constraint being "some table row starts with this prefix + code",
  computed by comparing every beam's prefix against all N rows (in chunks; a one-hot matmul turns matching
  rows into allowed codes).

The decoder is pluggable: a ``Decoder`` gives ``init(rng, sizes) -> params``, ``start(params, batch, rng) ->
(context, cache)`` (leaves ``[B, ...]``) and ``step(params, context, cache, prev [N], level) -> (log_probs
[N, K_level], cache)``. The stand-in is an embedding of the previous code + one hidden dense layer (d=128,
fed with the query context and a sum over a per-level hidden-state cache that the search reorders) + a
projection to ``K_level``. The T5 decoder (``models/seq2seq.py``: ``model.start(tokens, mask, max_len) ->
(context, cache)``, ``model.step(context, cache, token [B], position) -> (logits [B, V], cache)``) drops in
through ``models.beam_search.code_step``.

ms/step = median seconds of one whole search / D levels; queries/s = batch / median seconds. Rounds are
interleaved (every method once per round) so that load from other processes hits all alike; within a round
each method first runs ``--rewarm`` untimed times (a server decodes back to back; without it the method
timed right after the Python loop of host-trie or the seconds of brute-force may pay for cold caches and a
parked thread pool). ``uptime`` is printed before and after.

Full runs (2026-12-01, 2-core AMD EPYC shared with another job, load average 5-7 throughout; 1M SIDs,
sizes (256, 256, 256, 32), beam 50; ms/step and the ratio to unconstrained in the same run):

    batch  constrained     unconstrained  host-trie      brute-force
        8  2.08 (1.29x)    1.62           7.34 (4.54x)   3141 (1942x)     --rewarm 1
       64  16.01 (1.35x)   11.90          36.36 (3.06x)  24099 (2025x)    --rewarm 1
        8  3.11 (1.71x)    1.82           7.81 (4.29x)   3544 (1946x)     --rewarm 0
       64  15.97 (0.94x)   17.03          51.30 (3.01x)  37554 (2206x)    --rewarm 0

host-trie / constrained = 2.3-3.5x. Under this load the constrained/unconstrained ratio moves by +-30%
between runs; read it with the load. On a CPU the "device" is the host, so the host trie's round trips
are memory copies: its cost is the Python loop over the B*W beams.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from data_pipelines.sid.table import dedup_digit  # noqa: E402
from data_pipelines.sid.trie import TrieConstraint, build_trie  # noqa: E402
from models import beam_search as bs  # noqa: E402


# ----------------------------------------------------------------------------------------------- the table

def zipf(rng: np.random.Generator, n: int, k: int, s: float) -> np.ndarray:
    """``n`` draws from ``p(r) ~ 1 / (r + 1)^s`` over ``0 .. k-1``."""
    p = 1.0 / np.arange(1, k + 1) ** s
    return rng.choice(k, size=n, p=p / p.sum())


def clustered_table(n: int, levels: int, k: int, max_dup: int, seed: int = 0) -> np.ndarray:
    """``[n, levels + 1]`` int32: clustered codes (each prefix its own Zipf over its children, a random
    permutation of the ranks) + the dedup digit, which stays below ``max_dup``."""
    rng = np.random.default_rng(seed)
    codes = np.zeros((n, levels), np.int64)
    codes[:, 0] = rng.permutation(k)[zipf(rng, n, k, 1.0)]
    for level in range(1, levels):
        key = codes[:, :level] @ (k ** np.arange(level)[::-1])                     # the parent prefix
        shift, stride = (key * 2654435761) % k, 2 * ((key * 40503) % (k // 2)) + 1  # a bijection per parent
        codes[:, level] = (shift + stride * zipf(rng, n, k, 0.8 if level < levels - 1 else 0.5)) % k
    for i in range(60):                              # re-draw the last code, then the last two, ... of the excess
        dup = dedup_digit(codes)
        over = np.flatnonzero(dup >= max_dup)
        if not len(over):
            break
        first = max(0, levels - 1 - i // 10)
        codes[over, first:] = rng.integers(0, k, (len(over), levels - first))
    dup = dedup_digit(codes)
    if dup.max() >= max_dup:
        raise RuntimeError(f"clustered_table: could not cap the dedup digit at {max_dup}")
    return np.concatenate([codes, dup[:, None]], 1).astype(np.int32)


# ------------------------------------------------------------------------------------------ the decoders

@dataclasses.dataclass(frozen=True)
class StandInDecoder:
    """Embedding of the previous code + one hidden dense layer + a projection to ``K_level`` per level."""

    sizes: tuple[int, ...]
    d: int = 128

    def init(self, rng: jax.Array) -> dict:
        keys = iter(jax.random.split(rng, 4 + 2 * len(self.sizes)))
        normal = lambda shape, scale: scale * jax.random.normal(next(keys), shape, jnp.float32)  # noqa: E731
        return {"start": normal((self.d,), 1.0),
                "embed": [normal((k, self.d), 1.0) for k in self.sizes[:-1]],        # level l + 1 reads code l
                "w": normal((self.d, self.d), self.d ** -0.5), "b": jnp.zeros(self.d),
                "proj": [normal((self.d, k), 3 * self.d ** -0.5) for k in self.sizes]}

    def start(self, params: dict, batch: int, rng: jax.Array) -> tuple[Any, Any]:
        """The per-query context ``[B, d]`` and an empty cache of hidden states ``[B, D, d]``."""
        context = jax.random.normal(rng, (batch, self.d), jnp.float32)
        return context, {"h": jnp.zeros((batch, len(self.sizes), self.d), jnp.float32)}

    def step(self, params: dict, context: jax.Array, cache: dict, prev: jax.Array, level: int):
        """``prev [N]`` (-1 at level 0) -> ``(log_probs [N, K_level], cache)``."""
        x = jnp.broadcast_to(params["start"], context.shape) if level == 0 else params["embed"][level - 1][prev]
        h = jnp.tanh((x + context + cache["h"].sum(axis=1)) @ params["w"] + params["b"])
        cache = {"h": cache["h"].at[:, level].set(h)}
        return jax.nn.log_softmax(h @ params["proj"][level], axis=-1), cache


@dataclasses.dataclass(frozen=True)
class NullDecoder:
    """No network: fixed per-level log-probs, nudged by the previous code so beams differ. What is left of
    a step is the search itself (top-k, cache reorder) and the constraint: timing it isolates the cost of
    the constraint mechanism, as STATIC's per-step anchor does."""

    sizes: tuple[int, ...]

    def init(self, rng: jax.Array) -> dict:
        keys = jax.random.split(rng, len(self.sizes))
        return {"lp": [jax.nn.log_softmax(3.0 * jax.random.normal(key, (k,))) for key, k in zip(keys, self.sizes)]}

    def start(self, params: dict, batch: int, rng: jax.Array) -> tuple[Any, Any]:
        return jnp.zeros((batch, 1), jnp.float32), {"h": jnp.zeros((batch, 1), jnp.float32)}

    def step(self, params: dict, context: jax.Array, cache: dict, prev: jax.Array, level: int):
        nudge = 1e-3 * (prev[:, None] % 7).astype(jnp.float32)
        return params["lp"][level][None, :] + nudge + context[:, :1], cache


@dataclasses.dataclass(frozen=True)
class T5Decoder:
    """The generative retriever's own model (``models/seq2seq.py``, TIGER's sizes: 4 + 4 layers, d 128, 6 x 64
    heads, MLP 1024) over ``text`` query pieces + the SID code blocks, queries of ``query_len`` random pieces,
    decoded with its KV cache through ``models.gr.code_step``."""

    sizes: tuple[int, ...]
    text: int = 2000
    query_len: int = 16

    @property
    def vocab(self):
        from models.gr import SIDVocab

        return SIDVocab(self.text, self.sizes)

    def model(self, params):
        from flax import nnx

        return nnx.merge(self._graphdef, params)

    @functools.cached_property
    def _graphdef(self):
        return self._split[0]

    @functools.cached_property
    def _split(self):
        from flax import nnx

        from models.seq2seq import Seq2Seq, tiger

        vocab = self.vocab
        cfg = tiger(vocab_size=-(-vocab.size // 128) * 128, decoder_start_token=vocab.start)
        with nnx.use_eager_sharding(False):
            return nnx.split(Seq2Seq(cfg, rngs=nnx.Rngs(0)))

    def init(self, rng: jax.Array) -> Any:
        return self._split[1]

    def start(self, params, batch: int, rng: jax.Array) -> tuple[Any, Any]:
        tokens = jax.random.randint(rng, (batch, self.query_len), 4, self.text)
        return jax.jit(lambda p, t: self.model(p).start(t, jnp.ones_like(t, bool), len(self.sizes)))(params, tokens)

    def step(self, params, context, cache, prev: jax.Array, level: int):
        from models.gr import code_step

        return code_step(self.model(params), self.vocab)(context, cache, prev, level)


# -------------------------------------------------------------------------------------------- the methods

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BruteForceConstraint:
    """The constraint by exhaustive comparison: a prefix is its mixed-radix key; ``allowed`` compares every
    beam's key against the depth-``level`` key of every table row (``[N, chunk]`` at a time) and turns the
    matching rows' next codes into a mask with a one-hot matmul. ``keys, codes [D, rows]``."""

    keys: jax.Array
    codes: jax.Array
    sizes: tuple[int, ...] = dataclasses.field(metadata={"static": True})
    chunk: int = dataclasses.field(metadata={"static": True})

    @classmethod
    def of(cls, table: np.ndarray, sizes, chunk: int) -> "BruteForceConstraint":
        n, depth = table.shape
        pad = -n % chunk
        keys = np.zeros((depth, n), np.int64)
        for level in range(1, depth):
            keys[level] = keys[level - 1] * sizes[level - 1] + table[:, level - 1]
        assert keys.max() < 2 ** 31, "brute force: prefix keys overflow int32"
        keys = np.pad(keys, ((0, 0), (0, pad)), constant_values=-2)                     # never matches
        codes = np.pad(table.T, ((0, 0), (0, pad)))
        return cls(jnp.asarray(keys, jnp.int32), jnp.asarray(codes, jnp.int32), tuple(sizes), chunk)

    def allowed(self, level: int, prefix: jax.Array) -> jax.Array:
        k = self.sizes[level]
        keys = self.keys[level].reshape(-1, self.chunk)
        codes = self.codes[level].reshape(-1, self.chunk)

        def add(hits, chunk):
            key, code = chunk
            match = (prefix[:, None] == key[None]).astype(jnp.float32)                   # [N, chunk]
            return hits + match @ jax.nn.one_hot(code, k, dtype=jnp.float32), None      # [N, K]

        hits, _ = jax.lax.scan(add, jnp.zeros((prefix.shape[0], k), jnp.float32), (keys, codes))
        return (hits > 0) & (prefix >= 0)[:, None]

    def advance(self, level: int, prefix: jax.Array, code: jax.Array) -> jax.Array:
        return jnp.where(prefix >= 0, prefix * self.sizes[level] + code, -1)


def jitted_search(decoder, batch: int, beams: int):
    """``(params, context, cache, constraint) -> BeamResult``, one jit."""

    def run(params, context, cache, constraint):
        step = lambda c, k, prev, level: decoder.step(params, c, k, prev, level)  # noqa: E731
        return bs.beam_search(step, context, cache, batch=batch, beams=beams, sizes=decoder.sizes,
                              constraint=constraint)

    return jax.jit(run)


def host_prefix_dict(table: np.ndarray) -> list[dict[tuple, np.ndarray]]:
    """Per level, ``prefix tuple -> allowed codes`` (a Python dict, as a host-side decoder keeps it)."""
    out = []
    for level in range(table.shape[1]):
        rows = np.unique(table[:, :level + 1], axis=0)
        starts = np.flatnonzero(np.r_[True, (rows[1:, :level] != rows[:-1, :level]).any(axis=1)]) if level else [0]
        ends = list(starts[1:]) + [len(rows)]
        out.append({tuple(rows[s, :level].tolist()): rows[s:e, level].copy() for s, e in zip(starts, ends)})
    return out


class HostTrieSearch:
    """Beam search whose constraint is a Python dict on the host, consulted once per level."""

    def __init__(self, decoder, batch: int, beams: int, prefixes: list[dict]):
        self.decoder, self.batch, self.beams, self.prefixes = decoder, batch, beams, prefixes
        self.start = jax.jit(lambda c, k: bs.repeat_beams((c, k), beams))
        self.steps = [jax.jit(functools.partial(self._step, level=level)) for level in range(len(decoder.sizes))]
        self.select = jax.jit(self._select)

    def _step(self, params, context, cache, prev, level):
        return self.decoder.step(params, context, cache, prev, level)

    @staticmethod
    def _select(scores, log_probs, cache):
        scores, parent, code = bs.select(scores, log_probs)
        return scores, parent, code, bs.reorder(cache, parent)

    def __call__(self, params, context, cache, constraint=None):
        b, w = self.batch, self.beams
        context, cache = self.start(context, cache)
        scores = bs.initial_scores(b, w)
        codes = np.zeros((b, w, 0), np.int32)
        prev = jnp.full(b * w, -1, jnp.int32)
        for level, k in enumerate(self.decoder.sizes):
            log_probs, cache = self.steps[level](params, context, cache, prev)
            log_probs = np.asarray(log_probs)                                          # to the host
            mask = np.zeros((b * w, k), bool)
            table = self.prefixes[level]
            for i, prefix in enumerate(map(tuple, codes.reshape(b * w, level).tolist())):
                mask[i, table.get(prefix, ())] = True
            masked = jnp.asarray(np.where(mask, log_probs, -np.inf).astype(np.float32))  # back to the device
            scores, parent, code, cache = self.select(scores, masked, cache)
            parent, code_h = np.asarray(parent), np.asarray(code)
            codes = np.concatenate([np.take_along_axis(codes, parent[:, :, None], 1), code_h[:, :, None]], 2)
            prev = code.reshape(-1)
        live = np.isfinite(np.asarray(scores))
        return bs.BeamResult(np.where(live[:, :, None], codes, -1), scores, None)


# ------------------------------------------------------------------------------------------------- timing

def block(result):
    jax.block_until_ready([x for x in result if x is not None and not isinstance(x, np.ndarray)])
    return result


def machine() -> str:
    model = platform.processor() or "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc {_nproc()}), {model}; jax {jax.__version__}, {jax.devices()[0].platform}"


def _nproc() -> str:
    try:
        return subprocess.run(["nproc"], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def uptime() -> str:
    la = os.getloadavg()
    return f"load average {la[0]:.2f}, {la[1]:.2f}, {la[2]:.2f}"


def check_valid(result, table_set: set, name: str) -> float:
    codes = np.asarray(result.codes).reshape(-1, np.asarray(result.codes).shape[-1])
    live = (codes >= 0).all(axis=1)
    ok = sum(tuple(r) in table_set for r in codes[live].tolist())
    return ok / max(1, live.sum())


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    ap.add_argument("--items", type=int, default=1_000_000)
    ap.add_argument("--codes", type=int, default=256, help="K of each of the --levels levels")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--max-dup", type=int, default=32, help="the dedup digit stays below this")
    ap.add_argument("--beams", type=int, default=50)
    ap.add_argument("--batches", default="8,64")
    ap.add_argument("--runs", type=int, default=5, help="timed rounds (median); one warm-up round before")
    ap.add_argument("--rewarm", type=int, default=1,
                    help="untimed runs of a method right before each of its timed runs (not brute-force)")
    ap.add_argument("--dense-levels", type=int, default=3, help="trie levels stored as dense tables")
    ap.add_argument("--brute-runs", type=int, default=2, help="timed rounds of brute-force (it is slow)")
    ap.add_argument("--brute-chunk", type=int, default=8192)
    ap.add_argument("--methods", default="constrained,unconstrained,host-trie,brute-force")
    ap.add_argument("--decoder", default="stand-in", choices=("stand-in", "t5", "null"),
                    help="stand-in: one dense layer; t5: the GR model at TIGER's sizes (models/seq2seq.py); "
                         "null: no network, the constraint mechanism's own cost")
    args = ap.parse_args(argv)
    if args.quick:
        args.items, args.codes, args.max_dup, args.beams, args.batches, args.runs = 20_000, 32, 12, 10, "4", 3
        args.brute_runs, args.brute_chunk = 2, 4096
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")

    print(f"machine: {machine()}")
    print(f"before: {uptime()} (the box may be shared with other jobs)")
    t0 = time.perf_counter()
    table = clustered_table(args.items, args.levels, args.codes, args.max_dup)
    sizes = tuple([args.codes] * args.levels + [int(table[:, -1].max()) + 1])
    trie = build_trie(table, sizes, dense_levels=min(args.dense_levels, len(sizes)))
    n_prefix = [len(np.unique(table[:, :l + 1], axis=0)) for l in range(len(sizes))]
    print(f"table: {len(table):,} SIDs, sizes {sizes}, distinct prefixes per depth {n_prefix}, "
          f"max degree {trie.max_degree}, dense levels {trie.dense_levels} (built in {time.perf_counter() - t0:.1f} s)")
    constraint = jax.device_put(TrieConstraint(trie))
    brute = BruteForceConstraint.of(table, sizes, args.brute_chunk) if "brute-force" in methods else None
    prefixes = host_prefix_dict(table) if "host-trie" in methods else None
    table_set = {tuple(r) for r in table.tolist()}
    decoder = {"stand-in": StandInDecoder, "t5": T5Decoder, "null": NullDecoder}[args.decoder](sizes)
    print(f"decoder: {args.decoder}")
    params = decoder.init(jax.random.key(0))

    rows = []
    for batch in batches:
        context, cache = decoder.start(params, batch, jax.random.key(batch))
        search = jitted_search(decoder, batch, args.beams)
        runners = {"constrained": lambda: search(params, context, cache, constraint),
                   "unconstrained": lambda: search(params, context, cache, None),
                   "host-trie": functools.partial(HostTrieSearch(decoder, batch, args.beams, prefixes),
                                                  params, context, cache) if prefixes else None,
                   "brute-force": lambda: search(params, context, cache, brute)}
        times = {m: [] for m in methods}
        results = {}
        for m in methods:                                    # warm-up: compile
            t = time.perf_counter()
            results[m] = block(runners[m]())
            print(f"  batch {batch} {m}: warm-up {time.perf_counter() - t:.2f} s", flush=True)
        for r in range(args.runs):
            for m in methods:
                if m == "brute-force" and r >= args.brute_runs:
                    continue
                if m != "brute-force":
                    for _ in range(args.rewarm):                 # back to back, as a server runs it
                        block(runners[m]())
                t = time.perf_counter()
                block(runners[m]())
                times[m].append(time.perf_counter() - t)
        same = {m: np.array_equal(np.asarray(results[m].codes), np.asarray(results["constrained"].codes))
                for m in methods if m in ("host-trie", "brute-force") and "constrained" in methods}
        for m in methods:
            med = statistics.median(times[m])
            rows.append(dict(batch=batch, method=m, s=med, runs=len(times[m]),
                             valid=check_valid(results[m], table_set, m), same=same.get(m)))
    print(f"after: {uptime()}")

    what = f"stand-in decoder d={decoder.d}" if args.decoder == "stand-in" else {
        "t5": "T5 decoder (TIGER sizes, KV cache)",
        "null": "null decoder (no network: the search and its constraint alone)"}[args.decoder]
    print(f"\nbeam {args.beams}, D = {len(sizes)} levels, {what}; median of the timed rounds")
    head = f"{'batch':>5} {'method':<14} {'ms/step':>9} {'queries/s':>10} {'x uncon.':>9} {'host/this':>9} " \
           f"{'valid':>6} {'=constr.':>8} {'runs':>4}"
    print(head + "\n" + "-" * len(head))
    for row in rows:
        base = {r["method"]: r["s"] for r in rows if r["batch"] == row["batch"]}
        ratio = f"{row['s'] / base['unconstrained']:.2f}" if "unconstrained" in base else "-"
        host = f"{base['host-trie'] / row['s']:.1f}" if "host-trie" in base and row["method"] == "constrained" else ""
        same = "" if row["same"] is None else ("yes" if row["same"] else "no")
        print(f"{row['batch']:>5} {row['method']:<14} {1e3 * row['s'] / len(sizes):>9.2f} "
              f"{row['batch'] / row['s']:>10.1f} {ratio:>9} {host:>9} {100 * row['valid']:>5.0f}% {same:>8} "
              f"{row['runs']:>4}")


if __name__ == "__main__":
    main()

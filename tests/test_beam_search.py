"""Beam search over SIDs: against a brute-force oracle (every valid SID scored by teacher forcing), 100%
valid under a trie, the unconstrained global top-W, 8 sharded devices = one, the cache reorder, and the
leaf -> items rule."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from data_pipelines.sid.table import dedup_digit
from data_pipelines.sid import trie as trie_lib
from data_pipelines.sid.trie import TrieConstraint, accepts, advance, allowed, build_trie, children, leaves_to_items
from models import beam_search as bs

SIZES = (4, 5, 3)
RADIX = 8  # > every K_l: a mixed-radix score, see ``lexicographic_step``


def _hash(*xs):
    """A fixed pseudo-random float in [0, 1) per integer tuple: exact uint32 arithmetic (the same under jit
    and eagerly, unlike a float ``sin`` hash), elementwise, jittable."""
    h = jnp.uint32(2166136261)
    for x in xs:
        h = (h ^ jnp.asarray(x).astype(jnp.int32).astype(jnp.uint32)) * jnp.uint32(16777619)
        h = h ^ (h >> 13)
        h = h * jnp.uint32(0x5BD1E995)
        h = h ^ (h >> 15)
    return (h >> 8).astype(jnp.float32) / float(1 << 24)


def _path_step(kind):
    """A test model whose output depends on the whole path, read from its cache ``{"path": [N, D]}``
    (written one code per step), and on the query ``context {"q": [N]}``.

    ``random``: tie-free float "log-probs". ``lexicographic``: level ``l`` scores code ``k`` by minus its rank
    in a random permutation (per query and prefix) times ``RADIX^(D-1-l)``: exact integers, every SID a distinct
    score, and earlier levels dominate, so beam search is exact for every W (top-W prefixes contain the
    prefixes of the top-W SIDs)."""

    def step(context, cache, prev, level):
        path = cache["path"]
        if level > 0:
            path = path.at[:, level - 1].set(prev)
        key = jnp.zeros(prev.shape, jnp.int32)
        for j in range(level):
            key = key * 16 + path[:, j] + 1
        k = jnp.arange(SIZES[level])[None]
        u = _hash(key[:, None], context["q"][:, None], k, level)
        if kind == "random":
            out = jnp.log(0.05 + u)
        else:
            rank = jnp.argsort(jnp.argsort(u, axis=1), axis=1)
            out = -(rank * RADIX ** (len(SIZES) - 1 - level)).astype(jnp.float32)
        return out, {"path": path}

    return step


def _state(batch):
    return {"q": jnp.arange(batch, dtype=jnp.int32) * 3 + 1}, {"path": jnp.full((batch, len(SIZES)), -1, jnp.int32)}


def _oracle(step, sids, batch):
    """Teacher-forced scores of ``sids [M, D]`` for every query: ``[B, M]``."""
    m = len(sids)
    context, cache = _state(batch)
    context, cache = bs.repeat_beams(context, m), bs.repeat_beams(cache, m)
    codes = jnp.tile(jnp.asarray(sids, jnp.int32), (batch, 1))
    prev, total = jnp.full(batch * m, -1, jnp.int32), jnp.zeros(batch * m)
    for level in range(len(SIZES)):
        lp, cache = step(context, cache, prev, level)
        total = total + lp[jnp.arange(batch * m), codes[:, level]]
        prev = codes[:, level]
    return np.asarray(total).reshape(batch, m)


def _table(seed, n):
    rng = np.random.default_rng(seed)
    every = np.array(list(itertools.product(*map(range, SIZES))))
    return every[np.sort(rng.choice(len(every), n, replace=False))]


@functools.partial(jax.jit, static_argnames=("step", "batch", "beams", "sizes"))
def _search(step, context, cache, constraint, *, batch, beams, sizes=SIZES):
    return bs.beam_search(step, context, cache, batch=batch, beams=beams, sizes=sizes, constraint=constraint)


def _max_live_prefixes(table):
    return max(len({tuple(r[:level + 1]) for r in table.tolist()}) for level in range(table.shape[1]))


@pytest.mark.parametrize("dense_levels,n,kind", [(0, 20, "random"), (1, 60, "random"), (3, 40, "random"),
                                                 (1, 20, "lexicographic"), (0, 60, "lexicographic")])
def test_constrained_beam_equals_oracle_when_wide(dense_levels, n, kind):
    """W >= the number of valid prefixes at every depth: the search is exhaustive, so it returns every
    valid SID sorted by its teacher-forced score, then dead beams."""
    table = _table(n + dense_levels, n)
    trie = TrieConstraint(build_trie(table, SIZES, dense_levels=dense_levels))
    step, batch = _path_step(kind), 3
    beams = _max_live_prefixes(table) + 2                                   # > n: two dead beams
    out = _search(step, *_state(batch), trie, batch=batch, beams=beams)
    oracle = _oracle(step, table, batch)
    for b in range(batch):
        order = np.argsort(-oracle[b], kind="stable")
        np.testing.assert_array_equal(np.asarray(out.codes[b, :n]), table[order])
        np.testing.assert_allclose(np.asarray(out.scores[b, :n]), oracle[b, order], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.leaves[b, :n]), order)  # leaf id = lexicographic rank
    assert np.isneginf(np.asarray(out.scores[:, n:])).all()
    assert (np.asarray(out.codes[:, n:]) == -1).all() and (np.asarray(out.leaves[:, n:]) == -1).all()


@pytest.mark.parametrize("dense_levels,beams", [(0, 1), (2, 3), (0, 7)])
def test_constrained_beam_is_the_oracle_top_w_where_beam_search_is_exact(dense_levels, beams):
    table = _table(7, 40)
    trie = TrieConstraint(build_trie(table, SIZES, dense_levels=dense_levels))
    step, batch = _path_step("lexicographic"), 4
    out = _search(step, *_state(batch), trie, batch=batch, beams=beams)
    oracle = _oracle(step, table, batch)
    for b in range(batch):
        order = np.argsort(-oracle[b])[:beams]
        np.testing.assert_array_equal(np.asarray(out.codes[b]), table[order])
        np.testing.assert_array_equal(np.asarray(out.scores[b]), oracle[b, order])


def _prefers_invalid(context, cache, prev, level):
    """Unconstrained, this model wants code 0 at every level; no SID of the table below has a 0."""
    k = SIZES[level]
    lp = jnp.where(jnp.arange(k) == 0, 0.0, -5.0 - _hash(prev[:, None], jnp.arange(k)[None], level))
    return jnp.broadcast_to(lp, (prev.shape[0], k)), cache


@pytest.mark.parametrize("dense_levels", [0, 1])
def test_every_returned_sid_is_in_the_trie_even_when_the_model_prefers_invalid_codes(dense_levels):
    every = np.array(list(itertools.product(*map(range, SIZES))))
    table = every[(every != 0).all(axis=1)][::3]                              # 8 SIDs, none with a 0
    trie = build_trie(table, SIZES, dense_levels=dense_levels)
    context, cache = _state(2)
    free = _search(_prefers_invalid, context, cache, None, batch=2, beams=5)
    assert (np.asarray(free.codes)[:, 0] == 0).all()                          # the model's favourite: invalid
    assert not np.asarray(accepts(trie, free.codes[:, 0])).any()
    for beams in (5, 12):
        out = _search(_prefers_invalid, context, cache, TrieConstraint(trie), batch=2, beams=beams)
        live = np.isfinite(np.asarray(out.scores))
        assert live.sum(axis=1).tolist() == [min(beams, len(table))] * 2
        assert np.asarray(accepts(trie, out.codes[live])).all()               # 100% valid


@pytest.mark.parametrize("kind,beams", [("random", 60), ("lexicographic", 60), ("lexicographic", 6)])
def test_unconstrained_beam_is_the_global_top_w(kind, beams):
    """60 = every code tuple (exhaustive); with the lexicographic model also a narrow beam is exact."""
    every = np.array(list(itertools.product(*map(range, SIZES))))
    step, batch = _path_step(kind), 2
    out = _search(step, *_state(batch), None, batch=batch, beams=beams)
    oracle = _oracle(step, every, batch)
    for b in range(batch):
        order = np.argsort(-oracle[b], kind="stable")[:beams]
        np.testing.assert_array_equal(np.asarray(out.codes[b]), every[order])
        np.testing.assert_allclose(np.asarray(out.scores[b]), oracle[b, order], rtol=1e-5, atol=1e-5)
    assert (np.asarray(out.leaves) == -1).all()


def test_sharded_over_8_devices_equals_one_device():
    assert jax.device_count() >= 8
    table = _table(3, 50)
    trie = TrieConstraint(build_trie(table, SIZES, dense_levels=1))
    step, batch, beams = _path_step("random"), 16, 6
    context, cache = _state(batch)
    one = jax.device_get(_search(step, context, cache, trie, batch=batch, beams=beams))
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rows, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    context, cache = jax.device_put((context, cache), rows)
    trie = jax.device_put(trie, rep)
    fn = jax.jit(lambda c, k, t: bs.beam_search(step, c, k, batch=batch, beams=beams, sizes=SIZES, constraint=t),
                 in_shardings=(rows, rows, rep), out_shardings=rows)
    out = fn(context, cache, trie)
    assert out.codes.sharding.spec == P("data") and len(out.codes.sharding.device_set) == 8
    for got, want in zip(jax.device_get(out), one):
        np.testing.assert_array_equal(got, want)


def _recording_step(context, cache, prev, level):
    """Its cache is the path so far; the log-probs read the cache, and ``prev`` must be the last code there."""
    path = cache["path"]
    if level > 0:
        path = path.at[:, level - 1].set(prev)
    key = sum((path[:, j] + 1) * 16 ** j for j in range(level)) if level else jnp.zeros_like(prev)
    lp = jnp.log(0.05 + _hash(key[:, None], jnp.arange(SIZES[level])[None], context["q"][:, None], level))
    return lp, {"path": path, "steps": cache["steps"] + 1}


def test_cache_is_reordered_with_the_beams(monkeypatch):
    """The returned codes re-scored by teacher forcing match the search's scores only if each beam's cache
    followed it; and the final cache (checked through a spy) holds exactly each beam's path."""
    table = _table(11, 45)
    trie = TrieConstraint(build_trie(table, SIZES, dense_levels=1))
    batch, beams = 3, 4
    context = {"q": jnp.arange(batch, dtype=jnp.int32) + 5}
    cache = {"path": jnp.full((batch, 3), -1, jnp.int32), "steps": jnp.zeros(batch, jnp.int32)}
    seen = {}
    real_reorder = bs.reorder

    def spy(tree, parent):
        out = real_reorder(tree, parent)
        if isinstance(tree, dict):
            seen["cache"] = out
        return out

    def run(reorder):
        monkeypatch.setattr(bs, "reorder", reorder)

        def search(c, k, t):
            out = bs.beam_search(_recording_step, c, k, batch=batch, beams=beams, sizes=SIZES, constraint=t)
            return out, seen.pop("cache", None)

        return jax.jit(search)(context, cache, trie)

    out, final = run(spy)
    codes = np.asarray(out.codes).reshape(-1, 3)
    path = np.asarray(final["path"])
    np.testing.assert_array_equal(path[:, :2], codes[:, :2])                # the cache followed its beam
    assert (np.asarray(final["steps"]) == 3).all()
    rescored = _teacher_force(_recording_step, context, codes, beams)
    np.testing.assert_allclose(np.asarray(out.scores).reshape(-1), rescored, rtol=1e-5)
    # a search that forgets to reorder the cache is caught by the same check
    broken, _ = run(lambda tree, parent: tree if isinstance(tree, dict) else real_reorder(tree, parent))
    rescored = _teacher_force(_recording_step, context, np.asarray(broken.codes).reshape(-1, 3), beams)
    assert not np.allclose(np.asarray(broken.scores).reshape(-1), rescored, rtol=1e-5)


def _teacher_force(step, context, codes, beams):
    n = len(codes)
    ctx = bs.repeat_beams(context, beams)
    cache = {"path": jnp.full((n, 3), -1, jnp.int32), "steps": jnp.zeros(n, jnp.int32)}
    prev, total = jnp.full(n, -1, jnp.int32), np.zeros(n)
    for level in range(3):
        lp, cache = step(ctx, cache, prev, level)
        total = total + np.asarray(lp)[np.arange(n), codes[:, level]]
        prev = jnp.asarray(codes[:, level])
    return total


def test_length_penalty_rescales_without_reordering():
    table = _table(5, 30)
    trie = TrieConstraint(build_trie(table, SIZES, dense_levels=1))
    context, cache = _state(2)
    plain = _search(_path_step("random"), context, cache, trie, batch=2, beams=5)
    fn = jax.jit(lambda c, k, t: bs.beam_search(_path_step("random"), c, k, batch=2, beams=5, sizes=SIZES,
                                                constraint=t, length_penalty=0.6))
    pen = fn(context, cache, trie)
    np.testing.assert_array_equal(np.asarray(pen.codes), np.asarray(plain.codes))
    np.testing.assert_allclose(np.asarray(pen.scores), np.asarray(plain.scores) / ((5 + 3) / 6) ** 0.6, rtol=1e-6)


def test_code_step_adapts_a_token_decoder():
    """Code ``c`` of level ``l`` is token ``offsets[l] + c``; level 0 is fed the start token."""
    sizes, offsets, start, vocab = (3, 2), (10, 20), 1, 30
    fed = []

    def token_step(context, cache, token, position):
        fed.append((position, np.asarray(token).tolist()))
        logits = jnp.tile(jnp.arange(vocab, dtype=jnp.float32)[None], (token.shape[0], 1))
        return logits, cache

    step = bs.code_step(token_step, offsets=offsets, sizes=sizes, start_token=start)
    lp, _ = step(None, None, jnp.array([-1, -1]), 0)
    np.testing.assert_allclose(np.asarray(lp[0]), jax.nn.log_softmax(jnp.arange(10.0, 13.0)), rtol=1e-6)
    lp, _ = step(None, None, jnp.array([2, 0]), 1)
    assert lp.shape == (2, 2) and fed == [(0, [1, 1]), (1, [12, 10])]


def test_leaves_to_items_expands_shared_sids_in_table_order_and_beam_order():
    codes = np.array([[1, 2], [0, 0], [1, 2], [3, 1], [1, 2], [0, 0]])      # no dedup digit: shared SIDs
    trie = build_trie(codes, (4, 3), dense_levels=1)
    item_ids = np.array([100, 101, 102, 103, 104, 105])
    a = trie.arrays
    # leaves are lexicographic: 0 = (0,0) rows 1,5; 1 = (1,2) rows 0,2,4; 2 = (3,1) row 3
    leaves = np.array([[1, 0, 2], [2, -1, -1], [-1, -1, -1]])
    got = leaves_to_items(a["leaf_offsets"], a["leaf_rows"], item_ids, leaves, k=4)
    np.testing.assert_array_equal(got, [[100, 102, 104, 101], [103, -1, -1, -1], [-1, -1, -1, -1]])
    with_dedup = np.concatenate([codes, dedup_digit(codes)[:, None]], 1)
    trie = build_trie(with_dedup, (4, 3, 3), dense_levels=1)
    got = leaves_to_items(trie.arrays["leaf_offsets"], trie.arrays["leaf_rows"], item_ids, np.array([[2, 0]]), k=3)
    np.testing.assert_array_equal(got, [[100, 101, -1]])                    # one item per leaf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _TwoLookups:
    """The bare protocol (``allowed`` + ``advance``, no ``children``)."""

    trie: trie_lib.Trie

    def allowed(self, level, prefix):
        return allowed(self.trie, level, prefix)

    def advance(self, level, prefix, code):
        return advance(self.trie, level, prefix, code)


@pytest.mark.parametrize("dense_levels,compare_max", [(0, 4096), (0, 0), (2, 4096)])
def test_children_lookup_equals_allowed_and_advance(dense_levels, compare_max, monkeypatch):
    """``children`` (one lookup, compare or scatter) = ``allowed`` + ``advance``: for every prefix id of
    every level, and as the search's constraint."""
    monkeypatch.setattr(trie_lib, "_COMPARE_MAX", compare_max)
    table = _table(9, 40)
    trie = build_trie(table, SIZES, dense_levels=dense_levels)
    for level, k in enumerate(SIZES):
        ids = np.r_[np.arange(len({tuple(r[:level]) for r in table.tolist()})), -1].astype(np.int32)
        ch, mask = np.asarray(children(trie, level, ids)), np.asarray(allowed(trie, level, ids))
        np.testing.assert_array_equal(ch >= 0, mask)
        for code in range(k):
            np.testing.assert_array_equal(ch[:, code], np.asarray(advance(trie, level, ids, np.full_like(ids, code))))
    step, batch = _path_step("random"), 2
    fused = _search(step, *_state(batch), TrieConstraint(trie), batch=batch, beams=7)
    bare = _search(step, *_state(batch), _TwoLookups(trie), batch=batch, beams=7)
    for got, want in zip(fused, bare):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def _path_probs(step, table, constraint):
    """The sampler's distribution by enumeration: each valid SID's probability ``[M]`` for query 0, the product
    over levels of the model's softmax renormalised over the trie children of the SID's prefix."""
    m = len(table)
    context, cache = bs.repeat_beams(_state(1)[0], m), bs.repeat_beams(_state(1)[1], m)
    codes = jnp.asarray(table, jnp.int32)
    prev, prefix, logp = jnp.full(m, -1, jnp.int32), jnp.zeros(m, jnp.int32), jnp.zeros(m)
    for level in range(len(SIZES)):
        lp, cache = step(context, cache, prev, level)
        child = constraint.children(level, prefix)
        lp = jax.nn.log_softmax(jnp.where(child >= 0, lp, -jnp.inf), axis=1)
        logp = logp + lp[jnp.arange(m), codes[:, level]]
        prefix, prev = child[jnp.arange(m), codes[:, level]], codes[:, level]
    return np.exp(np.asarray(logp))


@pytest.mark.parametrize("dense_levels", [0, 2])
def test_constrained_sampling_draws_valid_sids_from_the_renormalised_policy(dense_levels):
    """``sample``: every draw is in the trie, its recorded log-prob is the enumerated one, and the draws'
    frequencies match the enumerated distribution (8,000 draws: within 5 standard errors)."""
    table = _table(3, 18)
    constraint = TrieConstraint(build_trie(table, SIZES, dense_levels=dense_levels))
    step, n = _path_step("random"), 8_000
    fn = jax.jit(functools.partial(bs.sample, step, batch=1, samples=n, sizes=SIZES), static_argnames=("temperature",))
    out = fn(*_state(1), rng=jax.random.key(0), constraint=constraint)
    codes = np.asarray(out.codes[0])
    assert np.asarray(accepts(constraint.trie, out.codes[0])).all()
    probs = _path_probs(step, table, constraint)
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
    index = {tuple(r): i for i, r in enumerate(table.tolist())}
    drawn = np.array([index[tuple(r)] for r in codes.tolist()])
    np.testing.assert_array_equal(np.asarray(out.leaves[0]), drawn)            # leaf id = table row
    np.testing.assert_allclose(np.exp(np.asarray(out.log_probs[0]).sum(1)), probs[drawn], rtol=1e-4)
    freq = np.bincount(drawn, minlength=len(table)) / n
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / n) + 1e-3).all(), np.c_[freq, probs]
    lexicographic = _path_step("lexicographic")         # integer score gaps: at T = 0.05 sampling is greedy
    cold = bs.sample(lexicographic, *_state(1), batch=1, samples=64, sizes=SIZES, rng=jax.random.key(1),
                     constraint=constraint, temperature=0.05)
    greedy = _search(lexicographic, *_state(1), constraint, batch=1, beams=1)
    assert (np.asarray(cold.leaves[0]) == int(greedy.leaves[0, 0])).all()
    with pytest.raises(ValueError, match="temperature"):
        bs.sample(step, *_state(1), batch=1, samples=2, sizes=SIZES, rng=jax.random.key(0), temperature=0.0)

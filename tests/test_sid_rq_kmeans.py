"""RQ-KMeans semantic IDs: the sharded, streamed fit equals a numpy reference (same k-means++ draws) on 1
and 8 devices; dead-code reset revives unused codes; the paper-scale configs lower on 8 devices; a killed
fit resumes bitwise."""

import math

import jax
import numpy as np
import pytest
from conftest import load_test_config

from models.semantic_ids import kmeans_plus_plus, revive_dead
from trainers.checkpoints import Checkpointer
from trainers.evaluators.sid_metrics import sid_metrics
from trainers.loop import Trainer

SMALL = ["data.num_items=600", "train.batch_size=256", "model.iterations=3", "model.codes=8"]


def _config(*overrides):
    c = load_test_config("configs/sid.py:tiny", *SMALL, *overrides)
    items = len(np.load(c.data.embeddings, mmap_mode="r")) if c.data.embeddings else c.data.num_items
    passes = math.ceil(items / c.train.batch_size)
    c.train.steps = c.model.levels * c.model.iterations * passes
    c.train.checkpoint_every = c.train.log_every = passes
    return c


def _final_state(trainer, workdir, step):
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        return ckpt.restore(step, trainer.abstract_state(trainer.compiled_step()))[0]
    finally:
        ckpt.close()


def kmeanspp_reference(points, weights, uniforms):
    """Numpy k-means++ with the given draws (inverse CDF), float64."""
    def pick(mass, u):
        cdf = np.cumsum(mass)
        return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(points) - 1)

    centres = [points[pick(weights, uniforms[0])]]
    d2 = ((points - centres[0]) ** 2).sum(1)
    for u in uniforms[1:]:
        centres.append(points[pick(weights * d2, u)])
        d2 = np.minimum(d2, ((points - centres[-1]) ** 2).sum(1))
    return np.stack(centres)


def rq_kmeans_reference(x, *, levels, k, iterations, batch, seed, init="kmeans++", reset=True):
    """Level-by-level RQ-KMeans in numpy: seeds from the first batch, exact Lloyd passes over all items,
    each empty code re-seeded at the pass's farthest points (i-th dead code, i-th farthest)."""
    x = x.astype(np.float64)
    passes = math.ceil(len(x) / batch)
    r, codebooks, step = x.copy(), [], 0
    for _ in range(levels):
        first = r[:batch]
        if init == "first":
            c = first[:k].copy()
        else:
            uniforms = np.asarray(jax.random.uniform(jax.random.fold_in(jax.random.key(seed), step), (k,)))
            c = kmeanspp_reference(first, np.ones(len(first)), uniforms.astype(np.float64))
        for _ in range(iterations):
            d2 = ((r[:, None] - c[None]) ** 2).sum(-1)
            code, best = d2.argmin(1), d2.min(1)
            counts = np.bincount(code, minlength=k)
            new = c.copy()
            for j in range(k):
                if counts[j]:
                    new[j] = r[code == j].mean(0)
            if reset:
                far = np.argsort(-best, kind="stable")[:k]
                for i, j in enumerate(np.flatnonzero(counts == 0)):
                    if best[far[i]] > 0:
                        new[j] = r[far[i]]
            c = new
            step += passes
        codebooks.append(c)
        r = r - c[((r[:, None] - c[None]) ** 2).sum(-1).argmin(1)]
    return np.stack(codebooks)


def _assign(x, codebooks):
    codes, r = [], x.astype(np.float64)
    for c in codebooks:
        codes.append(((r[:, None] - c[None]) ** 2).sum(-1).argmin(1))
        r = r - c[codes[-1]]
    return np.stack(codes, 1)


@pytest.mark.parametrize("devices", [8, 1])
def test_rq_kmeans_equals_numpy_reference(tmp_path, devices):
    # one device: 256 rows scored 96 at a time (the CPU path, with a padded last chunk)
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"] if devices == 8 else ["mesh.data=1", "model.chunk_rows=96"]
    config = _config(*mesh)
    trainer = Trainer.create(config, tmp_path, devices=jax.devices()[:devices])
    result = trainer.run()
    assert result.status == "completed"
    state = _final_state(trainer, tmp_path, config.train.steps)
    m = config.model
    assert int(state.extra["level"]) == m.levels  # the schedule in task state: every level fitted
    x = trainer.task.vectors
    expected = rq_kmeans_reference(x, levels=m.levels, k=m.codes, iterations=m.iterations,
                                   batch=config.train.batch_size, seed=config.seed)
    np.testing.assert_allclose(np.asarray(state.extra["codebooks"]), expected, rtol=1e-4, atol=1e-5)
    codes = _assign(x, expected)
    # the codes of the frozen levels, stored by the fit for every item (padding rows after them)
    np.testing.assert_array_equal(np.asarray(state.extra["item_codes"])[:len(x)], codes[:, :-1])
    assert result.eval_metrics == pytest.approx(sid_metrics(codes, [m.codes] * m.levels))
    # each level's usage in its last pass: every item counted once (600 items, padding to 768 not counted)
    np.testing.assert_array_equal(np.asarray(state.extra["usage"]).sum(1), [len(x)] * m.levels)


def test_kmeans_plus_plus_matches_reference_and_skips_padding():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(64, 4)).astype(np.float32)
    weights = np.ones(64, np.float32)
    weights[40:] = 0  # padding rows are never chosen
    uniforms = np.asarray(jax.random.uniform(jax.random.key(3), (10,)))
    got = np.asarray(jax.jit(kmeans_plus_plus)(points, weights, uniforms))
    want = kmeanspp_reference(points[:40].astype(np.float64), np.ones(40), uniforms.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len({tuple(r) for r in got}) == 10


def _duplicated_head(n=512, dim=8, dupes=5, seed=0):
    """Items whose first ``dupes + 1`` rows are one point: ``init=first`` seeds that many identical codes,
    of which all but one win no item."""
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    x[1:dupes + 1] = x[0]
    return x


@pytest.mark.parametrize("reset", [True, False])
def test_dead_code_reset_revives_unused_codes(tmp_path, reset):
    path = tmp_path / "items.npy"
    np.save(path, _duplicated_head())
    config = _config("model.levels=1", "model.init=first", f"model.dead_code_reset={reset}", "model.dim=8",
                     f"data.embeddings={path}", "data.num_items=0", "mesh.data=4")
    trainer = Trainer.create(config, tmp_path / "run", devices=jax.devices()[:4])
    result = trainer.run()
    state = _final_state(trainer, tmp_path / "run", config.train.steps)
    usage = np.asarray(state.extra["usage"])[0]
    if reset:
        assert (usage > 0).all(), usage  # revived in the first pass, used in the later ones
        assert result.eval_metrics["dead_codes/level_1"] == 0
    else:  # which of the tied twins wins an item is the matmul's rounding; at least 3 of them stay dead
        assert (usage == 0).sum() >= 3, usage
        assert result.eval_metrics["dead_codes/level_1"] >= 2  # the final assignment breaks ties its own way


def test_revive_dead_gives_the_i_th_dead_code_the_i_th_farthest_point():
    centroids = np.arange(8, dtype=np.float32).reshape(4, 2)
    counts = np.array([3.0, 0.0, 2.0, 0.0])
    far_d2 = np.array([9.0, 4.0, 1.0, -1.0])
    far_points = np.array([[10, 10], [20, 20], [30, 30], [0, 0]], np.float32)
    got = np.asarray(revive_dead(centroids, counts, far_d2, far_points))
    np.testing.assert_array_equal(got, [[0, 1], [10, 10], [4, 5], [20, 20]])
    # no far point left (-1): the dead code keeps its centroid
    got = np.asarray(revive_dead(centroids, counts, np.array([9.0, -1.0, -1.0, -1.0]), far_points))
    np.testing.assert_array_equal(got, [[0, 1], [10, 10], [4, 5], [6, 7]])


@pytest.mark.parametrize("arg", ["lite", "lite_tiger"])
def test_paper_scale_configs_lower_on_8_devices(tmp_path, arg):
    """OneSearch 3 x 1024 and TIGER 3 x 256 (+ dedup) on 768-d items, 6.6M of them: lowered, no data read."""
    config = load_test_config(f"configs/sid.py:{arg}", "mesh.data=8")
    trainer = Trainer.create(config, tmp_path)
    lowered = trainer.lower()
    text = lowered.as_text()
    assert "65536x768" in text.replace(",", "x") or "tensor<8192x768xf32>" in text
    levels, codes = (3, 1024) if arg == "lite" else (3, 256)
    assert (config.model.levels, config.model.codes, config.model.dedup) == (levels, codes, True)
    assert trainer.task.batches_per_pass == math.ceil(6_600_000 / 65_536)
    assert config.train.steps == levels * config.model.iterations * trainer.task.batches_per_pass


def test_one_level_equals_faiss_kmeans_with_the_same_seeds(tmp_path):
    """The same Lloyd iterations as faiss.Kmeans (what the KuaiSearch and OneSearch code uses), given seeds."""
    faiss = pytest.importorskip("faiss")
    config = _config("model.levels=1", "mesh.data=2")
    trainer = Trainer.create(config, tmp_path, devices=jax.devices()[:2])
    trainer.run()
    state = _final_state(trainer, tmp_path, config.train.steps)
    x = trainer.task.vectors
    uniforms = jax.random.uniform(jax.random.fold_in(jax.random.key(config.seed), 0), (8,))  # step 0
    seeds = np.asarray(jax.jit(kmeans_plus_plus)(x[:256], np.ones(256, np.float32), uniforms))
    km = faiss.Kmeans(x.shape[1], 8, niter=3, max_points_per_centroid=10_000, min_points_per_centroid=1)
    km.train(x, init_centroids=seeds)
    np.testing.assert_allclose(np.asarray(state.extra["codebooks"])[0], km.centroids, rtol=1e-4, atol=1e-5)


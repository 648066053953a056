"""RQ-KMeans options: OneRec's balanced assignment (numpy reference, sharding-independent, evens out a skewed
set), FSQ on the last residual (hand-computed digits and indices, one more SID level in `ecomax sid build`),
k-means++ on a subsample, and the per-run SID PNG."""

import functools
import json

import jax
import numpy as np
import pytest
from conftest import REPO, load_test_config

from data_pipelines.sid.table import load_table
from models.semantic_ids import (balanced_codes, fsq_code, fsq_projection, fsq_quantise, init_rq_kmeans_state,
                                 residual_codes, rq_kmeans_step, subsample)
from trainers.evaluators.sid_metrics import sid_metrics
from trainers.evaluators.sid_plots import sid_report, write_sid_png
from trainers.loop import Trainer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def balanced_reference(scores, valid):
    """OneRec Alg. 1 on one batch, in numpy: code k (in order) takes its w_k nearest untaken valid rows,
    w_k = n // K + (k < n % K), ties to the lower row."""
    b, k = scores.shape
    n = int(valid.sum())
    taken, codes = ~valid.copy(), np.zeros(b, np.int64)
    for j in range(k):
        w = n // k + (j < n % k)
        order = sorted((s, i) for i, s in enumerate(scores[:, j]) if not taken[i])[:w]
        for _, i in order:
            taken[i], codes[i] = True, j
    return codes


def test_balanced_codes_equal_the_numpy_reference_on_1_and_4_devices():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(24, 5)).astype(np.float32)
    scores[:, 0] -= 3.0  # every row's nearest is code 0
    scores[7, 2] = scores[9, 2] = -10.0  # a tie: the lower row wins
    valid = np.ones(24, bool)
    valid[[3, 20]] = False  # padding: 22 valid rows, codes take 5, 5, 4, 4, 4
    want = balanced_reference(scores, valid)
    got = np.asarray(jax.jit(balanced_codes)(scores, valid, np.int32(valid.sum())))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.bincount(got[valid], minlength=5), [5, 5, 4, 4, 4])
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
    sharded = jax.jit(jax.shard_map(lambda s, v, n: balanced_codes(s, v, n, ("data",)), mesh=mesh,
                                    in_specs=(jax.P("data"), jax.P("data"), jax.P()), out_specs=jax.P("data"),
                                    check_vma=False))
    np.testing.assert_array_equal(np.asarray(sharded(scores, valid, np.int32(valid.sum()))), want)


def _skewed(n=640, dim=8, seed=0):
    """80% of the items in one tight blob, the rest spread: plain k-means gives the blob few codes."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, dim)).astype(np.float32) * 3.0
    x[: int(0.8 * n)] = rng.normal(size=(int(0.8 * n), dim)) * 0.05 + 1.0
    return x


def _fit(x, **options):
    """One level of RQ-KMeans, 8 codes, 3 passes of one batch, the rows split over 2 devices: usage and SIDs."""
    mesh = jax.make_mesh((2,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
    step = jax.jit(functools.partial(rq_kmeans_step, mesh=mesh, axes=("data",), iterations=3, batches_per_pass=1,
                                     **options))
    rep, rows = jax.NamedSharding(mesh, jax.P()), jax.NamedSharding(mesh, jax.P("data"))
    # jitted, placed on the mesh up front: one compile serves every step (eager ops would compile one by one)
    state = jax.jit(functools.partial(init_rq_kmeans_state, 1, 8, x.shape[1], len(x)), out_shardings=rep)()
    x, w = jax.device_put(x, rows), jax.device_put(np.ones(len(x), np.float32), rows)
    for key in jax.random.split(jax.random.key(0), 3):
        state, _ = step(state, x, w, key)
    codes = np.asarray(jax.jit(residual_codes)(x, state["codebooks"])[0])
    return np.asarray(state["usage"])[0], sid_metrics(codes, [8])


def test_balanced_fit_evens_out_a_skewed_set():
    x = _skewed()
    plain, plain_sids = _fit(x)
    # seeded by k-means++ on 200 of the batch's 640 rows (the subsample path of the step)
    balanced, balanced_sids = _fit(x, balanced=True, init_rows=200)
    assert plain.sum() == balanced.sum() == 640
    assert plain.max() / plain.mean() > 3.0, plain  # the blob's codes hold most items
    np.testing.assert_array_equal(balanced, [80] * 8)  # one batch a pass: 640 / 8 rows a code
    # the SIDs (nearest centroid of the balanced codebook) are more even too
    assert balanced_sids["perplexity/level_1"] > plain_sids["perplexity/level_1"]


def test_fsq_digits_and_index_by_hand():
    # L = 3: f(z) = 0.999 tanh(z), digit = round(f) + 1.  L = 4: f(z) = 1.4985 tanh(z + atanh(0.5 / 1.4985)) - 0.5,
    # digit = round(f) + 2. z = (1, 3): f = (0.761, 0.995) -> digits (2, 3); z = (-2, -3): f = (-0.963, -1.984) -> (0, 0);
    # z = (-0.3, -0.5): f = (-0.291, -0.728) -> (1, 1); z = 0 -> (1, 2).
    z = np.array([[0.0, 0.0], [1.0, 3.0], [-2.0, -3.0], [-0.3, -0.5]], np.float32)
    digits = np.asarray(fsq_quantise(z, [3, 4]))
    np.testing.assert_array_equal(digits, [[1, 2], [2, 3], [0, 0], [1, 1]])
    np.testing.assert_array_equal(np.asarray(fsq_code(digits, [3, 4])), [1 + 3 * 2, 2 + 3 * 3, 0, 1 + 3 * 1])
    far = np.asarray(fsq_quantise(np.array([[50.0, 50.0], [-50.0, -50.0]], np.float32), [3, 4]))
    np.testing.assert_array_equal(far, [[2, 3], [0, 0]])  # the grid's ends, never past them
    p = fsq_projection(16, 3, seed=0)
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=1e-5)
    with pytest.raises(ValueError, match="fsq_levels has 2 entries"):
        fsq_quantise(np.zeros((1, 3), np.float32), [3, 4])


def test_sid_build_appends_the_fsq_level_and_writes_the_png(tmp_path):
    from launch.sid import build

    x = _skewed(n=300, dim=8, seed=1)
    np.save(tmp_path / "items.npy", x)
    metrics = build(f"{REPO}/configs/sid.py:tiny", tmp_path / "items.npy",
                    tmp_path / "out", ["model.dim=8", "model.codes=8", "model.levels=1", "model.iterations=1",
                                       "train.batch_size=320", "mesh.data=8", "model.fsq_levels=[3,4]"])
    table, _, meta = load_table(tmp_path / "out")
    assert table.shape == (300, 3)  # the k-means level, the FSQ level, the dedup digit
    assert meta["sizes"][:2] == [8, 12] and meta["levels"] == 2
    assert 0 <= table[:, 1].min() and table[:, 1].max() < 12 and len(np.unique(table[:, 1])) > 1
    assert metrics["cur/level_2"] == len(np.unique(table[:, 1])) / 12
    # the FSQ code is reproducible from what the build wrote
    fsq = json.loads((tmp_path / "out" / "fsq.json").read_text())
    r = x.astype(np.float64)
    r = r - np.load(tmp_path / "out" / "codebooks.npy")[0][table[:, 0]]
    z = r @ np.load(tmp_path / "out" / "fsq_projection.npy") / fsq["scale"]
    want = np.asarray(fsq_code(fsq_quantise(z.astype(np.float32), [3, 4]), [3, 4]))
    assert (want == table[:, 1]).mean() > 0.99  # float rounding at a grid boundary aside
    assert (tmp_path / "out" / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_subsample_draws_valid_rows_without_replacement():
    points = np.arange(40, dtype=np.float32).reshape(20, 2)
    weights = np.ones(20, np.float32)
    weights[15:] = 0
    got, w = subsample(points, weights, jax.random.key(0), 10)
    rows = np.asarray(got)[:, 0] / 2
    assert len(set(rows)) == 10 and rows.max() < 15 and (np.asarray(w) == 1).all()
    same, _ = subsample(points, weights, jax.random.key(0), 20)  # n <= rows: every row, in order
    np.testing.assert_array_equal(np.asarray(same), points)


def test_write_sid_png_and_sid_report(tmp_path):
    codes = np.array([[0, 1], [0, 1], [0, 2], [3, 1]])
    path = write_sid_png(codes, [4, 4], tmp_path / "a" / "sid.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    metrics = sid_report(codes, [4, 4], tmp_path, step=7)
    assert (tmp_path / "sid_step7.png").read_bytes()[:8] == PNG_MAGIC
    assert metrics["dead_codes/level_1"] == 2 and metrics["largest_group"] == 2
    with pytest.raises(ValueError, match="codes have 2 levels but sizes has 3"):
        write_sid_png(codes, [4, 4, 4], tmp_path / "b.png")


def test_lite_lowers_with_balanced_assignment_on_8_devices(tmp_path):
    """OneSearch 3 x 1024 on 768-d items, balanced: the per-shard [8192, 1024] scores and the code loop lower."""
    config = load_test_config("configs/sid.py:lite", "mesh.data=8", "model.balanced=True")
    text = Trainer.create(config, tmp_path).lower().as_text()
    assert "8192x1024" in text.replace(",", "x")

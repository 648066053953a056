"""RQ-VAE: every loss term against hand-computed values and gradients, the straight-through estimator,
the first-batch k-means initialisation of the codebooks, training, and the TIGER-scale config lowering."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_test_config
from flax import nnx

from models.rq_vae import straight_through
from trainers.checkpoints import Checkpointer
from trainers.loop import Trainer
from trainers.losses.semantic_ids import reconstruction_loss, rq_loss, rq_vae_loss
from trainers.tasks.sid_rq_vae import kmeans_codebooks


def test_reconstruction_loss_by_hand():
    x = jnp.array([[1.0, 2.0], [0.0, 0.0]])
    x_hat = jnp.array([[0.0, 0.0], [3.0, 0.0]])
    assert float(reconstruction_loss(x, x_hat)) == pytest.approx((5.0 + 9.0) / 2)


def test_rq_loss_values_and_which_side_each_term_trains():
    r = jnp.array([[[1.0, 2.0]], [[0.5, 0.0]]])   # [L=2, b=1, d=2]
    e = jnp.array([[[0.0, 0.0]], [[0.0, 1.0]]])
    # level 1: |r-e|^2 = 5, level 2: 0.25 + 1 = 1.25; each counted (1 + beta) times
    assert float(rq_loss(r, e, 0.25)) == pytest.approx(1.25 * (5.0 + 1.25))
    g_r, g_e = jax.grad(rq_loss, argnums=(0, 1))(r, e, 0.25)
    np.testing.assert_allclose(g_e, -2 * (r - e))          # codebook term: sg[r] - e
    np.testing.assert_allclose(g_r, 0.25 * 2 * (r - e))    # commitment term: beta |r - sg[e]|^2
    out = {"x_hat": jnp.zeros((1, 2)), "residuals": r, "codewords": e}
    total, parts = rq_vae_loss(jnp.array([[1.0, 1.0]]), out, 0.25)
    assert float(parts["recon_loss"]) == pytest.approx(2.0)
    assert float(total) == pytest.approx(2.0 + 1.25 * 6.25)


def test_straight_through_forwards_z_q_and_passes_gradients_to_z():
    z, z_q = jnp.array([1.0, -2.0]), jnp.array([0.5, 0.5])
    np.testing.assert_allclose(straight_through(z, z_q), z_q)
    np.testing.assert_allclose(jax.grad(lambda z: jnp.sum(straight_through(z, z_q) * jnp.array([3.0, 4.0])))(z),
                               [3.0, 4.0])
    assert float(jax.grad(lambda q: jnp.sum(straight_through(z, q)))(z_q).sum()) == 0.0


def test_codebooks_start_as_kmeans_of_the_first_batch_and_training_lowers_the_loss(tmp_path):
    config = load_test_config("configs/sid.py:rqvae_tiny", "train.steps=1", "optimizer.learning_rate=0.0",
                              "mesh.data=4")
    trainer = Trainer.create(config, tmp_path / "init", devices=jax.devices()[:4])
    step = trainer.compiled_step()
    before = trainer.init_state(step.tx, step.shardings)
    trainer.run()
    ckpt = Checkpointer(tmp_path / "init" / "checkpoints")
    try:
        after, _ = ckpt.restore(1, trainer.abstract_state(step))
    finally:
        ckpt.close()
    first = next(iter(trainer.data()))["x"]
    model = jax.tree.map(np.asarray, after.params)
    z = nnx.merge(trainer.spec.graphdef, model).encode(jnp.asarray(first))
    m = config.model
    expected = kmeans_codebooks(z, m.codes, m.levels, jax.random.fold_in(jax.random.key(config.seed), 0),
                                m.init_iterations)
    np.testing.assert_allclose(model["codebooks"], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.asarray(before.params["codebooks"]), model["codebooks"])

    config = load_test_config("configs/sid.py:rqvae_tiny", "train.steps=120", "train.log_every=20", "mesh.data=4")
    result = Trainer.create(config, tmp_path / "train", devices=jax.devices()[:4]).run()
    records = [l for l in (tmp_path / "train" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    losses = [json.loads(l)["loss"] for l in records]
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.eval_metrics["cur/level_1"] > 0.5 and 0 < result.eval_metrics["collision_rate"] <= 1


@pytest.mark.parametrize("variant", ["rqvae_lite", "quasid_lite", "adasid_lite"])
def test_rq_vae_lite_lowers_on_8_devices(tmp_path, variant):
    config = load_test_config(f"configs/sid.py:{variant}", "mesh.data=8")
    trainer = Trainer.create(config, tmp_path)
    assert trainer.spec.abstract_params["codebooks"].shape == (3, 256, 32)
    dims = [p["kernel"].shape for p in trainer.spec.abstract_params["encoder"].values()]
    assert dims == [(768, 512), (512, 256), (256, 128), (128, 32)]
    trainer.lower()

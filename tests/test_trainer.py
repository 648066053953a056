"""The engine: sharded step == single-device step, accumulation, precision, schedule, checkpoints, NaN stop."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from conftest import load_test_config
from trainers import tasks
from trainers.checkpoints import Checkpointer
from trainers.loop import NonFiniteLossError, Trainer, train
from trainers.optimizer import decay_mask, make_schedule
from trainers.state import abstract_state, init_state


def run_steps(config, n: int, devices=None) -> tuple[list[float], dict]:
    trainer = Trainer.create(config, "/tmp/unused", devices)
    step = trainer.compiled_step()
    step_fn, tx, shardings = step.fn, step.tx, step.shardings

    state = init_state(trainer.task.build_model, config.seed, tx, shardings)
    data = iter(trainer.data())
    losses = []
    for _ in range(n):
        state, metrics = step_fn(state, trainer.global_batch(next(data), trainer.batch_shardings()))
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.params), state


def test_sharded_step_equals_single_device_step():
    # SGD: Adam's first updates are ~sign(g), which turns float noise in near-zero gradients into O(lr) steps.
    base = ("train.batch_size=16", "model.width=16", "model.embed_dim=8", "optimizer.name=sgd",
            "optimizer.warmup_steps=1")
    single = load_test_config("configs/two_tower.py:tiny", *base, "mesh.data=1")
    sharded = load_test_config("configs/two_tower.py:tiny", *base, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    losses_1, params_1, _ = run_steps(single, 3, devices=jax.devices()[:1])
    losses_8, params_8, state_8 = run_steps(sharded, 3)
    np.testing.assert_allclose(losses_1, losses_8, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params_1, params_8)
    # the parameters really are split: an (embed, mlp) kernel over fsdp x tensor
    kernel = state_8.params["image"]["blocks"][0]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (8, 32)
    # the optimizer state follows its parameters (SGD momentum here)
    moments = [x for x in jax.tree.leaves(state_8.opt_state) if getattr(x, "shape", None) == kernel.shape]
    assert moments and all(m.sharding.spec == kernel.sharding.spec for m in moments)


# --- a linear-regression task: per-example loss, so accumulation must equal the full batch ------------

class _Linear(nnx.Module):
    def __init__(self, rngs):
        self.dense = nnx.Linear(8, 4, rngs=rngs,
                                kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), ("embed", "mlp")),
                                bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("mlp",)))

    def __call__(self, x):
        return self.dense(x)


class _RegressionSource:
    def __len__(self):
        return 512

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        x = rng.normal(size=8).astype(np.float32)
        return {"x": x, "y": (x[:4] * 2 - x[4:]).astype(np.float32)}


@tasks.register("test_regression")
class _RegressionTask(tasks.Task):
    def build_model(self, rngs):
        return _Linear(rngs)

    def loss(self, model, batch, rng):
        pred = model(batch["x"])
        assert pred.dtype == jnp.dtype(self.config.train.compute_dtype)
        return jnp.mean((pred.astype(jnp.float32) - batch["y"]) ** 2), {}

    def train_source(self):
        return _RegressionSource(), None


def regression_config(**train) -> ml_collections.ConfigDict:
    config = load_test_config("configs/two_tower.py:tiny")
    config.task = "test_regression"
    config.train.update(train)
    config.train.grad_clip_norm = 0.0
    return config


def test_gradient_accumulation_equals_full_batch():
    full, params_full, _ = run_steps(regression_config(microbatches=1, batch_size=32), 3)
    accumulated, params_acc, _ = run_steps(regression_config(microbatches=4, batch_size=32), 3)
    np.testing.assert_allclose(full, accumulated, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params_full, params_acc)


def test_bfloat16_compute_keeps_float32_params():
    reference, _, _ = run_steps(regression_config(batch_size=32), 5)
    losses, params, _ = run_steps(regression_config(compute_dtype="bfloat16", batch_size=32), 5)
    np.testing.assert_allclose(losses, reference, rtol=0.02)  # bf16 has an 8-bit mantissa
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))


def test_warmup_cosine_schedule_and_decay_mask():
    opt = ml_collections.ConfigDict({"learning_rate": 1.0, "warmup_steps": 10, "schedule": "cosine",
                                     "end_lr_ratio": 0.1})
    schedule = make_schedule(opt, total_steps=110)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(60)) == pytest.approx(0.55, abs=1e-3)  # half-way down the cosine to 0.1
    assert float(schedule(110)) == pytest.approx(0.1)
    params = {"dense": {"kernel": np.zeros((2, 2)), "bias": np.zeros(2)}, "pos": np.zeros((3, 2)),
              "scale": np.zeros(())}
    mask = decay_mask(params, "pos")
    assert mask == {"dense": {"kernel": True, "bias": False}, "pos": False, "scale": False}


def test_restore_onto_a_different_mesh(tmp_path):
    config = load_test_config("configs/two_tower.py:tiny", "train.steps=2", "train.batch_size=16",
                              "mesh.data=8", "model.width=16", "model.embed_dim=8")
    train(config, tmp_path)
    saved = Trainer.create(config, tmp_path)
    tx, _ = saved.optimizer()
    saved_state, _ = Checkpointer(tmp_path / "checkpoints").restore(2, abstract_state(saved.spec, tx, saved.shardings(tx)))

    other = load_test_config("configs/two_tower.py:tiny", "train.steps=2", "train.batch_size=16",
                             "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2", "model.width=16", "model.embed_dim=8")
    trainer = Trainer.create(other, tmp_path)
    target = abstract_state(trainer.spec, tx, trainer.shardings(tx))
    restored, meta = Checkpointer(tmp_path / "checkpoints").restore(2, target)
    assert meta["step"] == 2
    kernel = restored.params["image"]["blocks"][0]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "expert": 1, "tensor": 2}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 jax.device_get(saved_state), jax.device_get(restored))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = load_test_config("configs/two_tower.py:tiny", "train.steps=4", "train.checkpoint_every=2",
                              "train.batch_size=16")
    train(config, tmp_path)
    newest = tmp_path / "checkpoints" / "4" / "state"
    data_files = sorted((p for p in newest.rglob("*") if p.is_file() and p.stat().st_size > 64),
                        key=lambda p: -p.stat().st_size)
    for path in data_files:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])  # truncate every data file
    trainer = Trainer.create(config, tmp_path)
    tx, _ = trainer.optimizer()
    ckpt = Checkpointer(tmp_path / "checkpoints")
    restored = ckpt.restore_latest(abstract_state(trainer.spec, tx, trainer.shardings(tx)))
    assert restored is not None and restored[1]["step"] == 2
    assert "checkpoint step 4" in caplog.text
    assert (tmp_path / "checkpoints_corrupt" / "4").is_dir() and ckpt.steps() == [2]


@tasks.register("test_nan")
class _NanTask(_RegressionTask):
    """The regression task whose data holds a NaN in about one example of 250."""

    def train_source(self):
        source = _RegressionSource()

        def poison(record, rng):
            return {"x": record["x"] * (np.nan if rng.random() < 0.004 else 1.0), "y": record["y"]}

        return source, poison


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    config = regression_config(batch_size=8, steps=200, checkpoint_every=2, log_every=50)
    config.task = "test_nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss or gradient at step (\d+)") as err:
        train(config, tmp_path)
    bad = err.value.step
    ckpt = Checkpointer(tmp_path / "checkpoints")
    last = ckpt.steps()[-1]
    assert last < bad
    trainer = Trainer.create(config, tmp_path)
    tx, _ = trainer.optimizer()
    state, _ = ckpt.restore(last, abstract_state(trainer.spec, tx, trainer.shardings(tx)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    assert int(state.bad_step) == -1


def test_frozen_parameters_get_no_update_and_no_optimizer_state():
    config = regression_config(batch_size=32)
    config.optimizer.frozen = "^dense/kernel$"
    _, params, state = run_steps(config, 3)
    _, initial, _ = run_steps(config, 0)
    np.testing.assert_array_equal(params["dense"]["kernel"], initial["dense"]["kernel"])
    assert not np.array_equal(params["dense"]["bias"], initial["dense"]["bias"])
    moments = [leaf.shape for leaf in jax.tree.leaves(state.opt_state) if getattr(leaf, "ndim", 0) >= 1]
    assert (8, 4) not in moments and (4,) in moments  # Adam keeps moments for the bias only


def test_repeated_evaluations_reuse_the_compiled_embedding_functions(tmp_path):
    config = load_test_config("configs/two_tower.py:tiny", "train.batch_size=16", "data.num_eval=64")
    trainer = Trainer.create(config, tmp_path)
    step = trainer.compiled_step()
    tx, shardings = step.tx, step.shardings
    state = init_state(trainer.task.build_model, config.seed, tx, shardings)
    metrics = lambda step: {k: v for k, v in trainer.evaluate(state, step).items() if not k.endswith("_s")}  # noqa: E731
    first = metrics(1)
    compiled = dict(trainer._eval_compiled)
    assert compiled and metrics(2) == first
    assert trainer._eval_compiled == compiled  # same jitted functions, no new entries

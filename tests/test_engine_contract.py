"""The task contract beyond the gradient step: task-owned state, a task's own update, rollouts with a host
function, resume after kill -9 and restores onto another mesh (tasks in tests/toy_tasks.py)."""

import json
import os
import random
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, load_test_config, wait_for_checkpointed_step

from trainers.checkpoints import Checkpointer
from trainers.losses import group_advantages
from trainers.loop import Trainer
from trainers.tasks import EvalContext, Task

TOY = "tests/toy_tasks.py"


def _kmeans(*overrides):
    return load_test_config(f"{TOY}:kmeans", *overrides)


@pytest.mark.parametrize("devices", [8, 1])
def test_sharded_lloyd_update_equals_numpy_lloyd(tmp_path, devices):
    from toy_tasks import lloyd_reference

    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"] if devices == 8 else ["mesh.data=1"]
    config = _kmeans("train.steps=6", "train.checkpoint_every=100", *mesh)
    trainer = Trainer.create(config, tmp_path, devices=jax.devices()[:devices])
    result = trainer.run()
    assert result.status == "completed"
    state = _restore(trainer, tmp_path, 6)
    points = trainer.task.points
    expected = lloyd_reference(points, points[:config.model.codes], 6)
    np.testing.assert_allclose(np.asarray(state.extra["centroids"]), expected, rtol=1e-5, atol=1e-5)
    # usage counts: every point is counted once per iteration
    assert int(np.asarray(state.extra["counts"]).sum()) == 6 * len(points)
    if devices == 8:  # born sharded by the logical names ("codes" -> tensor, "embed" -> fsdp)
        assert state.extra["centroids"].sharding.spec == jax.P("tensor", "fsdp")
    inertia = lambda c: ((points[:, None] - c[None]) ** 2).sum(-1).min(1).mean()  # noqa: E731
    assert result.eval_metrics["inertia"] == pytest.approx(inertia(expected), rel=1e-5)
    assert inertia(expected) < 0.5 * inertia(points[:config.model.codes])


def _restore(trainer, workdir, step, target_trainer=None):
    target_trainer = target_trainer or trainer
    compiled = target_trainer.compiled_step()
    ckpt = Checkpointer(workdir / "checkpoints")
    try:
        state, _ = ckpt.restore(step, target_trainer.abstract_state(compiled))
    finally:
        ckpt.close()
    return state


@pytest.mark.parametrize("arg", ["kmeans", "grpo"])
def test_task_state_restores_onto_another_mesh_with_equal_values(tmp_path, arg):
    config = load_test_config(f"{TOY}:{arg}", "train.steps=4", "mesh.data=8")
    trainer = Trainer.create(config, tmp_path)
    trainer.run()
    saved = _restore(trainer, tmp_path, 4)
    other = Trainer.create(load_test_config(f"{TOY}:{arg}", "train.steps=4", "mesh.data=2", "mesh.fsdp=2",
                                            "mesh.tensor=2"), tmp_path)
    moved = _restore(trainer, tmp_path, 4, target_trainer=other)
    if arg == "kmeans":  # the codebook: whole on data=8, split over tensor x fsdp on 2x2x2
        shape = saved.extra["centroids"].shape
        assert saved.extra["centroids"].sharding.shard_shape(shape) == shape
        assert moved.extra["centroids"].sharding.shard_shape(shape) == (shape[0] // 2, shape[1] // 2)
    else:  # the reference policy follows its parameters' shardings
        for ref, param in zip(jax.tree.leaves(moved.extra["reference"]), jax.tree.leaves(moved.params)):
            assert ref.sharding == param.sharding
        assert not np.array_equal(np.asarray(moved.extra["reference"]["out"]["kernel"]),
                                  np.asarray(moved.params["out"]["kernel"]))  # trained away from it
    assert jax.tree.structure(saved) == jax.tree.structure(moved)
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(moved)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_grpo_rollout_task_learns_target_from_reward(tmp_path):
    config = load_test_config(f"{TOY}:grpo", "train.checkpoint_every=1000")
    trainer = Trainer.create(config, tmp_path)
    assert trainer.task.updates_per_rollout == 2
    result = trainer.run()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    assert len(rewards) == config.train.steps
    assert rewards[0] < 0.5, rewards[:5]  # a random policy hits ~1/vocab of the positions
    assert np.mean(rewards[-5:]) >= 0.9, rewards[-10:]
    assert result.eval_metrics["greedy_reward"] == 1.0
    assert 0.0 < result.metrics["kl"] < 10.0  # the reference policy (task state) is live in the loss


def test_a_two_turn_rollout_runs_the_host_environment_between_turns(tmp_path):
    config = load_test_config(f"{TOY}:grpo_turns", "train.steps=30", "train.checkpoint_every=1000")
    trainer = Trainer.create(config, tmp_path)
    result = trainer.run()
    assert trainer.task.interactions == 30                      # one environment call per step (2 turns)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in records if "reward" in r]
    assert rewards[0] < 0.5 and np.mean(rewards[-5:]) > 0.8, rewards
    # turn 2 samples after the inserted token: the greedy policy follows the target around it
    assert result.eval_metrics["greedy_reward"] >= 0.75


def test_host_scored_task_lowers_its_rollout(tmp_path):
    """Paper-scale compile checks without data: for a task with a host function, ``lower`` is its rollout."""
    config = load_test_config(f"{TOY}:grpo")
    trainer = Trainer.create(config, tmp_path)
    assert trainer.hosted()
    out = trainer.lower().out_info
    assert out["tokens"].shape == (config.train.batch_size, len(config.model.target))
    assert out["old_logp"].shape == out["tokens"].shape


def test_fused_rollout_without_host_function_is_one_program(tmp_path):
    """A rollout task without ``score`` compiles rollout + updates into one jitted step (and lowers)."""
    import toy_tasks

    class DeviceReward(toy_tasks.GRPOTask):
        score = Task.score  # no host function: the reward is computed on device

        def rollout(self, ctx, state, batch, rng):
            made = super().rollout(ctx, state, batch, rng)
            reward = (made["tokens"] == jax.numpy.asarray(self.target)[None]).mean(1)
            return {**made, "reward": reward, "advantage": group_advantages(reward, self.config.rl.group),
                    "reward_mean": reward}

    config = load_test_config(f"{TOY}:grpo", "train.steps=3")
    trainer = Trainer(config, tmp_path, DeviceReward(config), *_spec_and_mesh(config))
    assert not trainer.task.overrides("score") and trainer.task.overrides("rollout")
    trainer.lower().compile()  # abstract state, no data: the whole step is one program
    result = trainer.run()
    assert result.status == "completed" and np.isfinite(result.metrics["loss"])


def _spec_and_mesh(config):
    from trainers.mesh import make_mesh
    from trainers.state import model_spec
    from trainers.tasks import get_task

    return model_spec(get_task(config).build_model), make_mesh(config.mesh)


def test_non_finite_custom_update_keeps_state_and_stops(tmp_path):
    """A task's own update keeps the non-finite guard: NaN centroids are not written, the run stops."""
    import toy_tasks
    from trainers.loop import NonFiniteLossError

    class Broken(toy_tasks.KMeansTask):
        def update(self, ctx, state, batch, rng):
            state, metrics = super().update(ctx, state, batch, rng)
            bad = state.extra["centroids"] * jax.numpy.where(state.step >= 2, jax.numpy.nan, 1.0)
            return state.replace(extra={**state.extra, "centroids": bad}), metrics

    config = _kmeans("train.steps=6", "train.checkpoint_every=2")
    trainer = Trainer(config, tmp_path, Broken(config), *_spec_and_mesh(config))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        trainer.run()
    state = _restore(trainer, tmp_path, 2)
    assert np.isfinite(np.asarray(state.extra["centroids"])).all()


def test_eval_apply_batches_and_caches_compiled_functions(tmp_path):
    """``EvalContext.apply`` with ``batch_size`` pads the last chunk (one program) and reuses compiled
    entries across evaluations, also for a fresh ``functools.partial`` of the same call."""
    import functools

    traces = []

    def fn(model, x, scale, table):
        traces.append(x.shape)
        return {"y": x * scale + table.sum()}

    config = _kmeans()
    trainer = Trainer.create(config, tmp_path)
    compiled: dict = {}
    x = np.arange(21, dtype=np.float32)[:, None]
    for _ in range(2):
        ctx = EvalContext(trainer.spec.graphdef, {}, trainer.mesh, 0, tmp_path, compiled)
        out = ctx.apply(functools.partial(fn, scale=2.0), x, batch_size=8, replicated={"table": np.ones(3)})
        np.testing.assert_allclose(out["y"], x * 2 + 3)
    assert traces == [(8, 1)] and len(compiled) == 1


def test_kuaisearch_recall_does_not_retrace_across_evaluations(tmp_path):
    config = load_test_config("configs/kuaisearch_recall.py:tiny", "train.steps=1", "eval.max_examples=16")
    trainer = Trainer.create(config, tmp_path)
    compiled = trainer.compiled_step()
    state = trainer.init_state(compiled.tx, compiled.shardings)
    trainer.evaluate(state, 1)
    sizes = {k: f._cache_size() for k, f in trainer._eval_compiled.items()}
    trainer.evaluate(state, 2)
    assert {k: f._cache_size() for k, f in trainer._eval_compiled.items()} == sizes
    assert len(sizes) == 2 and all(n == 1 for n in sizes.values())


# --- resume after kill -9 (subprocesses) ---------------------------------------------------------------


def _train(workdir, arg, *extra, devices=2):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    spec = arg if ".py:" in arg else f"{TOY}:{arg}"
    args = ["--config", f"{REPO}/{spec}", "--set", "mesh.data=2", *extra]
    return subprocess.Popen([sys.executable, "-m", "launch.cli", "train", "--workdir", str(workdir), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(workdir):
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "examples_per_sec" in record:
            out[record["step"]] = {k: v for k, v in record.items() if k not in ("examples_per_sec", "step_time", "time")}
    return out


@pytest.mark.slow
# the real RQ-KMeans tokenizer (task state: codebooks, pass accumulators, stored item codes, the schedule;
# 3 levels x 8 passes x 4 batches) and the toy two-turn GRPO agent (rollouts, a host environment between
# turns, a host function and its state)
@pytest.mark.parametrize("arg,steps,every,extra", [("configs/sid.py:tiny", 96, 4, ("model.iterations=8",)),
                                                   ("grpo_turns", 24, 5, ())])
def test_kill_9_at_a_random_step_resumes_bitwise(tmp_path, arg, steps, every, extra):
    flags = ["--set", f"train.steps={steps}", "--set", f"train.checkpoint_every={every}", "--set", "train.log_every=1",
             *[a for e in extra for a in ("--set", e)]]
    reference = _train(tmp_path / "reference", arg, *flags)
    out, _ = reference.communicate(timeout=300)
    assert reference.returncode == 0, out
    expected = _metrics(tmp_path / "reference")
    assert sorted(expected) == list(range(1, steps + 1))

    kill_at = random.Random().randint(every + 1, 2 * steps // 3)  # early enough to land before the run ends
    workdir = tmp_path / "killed"
    kill_9_and_resume(workdir, arg, flags, kill_at)
    assert _metrics(workdir) == expected, f"killed at step {kill_at}"  # exact float equality, every metric


def kill_9_and_resume(workdir, arg, flags, kill_at, timeout=300):
    """Train in ``workdir``, SIGKILL the run once it has logged ``kill_at`` with a checkpoint finished (any: older
    ones rotate out), then train again there; asserts the second run resumed and finished."""
    victim = _train(workdir, arg, *flags)
    wait_for_checkpointed_step(workdir, kill_at, victim, timeout=timeout)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=60)
    resumed = _train(workdir, arg, *flags)
    out, _ = resumed.communicate(timeout=timeout)
    assert resumed.returncode == 0, out
    assert "resuming at step" in out, out


@pytest.mark.slow
def test_host_scored_rollouts_on_two_processes_match_one(tmp_path):
    """2 processes x 2 devices: every process scores the gathered rollout and feeds its own rows back; the
    run equals a 1 x 4 run (up to cross-process float summation order)."""

    def launch(processes, devices, workdir):
        cmd = [sys.executable, "-m", "launch.cli", "launch", "local", "--processes", str(processes),
               "--devices-per-process", str(devices), "--timeout", "240", "--init-timeout", "60", "--",
               "train", "--workdir", str(workdir), "--config", f"{REPO}/{TOY}:grpo", "--set", "train.steps=6"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        return _metrics(workdir)

    two, one = launch(2, 2, tmp_path / "two"), launch(1, 4, tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:
        for key in ("reward", "reward_mean", "loss", "kl"):
            assert two[step][key] == pytest.approx(one[step][key], rel=1e-4, abs=1e-6), (step, key)

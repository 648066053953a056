"""`ecomax bench`: analytic FLOPs agree with XLA's count, the timed run and the AOT mesh compile report."""

import argparse
import json

import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from conftest import REPO, load_test_config
from launch import bench
from trainers import flops
from trainers.tasks import get_task


def _xla_flops(compiled) -> float:
    return bench.xla_flops(compiled)


def test_vit_flops_match_xla_cost_analysis():
    """A small ViT query tower train step: CLS -> projection -> in-batch InfoNCE, AdamW."""
    from models.vit import ViT, ViTConfig
    from trainers.losses import info_nce

    cfg = ViTConfig(image_size=32, patch_size=8, hidden=128, depth=2, heads=4, mlp_dim=512)
    batch, dim = 8, 32

    class Query(nnx.Module):
        def __init__(self, rngs):
            self.vit = ViT(cfg, rngs=rngs)
            self.proj = nnx.Linear(cfg.hidden, dim, rngs=rngs)

    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(Query(nnx.Rngs(0)))
    tx = optax.adamw(1e-3)

    def step(params, opt_state, images, keys):
        def loss(p):
            model = nnx.merge(graphdef, p)
            return info_nce(model.proj(model.vit.pooled(images)), keys, 10.0)

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    images, keys = jnp.zeros((batch, 32, 32, 3)), jnp.zeros((batch, dim))
    xla = _xla_flops(jax.jit(step).lower(params, tx.init(params), images, keys).compile())
    forward = flops.vit_forward(cfg, batch)
    forward["proj"] = flops.matmul(batch, cfg.hidden, dim)
    forward["logits"] = flops.matmul(batch, dim, batch)
    assert flops.train_flops(forward) == pytest.approx(xla, rel=0.10)


def test_text_encoder_forward_flops_match_xla():
    from models.text_encoder import TextEncoder, TextEncoderConfig

    cfg = TextEncoderConfig(vocab_size=100, hidden=128, depth=2, heads=4, mlp_dim=512, max_len=32)
    with nnx.use_eager_sharding(False):
        graphdef, params = nnx.split(TextEncoder(cfg, rngs=nnx.Rngs(0)))
    ids = jnp.ones((4, 32), jnp.int32)
    compiled = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x)).lower(params, ids).compile()
    analytic = sum(flops.text_encoder_forward(cfg, 4, 32).values())
    assert analytic == pytest.approx(_xla_flops(compiled), rel=0.10)


def test_vit_b16_count_is_the_textbook_number():
    from models.vit import ViTConfig

    # ViT-B/16 at 224 px: ~17.6 GMACs per image = ~35.1 GFLOPs forward (timm lists 17.6 GMACs).
    forward = sum(flops.vit_forward(ViTConfig(), 1).values())
    assert forward == pytest.approx(35.1e9, rel=0.01)


def test_peak_table():
    assert flops.peak_flops("TPU v4")[0] == 275e12
    assert flops.peak_flops("TPU v5 lite")[0] == 197e12
    assert flops.peak_flops("TPU v5p")[0] == 459e12
    assert flops.peak_flops("TPU v6 lite")[0] == 918e12
    assert flops.peak_flops("NVIDIA A100-SXM4-80GB")[0] == 312e12
    assert flops.peak_flops("NVIDIA H100 80GB HBM3")[0] == 989e12
    assert flops.peak_flops("NVIDIA H200")[0] == 989e12
    assert flops.peak_flops("NVIDIA B200")[0] == 2250e12
    assert flops.peak_flops("cpu") is None


def test_bench_run_reports_every_measurement():
    """Also the two-tower check: the analytic count is within 10% of XLA's for the tiny config."""
    config = load_test_config("configs/two_tower.py:tiny", "mesh.data=1")
    r = bench.run_bench(config, steps=3, warmup=1, pipeline_batches=3, devices=jax.devices()[:1])
    assert r["compile_s"] > 0 and r["num_devices"] == 1 and r["device_kind"] == jax.devices()[0].device_kind
    s = r["step_time_s"]
    assert 0 < s["p10"] <= s["median"] <= s["p90"]
    assert r["examples_per_s"] == pytest.approx(64 / s["median"])
    analytic = flops.train_flops(flops.two_tower_forward(get_task(config).model_config(), 64))
    assert r["model_flops_per_step"] == analytic == pytest.approx(r["xla_flops_per_step_per_device"], rel=0.10)
    assert r["peak_source"].startswith("measured CPU matmul peak") and 0 < r["mfu"] < 1
    assert r["memory_per_device"]["total_bytes"] > r["memory_per_device"]["argument_bytes"] > 0
    assert r["input_pipeline"]["examples_per_s"] > 0 and 0 <= r["data_wait_fraction"] < 1
    table = bench.format_table(r)
    assert "device kind" in table and "MFU" in table and "waiting for data" in table
    json.dumps(r)  # the --json payload


def test_aot_compiles_for_a_mesh_without_running(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_bench_parser(parser.add_subparsers(dest="command"))
    out = tmp_path / "aot.json"
    args = parser.parse_args(["bench", "--config", "configs/two_tower.py:tiny", "--aot", "--mesh",
                              "data=2,fsdp=4,tensor=1", "--memory-limit-gib", "0.0001", "--json", str(out)])
    args.config = str(bench.pathlib.Path(__file__).resolve().parents[1] / "configs/two_tower.py") + ":tiny"
    assert args.func(args) == bench.EXIT_DOES_NOT_FIT  # 100 KiB is too small: the check works
    r = json.loads(out.read_text())
    assert r["aot"] and r["mesh"] == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1} and r["num_devices"] == 8
    assert r["fits"] is False and r["memory_per_device"]["total_bytes"] > r["memory_limit_bytes"]
    assert "step_time_s" not in r
    printed = capsys.readouterr().out
    assert "memory / device" in printed and "DOES NOT FIT" in printed


def test_aot_needs_devices_it_cannot_have():
    jax.devices()  # JAX has started with the 8 fake devices of conftest
    with pytest.raises(bench.BenchError, match="xla_force_host_platform_device_count=64"):
        bench.devices_for(64)
    with pytest.raises(bench.BenchError, match="AXIS=SIZE"):
        bench.parse_mesh("data=2,pipeline=2")


def test_train_flops_counts_frozen_parts_once():
    assert flops.train_flops({"a": 2.0, "frozen/teacher/b": 5.0}) == 3 * 2.0 + 5.0
    task = get_task(load_test_config("configs/tigerfg.py:tiny"))
    fwd = task.forward_flops(4)
    vit = sum(flops.vit_forward(task.teacher_config(), 4).values())
    assert sum(v for k, v in fwd.items() if k.startswith("frozen/teacher/")) == pytest.approx(3 * vit)  # item, query, box
    assert flops.train_flops(fwd) == pytest.approx(3 * sum(fwd.values()) - 2 * 3 * vit)


def test_pipeline_only_reports_stages_scaling_and_cores(tmp_path, capsys):
    out, tiger = tmp_path / "pipe.json", f"{REPO}/configs/tigerfg.py:tiny"
    assert bench.main(["--config", tiger, "--pipeline-only", "--workers", "0", "--batches", "2",
                       "--set", "data.photometric=device", "--set", "data.synth_image_format=jpeg",
                       "--hosts", "8xH100 SXM,4xTPU v5e", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    stages = r["stage_ms_per_example"]
    assert {"read", "decode", "crop_resize", "augment", "tokenise", "negative_text", "other", "collate"} <= set(stages)
    assert stages["decode"] > 0 and stages["total"] == pytest.approx(sum(v for k, v in stages.items() if k != "total"))
    assert r["data"]["photometric"] == "device" and r["data"]["synth_image_format"] == "jpeg"
    (scale,) = r["scaling"]
    assert scale["worker_count"] == 0 and scale["examples_per_s"] > 0
    h100, v5e = r["cores_needed"]
    per_core, per_ex = scale["examples_per_s_per_core"], r["train_flops_per_example"]
    assert h100["examples_per_s_consumed"] == pytest.approx(8 * 989e12 * 0.5 / per_ex)
    assert v5e["host_cores_needed"] == pytest.approx(0.95 * 4 * 197e12 * 0.5 / per_ex / per_core)
    assert "ESTIMATE" in capsys.readouterr().out
    bad = ["--config", tiger, "--pipeline-only", "--hosts", "eight H100"]
    assert bench.main(bad) == bench.EXIT_CONFIG_ERROR  # refused before measuring anything
    assert "--hosts 'eight H100': expected CHIPSxKIND" in capsys.readouterr().err

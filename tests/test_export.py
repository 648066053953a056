"""`ecomax export`: every format round-trips a trained two-tower model's outputs; refusals are clear."""

import argparse
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import load_test_config
from data_pipelines import shapes
from launch import export as ex
from trainers.checkpoints import Checkpointer
from trainers.loop import Trainer, train
from trainers.state import abstract_state

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_export")

N_REF = 16


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny two-tower run of 3 steps, and its towers' outputs on held-out data, computed from the
    checkpoint restored the way the trainer resumes (the whole train state)."""
    workdir = tmp_path_factory.mktemp("run")
    config = load_test_config("configs/two_tower.py:tiny", "train.steps=3", "train.checkpoint_every=3",
                              "train.log_every=3", "data.num_eval=64")
    train(config, workdir)
    trainer = Trainer.create(config, workdir)
    tx, _ = trainer.optimizer()
    ckpt = Checkpointer(workdir / "checkpoints")
    state, meta = ckpt.restore(3, abstract_state(trainer.spec, tx, trainer.shardings(tx)))
    ckpt.close()
    params = jax.device_get(state.params)
    d = config.data
    source = shapes.ShapesSource(300, d.image_size, d.max_words, seed=config.seed + 10_007)
    images = np.stack([source[i]["image"] for i in range(len(source))])  # uint8, as the image tower takes them
    tokens = np.stack([source[i]["tokens"] for i in range(len(source))]).astype(np.int32)
    towers = trainer.task.towers()
    assert set(towers) == {"image", "text"}
    ref = dict(zip(("image", "text"), _outputs(towers, trainer.spec, params, images, tokens)))
    return {"workdir": workdir, "config": config, "spec": trainer.spec, "towers": towers, "params": params,
            "meta": meta, "images": images, "tokens": tokens, "ref": ref}


def _outputs(towers, spec, params, images, tokens):
    """The task's serving towers (``Task.towers()``) applied to ``params``: (image [n, d], text [n, d])."""
    model = nnx.merge(spec.graphdef, params)
    return np.asarray(towers["image"].fn(model, images)), np.asarray(towers["text"].fn(model, tokens))


def test_params_roundtrip_on_one_device_and_on_a_new_mesh(trained, tmp_path):
    out = tmp_path / "params"
    manifest = ex.export(trained["workdir"], out, "params")
    assert manifest["step"] == 3 and manifest["config_hash"] == trained["meta"]["config_hash"]
    assert (out / "config.json").is_file() and (out / "export.json").is_file()
    images, tokens = trained["images"][:N_REF], trained["tokens"][:N_REF]

    one = ex.restore_params(out)  # SingleDeviceSharding on device 0
    assert all(isinstance(x.sharding, jax.sharding.SingleDeviceSharding) for x in jax.tree.leaves(one))
    img, txt = _outputs(trained["towers"], trained["spec"], one, images, tokens)
    np.testing.assert_allclose(img, trained["ref"]["image"][:N_REF], atol=1e-6)
    np.testing.assert_allclose(txt, trained["ref"]["text"][:N_REF], atol=1e-6)

    # straight into another topology: 2 x 2 x 2, sharded by the config's rules
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    sharded = ex.restore_params(out, mesh=mesh)
    kernel = sharded["image"]["blocks"][0]["up"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), one, sharded)

    # without ecomax: plain Orbax, target from the checkpoint's own metadata
    import orbax.checkpoint as ocp

    ckpt = ocp.StandardCheckpointer()
    meta = ckpt.metadata((out / "params").absolute()).item_metadata.tree
    device = jax.sharding.SingleDeviceSharding(jax.devices()[-1])
    plain = ckpt.restore((out / "params").absolute(),
                         jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta))
    np.testing.assert_array_equal(plain["text"]["proj"]["kernel"], np.asarray(one["text"]["proj"]["kernel"]))


def test_params_bfloat16(trained, tmp_path):
    out = tmp_path / "bf16"
    ex.export(trained["workdir"], out, "params", dtype="bfloat16")
    params = ex.restore_params(out)
    assert params["image"]["embed"]["kernel"].dtype == jax.numpy.bfloat16
    img, _ = _outputs(trained["towers"], trained["spec"], jax.tree.map(lambda x: x.astype(np.float32), params),
                      trained["images"][:N_REF], trained["tokens"][:N_REF])
    np.testing.assert_allclose(img, trained["ref"]["image"][:N_REF], atol=3e-2)


def test_safetensors_roundtrip_without_ecomax(trained, tmp_path):
    import safetensors.numpy
    from safetensors import safe_open

    out = tmp_path / "st"
    ex.export(trained["workdir"], out, "safetensors")
    tensors = safetensors.numpy.load_file(str(out / "model.safetensors"))
    assert tensors["image/blocks/0/up/kernel"].shape == (32, 128)  # [in, out]
    assert {"logit_scale", "text/embed/embedding", "image/proj/bias"} <= set(tensors)
    with safe_open(str(out / "model.safetensors"), "np") as f:
        meta = f.metadata()
    assert meta["config_hash"] == trained["meta"]["config_hash"] and meta["step"] == "3"
    params = ex.unflatten_params(tensors, trained["spec"].abstract_params)
    img, txt = _outputs(trained["towers"], trained["spec"], params, trained["images"][:N_REF], trained["tokens"][:N_REF])
    np.testing.assert_allclose(img, trained["ref"]["image"][:N_REF], atol=1e-6)
    np.testing.assert_allclose(txt, trained["ref"]["text"][:N_REF], atol=1e-6)


_STANDALONE = """
import sys, numpy as np, jax
out = sys.argv[1]
for name, n in (("image", 16), ("text", 16), ("image", 3)):
    exp = jax.export.deserialize(bytearray(open(f"{out}/{name}.jax_exported", "rb").read()))
    x = np.load(f"{out}/{name}_in.npy")[:n]
    np.save(f"{out}/{name}_{n}_out.npy", np.asarray(exp.call(x)))
mine = sorted(m for m in sys.modules if m.split(".")[0] in ("trainers", "models", "launch", "data_pipelines", "flax"))
assert not mine, mine
"""


def test_stablehlo_roundtrip_with_only_jax(trained, tmp_path):
    out = tmp_path / "hlo"
    manifest = ex.export(trained["workdir"], out, "stablehlo", platforms=("cpu", "cuda", "tpu"))
    assert set(manifest["towers"]) == {"image", "text"}
    assert manifest["towers"]["image"]["inputs"][0]["shape"] == ["b", 32, 32, 3]
    assert set(manifest["towers"]["text"]["platforms"]) == {"cpu", "cuda", "tpu"}
    np.save(out / "image_in.npy", trained["images"][:N_REF])
    np.save(out / "text_in.npy", trained["tokens"][:N_REF])
    # A fresh interpreter, run from an empty folder, that imports only jax and numpy.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    subprocess.run([sys.executable, "-c", _STANDALONE, str(out)], cwd=tmp_path, env=env, check=True, timeout=120)
    for name, n in (("image", 16), ("text", 16), ("image", 3)):
        got = np.load(out / f"{name}_{n}_out.npy")
        np.testing.assert_allclose(got, trained["ref"][name][:n], atol=1e-5)


def test_scann_index_roundtrip(trained, tmp_path):
    from trainers.evaluators.retrieval import exact_search, load_index

    out = tmp_path / "scann"
    manifest = ex.export(trained["workdir"], out, "scann", corpus_size=300)
    assert manifest["item_tower"] == "image" and manifest["query_towers"] == ["text"]
    assert manifest["num_items"] == 300 and manifest["index_kind"] == "scann_brute_force"
    params_file = json.loads((out / "index" / "index_params.json").read_text())
    assert params_file["params"]["num_neighbors"] == 10 and params_file["config_hash"] == trained["meta"]["config_hash"]

    index = load_index(out)
    np.testing.assert_array_equal(index.ids, np.arange(300))
    queries = trained["ref"]["text"]
    ids, _ = index.search(queries, 10)
    expected, _ = exact_search(queries, trained["ref"]["image"], 10)
    assert np.mean(ids[:, 0] == expected[:, 0]) >= 0.99
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, expected)])
    assert overlap >= 0.99


def test_embeddings_are_the_item_towers_outputs_and_open_as_sid_input(trained, tmp_path):
    from data_pipelines.sid.embeddings import open_embeddings

    out = tmp_path / "emb"
    manifest = ex.export(trained["workdir"], out, "embeddings", corpus_size=300)
    assert manifest["kind"] == "embeddings" and manifest["item_tower"] == "image" and manifest["num_items"] == 300
    assert manifest["step"] == 3 and manifest["config_hash"] == trained["meta"]["config_hash"]
    vectors = np.load(out / "items.npy", allow_pickle=False)
    ids = np.load(out / "items.ids.npy", allow_pickle=False)
    assert vectors.dtype == np.float32 and vectors.shape == trained["ref"]["image"].shape
    assert ids.dtype == np.int64 and ids.shape == (300,)
    np.testing.assert_array_equal(ids, np.arange(300))  # two-tower: the held-out images, ids 0..n-1
    np.testing.assert_allclose(vectors, trained["ref"]["image"], atol=1e-5)
    opened, opened_ids = open_embeddings(out / "items.npy", dim=vectors.shape[1])  # what `ecomax sid build` reads
    np.testing.assert_array_equal(opened, vectors)
    np.testing.assert_array_equal(opened_ids, ids)
    with pytest.raises(ex.ExportError, match="not empty; pass --force"):
        ex.export(trained["workdir"], out, "embeddings")
    assert ex.export(trained["workdir"], out, "embeddings", corpus_size=10, force=True)["num_items"] == 10
    assert np.load(out / "items.npy").shape[0] == 10 and np.load(out / "items.ids.npy").shape == (10,)


def test_refuses_non_empty_out_and_unfinished_workdir(trained, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ex.ExportError, match="not empty; pass --force"):
        ex.export(trained["workdir"], out, "safetensors")
    ex.export(trained["workdir"], out, "safetensors", force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()

    empty = tmp_path / "fresh_run"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(trained["config"].to_dict()))
    with pytest.raises(ex.ExportError, match="no finished checkpoint"):
        ex.export(empty, tmp_path / "x", "params")
    assert not (empty / "checkpoints").exists()  # looking did not create it
    with pytest.raises(ex.ExportError, match="finished steps: \\[3\\]"):
        ex.export(trained["workdir"], tmp_path / "y", "params", step=2)


def test_cli_reports_errors(trained, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    ex.add_export_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", "--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"),
                              "--format", "params"])
    assert args.func(args) == ex.EXIT_ERROR
    assert "does not exist" in capsys.readouterr().err


def test_task_without_corpus_is_refused():
    from trainers.tasks import Task

    class NoCorpus(Task):
        """A task that keeps the base class's ``export_corpus`` (none)."""

        def build_model(self, rngs):
            raise NotImplementedError

    with pytest.raises(ex.ExportError, match="no export corpus"):
        ex.export_corpus(NoCorpus(load_test_config()), "some_task")

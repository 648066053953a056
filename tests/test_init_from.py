"""init_from: a run starts from imported Hugging Face weights or another run's parameters, sharded as the rules say."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import load_test_config
from models.hf_import import load_hf
from models.vit import ViT, ViTConfig
from trainers import tasks
from configs.common import init_from_entry
from trainers.init_from import apply_init_from
from trainers.loop import Trainer
from trainers.state import model_spec
from trainers.checkpoints import Checkpointer

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_init_from")

VIT = ViTConfig(image_size=32, patch_size=8, hidden=32, depth=2, heads=4, mlp_dim=64, ln_eps=1e-12,
                pooler_dense=True)


class _Probe(nnx.Module):
    def __init__(self, rngs):
        self.vit = ViT(VIT, rngs=rngs)
        self.head = nnx.Linear(32, 1, rngs=rngs,
                               kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed", "classes")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("classes",)))


class _Images:
    def __len__(self):
        return 64

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        return {"image": rng.normal(size=(32, 32, 3)).astype(np.float32), "y": np.float32(i % 2)}


@tasks.register("test_vit_probe")
class _ProbeTask(tasks.Task):
    def build_model(self, rngs):
        return _Probe(rngs)

    def loss(self, model, batch, rng):
        logit = model.head(model.vit.pooled(batch["image"]))[:, 0]
        return jnp.mean(jnp.square(logit - batch["y"])), {}

    def train_source(self):
        return _Images(), None


@pytest.fixture(scope="module")
def hf_vit(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ViTModel(transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32,
                                                         num_hidden_layers=2, num_attention_heads=4,
                                                         intermediate_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("hf_vit")
    model.save_pretrained(path, safe_serialization=True)
    return path


def probe_config(*overrides):
    config = load_test_config("configs/two_tower.py:tiny", "train.batch_size=8", "train.steps=2",
                              "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2", *overrides)
    config.task = "test_vit_probe"
    config.init_from.vit = init_from_entry("vit")
    return config


def fresh_state(config, workdir):
    """The state a run starting from scratch begins with (``init_from`` applied), on the config's mesh."""
    trainer = Trainer.create(config, workdir)
    tx, _ = trainer.optimizer()
    return trainer.init_state(tx, trainer.shardings(tx))


def test_training_starts_from_the_imported_weights_sharded(hf_vit, tmp_path):
    config = probe_config()
    config.init_from.vit.path = str(hf_vit)
    state = fresh_state(config, tmp_path)
    expected = load_hf(hf_vit).params
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6),
                 state.params["vit"], expected)
    qkv = state.params["vit"]["encoder"]["blocks"][0]["attn"]["qkv_kernel"]
    assert "fsdp" in str(qkv.sharding.spec) and "tensor" in str(qkv.sharding.spec)
    assert not np.any(np.asarray(state.params["head"]["kernel"]))  # the rest keeps its own init


def test_a_model_of_another_size_is_rejected_naming_the_tensor(hf_vit, tmp_path):
    global VIT
    saved, VIT = VIT, ViTConfig(image_size=32, patch_size=8, hidden=32, depth=2, heads=4, mlp_dim=48,
                                ln_eps=1e-12, pooler_dense=True)
    try:
        config = probe_config()
        config.init_from.vit.path = str(hf_vit)
        with pytest.raises(ValueError, match=r"vit/encoder/blocks/0/mlp/fc1/bias: imported shape \(64,\) != model shape \(48,\)"):
            fresh_state(config, tmp_path)
    finally:
        VIT = saved


def test_an_unknown_target_is_rejected(hf_vit, tmp_path):
    config = probe_config()
    config.init_from.vit = init_from_entry("towers/vit", path=str(hf_vit))
    with pytest.raises(ValueError, match="target 'towers/vit': the model has no 'towers'"):
        fresh_state(config, tmp_path)


def test_a_pretrained_vocabulary_grows_by_new_rows_keeping_its_own():
    """mT5's embedding [250112, d] into a generative retriever's [250112 + codes, d]: the imported rows are kept,
    the new ones drawn at the imported scale, the same on every call (every host)."""
    from trainers.init_from import grow

    rng = np.random.default_rng(0)
    emb = rng.normal(0, 0.5, (10, 4)).astype(np.float32)
    out = grow(emb, (16, 4), "embedding")
    np.testing.assert_array_equal(out[:10], emb)
    assert out.shape == (16, 4) and 0.2 < out[10:].std() < 1.0
    np.testing.assert_array_equal(out, grow(emb, (16, 4), "embedding"))
    head = grow(emb.T, (4, 16), "lm_head")  # a [d, vocab] head grows along its second axis
    np.testing.assert_array_equal(head[:, :10], emb.T)
    with pytest.raises(ValueError, match="cannot grow"):
        grow(emb, (8, 4), "embedding")


@pytest.fixture(params=["workdir", "params_export"])
def source_run(request, tmp_path):
    """A finished run (its workdir) or an ``ecomax export --format params`` folder whose parameters hold the
    probe's ViT under ``towers/query/vit`` (random values)."""
    import json

    import orbax.checkpoint as ocp

    rng = np.random.default_rng(7)
    shapes = model_spec(lambda rngs: ViT(VIT, rngs=rngs)).abstract_params
    vit = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32), shapes)
    params = {"towers": {"query": {"vit": vit}, "head": np.ones(3, np.float32)}}
    if request.param == "workdir":
        ckpt = Checkpointer(tmp_path / "source" / "checkpoints", use_async=False)
        ckpt.save(5, {"params": params}, None, {})
    else:  # the layout launch/export.py:export_params writes
        ckpt = ocp.StandardCheckpointer()
        ckpt.save((tmp_path / "source" / "params").absolute(), params)
        ckpt.wait_until_finished()
        (tmp_path / "source" / "export.json").write_text(json.dumps({"kind": "params"}))
    ckpt.close()
    return tmp_path / "source", vit


def test_a_tower_of_another_run_is_placed_exactly_and_sharded(source_run, tmp_path):
    """init_from format=ecomax: the source subtree of a finished run's checkpoint lands bit for bit at the target,
    with the rules' shardings on the 2x2x2 mesh; the rest keeps its own init."""
    path, vit = source_run
    config = probe_config()
    config.init_from.vit = init_from_entry("vit", path=str(path), format="ecomax", source="towers/query/vit")
    state = fresh_state(config, tmp_path / "run")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), state.params["vit"], vit)
    qkv = state.params["vit"]["encoder"]["blocks"][0]["attn"]["qkv_kernel"]
    assert "fsdp" in str(qkv.sharding.spec) and "tensor" in str(qkv.sharding.spec)
    assert len(qkv.sharding.device_set) == 8
    assert not np.any(np.asarray(state.params["head"]["kernel"]))


@pytest.mark.parametrize("source, error", [
    ("towers/item/vit", "source 'towers/item/vit': .* has no 'item' \\(it has \\['head', 'query'\\]\\)"),
    ("towers/query", "the imported parameters do not match the model; missing \\['vit/cls_token'"),
])
def test_a_missing_or_mismatched_source_subtree_is_an_error_naming_it(source_run, tmp_path, source, error):
    path, _ = source_run
    entry = init_from_entry("vit", path=str(path), format="ecomax", source=source)
    abstract = model_spec(_Probe).abstract_params
    with pytest.raises(ValueError, match=error):  # raised before anything is placed
        apply_init_from(abstract, jax.tree.map(lambda _: None, abstract), ml_collections.ConfigDict({"vit": entry}))

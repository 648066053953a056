"""Sentence embeddings from an imported Hugging Face BERT-family encoder (mean pooling, then L2).

    enc = SentenceEncoder("path/to/all-MiniLM-L6-v2", max_len=64)
    enc.encode(["red running shoes", "a kitchen knife"])      # [2, 384] float32 unit rows

The folder holds ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (``models.hf_import``).
Texts are tokenised (truncated at ``max_len`` tokens), mean-pooled over the real tokens and
L2-normalised, as sentence-transformers does (``TextEncoder.embed``). Batches are padded to a fixed
row count (``batch_size``, or the next power of two >= 8 for fewer texts) and to a multiple of 16
tokens, so the jitted encoder compiles a few shapes, not one per batch: a retriever that embeds a
handful of queries per call reuses the same compiled functions.

Used by ``ecomax sid embed`` (item vectors) and the search agents' passage retriever
(``trainers/evaluators/passage_retriever.py``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import numpy as np

TEXT_FAMILIES = ("bert", "xlmr")


def padded_rows(n: int, batch_size: int) -> int:
    """Rows a batch of ``n`` texts is padded to: ``batch_size`` when ``n >= batch_size``, else the next power
    of two (at least 8, at most ``batch_size``)."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, max(8, 1 << max(0, n - 1).bit_length()))


class SentenceEncoder:
    """A loaded text encoder: ``encode(texts [N]) -> [N, dim]`` float32 unit vectors."""

    def __init__(self, path: str | pathlib.Path, *, max_len: int = 64, batch_size: int = 256):
        import jax  # noqa: PLC0415
        from flax import nnx  # noqa: PLC0415

        from models.hf_import import HFImportError, load_hf, load_tokenizer  # noqa: PLC0415

        if batch_size < 1 or max_len < 1:
            raise ValueError(f"batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        imp = load_hf(path)
        if imp.family not in TEXT_FAMILIES:
            raise HFImportError(f"{path}: a {imp.family!r} checkpoint; a sentence encoder needs a text encoder "
                                f"({', '.join(TEXT_FAMILIES)})")
        self.path, self.max_len, self.batch_size = str(path), int(max_len), int(batch_size)
        self.tokenizer = load_tokenizer(path, max_len=max_len)
        self.pad_id = (self.tokenizer.padding or {}).get("pad_id", 0)
        graphdef, self.params = nnx.split(imp.build())
        self._embed = jax.jit(lambda p, ids, mask, types: nnx.merge(graphdef, p).embed(ids, mask, types))
        self.dim = int(imp.config.hidden)

    def _batch(self, texts: Sequence[str], rows: int) -> np.ndarray:
        """texts ``[n <= rows]`` -> ``[n, dim]``: one padded call of the jitted encoder."""
        from models.hf_import import tokenize  # noqa: PLC0415

        batch = tokenize(self.tokenizer, texts)
        n, length = batch["ids"].shape
        width = min(-(-length // 16) * 16, max(self.max_len, length))
        ids = np.full((rows, width), self.pad_id, np.int32)
        mask, types = np.zeros((rows, width), np.int32), np.zeros((rows, width), np.int32)
        ids[:n, :length], mask[:n, :length], types[:n, :length] = batch["ids"], batch["mask"], batch["type_ids"]
        mask[n:, 0] = 1  # padding rows attend to one token: finite, then dropped
        return np.asarray(self._embed(self.params, ids, mask, types), np.float32)[:n]

    def encode(self, texts: Sequence[str], *, progress: bool = False, desc: str = "embed") -> np.ndarray:
        """texts ``[N]`` -> ``[N, dim]`` float32 unit rows (``[0, dim]`` for no text)."""
        import tqdm  # noqa: PLC0415

        texts = list(texts)
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        rows = padded_rows(len(texts), self.batch_size)
        out = [self._batch(texts[s:s + rows], rows)
               for s in tqdm.trange(0, len(texts), rows, desc=desc, unit="batch", disable=not progress)]
        return np.concatenate(out)


def encode_texts(encoder: str | pathlib.Path, texts: list[str], *, batch_size: int = 256, max_len: int = 64,
                 progress: bool = True) -> np.ndarray:
    """texts ``[N]`` -> ``[N, hidden]`` float32 unit vectors from a Hugging Face BERT-family folder (a
    one-off ``SentenceEncoder``)."""
    return SentenceEncoder(encoder, max_len=max_len, batch_size=batch_size).encode(texts, progress=progress)

"""Tokenizers for the search-agent policies (Hugging Face ``tokenizers``), and Search-R1's prompt.

* ``word_tokenizer(texts)``: a word-level vocabulary of a corpus (the synthetic world's passages and
  questions), with every rollout tag (``<search>``, ``</search>``, ...) a single token; what a tiny policy
  trained from scratch on CPU speaks.
* ``hf_tokenizer(folder)``: a Hugging Face ``tokenizer.json`` (Qwen2.5's; SmolLM2's byte-level BPE, which
  ``write_gguf_tokenizer`` extracts from its GGUF file through transformers' GGUF reader).

``AgentTokenizer`` wraps either with the ids the rollout needs: ``pad_id`` and, when ``</search>`` and
``</answer>`` are single tokens, those two as the sampler's stop tokens (a BPE vocabulary spells them in
several pieces: generation then runs the turn's full length and the host cuts at the first tag).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

from data_pipelines.agents.rollout import TAGS, hindsight_block

PAD, UNK = "[PAD]", "[UNK]"
TAG_TOKENS = tuple(t for tag in (*TAGS, "hindsight") for t in (f"<{tag}>", f"</{tag}>"))

# Search-R1's instruction (Jin et al. 2025, Sec. 3.2, Table 1), with IG-Search's / this format's tag names
PROMPT = ("Answer the given question. You must conduct reasoning inside <think> and </think> first every time "
          "you get new information. After reasoning, if you find you lack some knowledge, you can call a search "
          "engine by <search> query </search> and it will return the top searched results between <documents> "
          "and </documents>. You can search as many times as you want. If you find no further external knowledge "
          "needed, you can directly provide the answer inside <answer> and </answer>, without detailed "
          "illustrations. For example, <answer> Beijing </answer>. Question: {question}\n")


# Search-R1's retrieved-passage line (its `_passages2string`), inside <documents> ... </documents>
DOCUMENT = "Doc {i}(Title: {title}) {text}"


class AgentTokenizer:
    """A ``tokenizers.Tokenizer`` with the rollout's ids: ``encode(text) -> list[int]``, ``decode(ids)``."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_id = tok.token_to_id(PAD) if tok.token_to_id(PAD) is not None else 0
        ends = [self.encode(t) for t in ("</search>", "</answer>")]
        if not all(ends):
            raise ValueError("the tokenizer encodes </search> or </answer> to nothing")
        self.stop_ids: tuple[int, ...] = tuple(e[0] for e in ends) if all(len(e) == 1 for e in ends) else ()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.pad_id], skip_special_tokens=False)


def word_tokenizer(texts: Iterable[str]) -> AgentTokenizer:
    """A word-level vocabulary of ``texts`` (words and punctuation marks, lower-cased; ``[UNK]`` for the
    rest), the rollout tags as single tokens; id 0 is ``[PAD]``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=[PAD, UNK, *TAG_TOKENS], min_frequency=1)
    template = [DOCUMENT.format(i=i, title="", text="") for i in range(1, 11)] + [PROMPT]
    template.append(hindsight_block(["<search> q </search>", ""], [True, False]))  # SD-Search's teacher block
    tok.train_from_iterator([*template, *texts], trainer)
    tok.add_special_tokens(list(TAG_TOKENS))
    return AgentTokenizer(tok)


def hf_tokenizer(folder: str | pathlib.Path) -> AgentTokenizer:
    """A Hugging Face folder's ``tokenizer.json``."""
    from tokenizers import Tokenizer

    path = pathlib.Path(folder) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no tokenizer.json (ecomax agents import-gguf writes one)")
    return AgentTokenizer(Tokenizer.from_file(str(path)))


def write_gguf_tokenizer(gguf_path: str | pathlib.Path, folder: str | pathlib.Path) -> pathlib.Path:
    """The GGUF file's own tokenizer (transformers' GGUF reader) saved as ``folder/tokenizer.json``."""
    from transformers import AutoTokenizer

    gguf_path = pathlib.Path(gguf_path)
    AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(str(folder))
    return pathlib.Path(folder) / "tokenizer.json"

"""SentencePiece tokenizers for ecomax text towers (queries, titles), trained fully in memory.

    path = train_sentencepiece(texts, "spm.model", vocab_size=32000)      # unigram, byte_fallback
    tok = Tokenizer.load(path)
    ids, mask = tok.encode_batch(["新款蓝牙耳机", "wireless earbuds"], max_len=16)   # int32, bool

Special ids are fixed: pad=0, unk=1, bos=2, eos=3. With ``byte_fallback`` every string round-trips
(unseen characters become byte pieces); note that the 256 byte pieces and the 4 specials count
towards ``vocab_size``.

Corpora: ``kuaisearch_corpus(src_dir)`` streams the text fields of a KuaiSearch folder (released or
demo layout, or the synthetic one); ``iter_corpus(paths, fields)`` mixes KuaiSearch folders, JSONL
files and plain text files. ``tokenizer_main`` is what ``ecomax data tokenizer`` calls.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
import sys
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

# What the KuaiSearch corpus holds by default: "kind.field".
DEFAULT_KUAISEARCH_FIELDS: tuple[str, ...] = (
    "items.item_title",
    "recall.query",
    "relevance.query",
    "relevance.item_title",
)


def _clean(text: str) -> str:
    return " ".join(text.split())  # newlines/tabs would split or confuse sentencepiece


def train_sentencepiece(
    texts: Iterable[str],
    out_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "unigram",
    character_coverage: float = 0.9995,
    byte_fallback: bool = True,
    split_digits: bool = True,
    max_sentences: int = 2_000_000,
    max_sentence_length: int = 4192,
    hard_vocab_limit: bool = False,
    normalization_rule_name: str = "nmt_nfkc",
    user_defined_symbols: Sequence[str] = (),
    num_threads: int | None = None,
    seed: int = 0,
    write_vocab: bool = True,
) -> pathlib.Path:
    """Trains a SentencePiece model in memory from ``texts`` and writes it to ``out_path``.

    Args:
      texts: any iterable of strings (streamed; empty strings are skipped, whitespace collapsed).
      out_path: the ``.model`` file to write (parent folders are created). With ``write_vocab``,
        a ``<stem>.vocab`` TSV (piece, score) is written beside it.
      vocab_size: target vocabulary size including the 4 specials (and the 256 byte pieces when
        ``byte_fallback``). With ``hard_vocab_limit=False`` (default) it is an upper bound, so a
        small corpus yields a smaller vocabulary instead of an error.
      model_type: "unigram" (default), "bpe", "char" or "word".
      max_sentences: sentencepiece samples at most this many sentences (reservoir, ``seed``-free
        but shuffled by sentencepiece) to bound memory.
      seed: sets sentencepiece's random seed for reproducible models.

    Returns: ``out_path`` as a Path.
    """
    import sentencepiece as spm  # noqa: PLC0415

    if vocab_size < 8:
        raise ValueError(f"vocab_size must be >= 8, got {vocab_size}")
    out = pathlib.Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = [0]

    def sentences() -> Iterator[str]:
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"train_sentencepiece: expected str, got {type(t).__name__}")
            t = _clean(t)
            if t:
                count[0] += 1
                yield t

    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        byte_fallback=byte_fallback,
        split_digits=split_digits,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece="<pad>",
        unk_piece="<unk>",
        bos_piece="<s>",
        eos_piece="</s>",
        hard_vocab_limit=hard_vocab_limit,
        input_sentence_size=max_sentences,
        shuffle_input_sentence=True,
        max_sentence_length=max_sentence_length,
        normalization_rule_name=normalization_rule_name,
        user_defined_symbols=list(user_defined_symbols),
        num_threads=num_threads or max(1, os.cpu_count() or 1),
        minloglevel=2,
    )
    if count[0] == 0:
        raise ValueError("train_sentencepiece: the corpus has no non-empty text")
    proto = model.getvalue()
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_bytes(proto)
    os.replace(tmp, out)
    if write_vocab:
        sp = spm.SentencePieceProcessor(model_proto=proto)
        with open(out.with_suffix(".vocab"), "w", encoding="utf-8") as f:
            for i in range(sp.get_piece_size()):
                f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n")
    return out


class Tokenizer:
    """A SentencePiece model with fixed-length batch encoding. Pickles as its model bytes."""

    def __init__(self, model: str | os.PathLike | bytes):
        import sentencepiece as spm  # noqa: PLC0415

        if isinstance(model, (bytes, bytearray)):
            self._proto = bytes(model)
        else:
            self._proto = pathlib.Path(model).read_bytes()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"tokenizer special ids (pad, unk, bos, eos) are {ids}, "
                             f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        return cls(pathlib.Path(path))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        return self._sp.encode(text, add_bos=add_bos, add_eos=add_eos)

    def pieces(self, text: str) -> list[str]:
        return self._sp.encode(text, out_type=str)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/bos/eos are dropped."""
        return self._sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def encode_batch(self, texts: Sequence[str], max_len: int, *, add_bos: bool = False,
                     add_eos: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """``[n] texts -> (ids int32 [n, max_len], mask bool [n, max_len])``.

        Right-padded with pad=0; longer texts are truncated on the right (bos/eos, when asked
        for, are kept). ``mask`` is True on real tokens.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        texts = list(texts)
        n = len(texts)
        ids = np.zeros((n, max_len), dtype=np.int32)
        mask = np.zeros((n, max_len), dtype=bool)
        if n == 0:
            return ids, mask
        encoded = self._sp.encode(texts)
        room = max_len - int(add_bos) - int(add_eos)
        for r, seq in enumerate(encoded):
            body = seq[:max(room, 0)]
            row = ([BOS_ID] if add_bos else []) + body + ([EOS_ID] if add_eos else [])
            row = row[:max_len]
            ids[r, :len(row)] = row
            mask[r, :len(row)] = True
        return ids, mask

    def __getstate__(self):
        return {"proto": self._proto}

    def __setstate__(self, state):
        self.__init__(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size})"


# ----------------------------------------------------------------------------- corpora


def _parse_fields(fields: str | Sequence[str] | None) -> list[str] | None:
    if fields is None:
        return None
    if isinstance(fields, str):
        fields = fields.split(",")
    out = [f.strip() for f in fields if f.strip()]
    return out or None


def _jsonl_texts(path: pathlib.Path, keys: Sequence[str]) -> Iterator[str]:
    from data_pipelines.jsonl_convert import iter_file_lines  # noqa: PLC0415

    for line_no, raw in iter_file_lines(path):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}:{line_no}: cannot read JSON line ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{line_no}: expected a JSON object")
        for k in keys:
            v = obj.get(k)
            if v is None:
                raise ValueError(f"{path}:{line_no}: missing text field {k!r}")
            if not isinstance(v, str):
                raise ValueError(f"{path}:{line_no}: field {k!r} is {type(v).__name__}, not str")
            if v:
                yield v


def kuaisearch_corpus(src_dir: str | os.PathLike,
                      fields: str | Sequence[str] | None = None) -> Iterator[str]:
    """Streams the text fields of a KuaiSearch folder (released, demo or synthetic layout).

    ``fields``: "kind.field" names (default ``DEFAULT_KUAISEARCH_FIELDS``: item titles, recall
    queries, relevance queries and titles). Kinds whose files are absent are skipped only when
    ``fields`` is the default; an explicitly named kind must exist.
    """
    from data_pipelines.kuaisearch import schema  # noqa: PLC0415

    explicit = _parse_fields(fields)
    wanted = explicit or list(DEFAULT_KUAISEARCH_FIELDS)
    by_kind: dict[str, list[str]] = {}
    for f in wanted:
        if "." not in f:
            raise ValueError(f"KuaiSearch corpus field {f!r} must be 'kind.field', e.g. 'items.item_title'")
        kind, name = f.split(".", 1)
        if kind not in schema.SCHEMAS:
            raise ValueError(f"unknown KuaiSearch kind {kind!r} in field {f!r}; kinds: {schema.KINDS}")
        known = dict((x.name, x.type) for x in schema.SCHEMAS[kind])
        if known.get(name) != schema.STR:
            texts = [n for n, t in known.items() if t == schema.STR]
            raise ValueError(f"{f!r} is not a text field of {kind}; text fields: {texts}")
        by_kind.setdefault(kind, []).append(name)
    for kind, names in by_kind.items():
        try:
            files = schema.find_source_files(src_dir, kind)
        except FileNotFoundError:
            if explicit:
                raise
            continue
        for p in files:
            yield from _jsonl_texts(p, names)


def iter_corpus(paths: Sequence[str | os.PathLike],
                fields: str | Sequence[str] | None = None) -> Iterator[str]:
    """Texts from each path: a folder is a KuaiSearch source (``kuaisearch_corpus``); a ``.jsonl``
    file yields the given field names (the part after a ``kind.`` prefix; default ``query`` and
    ``item_title`` where present); any other file yields its non-empty lines."""
    parsed = _parse_fields(fields)
    for p in paths:
        p = pathlib.Path(p)
        if p.is_dir():
            yield from kuaisearch_corpus(p, parsed)
        elif p.suffix == ".jsonl":
            keys = sorted({f.split(".", 1)[-1] for f in parsed}) if parsed else None
            if keys is None:
                from data_pipelines.jsonl_convert import iter_file_lines  # noqa: PLC0415

                first = next((ln for _, ln in iter_file_lines(p)), b"{}")
                obj = json.loads(first.decode("utf-8"))
                keys = [k for k in ("query", "item_title") if k in obj]
                if not keys:
                    raise ValueError(f"{p}: no 'query'/'item_title' field; pass fields=")
            yield from _jsonl_texts(p, keys)
        elif p.is_file():
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        yield line.rstrip("\n")
        else:
            raise FileNotFoundError(f"corpus path not found: {p}")


def tokenizer_main(corpus_paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                   vocab_size: int = 32000, fields: str | Sequence[str] | None = None, *,
                   model_type: str = "unigram", max_sentences: int = 2_000_000,
                   verbose: bool = True) -> pathlib.Path:
    """``ecomax data tokenizer --corpus PATH... --out spm.model [--vocab-size N] [--fields a.b,..]``.

    Trains on ``iter_corpus(corpus_paths, fields)`` and writes ``out`` (+ ``.vocab``). Prints the
    vocabulary size and a sample tokenization; returns the model path.
    """
    if isinstance(corpus_paths, (str, os.PathLike)):
        corpus_paths = [corpus_paths]
    sample: list[str] = []

    def texts() -> Iterator[str]:
        for t in iter_corpus(corpus_paths, fields):
            if len(sample) < 3:
                sample.append(t)
            yield t

    path = train_sentencepiece(texts(), out, vocab_size=vocab_size, model_type=model_type,
                               max_sentences=max_sentences)
    if verbose:
        tok = Tokenizer.load(path)
        print(f"tokenizer: {path} ({model_type}, vocab {tok.vocab_size})", file=sys.stderr)
        for s in sample:
            print(f"  {s!r} -> {tok.pieces(s)}", file=sys.stderr)
    return path

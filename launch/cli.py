"""The ``ecomax`` command line: train, data, demo, bench, export, launch."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _train(args: argparse.Namespace) -> int:
    from launch.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.set)
    except ConfigError as e:
        print(f"ecomax train: {e}", file=sys.stderr)
        return 2
    from trainers.loop import NonFiniteLossError, train

    try:
        result = train(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"ecomax train: {e}", file=sys.stderr)
        return 3
    if result.status == "interrupted":
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ecomax", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a config in a workdir (resumes from its newest good checkpoint)")
    p.add_argument("--config", required=True, help="configs/NAME.py[:ARG]")
    p.add_argument("--workdir", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable), typed by the current value")
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

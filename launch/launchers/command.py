"""The ecomax command line that every launcher passes through (everything after `--`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

CLI_MODULE = "launch.cli"
# The folder holding launch/: put on PYTHONPATH so that `python -m launch.cli` runs this very code.
REPO_ROOT = Path(__file__).resolve().parents[2]


def allocator_switch(env=None) -> str:
    """The ``ECOMAX_ALLOCATOR`` value a launcher hands to the processes it starts: the launcher's own
    (default ``auto``). Each process's ``ecomax`` entry point then preloads that allocator where its
    library is installed on that host (launch/allocator.py), or runs on glibc malloc where it is not."""
    import os

    from launch.allocator import requested

    return requested(os.environ if env is None else env)


def add_command_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ecomax_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="the ecomax command line, after `--` (e.g. -- train --config configs/X.py:small)")


def command_args(args: argparse.Namespace, *, required: bool = True) -> list[str]:
    """The arguments after `--` (argparse keeps the separator with REMAINDER in some Python versions)."""
    rest = list(args.ecomax_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if required and not rest:
        raise SystemExit(f"ecomax launch {args.launcher}: give the ecomax command after `--`, "
                         "e.g. `-- train --config configs/X.py:small --workdir runs/x`")
    return rest


def python_module_argv(module: str, rest: Sequence[str], python: str | None = None) -> list[str]:
    """`python -m module rest...` with this interpreter: works in a venv whose bin/ is not on PATH."""
    return [python or sys.executable, "-m", module, *rest]

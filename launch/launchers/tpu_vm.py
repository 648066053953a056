"""`ecomax launch tpu-vm`: the same ecomax command on every worker of a Cloud TPU VM.

    ecomax launch tpu-vm --name my-v5e-16 --zone us-west4-a --project my-proj --remote-dir ecomax \\
        -- train --config configs/X.py:base --workdir gs://my-bucket/runs/x

runs ``gcloud compute tpus tpu-vm ssh NAME --zone Z [--project P] --worker=all --command 'CMD'`` where
CMD is ``[cd DIR &&] ECOMAX_DISTRIBUTED=auto ECOMAX_ALLOCATOR=auto ecomax ARGS`` (each word quoted with shlex).
``ECOMAX_DISTRIBUTED=auto`` makes ``initialize_distributed()`` use jax's TPU detection (a TPU VM sets
no environment variable that says so). With ``--dry-run``, or when gcloud is not on PATH, the command
is printed instead of run.

Allocator: CMD also sets ``ECOMAX_ALLOCATOR`` (the launcher's own value, default ``auto``); ``ecomax``
on each worker preloads that allocator where its library is installed there (the ``cmeel-mimalloc``
wheel comes with ``pip install`` of ecomax; else the worker's jemalloc/tcmalloc), and runs on glibc
malloc, saying so in its log, where none is.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence

from launch.distributed import ENV_MODE
from launch.allocator import ENV_SWITCH
from launch.launchers.command import add_command_argument, allocator_switch, command_args


def remote_command(ecomax_args: Sequence[str], *, entry: str = "ecomax", remote_dir: str | None = None,
                   allocator: str = "auto") -> str:
    """The shell command each worker runs."""
    command = f"{ENV_MODE}=auto {ENV_SWITCH}={shlex.quote(allocator)} {shlex.join([entry, *ecomax_args])}"
    return f"cd {shlex.quote(remote_dir)} && {command}" if remote_dir else command


def build_ssh_argv(ecomax_args: Sequence[str], *, name: str, zone: str, project: str | None = None,
                   entry: str = "ecomax", remote_dir: str | None = None, allocator: str = "auto") -> list[str]:
    argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", name, "--zone", zone]
    if project:
        argv += ["--project", project]
    return argv + ["--worker=all", "--command", remote_command(ecomax_args, entry=entry, remote_dir=remote_dir,
                                                                    allocator=allocator)]


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help="run on every worker of a Cloud TPU VM (gcloud ssh --worker=all)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project")
    parser.add_argument("--remote-dir", help="cd here on each worker first (relative to the home folder)")
    parser.add_argument("--entry", default="ecomax",
                        help="the ecomax program on the workers (default: ecomax; e.g. .venv/bin/ecomax)")
    parser.add_argument("--dry-run", action="store_true", help="print the gcloud command, do not run it")
    add_command_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        switch = allocator_switch()
    except ValueError as e:
        print(f"ecomax launch tpu-vm: {e}", file=sys.stderr)
        return 2
    argv = build_ssh_argv(command_args(args), name=args.name, zone=args.zone, project=args.project,
                          entry=args.entry, remote_dir=args.remote_dir, allocator=switch)
    gcloud = shutil.which("gcloud")
    if args.dry_run or gcloud is None:
        if gcloud is None and not args.dry_run:
            print("ecomax launch tpu-vm: gcloud is not on PATH; run this yourself:", file=sys.stderr)
        print(shlex.join(argv))
        return 0
    return subprocess.call([gcloud, *argv[1:]])

"""`ecomax launch slurm`: an sbatch script with one task per node, each task `srun`-started.

    ecomax launch slurm --nodes 4 --gpus-per-node 8 --partition gpu --time 12:00:00 \\
        -- train --config configs/X.py:base --workdir /shared/runs/x

Inside each task jax's SLURM detection finds the coordinator (first node of the step), the process
count and the process id from the variables srun sets; ``initialize_distributed()`` adds all of the
node's GPUs (jax alone would give each task one GPU). ``srun --kill-on-bad-exit=1`` ends the whole
step when one task fails. The script is written to ``--output-dir`` and submitted when ``sbatch`` is on
PATH (``--no-submit`` only writes it); job logs go to ``--output-dir/<job-name>-<job-id>.out``.

Allocator: the script exports ``ECOMAX_ALLOCATOR`` (the launcher's own value, default ``auto``), and
each task's ``python -m launch.cli`` preloads that allocator on its node where the library is installed
(the ``cmeel-mimalloc`` wheel in the job's venv, or the node's jemalloc/tcmalloc) by re-executing
itself once; srun itself is not preloaded. The task's log names the allocator it runs under.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from launch.allocator import ENV_SWITCH
from launch.launchers.command import (
    CLI_MODULE,
    REPO_ROOT,
    add_command_argument,
    allocator_switch,
    command_args,
    python_module_argv,
)

_TIME = re.compile(r"^(\d+-)?\d{1,3}:\d{2}:\d{2}$")
SUBMIT_TIMEOUT_S = 120


def build_sbatch_script(command: Sequence[str], *, nodes: int, gpus_per_node: int, job_name: str,
                        log_dir: Path, cwd: Path, partition: str | None = None, time_limit: str | None = None,
                        account: str | None = None, allocator: str = "auto") -> str:
    """The sbatch script text; ``command`` is the full argv each task runs."""
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0, got {nodes} and {gpus_per_node}")
    if time_limit is not None and not _TIME.match(time_limit):
        raise ValueError(f"--time {time_limit!r}: expected HH:MM:SS or D-HH:MM:SS")
    for label, value in (("--job-name", job_name), ("--partition", partition), ("--account", account),
                         ("--output-dir", str(log_dir))):
        if value is not None and re.search(r"\s", value):
            raise ValueError(f"{label} {value!r}: #SBATCH values cannot contain whitespace")
    directives = {
        "job-name": job_name,
        "nodes": nodes,
        "ntasks-per-node": 1,
        "gpus-per-node": gpus_per_node or None,
        "partition": partition,
        "time": time_limit,
        "account": account,
        "output": f"{log_dir}/%x-%j.out",
    }
    lines = ["#!/bin/bash", "# Written by `ecomax launch slurm`: one task per node; jax.distributed finds the rest."]
    lines += [f"#SBATCH --{key}={value}" for key, value in directives.items() if value is not None]
    lines += [
        "set -euo pipefail",
        f"cd {shlex.quote(str(cwd))}",
        "export PYTHONUNBUFFERED=1",
        f"export {ENV_SWITCH}={shlex.quote(allocator)}  # the task preloads it where installed (launch/allocator.py)",
        f"export PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " + shlex.join(command),
        "",
    ]
    return "\n".join(lines)


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help="write (and submit) a SLURM sbatch script",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True, help="0 for a CPU-only job")
    parser.add_argument("--partition")
    parser.add_argument("--time", dest="time_limit", metavar="HH:MM:SS")
    parser.add_argument("--account")
    parser.add_argument("--job-name", default="ecomax")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/slurm"),
                        help="where the script and the job logs go (default: runs/slurm)")
    parser.add_argument("--submit", action=argparse.BooleanOptionalAction, default=None,
                        help="submit with sbatch (default: when sbatch is on PATH)")
    add_command_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    output_dir = args.output_dir.resolve()
    try:
        script = build_sbatch_script(
            python_module_argv(CLI_MODULE, command_args(args)), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            job_name=args.job_name, log_dir=output_dir, cwd=Path.cwd(), partition=args.partition,
            time_limit=args.time_limit, account=args.account, allocator=allocator_switch())
    except ValueError as e:
        print(f"ecomax launch slurm: {e}", file=sys.stderr)
        return 2
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(script)
    sbatch = shutil.which("sbatch")
    if args.submit is False or (args.submit is None and sbatch is None):
        print(f"wrote {path}; submit it with: sbatch {shlex.quote(str(path))}")
        return 0
    if sbatch is None:
        print(f"ecomax launch slurm: --submit given but sbatch is not on PATH; the script is {path}",
              file=sys.stderr)
        return 1
    done = subprocess.run([sbatch, str(path)], capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    sys.stdout.write(done.stdout)
    sys.stderr.write(done.stderr)
    print(f"script: {path}; logs: {output_dir}/{args.job_name}-<job id>.out")
    return done.returncode

"""`ecomax launch ...`: start an ecomax command on many processes, here or on a cluster.

| launcher | what it does |
|---|---|
| `local`  | N processes on this machine, each with M fake CPU devices, joined through a local coordinator |
| `slurm`  | writes an sbatch script (one task per node, `srun`) and submits it when `sbatch` is on PATH |
| `gke`    | writes a Kubernetes JobSet manifest (TPU or GPU node pools) for `kubectl apply -f` |
| `tpu-vm` | runs the command on every worker of a Cloud TPU VM through `gcloud ... ssh --worker=all` |

Everything after `--` is the ecomax command line (`train --config ... --workdir ...`). Inside each
process `launch.distributed.initialize_distributed()` finds what the launcher set up.

The CLI registers these through ``add_launch_parser(subparsers)``; ``python -m launch.launchers``
runs them without the CLI.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from launch.launchers import gke, local, slurm, tpu_vm

LAUNCHERS = {"local": local, "slurm": slurm, "gke": gke, "tpu-vm": tpu_vm}


def _add_launchers(subparsers) -> None:
    for name, module in LAUNCHERS.items():
        module.add_parser(subparsers, name)


def add_launch_parser(subparsers) -> argparse.ArgumentParser:
    """Register `launch {local,slurm,gke,tpu-vm}` on the CLI's subparsers; each sets ``func(args) -> int``."""
    parser = subparsers.add_parser(
        "launch", help="run an ecomax command on many processes (local, SLURM, GKE, TPU VM)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_launchers(parser.add_subparsers(dest="launcher", required=True, metavar="{" + ",".join(LAUNCHERS) + "}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.launchers", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_launchers(parser.add_subparsers(dest="launcher", required=True, metavar="{" + ",".join(LAUNCHERS) + "}"))
    args = parser.parse_args(argv)
    return args.func(args)

"""`ecomax launch gke`: a Kubernetes JobSet manifest, one pod per node, for TPU or GPU node pools.

    ecomax launch gke --name ecomax-x --image us-docker.pkg.dev/P/ecomax/ecomax:latest --nodes 2 \\
        --accelerator tpu-v5e --topology 2x4 --workdir gs://my-bucket/runs/x --out x.yaml \\
        -- train --config configs/X.py:base
    kubectl apply -f x.yaml

The JobSet (jobset.x-k8s.io/v1alpha2) has one replicated Job, Indexed, with parallelism = completions
= ``--nodes``. Every pod gets ``JAX_COORDINATOR_ADDRESS`` (pod 0 through the JobSet's headless
service: ``<name>-workers-0-0.<name>``), ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (the Job
completion index), which ``initialize_distributed()`` reads. TPU pods request ``google.com/tpu`` and
select ``cloud.google.com/gke-tpu-accelerator`` / ``gke-tpu-topology``; GPU pods request
``nvidia.com/gpu`` and select ``cloud.google.com/gke-accelerator``. A ``gs://BUCKET/PATH`` workdir is
mounted with the Cloud Storage FUSE CSI driver at ``/gcs/BUCKET`` (pod annotation
``gke-gcsfuse/volumes``; the pods' service account needs access to the bucket); a path workdir is a
``--pvc`` claim (ReadWriteMany, e.g. Filestore) mounted at that path. Either way ``--workdir`` is
appended to the ecomax command.

Allocator: every pod gets ``ECOMAX_ALLOCATOR`` (the launcher's own value, default ``auto``); the
container's ``ecomax`` entry point preloads that allocator where the image has its library. An image
built with ``pip install`` of ecomax has the ``cmeel-mimalloc`` wheel (a dependency); an image that
installs ecomax without its dependencies needs ``pip install cmeel-mimalloc`` (or Debian's
``libjemalloc2``), else its pods run on glibc malloc and their logs say so.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from launch.allocator import ENV_SWITCH
from launch.launchers.command import add_command_argument, allocator_switch, command_args

API_VERSION = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "workers"
COORDINATOR_PORT = 8482  # jax's own default for TPU pods
GCS_MOUNT_ROOT = "/gcs"

# accelerator -> (resource name, node selector key, node selector value, default chips per node)
ACCELERATORS = {
    "tpu-v4": ("google.com/tpu", "cloud.google.com/gke-tpu-accelerator", "tpu-v4-podslice", 4),
    "tpu-v5e": ("google.com/tpu", "cloud.google.com/gke-tpu-accelerator", "tpu-v5-lite-podslice", 4),
    "tpu-v5p": ("google.com/tpu", "cloud.google.com/gke-tpu-accelerator", "tpu-v5p-slice", 4),
    "tpu-v6e": ("google.com/tpu", "cloud.google.com/gke-tpu-accelerator", "tpu-v6e-slice", 4),
    "h100": ("nvidia.com/gpu", "cloud.google.com/gke-accelerator", "nvidia-h100-80gb", 8),
    "h200": ("nvidia.com/gpu", "cloud.google.com/gke-accelerator", "nvidia-h200-141gb", 8),
    "a100": ("nvidia.com/gpu", "cloud.google.com/gke-accelerator", "nvidia-tesla-a100", 8),
}
_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")  # DNS label, short enough for the pod hostnames
_TOPOLOGY = re.compile(r"^\d+(x\d+){1,2}$")


def _workdir_mount(workdir: str, pvc: str | None) -> tuple[str, dict, dict]:
    """(path the pods see, volume, volumeMount) for a gs:// or a PVC-backed workdir."""
    if workdir.startswith("gs://"):
        bucket, _, rest = workdir[len("gs://"):].partition("/")
        if not bucket:
            raise ValueError(f"--workdir {workdir!r}: expected gs://BUCKET/PATH")
        mount = f"{GCS_MOUNT_ROOT}/{bucket}"
        attributes = {"bucketName": bucket, "mountOptions": "implicit-dirs"}
        volume = {"name": "workdir", "csi": {"driver": "gcsfuse.csi.storage.gke.io", "volumeAttributes": attributes}}
        return f"{mount}/{rest}".rstrip("/"), volume, {"name": "workdir", "mountPath": mount}
    if not workdir.startswith("/"):
        raise ValueError(f"--workdir {workdir!r}: expected gs://BUCKET/PATH or an absolute path such as /mnt/runs/x")
    if not pvc:
        raise ValueError(f"--workdir {workdir}: a path workdir needs --pvc CLAIM (a ReadWriteMany "
                         "PersistentVolumeClaim, e.g. Filestore) so that every pod sees the same files")
    volume = {"name": "workdir", "persistentVolumeClaim": {"claimName": pvc}}
    return workdir, volume, {"name": "workdir", "mountPath": workdir}


def build_jobset(ecomax_args: Sequence[str], *, name: str, image: str, nodes: int, accelerator: str,
                 topology: str | None = None, chips_per_node: int | None = None, workdir: str | None = None,
                 pvc: str | None = None, service_account: str | None = None, max_restarts: int = 0,
                 allocator: str = "auto") -> dict:
    """The JobSet as a plain dict (dump it as YAML or JSON)."""
    if not _NAME.match(name):
        raise ValueError(f"--name {name!r}: lowercase letters, digits and '-', starting with a letter, "
                         "at most 40 characters")
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    resource, selector_key, selector_value, default_chips = ACCELERATORS[accelerator]
    is_tpu = resource == "google.com/tpu"
    node_selector = {selector_key: selector_value}
    if is_tpu:
        if not topology or not _TOPOLOGY.match(topology):
            raise ValueError(f"--accelerator {accelerator} needs --topology like 2x4 or 2x2x2, got {topology!r}")
        chips_total = math.prod(int(d) for d in topology.split("x"))
        if chips_per_node is None:
            chips_per_node = chips_total // nodes if chips_total % nodes == 0 else default_chips
        if chips_per_node * nodes != chips_total:
            raise ValueError(f"--topology {topology} has {chips_total} chips, but --nodes {nodes} x "
                             f"--chips-per-node {chips_per_node} = {nodes * chips_per_node}")
        node_selector["cloud.google.com/gke-tpu-topology"] = topology
    elif topology:
        raise ValueError(f"--topology is for TPU accelerators, not {accelerator}")
    chips_per_node = chips_per_node or default_chips

    args = list(ecomax_args)
    pod_annotations: dict[str, str] = {}
    volumes, mounts = [], []
    if workdir:
        if "--workdir" in args or any(a.startswith("--workdir=") for a in args):
            raise ValueError("give --workdir once: to `ecomax launch gke` (it mounts it) or to the ecomax command")
        pod_workdir, volume, mount = _workdir_mount(workdir, pvc)
        args += ["--workdir", pod_workdir]
        volumes.append(volume)
        mounts.append(mount)
        if "csi" in volume:
            pod_annotations["gke-gcsfuse/volumes"] = "true"

    env = [
        {"name": "JAX_COORDINATOR_ADDRESS", "value": f"{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}"},
        {"name": "JAX_NUM_PROCESSES", "value": str(nodes)},
        {"name": "JAX_PROCESS_ID", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": ENV_SWITCH, "value": allocator},
    ]
    container = {
        "name": "ecomax",
        "image": image,
        "command": ["ecomax", *args],
        "env": env,
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"requests": {resource: chips_per_node}, "limits": {resource: chips_per_node}},
    }
    if mounts:
        container["volumeMounts"] = mounts
    pod_spec: dict = {"restartPolicy": "Never", "nodeSelector": node_selector, "containers": [container]}
    if volumes:
        pod_spec["volumes"] = volumes
    if service_account:
        pod_spec["serviceAccountName"] = service_account
    pod_template = {"metadata": {"annotations": pod_annotations}, "spec": pod_spec} if pod_annotations else {
        "spec": pod_spec}

    metadata: dict = {"name": name, "labels": {"app": "ecomax"}}
    if is_tpu:  # one TPU slice per node pool
        metadata["annotations"] = {"alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"}
    return {
        "apiVersion": API_VERSION,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": {"maxRestarts": max_restarts},
            "network": {"enableDNSHostnames": True, "subdomain": name},
            "replicatedJobs": [{
                "name": REPLICATED_JOB,
                "replicas": 1,
                "template": {"spec": {
                    "parallelism": nodes,
                    "completions": nodes,
                    "completionMode": "Indexed",
                    "backoffLimit": 0,
                    "template": pod_template,
                }},
            }],
        },
    }


def dump_manifest(manifest: dict) -> str:
    """YAML when PyYAML is installed, else JSON (kubectl reads both)."""
    try:
        import yaml
    except ImportError:
        return json.dumps(manifest, indent=2) + "\n"
    return yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False)


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help="write a Kubernetes JobSet manifest (GKE TPU or GPU)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="JobSet name (DNS label, <= 40 characters)")
    parser.add_argument("--image", required=True, help="container image with ecomax installed")
    parser.add_argument("--nodes", type=int, required=True, help="pods = hosts = JAX processes")
    parser.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS))
    parser.add_argument("--topology", help="TPU slice topology, e.g. 2x4 (v5e/v6e) or 2x2x2 (v4/v5p)")
    parser.add_argument("--chips-per-node", type=int,
                        help="TPU chips or GPUs per pod (default: topology chips / nodes for TPU, 8 for GPU)")
    parser.add_argument("--workdir", help="gs://BUCKET/PATH (Cloud Storage FUSE) or /mnt/... (with --pvc)")
    parser.add_argument("--pvc", help="PersistentVolumeClaim that holds a path --workdir")
    parser.add_argument("--service-account", help="Kubernetes service account of the pods (bucket access)")
    parser.add_argument("--max-restarts", type=int, default=0, help="JobSet restarts after a failure (default: 0)")
    parser.add_argument("--out", type=Path, help="write the manifest here (default: print it)")
    add_command_argument(parser)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        manifest = build_jobset(
            command_args(args), name=args.name, image=args.image, nodes=args.nodes, accelerator=args.accelerator,
            topology=args.topology, chips_per_node=args.chips_per_node, workdir=args.workdir, pvc=args.pvc,
            service_account=args.service_account, max_restarts=args.max_restarts, allocator=allocator_switch())
    except ValueError as e:
        print(f"ecomax launch gke: {e}", file=sys.stderr)
        return 2
    text = dump_manifest(manifest)
    if args.out is None:
        sys.stdout.write(text)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}; start it with: kubectl apply -f {args.out}")
    return 0

"""torchx components for recsys_mtl.

Run from the repository root (the venv's ``bin`` must be on PATH: torchx starts ``torchrun``)::

    torchx run -s local_cwd launch/components.py:train --nnodes 1 --nproc_per_node 2 \\
        -- --data data/synth_recsys --model stem --output-dir runs/stem

The same component runs on Slurm (``-s slurm``) and Kubernetes (``-s kubernetes`` with
``--image``); see the README's "Launching on a cluster". Every rank runs ``recsys-mtl train``,
which joins the process group torchrun created.

Fault tolerance: pass ``--checkpoint-dir`` (on storage every node sees) to ``recsys-mtl train``;
``--max_restarts N`` lets torchrun restart the ranks in place after a failure (they resume from
the newest checkpoint), ``--max_retries N`` lets the scheduler resubmit the whole job (Slurm
requeue, Volcano ``maxRetry`` on Kubernetes), which resumes the same way.

Annotations use ``typing.Optional``/``Dict``/``List``: torchx's component linter reads them
from the source and does not understand ``X | None``.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist


def train(
    *train_args: str,
    nnodes: int = 1,
    nproc_per_node: int = 2,
    image: str = ".",
    name: str = "recsys-mtl-train",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    max_retries: int = 0,
    max_restarts: int = 0,
    rdzv_port: int = 29500,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distributed ``recsys-mtl train`` on ``nnodes x nproc_per_node`` ranks.

    Args:
        train_args: arguments of ``recsys-mtl train`` (``--data``, ``--model``, ``--output-dir``, ...).
        nnodes: number of hosts.
        nproc_per_node: ranks per host (one per GPU on GPU hosts).
        image: working directory (local_cwd / slurm) or container image (kubernetes).
        name: job name.
        cpu: CPUs per host (kubernetes / slurm resources).
        gpu: GPUs per host (nccl is used automatically when CUDA is visible).
        memMB: memory per host in MB.
        h: a named torchx hardware resource instead of cpu/gpu/memMB.
        max_retries: scheduler-level retries of the whole job (Slurm requeue, Kubernetes maxRetry).
        max_restarts: torchrun restarts of the ranks in place after a rank fails.
        rdzv_port: rendezvous port on the first host (distinct per concurrent job on one host).
        env: extra environment variables.
        mounts: kubernetes/docker mounts, e.g. ``type=bind,src=/data,dst=/data``.
    """
    env = dict(env or {})
    env["PET_MAX_RESTARTS"] = str(max_restarts)  # torchrun's --max-restarts
    # A fresh rendezvous store per restart: with the shared one, restarted ranks can read the
    # previous attempt's gloo addresses and fail to connect.
    env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    # One OpenMP thread per rank unless the caller says otherwise: what torchrun would pick anyway,
    # set here so it does not print its multi-line notice about choosing it.
    env.setdefault("OMP_NUM_THREADS", "1")
    app = dist.ddp(
        "train",
        *train_args,
        m="recsys_mtl.cli",
        image=image,
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=mounts,
    )
    app.roles[0].name = "trainer"  # slurm job / kubernetes task name (default: the module name "cli")
    return app
